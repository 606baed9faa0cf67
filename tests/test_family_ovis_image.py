"""Ovis-Image: FLUX.1's attention (dit-attn's FluxAttnProcessor) installed through each attention module's
`processor` (the model has no `attn_processors`), in its stock pipeline called with `prompt_embeds` (no tiny
Qwen3) that makes CFG a second call under cache context "uncond"."""
import pytest
import torch

import dit_attn as da
from dit_attn.toy.ovis_image import build_ovis_image_pipeline, text_embeds

from . import flux_layout_checks as checks
from .conftest import SIZE, CallRecorder, PerturbSDPA, flux_attention_module, replay

HEADS = [1, 3]


@pytest.fixture(scope="module")
def ovis_pipe():
    pipe = build_ovis_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ovis_call(pipe, prompt="a red circle", steps=2, seed=0, negative=None, **kwargs):
    args = dict(num_inference_steps=steps, guidance_scale=1.0, output_type="latent", negative_prompt=None,
                prompt_embeds=text_embeds(prompt), **SIZE)
    if negative is not None:
        args["negative_prompt_embeds"] = text_embeds(negative)
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        ovis_call(pipe, **kwargs)
    return rec


def test_processors_bit_exact(ovis_pipe):
    calls = recorded(ovis_pipe, guidance_scale=3.0, negative="blue").calls
    assert len(calls) == 4
    assert not hasattr(ovis_pipe.transformer, "attn_processors")
    assert len(checks.attention_processors(ovis_pipe)) == 4
    checks.processors_bit_exact(ovis_pipe, calls, "OvisImageAttnProcessor")


def test_softpag_u0_is_stock_and_layers_are_numbered(ovis_pipe):
    checks.softpag_u0_is_stock_and_layers_are_double_then_single(ovis_pipe, ovis_call, 4, guidance_scale=3.0, negative="blue")
    assert all(type(p).__name__ == "OvisImageAttnProcessor" for p in checks.attention_processors(ovis_pipe).values())


@pytest.mark.parametrize("layer,target", [(1, "identity"), (2, "uniform"), (0, "uniform"), (3, "identity")])
def test_softpag_equals_an_sdpa_perturbation_inside_the_module(ovis_pipe, layer, target):
    checks.softpag_equals_an_sdpa_perturbation(ovis_pipe, recorded(ovis_pipe).calls[0], layer, HEADS, target)


@pytest.mark.parametrize("cfg,images", [(1.0, 1), (3.0, 1), (3.0, 2)])
def test_guided_step_equals_the_explicit_computation(ovis_pipe, cfg, images):
    """The pipeline's CFG of the two calls, plus the guidance term on the "cond" call."""
    layer, scale = 1, 2.0
    edit = da.HeadGuidance(heads=[(layer, h) for h in HEADS], scale=scale, u=1.0)
    kwargs = dict(guidance_scale=cfg, negative="blue" if cfg > 1 else None, num_images_per_prompt=images)
    with CallRecorder(ovis_pipe) as rec, da.apply(ovis_pipe, edit):
        ovis_call(ovis_pipe, **kwargs)
    per_step = 2 if cfg > 1 else 1
    assert len(rec.calls) == per_step * len(rec.steps)
    for step, eps in enumerate(rec.steps):
        cond_call = rec.calls[per_step * step]
        eps_c = replay(ovis_pipe.transformer, cond_call)
        with PerturbSDPA(flux_attention_module(ovis_pipe, layer), HEADS):
            eps_p = replay(ovis_pipe.transformer, cond_call)
        assert (eps_c - eps_p).abs().max() > 1e-4
        want = eps_c
        if cfg > 1:
            eps_u = replay(ovis_pipe.transformer, rec.calls[per_step * step + 1])
            want = eps_u + cfg * (eps_c - eps_u)
        want = want + scale * (eps_c - eps_p)
        assert eps.shape[0] == images
        assert (eps - want).abs().max() < 1e-5


def test_calls_shared_prefix_and_remove(ovis_pipe):
    checks.shared_prefix_equals_unshared_and_remove_restores(ovis_pipe, ovis_call, guidance_scale=3.0, negative="blue")
    assert all(type(p).__name__ == "OvisImageAttnProcessor" for p in checks.attention_processors(ovis_pipe).values())


def test_local_attention_tiled_equals_reference(ovis_pipe):
    checks.local_attention_tiled_equals_reference(ovis_pipe, ovis_call, guidance_scale=3.0, negative="blue")


def test_flux_presets_are_refused_clearly(ovis_pipe):
    checks.flux_presets_are_refused(ovis_pipe, "ovis_image")


def test_text_edits_need_the_text_encoder(ovis_pipe):
    """This pipeline is built without its encoder (text edits with one: tests/test_text_families.py)."""
    for edit in (da.TextPatch(layers=[1], source_prompt="a blue square"), da.NAG(negative_prompt="blurry")):
        with pytest.raises(ValueError, match="has text_encoder=None: load the pipeline with its text encoder"):
            da.apply(ovis_pipe, edit)
