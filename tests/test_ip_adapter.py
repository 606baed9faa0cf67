"""IP-Adapters with dit-attn on FLUX.1 and SD3 / SD3.5, loaded before or after `apply` (issue 24).

The IP-Adapters are config-built: the image projection and the per-layer image-prompt projections
are random modules of diffusers' own classes, written in the checkpoint's key layout and loaded by
diffusers' `_load_ip_adapter_weights`. References are stock runs of the IP-Adapter model, with
a TorchFunctionMode perturbing the layer's joint attention for an edited layer.
"""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, IPAdapterTimeImageProjection
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

import dit_attn as da
from dit_attn.processors.state import LayerProcessor
from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

from .conftest import PerturbSDPA, flux_attention_module

IMAGE_EMBED_DIM = 12


class PerturbJointSDPA(PerturbSDPA):
    """PerturbSDPA on the module's first SDPA call only: the joint attention, not the IP-Adapter's."""

    def _set(self, value):
        self.inside, self.done = value, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and self.inside and not self.done:
            self.done = True
            return super().__torch_function__(func, types, args, kwargs)
        return func(*args, **(kwargs or {}))


def flux_ip_state_dict(transformer, seed=0):
    torch.manual_seed(seed)
    config = transformer.config
    projection = ImageProjection(cross_attention_dim=config.joint_attention_dim, image_embed_dim=IMAGE_EMBED_DIM,
                                 num_image_text_embeds=4)
    image_proj = {key.replace("image_embeds", "proj"): value for key, value in projection.state_dict().items()}
    ip_adapter = {}
    for i in range(len(transformer.transformer_blocks)):
        layer = FluxIPAdapterAttnProcessor(transformer.inner_dim, config.joint_attention_dim, num_tokens=(4,))
        for key, value in layer.state_dict().items():
            ip_adapter[f"{i}.{key.replace('.0.', '.')}"] = value * 4  # strong enough to show
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


_SD3_PROJECTION_KEYS = [("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_kv", "0.to_kv"),
                        ("attn.to_out.0", "0.to_out"), ("adaln_norm", "1.0"), ("ff.net.0.proj", "1.1"),
                        ("ff.net.2", "1.3"), ("adaln_proj", "2.1")]


def sd3_ip_state_dict(transformer, seed=0):
    torch.manual_seed(seed)
    config = transformer.config
    inner = config.attention_head_dim * config.num_attention_heads
    projection = IPAdapterTimeImageProjection(embed_dim=IMAGE_EMBED_DIM, output_dim=inner, hidden_dim=64, heads=1,
                                              num_queries=4, timestep_in_dim=32)
    image_proj = {}
    for key, value in projection.state_dict().items():
        if key.startswith("layers."):
            index = key.split(".")[1]
            for new, old in _SD3_PROJECTION_KEYS:  # diffusers' checkpoint names (its loader renames them back)
                key = key.replace(f"layers.{index}.{new}", f"layers.{index}.{old}")
        image_proj[key] = value
    ip_adapter = {}
    for i in range(len(transformer.attn_processors)):
        layer = SD3IPAdapterJointAttnProcessor2_0(inner, inner, config.attention_head_dim, timesteps_emb_dim=64)
        for p in layer.parameters():
            p.data.normal_(0, 0.3)
        ip_adapter.update({f"{i}.{key}": value for key, value in layer.state_dict().items()})
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def flux_call(transformer, rows=2, seed=0):
    config = transformer.config
    g = torch.Generator().manual_seed(seed)
    call = dict(hidden_states=torch.randn(rows, 16, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(rows, 6, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(rows, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7, 0.4][:rows]), img_ids=torch.stack(torch.meshgrid(
                    torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3),
                txt_ids=torch.zeros(6, 3))
    if config.guidance_embeds:
        call["guidance"] = torch.full((rows,), 3.5)
    return call, [torch.randn(rows, 1, IMAGE_EMBED_DIM, generator=g)]


def sd3_call(transformer, rows=2, seed=0):
    config = transformer.config
    g = torch.Generator().manual_seed(seed)
    call = dict(hidden_states=torch.randn(rows, config.in_channels, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(rows, 5, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(rows, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([500.0, 300.0][:rows]))
    return call, torch.randn(rows, 3, IMAGE_EMBED_DIM, generator=g)


FAMILIES = {
    "flux": (lambda: build_flux_pipeline(num_layers=2, num_single_layers=1, num_heads=2, head_dim=16),
             flux_ip_state_dict, flux_call, lambda pipe, layer: flux_attention_module(pipe, layer)),
    "sd3": (lambda: build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8), sd3_ip_state_dict, sd3_call,
            lambda pipe, layer: pipe.transformer.transformer_blocks[layer].attn),
    "sd3.5": (lambda: build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8, qk_norm="rms_norm"),
              sd3_ip_state_dict, sd3_call, lambda pipe, layer: pipe.transformer.transformer_blocks[layer].attn),
}


def run(transformer, call, image_embeds=None, perturb=None):
    kwargs = dict(call, return_dict=False)
    if image_embeds is not None:
        kwargs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": image_embeds}
    with torch.no_grad():
        if perturb is None:
            return transformer(**kwargs)[0]
        with PerturbJointSDPA(*perturb):
            return transformer(**kwargs)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ip_adapter_in_both_orders_equals_stock(family):
    build, state_dict_of, call_of, module_of = FAMILIES[family]
    pipe = build()
    transformer = pipe.transformer
    call, image_embeds = call_of(transformer)
    ip_weights = state_dict_of(transformer)
    plain = run(transformer, call)
    edit, edited_heads = da.SoftPAG(["L1H1"], u=1.0), (module_of(pipe, 1), [1])

    transformer._load_ip_adapter_weights(ip_weights, low_cpu_mem_usage=False)
    stock_keys = set(transformer.state_dict())
    stock = run(transformer, call, image_embeds)
    perturbed = run(transformer, call, image_embeds, perturb=edited_heads)
    assert (stock - plain).abs().max() > 1e-3  # the image prompt acts
    assert (perturbed - stock).abs().max() > 1e-3

    # load, then apply: untouched layers bit-exact, the edited layer as the independent perturbation
    with da.apply(transformer, da.SoftPAG(["L0", "L1"], u=0.0)):
        assert torch.equal(run(transformer, call, image_embeds), stock)
        assert set(transformer.state_dict()) == stock_keys  # the checkpoint keys stay diffusers'
    with da.apply(transformer, edit):
        assert (run(transformer, call, image_embeds) - perturbed).abs().max() < 1e-5
    assert torch.equal(run(transformer, call, image_embeds), stock)
    assert not any(isinstance(p, LayerProcessor) for p in transformer.attn_processors.values())  # diffusers' own back

    pipe.unload_ip_adapter()
    assert torch.equal(run(transformer, call), plain)

    # apply, then load and unload: the next call carries the image prompt, then goes back to the edit alone
    with da.apply(transformer, edit):
        alone = run(transformer, call)
        transformer._load_ip_adapter_weights(ip_weights, low_cpu_mem_usage=False)
        assert (run(transformer, call, image_embeds) - perturbed).abs().max() < 1e-5
        assert set(transformer.state_dict()) == stock_keys
        pipe.set_ip_adapter_scale(0.0 if family == "flux" else 0)  # diffusers' own setting reaches the branch
        assert (run(transformer, call, image_embeds) - alone).abs().max() < 1e-5
        pipe.set_ip_adapter_scale(1.0 if family == "flux" else 0.5)
        pipe.unload_ip_adapter()
        assert torch.equal(run(transformer, call), alone)
        transformer._load_ip_adapter_weights(ip_weights, low_cpu_mem_usage=False)
        run(transformer, call, image_embeds)
    # remove() leaves the IP-Adapter of the last load, stock
    assert torch.equal(run(transformer, call, image_embeds), stock)
    assert (alone - plain).abs().max() > 1e-3


def test_other_processor_swaps_after_apply_still_raise():
    pipe = FAMILIES["flux"][0]()
    transformer = pipe.transformer
    call, _ = flux_call(transformer)
    with da.apply(transformer, da.SoftPAG(["L1H1"], u=1.0)):
        transformer.set_attn_processor({key: type(p)() for key, p in transformer.attn_processors.items()})
        with pytest.raises(RuntimeError, match="processors were replaced after dit-attn's apply"):
            run(transformer, call)


def _rows(value, rows):
    if isinstance(value, list):
        return [_rows(v, rows) for v in value]
    return value[rows] if isinstance(value, torch.Tensor) and value.ndim > 0 else value


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_head_guidance_with_an_image_prompt_equals_stock_passes(family):
    """Pipelines with an IP-Adapter image prompt: each guided ε = ε (SD3: with CFG) + s·(ε_c − ε_p), ε_p the
    conditional rows (with their image prompt) through the stock IP-Adapter model under the perturbation."""
    build, state_dict_of, _, module_of = FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    transformer._load_ip_adapter_weights(state_dict_of(transformer), low_cpu_mem_usage=False)
    calls, steps = [], []

    def record(module, args, kwargs):
        attention = dict(kwargs["joint_attention_kwargs"])
        calls.append({**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                      "joint_attention_kwargs": attention})

    hook = transformer.register_forward_pre_hook(record, with_kwargs=True)
    original_step = pipe.scheduler.step
    pipe.scheduler.step = lambda eps, *a, **k: (steps.append(eps.clone()), original_step(eps, *a, **k))[1]
    g = torch.Generator().manual_seed(3)
    if family == "sd3":
        cfg, image_prompt = 4.0, dict(ip_adapter_image_embeds=torch.randn(2, 3, IMAGE_EMBED_DIM, generator=g))
    else:
        cfg, image_prompt = None, dict(ip_adapter_image_embeds=[torch.randn(1, 1, IMAGE_EMBED_DIM, generator=g)],
                                       negative_ip_adapter_image_embeds=[torch.zeros(1, 1, IMAGE_EMBED_DIM)])
    edit = da.HeadGuidance(["L1H0"], scale=2.0, u=1.0)
    try:
        with da.apply(pipe, edit):
            pipe("a red circle", num_inference_steps=2, guidance_scale=cfg or 3.5, max_sequence_length=8, height=32,
                 width=32, output_type="latent", generator=torch.Generator().manual_seed(0), **image_prompt)
    finally:
        hook.remove()
        del pipe.scheduler.step
    assert len(calls) == len(steps) == 2
    cond_rows = slice(1, 2) if cfg else slice(0, 1)
    for call, eps in zip(calls, steps):
        with torch.no_grad():
            both = transformer(**{**call, "joint_attention_kwargs": dict(call["joint_attention_kwargs"])})[0]
            cond = {k: v if k in ("img_ids", "txt_ids") else _rows(v, cond_rows)
                    for k, v in call.items() if k != "joint_attention_kwargs"}
            cond["joint_attention_kwargs"] = {k: _rows(v, cond_rows) for k, v in call["joint_attention_kwargs"].items()}
            with PerturbJointSDPA(module_of(pipe, 1), [0]):
                eps_p = transformer(**cond)[0]
        eps_c = both[cond_rows]
        base = both[:1] + cfg * (eps_c - both[:1]) if cfg else eps_c
        assert (eps - (base + edit.scale * (eps_c - eps_p))).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_patch_rows_carry_the_image_prompt(family):
    """TextPatch's source rows get their target rows' image prompt: patching with the prompt itself is the
    stock IP-Adapter generation, and another source prompt changes it."""
    build, state_dict_of, _, _ = FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer._load_ip_adapter_weights(state_dict_of(pipe.transformer), low_cpu_mem_usage=False)
    g = torch.Generator().manual_seed(5)
    if family == "sd3":
        image_prompt = dict(ip_adapter_image_embeds=torch.randn(2, 3, IMAGE_EMBED_DIM, generator=g), guidance_scale=4.0)
    else:
        image_prompt = dict(ip_adapter_image_embeds=[torch.randn(1, 1, IMAGE_EMBED_DIM, generator=g)],
                            negative_ip_adapter_image_embeds=[torch.zeros(1, 1, IMAGE_EMBED_DIM)], guidance_scale=3.5)

    def generate(**kwargs):
        return pipe("a red circle", num_inference_steps=3, max_sequence_length=8, height=32, width=32,
                    output_type="latent", generator=torch.Generator().manual_seed(0), **image_prompt, **kwargs).images

    stock = generate()
    with da.apply(pipe, da.TextPatch(layers=(0, 1), source_prompt="a red circle")):
        assert (generate() - stock).abs().max() < 1e-5
    with da.apply(pipe, da.TextPatch(layers=(0, 1), source_prompt="a blue square")):
        assert (generate() - stock).abs().max() > 1e-4


class MaskedJointSDPA(PerturbJointSDPA):
    """The module's first SDPA call (its joint attention) with a keep-mask; the IP-Adapter's call stock."""

    def __init__(self, module, mask):
        super().__init__(module, [])
        self.mask = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and self.inside and not self.done:
            self.done = True
            return func(*args, **{**(kwargs or {}), "attn_mask": self.mask})
        return func(*args, **(kwargs or {}))


def test_local_attention_on_an_ip_adapter_layer():
    pipe = FAMILIES["flux"][0]()
    transformer = pipe.transformer
    call, image_embeds = flux_call(transformer)
    transformer._load_ip_adapter_weights(flux_ip_state_dict(transformer), low_cpu_mem_usage=False)
    text, ids = call["encoder_hidden_states"].shape[1], call["img_ids"]
    ys, xs = ids[:, 1], ids[:, 2]
    keep = torch.ones(text + len(ids), text + len(ids), dtype=torch.bool)
    keep[text:, text:] = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2 < 1.5**2
    with torch.no_grad(), MaskedJointSDPA(transformer.transformer_blocks[1].attn, keep):
        want = transformer(**call, joint_attention_kwargs={"ip_adapter_image_embeds": image_embeds}, return_dict=False)[0]
    assert (want - run(transformer, call, image_embeds)).abs().max() > 1e-3
    with da.apply(transformer, da.LocalAttention(radius=1.5, layers=[1], backend="tiled")):
        assert (run(transformer, call, image_embeds) - want).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fullgraph_compile_with_an_ip_adapter_equals_eager(family):
    build, state_dict_of, call_of, _ = FAMILIES[family]
    transformer = build().transformer
    call, image_embeds = call_of(transformer)
    transformer._load_ip_adapter_weights(state_dict_of(transformer), low_cpu_mem_usage=False)
    with da.apply(transformer, da.SoftPAG(["L1H1"], u=1.0)):
        eager = run(transformer, call, image_embeds)
        torch._dynamo.reset()
        transformer.compile(fullgraph=True, backend="aot_eager")
        try:
            got = run(transformer, call, image_embeds)
        finally:
            torch._dynamo.reset()
    assert (got - eager).abs().max() < 1e-5
