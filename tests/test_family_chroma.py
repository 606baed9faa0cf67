"""Chroma: FLUX.1's attention under the pipeline's own float 0/1 mask, in its stock pipelines."""
import pytest
import torch

import dit_attn as da
from dit_attn.toy.chroma import build_chroma_pipeline

from . import flux_layout_checks as checks
from .conftest import SIZE, CallRecorder, PerturbSDPA, flux_attention_module, replay

HEADS = [1, 3]


@pytest.fixture(scope="module")
def chroma_pipe():
    pipe = build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_call(pipe, prompt="a red circle", steps=2, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, guidance_scale=1.0, max_sequence_length=8, output_type="latent", **SIZE)
    args.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).images


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        chroma_call(pipe, **kwargs)
    return rec


def test_processors_bit_exact_under_the_mask(chroma_pipe):
    calls = recorded(chroma_pipe, guidance_scale=3.0, negative_prompt="blue").calls
    assert all(c["attention_mask"] is not None for c in calls)
    checks.processors_bit_exact(chroma_pipe, calls, "FluxAttnProcessor")


def test_softpag_u0_is_stock_and_layers_are_numbered(chroma_pipe):
    checks.softpag_u0_is_stock_and_layers_are_double_then_single(chroma_pipe, chroma_call, 4, guidance_scale=3.0)


@pytest.mark.parametrize("layer,target", [(1, "identity"), (2, "uniform"), (0, "uniform")])
def test_softpag_equals_an_sdpa_perturbation_inside_the_module(chroma_pipe, layer, target):
    checks.softpag_equals_an_sdpa_perturbation(chroma_pipe, recorded(chroma_pipe).calls[0], layer, HEADS, target)


@pytest.mark.parametrize("cfg,images", [(1.0, 1), (3.0, 1), (3.0, 2)])
def test_guided_step_equals_the_explicit_computation(chroma_pipe, cfg, images):
    layer, scale = 1, 2.0
    edit = da.HeadGuidance(heads=[(layer, h) for h in HEADS], scale=scale, u=1.0)
    kwargs = dict(guidance_scale=cfg, negative_prompt="blue" if cfg > 1 else None, num_images_per_prompt=images)
    with CallRecorder(chroma_pipe) as rec, da.apply(chroma_pipe, edit):
        chroma_call(chroma_pipe, **kwargs)
    per_step = 2 if cfg > 1 else 1
    assert len(rec.calls) == per_step * len(rec.steps)
    for step, eps in enumerate(rec.steps):
        cond_call = rec.calls[per_step * step]
        eps_c = replay(chroma_pipe.transformer, cond_call)
        with PerturbSDPA(flux_attention_module(chroma_pipe, layer), HEADS):
            eps_p = replay(chroma_pipe.transformer, cond_call)
        assert (eps_c - eps_p).abs().max() > 1e-4
        want = eps_c
        if cfg > 1:
            eps_u = replay(chroma_pipe.transformer, rec.calls[per_step * step + 1])
            want = eps_u + cfg * (eps_c - eps_u)
        want = want + scale * (eps_c - eps_p)
        assert eps.shape[0] == images
        assert (eps - want).abs().max() < 1e-5


def test_calls_shared_prefix_and_remove(chroma_pipe):
    checks.shared_prefix_equals_unshared_and_remove_restores(chroma_pipe, chroma_call, guidance_scale=3.0, negative_prompt="blue")


def test_local_attention_under_the_mask(chroma_pipe):
    kwargs = dict(guidance_scale=3.0, negative_prompt="blue")
    out = {}
    for backend in ("tiled", "reference"):
        with da.apply(chroma_pipe, da.LocalAttention(radius=2.0, layers=[1, 2], backend=backend)):
            out[backend] = chroma_call(chroma_pipe, **kwargs)
    assert (out["tiled"] - out["reference"]).abs().max() < 1e-4
    assert (out["tiled"] - chroma_call(chroma_pipe, **kwargs)).abs().max() > 1e-4
    stock = chroma_call(chroma_pipe, **kwargs)
    with da.apply(chroma_pipe, da.LocalAttention(radius=100.0, layers=[1, 2], backend="tiled")):
        assert torch.equal(chroma_call(chroma_pipe, **kwargs), stock)  # a circle covering the grid is stock attention


def test_flux_presets_are_refused_clearly(chroma_pipe):
    checks.flux_presets_are_refused(chroma_pipe, "chroma")


def test_img2img_pipeline_is_guided(chroma_pipe):
    from diffusers import ChromaImg2ImgPipeline
    from PIL import Image

    pipe = ChromaImg2ImgPipeline(**{k: v for k, v in chroma_pipe.components.items()})
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    run = lambda: pipe("a red circle", image=image, strength=0.8, num_inference_steps=3, guidance_scale=1.0,  # noqa: E731
                       max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    with CallRecorder(pipe) as rec:
        stock = run()
    with da.apply(pipe, da.HeadGuidance(heads=["L1"], scale=2.0)):
        with CallRecorder(pipe) as guided:
            out = run()
    assert len(guided.calls) == len(rec.calls) and (out - stock).abs().max() > 1e-4


def test_text_patch_with_its_own_mask(chroma_pipe):
    """The prompt itself as source changes nothing; a shorter source prompt, patched into every layer,
    equals a run of that prompt (its own padding mask rides with its rows)."""
    kwargs = dict(guidance_scale=1.0)
    prompt, source = "a red circle on a white background", "a blue square"
    stock = chroma_call(chroma_pipe, prompt=prompt, **kwargs)
    with da.apply(chroma_pipe, da.TextPatch(layers=[1, 2], source_prompt=prompt)):
        assert (chroma_call(chroma_pipe, prompt=prompt, **kwargs) - stock).abs().max() < 1e-5
    everywhere = list(range(len(da.layers(chroma_pipe))))
    with da.apply(chroma_pipe, da.TextPatch(layers=everywhere, source_prompt=source)):
        patched = chroma_call(chroma_pipe, prompt=prompt, **kwargs)
    assert (patched - chroma_call(chroma_pipe, prompt=source, **kwargs)).abs().max() < 1e-5
    assert (patched - stock).abs().max() > 1e-4
