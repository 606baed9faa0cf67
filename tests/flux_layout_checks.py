"""Checks shared by the families with FLUX.1's block layout (Chroma, LongCat-Image, Ovis-Image, Bria):
`run(pipe, **kwargs)` is the family's seeded pipeline call returning latents."""
import pytest
import torch

import dit_attn as da
from dit_attn import processors
from dit_attn.families import family_of
from dit_attn.processors.state import EditState

from .conftest import CallRecorder, PerturbSDPA, flux_attention_module, replay


def attention_processors(pipe) -> dict:
    """The processors dit-attn replaces, by key (also for models without `attn_processors`)."""
    return family_of(pipe.transformer).attention_processors(pipe.transformer)


def processors_bit_exact(pipe, calls: list[dict], stock_processor: str) -> None:
    """With nothing to edit, dit-attn's FLUX.1 processor on every attention module reproduces the recorded
    calls exactly; restore puts the family's own processors back."""
    stock = [replay(pipe.transformer, c) for c in calls]
    originals = processors.install(pipe.transformer, EditState())
    try:
        assert all(type(p).__module__ == "dit_attn.processors.flux" for p in attention_processors(pipe).values())
        mine = [replay(pipe.transformer, c) for c in calls]
    finally:
        processors.restore(pipe.transformer, originals)
    assert all(type(p).__name__ == stock_processor for p in attention_processors(pipe).values())
    assert all(torch.equal(a, b) for a, b in zip(stock, mine))


def softpag_u0_is_stock_and_layers_are_double_then_single(pipe, run, heads: int, **kwargs) -> None:
    """SoftPAG at u = 0 is the stock run bit for bit; layers 0-1 are the double blocks, 2-3 the single ones."""
    stock = run(pipe, **kwargs)
    with da.apply(pipe, da.SoftPAG(["L0", "L3"], u=0.0)):
        assert torch.equal(run(pipe, **kwargs), stock)
    layer_map = da.layers(pipe)
    assert [(info.index, info.kind) for info in layer_map] == [(0, "double"), (1, "double"), (2, "single"), (3, "single")]
    assert layer_map[1].name == "transformer_blocks.1.attn"
    assert layer_map[2].name == "single_transformer_blocks.0.attn"
    assert all(info.heads == heads for info in layer_map)


def softpag_equals_an_sdpa_perturbation(pipe, call: dict, layer: int, heads, target: str) -> None:
    """SoftPAG at u = 1 on `heads` of `layer` equals replacing their SDPA output inside that one module."""
    with PerturbSDPA(flux_attention_module(pipe, layer), heads, target):
        want = replay(pipe.transformer, call)
    with da.apply(pipe.transformer, da.SoftPAG([(layer, h) for h in heads], u=1.0, target=target)):
        got = replay(pipe.transformer, call)
    assert (got - want).abs().max() < 1e-5
    assert (got - replay(pipe.transformer, call)).abs().max() > 1e-4


def shared_prefix_equals_unshared_and_remove_restores(pipe, run, **kwargs) -> None:
    """Calls per step equal stock with and without prefix sharing, both give one result, remove() gives stock back."""
    with CallRecorder(pipe) as rec:
        run(pipe, **kwargs)
    stock_calls, stock = len(rec.calls), run(pipe, **kwargs)
    results = {}
    for share in (True, False):
        handle = da.apply(pipe, da.HeadGuidance(heads=["L2H0", "L3"], scale=1.5, share_prefix=share))
        with CallRecorder(pipe) as rec:
            results[share] = run(pipe, **kwargs)
        handle.remove()
        assert len(rec.calls) == stock_calls
    assert (results[True] - results[False]).abs().max() < 1e-5
    assert (results[True] - stock).abs().max() > 1e-4
    assert torch.equal(run(pipe, **kwargs), stock)


def local_attention_tiled_equals_reference(pipe, run, **kwargs) -> None:
    out = {}
    for backend in ("tiled", "reference"):
        with da.apply(pipe, da.LocalAttention(radius=2.0, layers=[1, 2], backend=backend)):
            out[backend] = run(pipe, **kwargs)
    stock = run(pipe, **kwargs)
    assert (out["tiled"] - out["reference"]).abs().max() < 1e-4
    assert (out["tiled"] - stock).abs().max() > 1e-4
    with da.apply(pipe, da.LocalAttention(radius=100.0, layers=[1, 2], backend="tiled")):
        assert torch.equal(run(pipe, **kwargs), stock)  # a circle covering the grid is stock attention


def flux_presets_are_refused(pipe, family: str) -> None:
    with pytest.raises(ValueError, match=f"is for flux models, this is a {family} model"):
        da.apply(pipe, da.SoftPAG(["flux:glossy"]))
