"""HeadGuidance inside stock pipelines, checked against explicit computations."""
import numpy as np
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3PAGPipeline,
)
from PIL import Image

import dit_attn as da
from dit_attn.toy.configs import build_sd3_pipeline, pipeline_components

from .conftest import SIZE, CallRecorder, flux_call, replay, sd3_call


def explicit_sd3(pipe, calls, edit: da.HeadGuidance, cfg: float | None):
    """ε per step from separate passes: stock [uncond; cond] and the SoftPAG-perturbed cond."""
    out = []
    for call in calls:
        n = call["hidden_states"].shape[0]
        cond_rows = slice(n // 2, n) if cfg else slice(0, n)
        eps = replay(pipe.transformer, call)
        eps_c = eps[cond_rows]
        with da.apply(pipe.transformer, da.SoftPAG(edit.heads, u=edit.u, target=edit.target, scope=edit.scope)):
            eps_p = replay(pipe.transformer, call, rows=cond_rows)
        base = eps[: n // 2] + cfg * (eps_c - eps[: n // 2]) if cfg else eps_c
        out.append(base + edit.scale * (eps_c - eps_p))
    return out


@pytest.mark.parametrize("cfg", [4.0, None])
@pytest.mark.parametrize("scope,target,u", [("joint", "identity", 1.0), ("image", "uniform", 0.3)])
def test_sd3_guided_step_equals_three_passes(sd35_pipe, cfg, scope, target, u):
    edit = da.HeadGuidance(heads=["L1H1", (2, 3)], scale=2.5, u=u, target=target, scope=scope)
    with CallRecorder(sd35_pipe) as rec, da.apply(sd35_pipe, edit):
        sd3_call(sd35_pipe, guidance_scale=cfg or 1.0)
    expected = explicit_sd3(sd35_pipe, rec.calls, edit, cfg)
    assert len(rec.steps) == len(expected) == 3
    for got, want in zip(rec.steps, expected):
        assert (got - want).abs().max() < 1e-5


def test_flux_guided_step_equals_three_passes(flux_pipe):
    edit = da.HeadGuidance(heads=["L0H1", "L3"], scale=2.0, u=0.5, scope="image")
    true_cfg = 2.0
    with CallRecorder(flux_pipe) as rec, da.apply(flux_pipe, edit):
        flux_call(flux_pipe, negative_prompt="blurry", true_cfg_scale=true_cfg)
    assert len(rec.calls) == 2 * len(rec.steps)  # cond then uncond, each a stock-sized call
    for step, eps in enumerate(rec.steps):
        cond_call, uncond_call = rec.calls[2 * step], rec.calls[2 * step + 1]
        eps_c, eps_u = replay(flux_pipe.transformer, cond_call), replay(flux_pipe.transformer, uncond_call)
        with da.apply(flux_pipe.transformer, da.SoftPAG(edit.heads, u=edit.u, scope=edit.scope)):
            eps_p = replay(flux_pipe.transformer, cond_call)
        want = eps_u + true_cfg * (eps_c - eps_u) + edit.scale * (eps_c - eps_p)
        assert (eps - want).abs().max() < 1e-5


def count_calls(pipe, run) -> int:
    with CallRecorder(pipe) as rec:
        run()
    return len(rec.calls)


@pytest.mark.parametrize(
    "family,kwargs",
    [("sd3", dict(guidance_scale=4.0)), ("sd3", dict(guidance_scale=1.0)), ("flux", {}), ("flux", dict(negative_prompt="dark", true_cfg_scale=3.0))],
)
def test_forward_calls_equal_stock(family, kwargs, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = flux_call if family == "flux" else sd3_call
    stock = count_calls(pipe, lambda: call(pipe, **kwargs))
    with da.apply(pipe, da.HeadGuidance(heads=["L1"], scale=2.0)):
        guided = count_calls(pipe, lambda: call(pipe, **kwargs))
    assert guided == stock


def test_scope_image_equals_diffusers_pag():
    """u = 1, all heads of one layer, image scope = StableDiffusion3PAGPipeline on that layer (SD3, no q/k norm)."""
    pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8, seed=3)
    pipe.set_progress_bar_config(disable=True)
    pag = StableDiffusion3PAGPipeline(**pipeline_components(pipe), pag_applied_layers=["blocks.1"])
    pag.set_progress_bar_config(disable=True)
    for cfg in (4.0, 1.0):
        theirs = sd3_call(pag, pag_scale=3.0, guidance_scale=cfg)
        with da.apply(pipe, da.HeadGuidance(heads=["L1"], scale=3.0, u=1.0, scope="image")):
            ours = sd3_call(pipe, guidance_scale=cfg)
        assert (ours - theirs).abs().max() < 1e-5
        assert not torch.allclose(ours, sd3_call(pipe, guidance_scale=cfg))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_shared_prefix_equals_unshared(family, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = flux_call if family == "flux" else sd3_call
    results = []
    for share in (True, False):
        with da.apply(pipe, da.HeadGuidance(heads=["L2H0", "L2H3"], scale=3.0, u=0.7, share_prefix=share)):
            results.append(call(pipe))
    assert (results[0] - results[1]).abs().max() < 1e-5


def test_shared_prefix_forks_at_first_perturbed_layer(sd3_pipe):
    batches = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        for block in sd3_pipe.transformer.transformer_blocks
    ]
    try:
        with da.apply(sd3_pipe, da.HeadGuidance(heads=["L2"], scale=1.0)):
            sd3_call(sd3_pipe, steps=1)
    finally:
        for h in hooks:
            h.remove()
    assert batches == [2, 2, 3]  # uncond, cond; + perturbed cond from layer 2 on


def test_start_end_window(sd3_pipe):
    steps = 4
    with CallRecorder(sd3_pipe) as stock:
        sd3_call(sd3_pipe, steps=steps)
    edit = da.HeadGuidance(heads=["L0"], scale=3.0, start=0.25, end=0.75)
    with CallRecorder(sd3_pipe) as guided, da.apply(sd3_pipe, edit):
        sd3_call(sd3_pipe, steps=steps)
    assert torch.equal(guided.steps[0], stock.steps[0])  # step 0 < start: stock, no perturbed rows
    assert not torch.allclose(guided.steps[1], stock.steps[1])
    # steps 1-2 guided; step 3 ≥ end is stock given its (already changed) input
    call = guided.calls[3]
    eps = replay(sd3_pipe.transformer, call)
    n = eps.shape[0] // 2
    assert (guided.steps[3] - (eps[:n] + 4.0 * (eps[n:] - eps[:n]))).abs().max() < 1e-6


def test_img2img_and_inpaint_pipelines(sd3_pipe, flux_pipe):
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, "uint8"), 8))
    cases = [
        (StableDiffusion3Img2ImgPipeline(**sd3_pipe.components), dict(image=image, strength=0.7, max_sequence_length=8)),
        (StableDiffusion3InpaintPipeline(**sd3_pipe.components), dict(image=image, mask_image=mask, strength=0.9, max_sequence_length=8, **SIZE)),
        (FluxImg2ImgPipeline(**flux_pipe.components), dict(image=image, strength=0.7, max_sequence_length=8, **SIZE)),
    ]
    for pipe, kwargs in cases:
        pipe.set_progress_bar_config(disable=True)

        def run():
            return pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images

        stock, n_stock = run(), count_calls(pipe, run)
        with da.apply(pipe, da.HeadGuidance(heads=["L1"], scale=3.0, start=0.5)):
            guided, n_guided = run(), count_calls(pipe, run)
        assert n_guided == n_stock > 0
        assert not torch.allclose(stock, guided), type(pipe).__name__
        assert torch.equal(run(), stock)


def test_flux_img2img_true_cfg_guides_only_the_conditional_call(flux_pipe):
    """FluxImg2ImgPipeline makes its cond and negative calls without cache contexts."""
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8"))
    pipe = FluxImg2ImgPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    edit = da.HeadGuidance(heads=["L1"], scale=2.0, u=0.5)
    true_cfg = 2.0
    with CallRecorder(pipe) as rec, da.apply(pipe, edit):
        pipe("a red circle", image=image, strength=0.8, num_inference_steps=4, negative_prompt="blurry",
             true_cfg_scale=true_cfg, max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(0), **SIZE)
    assert len(rec.calls) == 2 * len(rec.steps) > 0
    for step, eps in enumerate(rec.steps):
        cond_call, uncond_call = rec.calls[2 * step], rec.calls[2 * step + 1]
        eps_c, eps_u = replay(pipe.transformer, cond_call), replay(pipe.transformer, uncond_call)
        with da.apply(pipe.transformer, da.SoftPAG(edit.heads, u=edit.u)):
            eps_p = replay(pipe.transformer, cond_call)
        assert (eps - (eps_u + true_cfg * (eps_c - eps_u) + edit.scale * (eps_c - eps_p))).abs().max() < 1e-5
