"""FLUX.1 Kontext: the reference image's tokens ride in the call; guidance acts on the generated tokens."""
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

import dit_attn as da

from .conftest import CallRecorder, PerturbSDPA, flux_attention_module, replay

HEADS = [0, 2]


@pytest.fixture(scope="module")
def kontext_pipe(flux_pipe):
    pipe = FluxKontextPipeline(**{k: v for k, v in flux_pipe.components.items() if k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kontext_call(pipe, **kwargs):
    args = dict(image=Image.new("RGB", (32, 32), (30, 160, 40)), num_inference_steps=2, guidance_scale=3.5, height=32,
                width=32, max_sequence_length=8, output_type="latent", max_area=32 * 32, _auto_resize=False)
    args.update(kwargs)
    return pipe(prompt="make it red", generator=torch.Generator().manual_seed(0), **args).images


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_guided_step_on_the_generated_tokens(kontext_pipe, true_cfg):
    layer, scale = 1, 2.0
    kwargs = dict(negative_prompt="blurry", true_cfg_scale=true_cfg) if true_cfg > 1 else {}
    with CallRecorder(kontext_pipe) as rec, da.apply(kontext_pipe, da.HeadGuidance([(layer, h) for h in HEADS], scale=scale)):
        kontext_call(kontext_pipe, **kwargs)
    per_step = 2 if true_cfg > 1 else 1
    assert len(rec.calls) == per_step * len(rec.steps)
    for step, eps in enumerate(rec.steps):
        call = rec.calls[per_step * step]
        generated = eps.shape[1]
        assert call["hidden_states"].shape[1] == 2 * generated  # the reference image's tokens follow
        eps_c = replay(kontext_pipe.transformer, call)[:, :generated]
        with PerturbSDPA(flux_attention_module(kontext_pipe, layer), HEADS):
            eps_p = replay(kontext_pipe.transformer, call)[:, :generated]
        want = eps_c
        if true_cfg > 1:
            eps_u = replay(kontext_pipe.transformer, rec.calls[per_step * step + 1])[:, :generated]
            want = eps_u + true_cfg * (eps_c - eps_u)
        assert (eps_c - eps_p).abs().max() > 1e-4
        assert (eps - (want + scale * (eps_c - eps_p))).abs().max() < 1e-5


def test_text_patch_with_the_prompt_itself_changes_nothing(kontext_pipe):
    stock = kontext_call(kontext_pipe)
    with da.apply(kontext_pipe, da.TextPatch(layers=[0, 2], source_prompt="make it red")):
        assert (kontext_call(kontext_pipe) - stock).abs().max() < 1e-5
    with da.apply(kontext_pipe, da.TextPatch(layers=[0, 2], source_prompt="a blue square")):
        assert (kontext_call(kontext_pipe) - stock).abs().max() > 1e-4


@pytest.mark.parametrize("layers", [None, (1, 2)])  # the token path (every layer), the row path
def test_nag_against_its_own_prompt_is_stock(kontext_pipe, layers):
    """NAG with the reference image's tokens in the image stream: against the prompt itself (Z⁻ = Z⁺) it leaves the
    stock run at the stock call count, and against another prompt it acts (token path = row path:
    tests/test_nag.py::test_kontext_token_path_equals_row_path)."""
    settings = dict(scale=4.0, tau=1.2, alpha=0.5)
    with CallRecorder(kontext_pipe) as stock_rec:
        stock = kontext_call(kontext_pipe)
    with CallRecorder(kontext_pipe) as rec, da.apply(kontext_pipe, da.NAG("make it red", layers=layers, **settings)):
        same = kontext_call(kontext_pipe)
    assert len(rec.calls) == len(stock_rec.calls)
    assert (same - stock).abs().max() <= 1e-5
    with da.apply(kontext_pipe, da.NAG("a blue square", layers=layers, **settings)):
        assert (kontext_call(kontext_pipe) - stock).abs().max() > 1e-3


def test_nag_defaults_follow_the_official_kontext_pipeline(kontext_pipe):
    """In FluxKontextPipeline NAG's end defaults to 0.25 (the official Kontext NAG pipeline's): the same run as end=0.25,
    another than end=1.0; a start past it is refused at apply."""
    with da.apply(kontext_pipe, da.NAG("a blue square")) as handle:
        default = kontext_call(kontext_pipe, num_inference_steps=4)
    assert (handle.edits[0].end, handle.edits[0].alpha) == (0.25, 0.25)
    with da.apply(kontext_pipe, da.NAG("a blue square", end=0.25)):
        assert torch.equal(kontext_call(kontext_pipe, num_inference_steps=4), default)
    with da.apply(kontext_pipe, da.NAG("a blue square", end=1.0)):
        assert (kontext_call(kontext_pipe, num_inference_steps=4) - default).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"start must be < end .* got start=0.5, end=0.25 \(FluxKontextPipeline's default end\)"):
        da.apply(kontext_pipe, da.NAG("a blue square", start=0.5))
