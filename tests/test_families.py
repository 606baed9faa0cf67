"""What a family spec can declare beyond SD3/FLUX's defaults, checked on the SD3 spec:
widening at the call (for models that reshape with the input batch after their blocks) and a
linear prediction transform (for pipelines that transform the output before the step)."""
import pytest
import torch

import dit_attn as da
from dit_attn.families import family_of

from .conftest import CallRecorder, flux_call, sd3_call
from .test_guidance import explicit_sd3


@pytest.fixture()
def at_call(sd35_pipe, monkeypatch):
    monkeypatch.setattr(family_of(sd35_pipe.transformer), "widen_at_call", True)
    return sd35_pipe


def block_batches(pipe, run):
    seen = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("cfg", [4.0, None])
def test_widening_at_the_call_equals_three_passes(at_call, cfg):
    edit = da.HeadGuidance(heads=["L1H1", (2, 3)], scale=2.5, u=0.8)
    with CallRecorder(at_call) as rec, da.apply(at_call, edit):
        seen = block_batches(at_call, lambda: sd3_call(at_call, guidance_scale=cfg or 1.0))
    stock_rows = rec.calls[0]["hidden_states"].shape[0]
    copies = stock_rows // 2 if cfg else stock_rows
    assert set(seen) == {stock_rows + copies}  # block 0 already runs the perturbed copies: no prefix is shared
    assert not any(hasattr(b, "_diffusers_hook") and b._diffusers_hook.get_hook("dit_attn.fork")
                   for b in at_call.transformer.transformer_blocks)
    for got, want in zip(rec.steps, explicit_sd3(at_call, rec.calls, edit, cfg), strict=True):
        assert (got - want).abs().max() < 1e-5


def test_text_patch_widened_at_the_call_equals_the_block_path(sd35_pipe, monkeypatch):
    edits = (da.TextPatch(layers=[1], source_prompt="a blue square"), da.HeadGuidance(heads=["L2H1"], scale=2.0))
    with da.apply(sd35_pipe, *edits):
        forked = sd3_call(sd35_pipe)
    monkeypatch.setattr(family_of(sd35_pipe.transformer), "widen_at_call", True)
    with da.apply(sd35_pipe, *edits):
        widened = sd3_call(sd35_pipe)
    assert (forked - widened).abs().max() < 1e-5
    assert not torch.allclose(forked, sd3_call(sd35_pipe))


def test_a_prediction_transform_scales_the_guidance_term(flux_pipe, monkeypatch):
    """FLUX without true CFG: ε = ε_c + s·(T(ε_c) − T(ε_p)); with T = 2·x that is the term at scale 2s."""
    with da.apply(flux_pipe, da.HeadGuidance(heads=["L1H2"], scale=3.0)):
        doubled_scale = flux_call(flux_pipe)
    monkeypatch.setattr(family_of(flux_pipe.transformer), "prediction", lambda sample: 2 * sample)
    with da.apply(flux_pipe, da.HeadGuidance(heads=["L1H2"], scale=1.5)):
        transformed = flux_call(flux_pipe)
    assert (doubled_scale - transformed).abs().max() < 1e-5
