"""Checks shared by the families with FLUX.1's block layout (Chroma, LongCat-Image, Ovis-Image, Bria):
`run(pipe, **kwargs)` is the family's seeded pipeline call returning latents."""
import pytest
import torch

import dit_attn as da

from .conftest import CallRecorder, PerturbSDPA, flux_attention_module, replay


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
