"""Qwen-Image: the processor reproduces diffusers exactly; edits against independent references
(a TorchFunctionMode on the stock model's SDPA, explicit CFG arithmetic, the reference kernel)."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageImg2ImgPipeline
from PIL import Image

import dit_attn as da
from dit_attn import processors
from dit_attn.families import family_of
from dit_attn.processors.state import EditState
from dit_attn.toy.qwen_image import build_qwen_image_pipeline

from .conftest import CallRecorder, replay

# "a red circle" and "a blue square" encode to the same length; "a cat" is one token shorter
EVEN = ["a red circle", "a blue square"]
PADDED = ["a red circle", "a cat"]


@pytest.fixture(scope="module")
def qwen_pipe():
    pipe = build_qwen_image_pipeline(num_layers=3, num_heads=4, head_dim=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def zero_cond_pipe():
    """A `zero_cond_t` transformer (temb runs as 2B rows) with text states passed in."""
    pipe = build_qwen_image_pipeline(num_layers=3, num_heads=4, head_dim=16, zero_cond_t=True, text_encoder=False, seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_call(pipe, prompt="a red circle", steps=3, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, true_cfg_scale=1.0, max_sequence_length=16, output_type="latent",
                height=32, width=32)
    args.update(kwargs)
    if prompt is not None:
        args["prompt"] = prompt
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


class SDPAToward:
    """Reference SoftPAG on the stock model: inside the chosen attention modules, the selected heads'
    SDPA output is blended toward V, (1 − u)·SDPA + u·V (joint identity target)."""

    def __init__(self, transformer, heads: dict[int, list[int]], u: float):
        self.blocks = transformer.transformer_blocks
        self.heads, self.u = heads, u
        self.current = None

    def __enter__(self):
        outer = self

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func is F.scaled_dot_product_attention and outer.current is not None:
                    value = kwargs["value"] if "value" in kwargs else args[2]
                    out = out.clone()
                    for h in outer.heads[outer.current]:
                        out[:, h] = (1 - outer.u) * out[:, h] + outer.u * value[:, h]
                return out

        self.hooks = []
        for layer in self.heads:
            attn = self.blocks[layer].attn
            self.hooks.append(attn.register_forward_pre_hook(lambda m, a, layer=layer: setattr(self, "current", layer)))
            self.hooks.append(attn.register_forward_hook(lambda m, a, o: setattr(self, "current", None)))
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for hook in self.hooks:
            hook.remove()


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        qwen_call(pipe, steps=2, **kwargs)
    return rec


def test_layers_numbering(qwen_pipe):
    layers = da.layers(qwen_pipe)
    assert [(l.index, l.name, l.kind, l.heads, l.head_dim) for l in layers] == [
        (i, f"transformer_blocks.{i}.attn", "double", 4, 16) for i in range(3)
    ]
    assert family_of(qwen_pipe.transformer).name == "qwen_image"


@pytest.mark.parametrize("fixture,kwargs", [
    ("qwen_pipe", dict(prompt=PADDED, negative_prompt=["blurry", "dark"], true_cfg_scale=3.0)),
    ("qwen_pipe", dict(prompt="a red circle")),
    ("zero_cond_pipe", dict(prompt=None, prompt_embeds=torch.randn(2, 6, 16))),
])
def test_processors_bit_exact(fixture, kwargs, request):
    pipe = request.getfixturevalue(fixture)
    calls = recorded(pipe, **kwargs).calls
    if "negative_prompt" in kwargs:  # the padded batch carries the joint mask
        assert calls[0]["encoder_hidden_states_mask"] is not None
    stock = [replay(pipe.transformer, c) for c in calls]
    originals = processors.install(pipe.transformer, EditState())
    try:
        assert type(pipe.transformer.transformer_blocks[0].attn.processor).__name__ == "QwenImageAttnProcessor"
        mine = [replay(pipe.transformer, c) for c in calls]
    finally:
        processors.restore(pipe.transformer, originals)
    assert all((a - b).abs().max() == 0.0 for a, b in zip(stock, mine))


def test_softpag_u0_bit_exact_in_pipeline(qwen_pipe):
    stock = qwen_call(qwen_pipe)
    with da.apply(qwen_pipe, da.SoftPAG(heads=["L1"], u=0.0)):
        assert torch.equal(qwen_call(qwen_pipe), stock)
    with da.apply(qwen_pipe, da.SoftPAG(heads=["L1H0"], u=1.0)):
        assert not torch.equal(qwen_call(qwen_pipe), stock)
    assert torch.equal(qwen_call(qwen_pipe), stock)


@pytest.mark.parametrize("u", [1.0, 0.4])
def test_softpag_equals_sdpa_reference(qwen_pipe, u):
    call = recorded(qwen_pipe, prompt=EVEN).calls[1]
    with SDPAToward(qwen_pipe.transformer, {1: [0, 2], 2: [3]}, u):
        want = replay(qwen_pipe.transformer, call)
    with da.apply(qwen_pipe.transformer, da.SoftPAG(heads=["L1H0", "L1H2", "L2H3"], u=u)):
        got = replay(qwen_pipe.transformer, call)
    assert (got - want).abs().max() < 1e-5
    assert (got - replay(qwen_pipe.transformer, call)).abs().max() > 1e-3


def explicit_step(pipe, cond_call, uncond_call, edit: da.HeadGuidance, heads: dict, true_cfg: float | None):
    """ε the scheduler should get: the pipeline's CFG with its norm rescale, then s·(ε_c − ε_p)."""
    eps_c = replay(pipe.transformer, cond_call)
    with SDPAToward(pipe.transformer, heads, edit.u):
        eps_p = replay(pipe.transformer, cond_call)
    base = eps_c
    if true_cfg:
        eps_u = replay(pipe.transformer, uncond_call)
        comb = eps_u + true_cfg * (eps_c - eps_u)
        base = comb * (eps_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    return base + edit.scale * (eps_c - eps_p)


@pytest.mark.parametrize("fixture,kwargs", [
    ("qwen_pipe", dict(prompt="a red circle")),
    ("qwen_pipe", dict(prompt="a red circle", negative_prompt="blurry", true_cfg_scale=3.0)),
    ("qwen_pipe", dict(prompt="a red circle", num_images_per_prompt=2)),
    ("qwen_pipe", dict(prompt=EVEN, negative_prompt=["blurry", "dark"], true_cfg_scale=2.5)),
    ("zero_cond_pipe", dict(prompt=None, prompt_embeds=torch.randn(2, 6, 16), negative_prompt_embeds=torch.randn(2, 5, 16),
                            true_cfg_scale=2.0)),
])
def test_guided_step_equals_explicit(fixture, kwargs, request):
    pipe = request.getfixturevalue(fixture)
    edit = da.HeadGuidance(heads=["L1H1", "L2H0", "L2H3"], scale=2.0, u=1.0)
    with CallRecorder(pipe) as stock:
        qwen_call(pipe, **kwargs)
    with CallRecorder(pipe) as rec, da.apply(pipe, edit):
        qwen_call(pipe, **kwargs)
    true_cfg = kwargs.get("true_cfg_scale")
    per_step = 2 if true_cfg else 1
    assert len(rec.calls) == len(stock.calls) == per_step * len(rec.steps) == 3 * per_step
    assert (rec.steps[0] - stock.steps[0]).abs().max() > 1e-3  # same input: the difference is the guidance term
    for step, eps in enumerate(rec.steps):
        cond, uncond = rec.calls[per_step * step], rec.calls[per_step * step + per_step - 1]
        want = explicit_step(pipe, cond, uncond, edit, {1: [1], 2: [0, 3]}, true_cfg)
        assert (eps - want).abs().max() < 1e-5


def test_shared_prefix_equals_unshared(qwen_pipe):
    results = []
    for share in (True, False):
        with da.apply(qwen_pipe, da.HeadGuidance(heads=["L2H0", "L2H3"], scale=3.0, u=0.7, share_prefix=share)):
            results.append(qwen_call(qwen_pipe, negative_prompt="blurry", true_cfg_scale=2.0))
    assert (results[0] - results[1]).abs().max() < 1e-5


def test_remove_restores_original_objects(qwen_pipe):
    transformer = qwen_pipe.transformer
    before = dict(transformer.attn_processors)
    handle = da.apply(qwen_pipe, da.HeadGuidance(heads=["L0H1"]))
    assert transformer.transformer_blocks[0].attn.processor is not before["transformer_blocks.0.attn.processor"]
    handle.remove()
    handle.remove()
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    assert "step" not in vars(qwen_pipe.scheduler)
    assert not transformer._diffusers_hook.hooks


def test_img2img_pipeline(qwen_pipe):
    pipe = QwenImageImg2ImgPipeline(**qwen_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())

    def run():
        return qwen_call(pipe, image=image, strength=0.75, steps=4)

    with CallRecorder(pipe) as rec:
        stock = run()
    with CallRecorder(pipe) as guided_rec, da.apply(pipe, da.HeadGuidance(heads=["L1"], scale=3.0, start=0.3)):
        guided = run()
    assert len(guided_rec.calls) == len(rec.calls) > 0
    assert not torch.allclose(stock, guided)
    assert torch.equal(run(), stock)
    outs = {}
    for backend in ("tiled", "reference"):  # local windows on the img2img calls too
        with da.apply(pipe, da.LocalAttention(radius=1.5, layers=(0, 2), backend=backend)):
            outs[backend] = run()
    assert (outs["tiled"] - outs["reference"]).abs().max() < 1e-4 and (outs["tiled"] - stock).abs().max() > 1e-4


@pytest.mark.parametrize("prompt", ["a red circle", PADDED])
def test_local_attention_equals_reference_backend(qwen_pipe, prompt):
    size = 64
    call = recorded(qwen_pipe, prompt=prompt, height=size, width=size).calls[0]
    assert call["hidden_states"].shape[1] == (size // 8) ** 2
    assert (call["encoder_hidden_states_mask"] is None) == isinstance(prompt, str)
    outs = {}
    for backend in ("auto", "reference"):
        with da.apply(qwen_pipe.transformer, da.LocalAttention(radius=2, layers=(0, 2), backend=backend)):
            outs[backend] = replay(qwen_pipe.transformer, call)
    assert (outs["auto"] - outs["reference"]).abs().max() < 1e-5
    assert (outs["auto"] - replay(qwen_pipe.transformer, call)).abs().max() > 1e-4


def test_text_patch_with_own_prompt_changes_nothing(qwen_pipe):
    stock = qwen_call(qwen_pipe, negative_prompt="blurry", true_cfg_scale=2.0)
    with da.apply(qwen_pipe, da.TextPatch(layers=[0, 1], source_prompt="a red circle")):
        same = qwen_call(qwen_pipe, negative_prompt="blurry", true_cfg_scale=2.0)
    with da.apply(qwen_pipe, da.TextPatch(layers=[0, 1], source_prompt="a cat")):  # shorter: padded, masked
        other = qwen_call(qwen_pipe, negative_prompt="blurry", true_cfg_scale=2.0)
    assert (same - stock).abs().max() < 1e-5
    assert (other - stock).abs().max() > 1e-3


def test_text_patch_source_padding_is_masked(qwen_pipe):
    """A padded source prompt gives the rows it patches the keys/values of a stock run of that prompt
    batched with a longer one: patching every layer equals running the source prompt, padded and masked."""
    family = family_of(qwen_pipe.transformer)
    embeds, mask = family.encode_prompts(qwen_pipe, ["a cat"], 8)
    assert mask.tolist() == [[1] * 7 + [0]]
    own, _ = family.encode_prompts(qwen_pipe, ["a red circle"], 8)
    call = recorded(qwen_pipe).calls[0]
    source_call = dict(call, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask.bool())
    want = replay(qwen_pipe.transformer, source_call)
    assert torch.equal(call["encoder_hidden_states"], own)
    ours = {}

    class Capture:
        def __call__(self, module, args, kwargs, output):
            ours.setdefault("eps", output[0].clone())

    hook = qwen_pipe.transformer.register_forward_hook(Capture(), with_kwargs=True)
    try:
        with da.apply(qwen_pipe, da.TextPatch(layers=[0, 1, 2], source_prompt="a cat")):
            qwen_call(qwen_pipe, steps=2)
    finally:
        hook.remove()
    # every layer's text keys/values are the source's, so the target row's image stream sees only them;
    # the text stream's own queries are the target's, but only image tokens reach the output
    assert (ours["eps"] - want).abs().max() < 1e-5


def test_softpag_with_padding_mask_equals_sdpa_reference(qwen_pipe):
    call = recorded(qwen_pipe, prompt=PADDED).calls[0]
    assert call["encoder_hidden_states_mask"] is not None
    with SDPAToward(qwen_pipe.transformer, {1: [0, 2]}, 1.0):
        want = replay(qwen_pipe.transformer, call)
    with da.apply(qwen_pipe.transformer, da.SoftPAG(heads=["L1H0", "L1H2"], u=1.0)):
        got = replay(qwen_pipe.transformer, call)
    assert (got - want).abs().max() < 1e-5


def test_guided_step_with_padded_prompts_equals_explicit(qwen_pipe):
    edit = da.HeadGuidance(heads=["L1H1"], scale=2.0, u=1.0)
    kwargs = dict(prompt=PADDED, negative_prompt=["blurry", "a dark cat"], true_cfg_scale=2.0)
    with CallRecorder(qwen_pipe) as rec, da.apply(qwen_pipe, edit):
        qwen_call(qwen_pipe, **kwargs)
    for step, eps in enumerate(rec.steps):
        want = explicit_step(qwen_pipe, rec.calls[2 * step], rec.calls[2 * step + 1], edit, {1: [1]}, 2.0)
        assert (eps - want).abs().max() < 1e-5


@pytest.fixture()
def edit_pipe(qwen_pipe, monkeypatch):
    """QwenImageEditPipeline on the tiny components, text states passed in; the pipeline's 1024² reference
    area is shrunk to 32² so that the reference image is 4×4 tokens."""
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

    original = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))
    parts = {k: v for k, v in qwen_pipe.components.items() if k not in ("text_encoder", "tokenizer")}
    pipe = QwenImageEditPipeline(**parts, text_encoder=None, tokenizer=None, processor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("true_cfg", [None, 2.0])
def test_edit_guided_step_on_generated_tokens_equals_explicit(edit_pipe, true_cfg):
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    texts = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt=None, image=image, prompt_embeds=texts[:1])
    if true_cfg:
        kwargs.update(negative_prompt_embeds=texts[1:], true_cfg_scale=true_cfg)
    edit = da.HeadGuidance(heads=["L1H1", "L2H0", "L2H3"], scale=2.0, u=1.0)
    with CallRecorder(edit_pipe) as rec, da.apply(edit_pipe, edit):
        qwen_call(edit_pipe, **kwargs)
    per_step = 2 if true_cfg else 1
    assert len(rec.calls) == per_step * len(rec.steps) == 3 * per_step
    assert rec.calls[0]["hidden_states"].shape[1] == 32  # 16 generated + 16 reference tokens
    generated = rec.steps[0].shape[1]
    for step, eps in enumerate(rec.steps):
        cond, uncond = rec.calls[per_step * step], rec.calls[per_step * step + per_step - 1]
        eps_c = replay(edit_pipe.transformer, cond)[:, :generated]
        with SDPAToward(edit_pipe.transformer, {1: [1], 2: [0, 3]}, 1.0):
            eps_p = replay(edit_pipe.transformer, cond)[:, :generated]
        base = eps_c
        if true_cfg:
            eps_u = replay(edit_pipe.transformer, uncond)[:, :generated]
            comb = eps_u + true_cfg * (eps_c - eps_u)
            base = comb * (eps_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        assert (eps - (base + edit.scale * (eps_c - eps_p))).abs().max() < 1e-5
        assert (eps - base).abs().max() > 1e-4


def test_edit_pipeline_encodes_prompts_with_the_image(edit_pipe):
    with pytest.raises(ValueError, match="reference image"):
        family_of(edit_pipe.transformer).encode_prompts(edit_pipe, ["a cat"], 8)


def test_predict_is_the_pipeline_call(qwen_pipe):
    """The training call: text mask from encode_prompts, timestep t, img_shapes from the latent size."""
    family = family_of(qwen_pipe.transformer)
    call = recorded(qwen_pipe, prompt=PADDED).calls[0]
    embeds, mask = family.encode_prompts(qwen_pipe, PADDED, 16)
    with torch.no_grad():
        got = family.predict(qwen_pipe.transformer, call["hidden_states"], embeds, mask, call["timestep"], (8, 8))
        unpadded = family.predict(qwen_pipe.transformer, call["hidden_states"], embeds[:, :8], mask[:, :8],
                                  call["timestep"], (8, 8))
    assert (got - replay(qwen_pipe.transformer, call)).abs().max() < 1e-5
    assert (got - unpadded).abs().max() < 1e-5  # padding to 16 tokens is masked


def test_text_guard_patches_quoted_words_only(qwen_pipe):
    quoted, plain = 'a sign that says "cat"', "a red circle"
    stock = {p: qwen_call(qwen_pipe, prompt=p, steps=2) for p in (quoted, plain)}
    with da.apply(qwen_pipe, da.TextGuard(blocklist=("cat",), replacement="dog", layers=(0, 1))):
        assert (qwen_call(qwen_pipe, prompt=quoted, steps=2) - stock[quoted]).abs().max() > 1e-3
        assert torch.equal(qwen_call(qwen_pipe, prompt=plain, steps=2), stock[plain])
