"""Wan 2.1 (text-to-video): the self-attention processors reproduce diffusers exactly (fp32 and bf16); the
cross-attention stays stock; SoftPAG on attn1 equals an independent SDPA perturbation inside the module; a
guided step equals the explicit computation from recorded stock calls (CFG on and off, batch 1 and 2);
calls are widened at the call, so a step makes the stock number of calls."""
import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn import processors
from dit_attn.families import family_of
from dit_attn.processors.state import EditState
from dit_attn.toy.wan import WAN_I2V_RUN, WAN_RUN, build_wan_i2v_pipeline, build_wan_pipeline

from .conftest import CallRecorder, PerturbSDPA, replay

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square cat"]


@pytest.fixture(scope="module")
def wan_pipe():
    pipe = build_wan_pipeline(num_layers=3, num_heads=4, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call(pipe, prompt="a red circle", steps=2, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, output_type="latent", guidance_scale=3.0, **WAN_RUN)
    args.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).frames


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        wan_call(pipe, **kwargs)
    return rec


def test_layers_and_family(wan_pipe):
    assert [(l.index, l.name, l.kind, l.heads, l.head_dim) for l in da.layers(wan_pipe)] == [
        (i, f"blocks.{i}.attn1", "self", 4, 12) for i in range(3)]
    assert family_of(wan_pipe.transformer).name == "wan"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_processors_bit_exact(wan_pipe, dtype):
    calls = recorded(wan_pipe, prompt=PROMPTS, negative_prompt=["blurry", "dark"]).calls
    transformer = wan_pipe.transformer.to(dtype)
    try:
        calls = [{k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in c.items()}
                 for c in calls]
        stock = [replay(transformer, c) for c in calls]
        originals = processors.install(transformer, EditState())
        try:
            assert type(transformer.blocks[1].attn1.processor).__name__ == "WanSelfAttnProcessor"
            assert type(transformer.blocks[1].attn2.processor).__name__ == "WanAttnProcessor"  # cross-attention: stock
            mine = [replay(transformer, c) for c in calls]
        finally:
            processors.restore(transformer, originals)
        assert all((a - b).abs().max() == 0.0 for a, b in zip(stock, mine))
    finally:
        transformer.to(torch.float32)


def test_kernel_path_reproduces_stock_attention(wan_pipe):
    """The processor's own math (through dit-attn's kernels, SoftPAG at u = 0 on a guided-like plan) equals stock."""
    call = recorded(wan_pipe).calls[0]
    stock = replay(wan_pipe.transformer, call)
    with da.apply(wan_pipe.transformer, da.SoftPAG(heads=["L0H1", "L2"], u=1e-30)):
        got = replay(wan_pipe.transformer, call)
    assert (got - stock).abs().max() < 1e-5


@pytest.mark.parametrize("layer,target", [(0, "identity"), (1, "uniform"), (2, "identity")])
def test_softpag_equals_an_sdpa_perturbation_inside_the_module(wan_pipe, layer, target):
    call = recorded(wan_pipe, prompt=PROMPTS).calls[0]
    heads = [1, 3]
    with PerturbSDPA(wan_pipe.transformer.blocks[layer].attn1, heads, target):
        want = replay(wan_pipe.transformer, call)
    with da.apply(wan_pipe.transformer, da.SoftPAG([(layer, h) for h in heads], u=1.0, target=target)):
        got = replay(wan_pipe.transformer, call)
    assert (got - want).abs().max() < 1e-5
    assert (got - replay(wan_pipe.transformer, call)).abs().max() > 1e-4


def explicit_steps(pipe, rec, edit, layer_heads: dict, cfg: bool, guidance_scale: float):
    """ε the scheduler should get at each step: the pipeline's CFG of the recorded calls, then s·(ε_c − ε_p)."""
    per_step = 2 if cfg else 1
    out = []
    for step in range(len(rec.steps)):
        cond = rec.calls[per_step * step]
        eps_c = replay(pipe.transformer, cond)
        modes = [PerturbSDPA(pipe.transformer.blocks[layer].attn1, heads) for layer, heads in layer_heads.items()]
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
            base = eps_u + guidance_scale * (eps_c - eps_u)
        out.append(base + edit.scale * (eps_c - eps_p))
    return out


@pytest.mark.parametrize("guidance_scale,prompt", [(3.0, "a red circle"), (3.0, PROMPTS), (1.0, "a red circle"),
                                                   (1.0, PROMPTS)])
def test_guided_step_equals_explicit(wan_pipe, guidance_scale, prompt):
    edit = da.HeadGuidance(heads=["L1H1", "L2H0"], scale=2.0, u=1.0)
    with CallRecorder(wan_pipe) as stock:
        wan_call(wan_pipe, prompt=prompt, guidance_scale=guidance_scale)
    with CallRecorder(wan_pipe) as rec, da.apply(wan_pipe, edit):
        wan_call(wan_pipe, prompt=prompt, guidance_scale=guidance_scale)
    cfg = guidance_scale > 1.0
    assert len(rec.calls) == len(stock.calls) == (2 if cfg else 1) * len(rec.steps) == (2 if cfg else 1) * 2
    assert (rec.steps[0] - stock.steps[0]).abs().max() > 1e-3
    want = explicit_steps(wan_pipe, rec, edit, {1: [1], 2: [0]}, cfg, guidance_scale)
    for eps, expected in zip(rec.steps, want):
        assert (eps - expected).abs().max() < 1e-5


def test_row_count_guard_and_refusals(wan_pipe, monkeypatch):
    spec = family_of(wan_pipe.transformer)
    with pytest.raises(ValueError, match="TextPatch layers \\[3\\] do not exist"):
        da.apply(wan_pipe, da.TextPatch(layers=[3], source_prompt="a blue circle"))  # text edits run (tests/test_wan_text.py)
    with pytest.raises(ValueError, match=r"video grid .* needs radius=\(frames, height, width\)"):
        with da.apply(wan_pipe, da.LocalAttention(radius=2.0, layers=[1])):
            wan_call(wan_pipe)
    monkeypatch.setattr(type(spec), "widen_at_call", False)  # declared wrongly: rows forked at blocks get folded
    with pytest.raises(RuntimeError, match="returned 1 rows for a call widened to 2: this model does not carry extra rows"):
        with da.apply(wan_pipe, da.HeadGuidance(heads=["L1H1"], scale=2.0)):
            wan_call(wan_pipe)


def test_remove_restores_original_objects(wan_pipe):
    transformer = wan_pipe.transformer
    before = dict(transformer.attn_processors)
    handle = da.apply(wan_pipe, da.HeadGuidance(heads=["L0H1", "L2"]))
    assert transformer.blocks[2].attn1.processor is not before["blocks.2.attn1.processor"]
    handle.remove()
    handle.remove()
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    assert not transformer._diffusers_hook.hooks


def test_image_to_video_guided_step_equals_explicit():
    """WanImageToVideoPipeline: the image context rides in the cross-attention (stock), the call's per-row
    image states are widened with the rest."""
    pipe = build_wan_i2v_pipeline(num_layers=2, num_heads=2, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    edit = da.HeadGuidance(heads=["L0H1", "L1H0"], scale=2.0, u=1.0)
    run = dict(image=image, prompt=PROMPTS, num_inference_steps=2, guidance_scale=3.0, output_type="latent", **WAN_I2V_RUN)
    with CallRecorder(pipe) as stock:
        pipe(generator=torch.Generator().manual_seed(0), **run)
    with CallRecorder(pipe) as rec, da.apply(pipe, edit):
        pipe(generator=torch.Generator().manual_seed(0), **run)
    assert rec.calls[0]["encoder_hidden_states_image"] is not None and len(rec.calls) == len(stock.calls) == 4
    assert type(pipe.transformer.blocks[0].attn2.processor).__name__ == "WanAttnProcessor"
    want = explicit_steps(pipe, rec, edit, {0: [1], 1: [0]}, True, 3.0)
    for eps, expected in zip(rec.steps, want):
        assert (eps - expected).abs().max() < 1e-5


def test_head_search_is_refused_clearly_on_video(wan_pipe):
    with pytest.raises(NotImplementedError, match="hunt scores images; WanPipeline makes videos"):
        da.hunt(wan_pipe, "color:red", ["a red circle"], [0], k=1, rounds=1)
    with pytest.raises(NotImplementedError, match="atlas scores images; WanPipeline makes videos"):
        da.atlas(wan_pipe, "color:red", ["a red circle"])
    with pytest.raises(NotImplementedError, match="screen_heads scores images; WanPipeline makes videos"):
        da.screen_heads(wan_pipe, "color:red", ["a red circle"], [0])
