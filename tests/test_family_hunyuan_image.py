"""HunyuanImage 2.1: the processors reproduce diffusers exactly under the pipeline's text mask; edits against
independent references (PerturbSDPA on the stock model's SDPA, the pipeline guider's own combination, the
reference kernel); calls widened at the call."""
import pytest
import torch
from diffusers import AdaptiveProjectedMixGuidance

import dit_attn as da
from dit_attn import processors
from dit_attn.families import family_of
from dit_attn.processors.state import EditState
from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline

from .conftest import CallRecorder, PerturbSDPA, flux_attention_module, replay

HEADS = [1, 3]
PROMPTS = ["a red circle", "a blue square cat"]


@pytest.fixture(scope="module")
def hy_pipe():
    """Guider pipeline: CFG at steps 0–1, APG with momentum from step 2 (apg_start=1)."""
    pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8, apg_start=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def distilled_pipe():
    """Guidance-distilled: no guider, one call a step with a `guidance` input."""
    pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8,
                                        guidance_embeds=True, seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hy_call(pipe, prompt="a red circle", steps=2, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, output_type="latent", height=32, width=32)
    if pipe.transformer.config.guidance_embeds:
        args["distilled_guidance_scale"] = 3.25
    args.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).images


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        hy_call(pipe, **kwargs)
    return rec


def test_layers_numbering(hy_pipe):
    layers = da.layers(hy_pipe)
    assert [(l.index, l.name, l.kind, l.heads, l.head_dim) for l in layers] == [
        (0, "transformer_blocks.0.attn", "double", 4, 8), (1, "transformer_blocks.1.attn", "double", 4, 8),
        (2, "single_transformer_blocks.0.attn", "single", 4, 8), (3, "single_transformer_blocks.1.attn", "single", 4, 8),
    ]
    assert family_of(hy_pipe.transformer).name == "hunyuan_image"


@pytest.mark.parametrize("fixture,kwargs", [
    ("hy_pipe", dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"])),
    ("distilled_pipe", dict(prompt="a red circle", num_images_per_prompt=2)),
])
def test_processors_bit_exact_under_the_mask(fixture, kwargs, request):
    pipe = request.getfixturevalue(fixture)
    calls = recorded(pipe, **kwargs).calls
    assert all(c["encoder_attention_mask"] is not None and not c["encoder_attention_mask"].all() for c in calls)
    stock = [replay(pipe.transformer, c) for c in calls]
    originals = processors.install(pipe.transformer, EditState())
    try:
        assert type(pipe.transformer.single_transformer_blocks[0].attn.processor).__name__ == "HunyuanImageAttnProcessor"
        refiner = pipe.transformer.context_embedder.token_refiner.refiner_blocks[0].attn
        assert type(refiner.processor).__name__ == "AttnProcessor2_0"  # the token refiner is not a layer
        mine = [replay(pipe.transformer, c) for c in calls]
    finally:
        processors.restore(pipe.transformer, originals)
    assert all((a - b).abs().max() == 0.0 for a, b in zip(stock, mine))


def test_softpag_u0_bit_exact_in_pipeline(hy_pipe):
    stock = hy_call(hy_pipe, negative_prompt="blurry")
    with da.apply(hy_pipe, da.SoftPAG(heads=["L1", "L2"], u=0.0)):
        assert torch.equal(hy_call(hy_pipe, negative_prompt="blurry"), stock)
    with da.apply(hy_pipe, da.SoftPAG(heads=["L1H0"], u=1.0)):
        assert not torch.equal(hy_call(hy_pipe, negative_prompt="blurry"), stock)
    assert torch.equal(hy_call(hy_pipe, negative_prompt="blurry"), stock)


@pytest.mark.parametrize("layer,target", [(1, "identity"), (2, "uniform"), (0, "uniform"), (3, "identity")])
def test_softpag_equals_an_sdpa_perturbation_inside_the_module(hy_pipe, layer, target):
    call = recorded(hy_pipe, prompt=PROMPTS).calls[0]
    with PerturbSDPA(flux_attention_module(hy_pipe, layer), HEADS, target):
        want = replay(hy_pipe.transformer, call)
    with da.apply(hy_pipe.transformer, da.SoftPAG([(layer, h) for h in HEADS], u=1.0, target=target)):
        got = replay(hy_pipe.transformer, call)
    assert (got - want).abs().max() < 1e-5
    assert (got - replay(hy_pipe.transformer, call)).abs().max() > 1e-4


def explicit_steps(pipe, rec, edit, layer_heads: dict, cfg: bool, steps: int):
    """ε the scheduler should get at each step: the pipeline guider's combination of the recorded calls
    (a fresh guider of the same config, so APG's momentum runs over these steps), then s·(ε_c − ε_p)."""
    guider = AdaptiveProjectedMixGuidance(**dict(pipe.guider.config)) if cfg else None
    per_step = 2 if cfg else 1
    out = []
    for step in range(steps):
        cond = rec.calls[per_step * step]
        eps_c = replay(pipe.transformer, cond)
        modes = [PerturbSDPA(flux_attention_module(pipe, layer), heads) for layer, heads in layer_heads.items()]
        for mode in modes:
            mode.__enter__()
        try:
            eps_p = replay(pipe.transformer, cond)
        finally:
            for mode in reversed(modes):
                mode.__exit__(None, None, None)
        base = eps_c
        if cfg:
            eps_u = replay(pipe.transformer, rec.calls[per_step * step + 1])
            guider.set_state(step=step, num_inference_steps=steps, timestep=cond["timestep"][0])
            if step == 0:
                guider.prepare_inputs({"encoder_hidden_states": (cond["encoder_hidden_states"], None)})
            base = guider.forward(eps_c, eps_u).pred
        out.append(base + edit.scale * (eps_c - eps_p))
    return out


@pytest.mark.parametrize("fixture,kwargs", [
    ("distilled_pipe", dict(prompt="a red circle")),
    ("distilled_pipe", dict(prompt=PROMPTS)),
    ("hy_pipe", dict(prompt="a red circle", negative_prompt="blurry")),
    ("hy_pipe", dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"])),
])
def test_guided_step_equals_explicit(fixture, kwargs, request):
    pipe = request.getfixturevalue(fixture)
    steps = 4 if fixture == "hy_pipe" else 2  # guider pipe: CFG at steps 0–1, APG at 2–3
    edit = da.HeadGuidance(heads=["L1H1", "L2H0", "L3H3"], scale=2.0, u=1.0)
    with CallRecorder(pipe) as stock:
        hy_call(pipe, steps=steps, **kwargs)
    with CallRecorder(pipe) as rec, da.apply(pipe, edit):
        hy_call(pipe, steps=steps, **kwargs)
    cfg = fixture == "hy_pipe"
    per_step = 2 if cfg else 1
    assert len(rec.calls) == len(stock.calls) == per_step * len(rec.steps) == per_step * steps
    assert (rec.steps[0] - stock.steps[0]).abs().max() > 1e-3  # same input: the difference is the guidance term
    if cfg:  # the conditional call comes first in each step
        assert not torch.equal(rec.calls[0]["encoder_hidden_states"], rec.calls[1]["encoder_hidden_states"])
    want = explicit_steps(pipe, rec, edit, {1: [1], 2: [0], 3: [3]}, cfg, steps)
    for eps, expected in zip(rec.steps, want):
        assert (eps - expected).abs().max() < 1e-5


def test_shared_prefix_equals_unshared(hy_pipe):
    stock_calls = len(recorded(hy_pipe, negative_prompt="blurry").calls)
    results = {}
    for share in (True, False):
        with CallRecorder(hy_pipe) as rec, \
                da.apply(hy_pipe, da.HeadGuidance(heads=["L2H0", "L3H3"], scale=3.0, u=0.7, share_prefix=share)):
            results[share] = hy_call(hy_pipe, negative_prompt="blurry")
        assert len(rec.calls) == stock_calls
    assert (results[True] - results[False]).abs().max() < 1e-5


def test_remove_restores_original_objects(hy_pipe):
    transformer = hy_pipe.transformer
    before = dict(transformer.attn_processors)
    handle = da.apply(hy_pipe, da.HeadGuidance(heads=["L0H1", "L3"]))
    assert transformer.single_transformer_blocks[1].attn.processor is not before["single_transformer_blocks.1.attn.processor"]
    handle.remove()
    handle.remove()
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    assert "step" not in vars(hy_pipe.scheduler)
    assert not transformer._diffusers_hook.hooks


def test_local_attention_under_the_mask(hy_pipe):
    kwargs = dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], height=64, width=64)
    call = recorded(hy_pipe, **kwargs).calls[0]
    assert family_of(hy_pipe.transformer).grid(hy_pipe.transformer, call) == ((8, 8), "")
    out = {}
    for backend in ("tiled", "reference"):
        with da.apply(hy_pipe, da.LocalAttention(radius=2.0, layers=[1, 2], backend=backend)):
            out[backend] = hy_call(hy_pipe, **kwargs)
    stock = hy_call(hy_pipe, **kwargs)
    assert (out["tiled"] - out["reference"]).abs().max() < 1e-4
    assert (out["tiled"] - stock).abs().max() > 1e-4
    with da.apply(hy_pipe, da.LocalAttention(radius=100.0, layers=[1, 2], backend="tiled")):
        assert torch.equal(hy_call(hy_pipe, **kwargs), stock)  # a circle covering the grid is stock attention


def test_presets_are_refused_clearly(hy_pipe):
    with pytest.raises(ValueError, match="is for flux models, this is a hunyuan_image model"):
        da.apply(hy_pipe, da.SoftPAG(["flux:glossy"]))
    with pytest.raises(ValueError, match="is for sd3 models, this is a hunyuan_image model"):
        da.apply(hy_pipe, da.SoftPAG(["sd3:dark"]))


def test_predict_is_the_pipeline_call(distilled_pipe):
    """The training call: Qwen text states and mask, timestep 1000·t, guidance 1000·g (glyph padding dropped)."""
    call = recorded(distilled_pipe, prompt=PROMPTS).calls[0]
    with torch.no_grad():
        got = family_of(distilled_pipe.transformer).predict(
            distilled_pipe.transformer, call["hidden_states"], call["encoder_hidden_states"],
            call["encoder_attention_mask"], call["timestep"] / 1000, (4, 4), guidance=3.25)
    assert (got - replay(distilled_pipe.transformer, call)).abs().max() < 1e-5
