"""Z-Image: single-stream attention over [image ; caption] rows given as lists, padded with a bool key
mask; CFG in one call with the conditional rows first; the pipelines negate the prediction."""
import pytest
import torch

import dit_attn as da
from dit_attn import processors
from dit_attn.families import family_of
from dit_attn.processors.state import EditState
from dit_attn.toy.z_image import build_z_image_pipeline

from .conftest import SIZE, CallRecorder, PerturbSDPA

HEADS = [1, 3]
LONG = " ".join(["a blurry dark blue square"] * 8)  # past 32 caption tokens: the rows of a call get padded


@pytest.fixture(scope="module")
def z_pipe():
    pipe = build_z_image_pipeline(num_layers=3, num_refiner_layers=1, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_call(pipe, prompt="a red circle", steps=2, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, guidance_scale=0.0, max_sequence_length=64, output_type="latent", **SIZE)
    args.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).images


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        z_call(pipe, **kwargs)
    return rec


def rows_of(call, rows):
    return {k: ([v[i] for i in rows] if k in ("x", "cap_feats") else v[rows] if k == "t" else v) for k, v in call.items()}


def run(transformer, call, rows=None) -> list:
    kwargs = dict(call if rows is None else rows_of(call, rows))
    kwargs["return_dict"] = False
    with torch.no_grad():
        return transformer(**kwargs)[0]


def pipeline_prediction(out: list) -> torch.Tensor:
    """What the pipeline hands the scheduler without CFG: the stacked output, negated."""
    return -torch.stack([o.float() for o in out]).squeeze(2)


def is_padded(call) -> bool:
    return len({-(-c.shape[0] // 32) for c in call["cap_feats"]}) > 1


def test_processors_bit_exact_under_the_mask(z_pipe):
    calls = recorded(z_pipe, guidance_scale=3.0, negative_prompt=LONG).calls
    assert all(is_padded(c) for c in calls)
    stock = [run(z_pipe.transformer, c) for c in calls]
    originals = processors.install(z_pipe.transformer, EditState())
    try:
        assert len(originals) == 3  # the main blocks only
        assert type(z_pipe.transformer.noise_refiner[0].attention.processor).__name__ == "ZSingleStreamAttnProcessor"
        assert type(z_pipe.transformer.layers[0].attention.processor).__name__ == "ZImageAttnProcessor"
        mine = [run(z_pipe.transformer, c) for c in calls]
    finally:
        processors.restore(z_pipe.transformer, originals)
    assert all(z_pipe.transformer.layers[i].attention.processor is p for i, p in enumerate(originals.values()))
    diffs = [(a - b).abs().max().item() for s, m in zip(stock, mine) for a, b in zip(s, m)]
    assert max(diffs) == 0.0


def test_softpag_u0_is_stock_and_layers_are_numbered(z_pipe):
    kwargs = dict(guidance_scale=3.0, negative_prompt=LONG)
    stock = z_call(z_pipe, **kwargs)
    with da.apply(z_pipe, da.SoftPAG(["L0", "L2"], u=0.0)):
        assert torch.equal(z_call(z_pipe, **kwargs), stock)
    layer_map = da.layers(z_pipe)
    assert [(info.index, info.name) for info in layer_map] == [(i, f"layers.{i}.attention") for i in range(3)]
    assert all(info.heads == 4 and info.head_dim == 8 for info in layer_map)


class ImageScopeIdentitySDPA(PerturbSDPA):
    """Independent SoftPAG identity at u = 1 with scope "image" in one module: the selected heads' image queries
    see their own key and every key outside the image range (caption, padding under the rows' mask)."""

    def __init__(self, module, heads, image_tokens):
        super().__init__(module, heads, "identity")
        self.image_tokens = image_tokens

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.scaled_dot_product_attention and self.inside:
            q, k, v, mask = kwargs["query"], kwargs["key"], kwargs["value"], kwargs.get("attn_mask")
            seq, n = q.shape[2], self.image_tokens
            index = torch.arange(seq)
            allowed = (index[:, None] >= n) | (index[None, :] >= n) | (index[:, None] == index[None, :])
            keep = allowed if mask is None else mask & allowed
            out = out.clone()
            out[:, self.heads] = func(q[:, self.heads], k[:, self.heads], v[:, self.heads], attn_mask=keep)
        return out


@pytest.mark.parametrize("layer,target,scope", [(1, "identity", "joint"), (2, "uniform", "joint"), (0, "uniform", "joint"),
                                                (1, "identity", "image")])
def test_softpag_equals_an_sdpa_perturbation_inside_the_module(z_pipe, layer, target, scope):
    call = recorded(z_pipe, guidance_scale=3.0, negative_prompt=LONG).calls[0]
    assert is_padded(call)
    module = z_pipe.transformer.layers[layer].attention
    mode = ImageScopeIdentitySDPA(module, HEADS, 64) if scope == "image" else PerturbSDPA(module, HEADS, target)
    with mode:
        want = torch.stack(run(z_pipe.transformer, call))
    with da.apply(z_pipe.transformer, da.SoftPAG([(layer, h) for h in HEADS], u=1.0, target=target, scope=scope)):
        got = torch.stack(run(z_pipe.transformer, call))
    assert (got - want).abs().max() < 1e-5
    assert (got - torch.stack(run(z_pipe.transformer, call))).abs().max() > 1e-4


def explicit_steps(pipe, calls, layer, scale, cfg, images):
    """Per step: the pipeline's own prediction from the stock call, plus s·(ε̂_c − ε̂_p) in its negated space,
    ε_p from the SDPA-perturbing reference on the conditional rows."""
    want = []
    for call in calls:
        out = run(pipe.transformer, call)
        with_cfg = len(out) == 2 * images
        cond = list(range(images))
        if with_cfg:
            pos, neg = torch.stack([o.float() for o in out[:images]]), torch.stack([o.float() for o in out[images:]])
            base = -(pos + cfg * (pos - neg)).squeeze(2)
        else:
            base = pipeline_prediction(out)
        eps_c = pipeline_prediction([out[i] for i in cond])
        with PerturbSDPA(pipe.transformer.layers[layer].attention, HEADS):
            eps_p = pipeline_prediction(run(pipe.transformer, call, cond))
        assert (eps_c - eps_p).abs().max() > 1e-4
        want.append((base + scale * (eps_c - eps_p), with_cfg))
    return want


@pytest.mark.parametrize("cfg,images,truncation", [(0.0, 1, 1.0), (3.0, 1, 1.0), (3.0, 2, 1.0), (3.0, 1, 0.5)])
def test_guided_step_equals_the_explicit_computation(z_pipe, cfg, images, truncation):
    layer, scale = 1, 2.0
    edit = da.HeadGuidance(heads=[(layer, h) for h in HEADS], scale=scale, u=1.0)
    kwargs = dict(guidance_scale=cfg, negative_prompt=LONG if cfg else None, num_images_per_prompt=images,
                  cfg_truncation=truncation, steps=3)
    with CallRecorder(z_pipe) as rec, da.apply(z_pipe, edit):
        z_call(z_pipe, **kwargs)
    assert len(rec.calls) == len(rec.steps) == 3
    want = explicit_steps(z_pipe, rec.calls, layer, scale, cfg, images)
    with_cfg = [w[1] for w in want]
    if truncation == 1.0:
        assert with_cfg == [cfg > 0] * 3
    else:  # cfg_truncation drops the negative rows from the late steps
        assert any(with_cfg) and not all(with_cfg)
    for eps, (expected, _) in zip(rec.steps, want, strict=True):
        assert eps.shape[0] == images
        assert (eps - expected).abs().max() < 1e-5


def test_calls_per_step_and_remove(z_pipe):
    kwargs = dict(guidance_scale=3.0, negative_prompt=LONG)
    stock_rec = recorded(z_pipe, **kwargs)
    stock = z_call(z_pipe, **kwargs)
    originals = [block.attention.processor for block in z_pipe.transformer.layers]
    handle = da.apply(z_pipe, da.HeadGuidance(heads=["L1H0", "L2"], scale=1.5))
    seen = []
    hook = z_pipe.transformer.layers[0].register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[0]), with_kwargs=True)
    try:
        with CallRecorder(z_pipe) as rec:
            guided = z_call(z_pipe, **kwargs)
    finally:
        hook.remove()
    handle.remove()
    assert len(rec.calls) == len(stock_rec.calls) == 2
    assert set(seen) == {3}  # [cond ; negative] and the perturbed copy, from the call on
    assert (guided - stock).abs().max() > 1e-4
    assert all(block.attention.processor is p for block, p in zip(z_pipe.transformer.layers, originals))
    assert torch.equal(z_call(z_pipe, **kwargs), stock)


def test_local_attention_under_the_mask(z_pipe):
    kwargs = dict(guidance_scale=3.0, negative_prompt=LONG)
    out = {}
    for backend in ("tiled", "reference"):
        with da.apply(z_pipe, da.LocalAttention(radius=2.0, layers=[1, 2], backend=backend)):
            out[backend] = z_call(z_pipe, **kwargs)
    stock = z_call(z_pipe, **kwargs)
    assert (out["tiled"] - out["reference"]).abs().max() < 1e-4
    assert (out["tiled"] - stock).abs().max() > 1e-4
    with da.apply(z_pipe, da.LocalAttention(radius=100.0, layers=[1, 2], backend="tiled")):
        assert torch.equal(z_call(z_pipe, **kwargs), stock)  # a circle covering the grid is stock attention


def test_grid(z_pipe):
    family = family_of(z_pipe.transformer)
    call = recorded(z_pipe, steps=1).calls[0]
    assert family.grid(z_pipe.transformer, call) == ((8, 8), "")
    assert family.image_length(call) == 64
    assert family.max_token_side(z_pipe.transformer) == 32  # axes_lens (256, 32, 32)
    omni = dict(call, x=[[x] for x in call["x"]])
    assert family.grid(z_pipe.transformer, omni)[0] is None and family.image_length(omni) is None


def test_training_prediction_equals_the_pipeline_step(z_pipe):
    family = family_of(z_pipe.transformer)
    rec = recorded(z_pipe, steps=2)
    call = rec.calls[0]
    embeds, mask = family.encode_prompts(z_pipe, ["a red circle"], 64)
    assert torch.equal(embeds[0, : int(mask.sum())], call["cap_feats"][0])
    x_t = torch.stack(call["x"]).squeeze(2)
    with torch.no_grad():
        got = family.predict(z_pipe.transformer, x_t, embeds, mask, 1 - call["t"], (16, 16))
    assert (got - rec.steps[0]).abs().max() < 1e-6


def test_img2img_pipeline_is_guided(z_pipe):
    from diffusers import ZImageImg2ImgPipeline
    from PIL import Image

    pipe = ZImageImg2ImgPipeline(**z_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    go = lambda: pipe("a red circle", image=image, strength=0.8, num_inference_steps=3, guidance_scale=3.0,  # noqa: E731
                      negative_prompt="blue", max_sequence_length=16, output_type="latent", **SIZE,
                      generator=torch.Generator().manual_seed(0)).images
    with CallRecorder(pipe) as rec:
        stock = go()
    layer, scale = 1, 2.0
    with CallRecorder(pipe) as guided, da.apply(pipe, da.HeadGuidance(heads=[(layer, h) for h in HEADS], scale=scale)):
        out = go()
    assert len(guided.calls) == len(rec.calls) and (out - stock).abs().max() > 1e-4
    for eps, (expected, _) in zip(guided.steps, explicit_steps(pipe, guided.calls, layer, scale, 3.0, 1), strict=True):
        assert (eps - expected).abs().max() < 1e-5
