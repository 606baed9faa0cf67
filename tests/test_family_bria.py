"""Bria 3.2: FLUX.1's attention (dit-attn's FluxAttnProcessor) installed through each attention module's
`processor` (the model has no `attn_processors`), in its stock pipeline called with `prompt_embeds` that makes
CFG one batched call [uncond ; cond]."""
import pytest
import torch

import dit_attn as da
from dit_attn.toy.bria import build_bria_pipeline, text_embeds

from . import flux_layout_checks as checks
from .conftest import SIZE, CallRecorder, PerturbSDPA, flux_attention_module, replay

HEADS = [1, 3]


@pytest.fixture(scope="module")
def bria_pipe():
    pipe = build_bria_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bria_call(pipe, prompt="a red circle", steps=2, seed=0, negative=None, **kwargs):
    args = dict(num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                prompt_embeds=text_embeds(prompt), **SIZE)
    if negative is not None:
        args["negative_prompt_embeds"] = text_embeds(negative)
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        bria_call(pipe, **kwargs)
    return rec


def test_processors_bit_exact(bria_pipe):
    calls = recorded(bria_pipe, guidance_scale=3.0, negative="blue").calls
    assert len(calls) == 2 and calls[0]["hidden_states"].shape[0] == 2  # one [uncond ; cond] call a step
    assert not hasattr(bria_pipe.transformer, "attn_processors")
    assert len(checks.attention_processors(bria_pipe)) == 4
    checks.processors_bit_exact(bria_pipe, calls, "BriaAttnProcessor")


def test_softpag_u0_is_stock_and_layers_are_numbered(bria_pipe):
    checks.softpag_u0_is_stock_and_layers_are_double_then_single(bria_pipe, bria_call, 4, guidance_scale=3.0, negative="blue")
    assert all(type(p).__name__ == "BriaAttnProcessor" for p in checks.attention_processors(bria_pipe).values())


@pytest.mark.parametrize("layer,target", [(1, "identity"), (2, "uniform"), (0, "uniform"), (3, "identity")])
def test_softpag_equals_an_sdpa_perturbation_inside_the_module(bria_pipe, layer, target):
    checks.softpag_equals_an_sdpa_perturbation(bria_pipe, recorded(bria_pipe).calls[0], layer, HEADS, target)


@pytest.mark.parametrize("cfg,images", [(1.0, 1), (3.0, 1), (3.0, 2)])
def test_guided_step_equals_the_explicit_computation(bria_pipe, cfg, images):
    """The pipeline's CFG of the [uncond ; cond] rows, plus the guidance term on the cond rows."""
    layer, scale = 1, 2.0
    edit = da.HeadGuidance(heads=[(layer, h) for h in HEADS], scale=scale, u=1.0)
    # two prompts' states, not num_images_per_prompt (the stock pipeline does not repeat given prompt_embeds)
    kwargs = dict(guidance_scale=cfg, prompt_embeds=torch.cat([text_embeds(p) for p in ["a red circle", "a dot"][:images]]))
    if cfg > 1:
        kwargs["negative_prompt_embeds"] = torch.cat([text_embeds(n) for n in ["blue", "green"][:images]])
    with CallRecorder(bria_pipe) as rec, da.apply(bria_pipe, edit):
        bria_call(bria_pipe, **kwargs)
    assert len(rec.calls) == len(rec.steps)
    for call, eps in zip(rec.calls, rec.steps):
        out = replay(bria_pipe.transformer, call)
        cond = torch.arange(images, 2 * images) if cfg > 1 else torch.arange(images)
        assert out.shape[0] == len(cond) * (2 if cfg > 1 else 1)
        eps_c = out[cond]
        with PerturbSDPA(flux_attention_module(bria_pipe, layer), HEADS):
            eps_p = replay(bria_pipe.transformer, call, rows=cond)
        assert (eps_c - eps_p).abs().max() > 1e-4
        want = eps_c
        if cfg > 1:
            eps_u = out[:images]
            want = eps_u + cfg * (eps_c - eps_u)
        want = want + scale * (eps_c - eps_p)
        assert eps.shape[0] == images
        assert (eps - want).abs().max() < 1e-5


def test_calls_shared_prefix_and_remove(bria_pipe):
    checks.shared_prefix_equals_unshared_and_remove_restores(bria_pipe, bria_call, guidance_scale=3.0, negative="blue")
    assert all(type(p).__name__ == "BriaAttnProcessor" for p in checks.attention_processors(bria_pipe).values())


def test_local_attention_tiled_equals_reference(bria_pipe):
    checks.local_attention_tiled_equals_reference(bria_pipe, bria_call, guidance_scale=3.0, negative="blue")


def test_flux_presets_are_refused_clearly(bria_pipe):
    checks.flux_presets_are_refused(bria_pipe, "bria")


def test_text_edits_need_the_text_encoder(bria_pipe):
    """This pipeline is built without its encoder (text edits with one: tests/test_text_families.py)."""
    for edit in (da.TextPatch(layers=[1], source_prompt="a blue square"), da.NAG(negative_prompt="blurry")):
        with pytest.raises(ValueError, match="has text_encoder=None: load the pipeline with its text encoder"):
            da.apply(bria_pipe, edit)
