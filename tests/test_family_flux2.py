"""FLUX.2 (Flux2Pipeline, Flux2KleinPipeline) on config-built tiny models: the processors reproduce stock
diffusers, SoftPAG matches an SDPA-level reference, HeadGuidance matches explicit passes (batch 1 and 2,
reference images, Klein's CFG), LocalAttention and TextPatch behave, and KV-cache calls are refused."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn import processors
from dit_attn.processors.state import EditState
from dit_attn.toy.flux2 import build_flux2_klein_pipeline, build_flux2_pipeline, flux2_prompt_embeds

from .conftest import CallRecorder, PerturbSDPA, flux_attention_module, replay

GENERATED = 16  # image tokens of a 32×32 call
EMBEDS = flux2_prompt_embeds(1, 8)


@pytest.fixture(scope="module")
def dev():
    pipe = build_flux2_pipeline(num_layers=2, num_single_layers=2, num_heads=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def klein():
    pipe = build_flux2_klein_pipeline(num_layers=2, num_single_layers=2, num_heads=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_image():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def dev_call(pipe, steps=3, **kwargs):
    args = dict(prompt_embeds=EMBEDS, height=32, width=32, num_inference_steps=steps, guidance_scale=2.5,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


def klein_call(pipe, steps=3, **kwargs):
    args = dict(prompt="a red circle", height=32, width=32, num_inference_steps=steps, guidance_scale=3.0,
                max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


def perturbed(pipe, heads_by_layer: dict[int, list[int]]):
    """SoftPAG(identity, joint, u=1) by the SDPA-level reference, one mode per layer."""
    stack = contextlib.ExitStack()
    for layer, heads in heads_by_layer.items():
        stack.enter_context(PerturbSDPA(flux_attention_module(pipe, layer), heads))
    return stack


def test_layers_number_double_then_single_blocks(dev):
    layers = da.layers(dev)
    assert [(l.index, l.name, l.kind, l.heads, l.head_dim) for l in layers] == [
        (0, "transformer_blocks.0.attn", "double", 4, 16),
        (1, "transformer_blocks.1.attn", "double", 4, 16),
        (2, "single_transformer_blocks.0.attn", "single", 4, 16),
        (3, "single_transformer_blocks.1.attn", "single", 4, 16),
    ]


@pytest.mark.parametrize("case", ["t2i", "batch2", "reference"])
def test_processors_bit_exact(dev, reference_image, case):
    kwargs = {"batch2": dict(num_images_per_prompt=2), "reference": dict(image=reference_image)}.get(case, {})
    with CallRecorder(dev) as rec:
        dev_call(dev, steps=2, **kwargs)
    stock = [replay(dev.transformer, c) for c in rec.calls]
    originals = processors.install(dev.transformer, EditState())
    try:
        kinds = {type(p).__name__ for p in dev.transformer.attn_processors.values()}
        mine = [replay(dev.transformer, c) for c in rec.calls]
    finally:
        processors.restore(dev.transformer, originals)
    assert kinds == {"Flux2AttnProcessor", "Flux2SingleAttnProcessor"}
    assert all((a - b).abs().max() == 0.0 for a, b in zip(stock, mine, strict=True))


def test_soft_pag_u0_is_stock_and_remove_restores(dev):
    stock = dev_call(dev)
    before = dict(dev.transformer.attn_processors)
    with da.apply(dev, da.SoftPAG(heads=["L1", "L2"], u=0.0)):
        assert torch.equal(dev_call(dev), stock)
    with da.apply(dev, da.SoftPAG(heads=["L2H0"], u=1.0)):
        assert not torch.equal(dev_call(dev), stock)
    handle = da.apply(dev, da.HeadGuidance(heads=["L1H1"], scale=2.0))
    handle.remove()
    handle.remove()
    after = dev.transformer.attn_processors
    assert all(after[k] is v for k, v in before.items())
    assert "step" not in vars(dev.scheduler)
    assert not dev.transformer._diffusers_hook.hooks
    assert torch.equal(dev_call(dev), stock)


@pytest.mark.parametrize("layer", [1, 2])  # a double and a single block
@pytest.mark.parametrize("with_reference", [False, True])
def test_soft_pag_equals_sdpa_reference(dev, reference_image, layer, with_reference):
    kwargs = dict(image=reference_image) if with_reference else {}
    with da.apply(dev, da.SoftPAG(heads=[(layer, 0), (layer, 3)], u=1.0)):
        ours = dev_call(dev, **kwargs)
    with perturbed(dev, {layer: [0, 3]}):
        reference = dev_call(dev, **kwargs)
    assert (ours - reference).abs().max() < 1e-5
    assert (ours - dev_call(dev, **kwargs)).abs().max() > 1e-4


def explicit_dev(pipe, calls, heads_by_layer, scale):
    """ε per step: stock ε_c + s·(ε_c − ε_p), ε_p by the SDPA reference; on the generated tokens."""
    out = []
    for call in calls:
        eps_c = replay(pipe.transformer, call)
        with perturbed(pipe, heads_by_layer):
            eps_p = replay(pipe.transformer, call)
        out.append(((eps_c + scale * (eps_c - eps_p))[:, :GENERATED], eps_c[:, :GENERATED]))
    return out


@pytest.mark.parametrize("case", ["t2i", "batch2", "reference"])
def test_guided_step_equals_explicit_passes(dev, reference_image, case):
    kwargs = {"batch2": dict(num_images_per_prompt=2), "reference": dict(image=reference_image)}.get(case, {})
    edit = da.HeadGuidance(heads=["L1H1", "L2H0", "L2H2"], scale=2.0)
    with CallRecorder(dev) as rec, da.apply(dev, edit):
        dev_call(dev, **kwargs)
    expected = explicit_dev(dev, rec.calls, {1: [1], 2: [0, 2]}, edit.scale)
    assert len(rec.steps) == len(rec.calls) == 3
    for got, (want, stock) in zip(rec.steps, expected, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-5
        assert (got - stock).abs().max() > 1e-4


@pytest.mark.parametrize("with_reference", [False, True])
def test_klein_guided_step_under_cfg(klein, reference_image, with_reference):
    cfg = 3.0
    edit = da.HeadGuidance(heads=["L0H2", "L3H1"], scale=1.5)
    with CallRecorder(klein) as rec, da.apply(klein, edit):
        klein_call(klein, guidance_scale=cfg, **(dict(image=reference_image) if with_reference else {}))
    assert len(rec.calls) == 2 * len(rec.steps)  # cond then uncond, each stock-sized
    for step, eps in enumerate(rec.steps):
        cond, uncond = rec.calls[2 * step], rec.calls[2 * step + 1]
        eps_c, eps_u = replay(klein.transformer, cond), replay(klein.transformer, uncond)
        with perturbed(klein, {0: [2], 3: [1]}):
            eps_p = replay(klein.transformer, cond)
        want = (eps_u + cfg * (eps_c - eps_u) + edit.scale * (eps_c - eps_p))[:, :GENERATED]
        assert eps.shape == want.shape and (eps - want).abs().max() < 1e-5


@pytest.mark.parametrize("pipeline", ["dev", "klein"])
def test_forward_calls_equal_stock_and_shared_prefix_equals_unshared(dev, klein, pipeline):
    pipe, run = (dev, dev_call) if pipeline == "dev" else (klein, klein_call)
    with CallRecorder(pipe) as rec:
        stock = run(pipe)
    first_block_rows, results = {}, {}
    for share in (True, False):
        seen = []
        hook = pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
        try:
            with CallRecorder(pipe) as guided, da.apply(pipe, da.HeadGuidance(heads=["L2H1"], scale=2.0, share_prefix=share)):
                results[share] = run(pipe)
        finally:
            hook.remove()
        assert len(guided.calls) == len(rec.calls)
        first_block_rows[share] = max(seen)
    assert first_block_rows == {True: 1, False: 2}  # the prefix before layer 2 runs once when shared
    assert (results[True] - results[False]).abs().max() < 1e-5
    assert (results[True] - stock).abs().max() > 1e-4


def test_local_attention_matches_reference(dev):
    out = {}
    for backend in ("auto", "reference"):
        with da.apply(dev, da.LocalAttention(radius=1.5, layers=[1, 2], backend=backend)):
            out[backend] = dev_call(dev)
    assert (out["auto"] - out["reference"]).abs().max() < 1e-5
    assert (out["auto"] - dev_call(dev)).abs().max() > 1e-4


def test_text_patch_with_the_prompt_itself_changes_nothing(klein):
    stock = klein_call(klein)
    with da.apply(klein, da.TextPatch(layers=[1, 2], source_prompt="a red circle")):
        assert (klein_call(klein) - stock).abs().max() < 1e-5
    with da.apply(klein, da.TextPatch(layers=[1, 2], source_prompt="a blue square")):
        assert (klein_call(klein) - stock).abs().max() > 1e-4


def test_kv_cache_calls_are_refused(klein, reference_image):
    from diffusers import Flux2KleinKVPipeline

    saved = dict(klein.transformer.attn_processors)
    pipe = Flux2KleinKVPipeline(**klein.components)  # sets its KV-cache processors on the shared transformer
    pipe.set_progress_bar_config(disable=True)
    try:
        with pytest.raises(TypeError, match="does not support Flux2KleinKVPipeline"):
            da.apply(pipe, da.HeadGuidance(heads=["L1H0"]))
        with da.apply(pipe, da.SoftPAG(heads=["L1H0"])):
            with pytest.raises(NotImplementedError, match="KV-cache calls"):
                pipe(prompt="a red circle", image=reference_image, height=32, width=32, num_inference_steps=2,
                     max_sequence_length=16, output_type="latent")
    finally:
        klein.transformer.set_attn_processor(saved)


def test_flux_presets_and_encoderless_text_edits_are_refused_clearly(dev):
    with pytest.raises(ValueError, match="is for flux models, this is a flux2 model"):
        da.apply(dev, da.SoftPAG(["flux:glossy"]))
    with pytest.raises(ValueError, match="Flux2Pipeline has text_encoder=None"):
        da.apply(dev, da.TextPatch(layers=[1], source_prompt="a blue circle"))
    assert not any(type(p).__module__.startswith("dit_attn") for p in dev.transformer.attn_processors.values())
