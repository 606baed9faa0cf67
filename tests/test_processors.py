"""Installed processors reproduce stock diffusers exactly; edits touch only what they select."""
import pytest
import torch
import torch.nn.functional as F

import dit_attn as da
from dit_attn import processors
from dit_attn.processors.state import EditState

from .conftest import CallRecorder, flux_call, replay, sd3_call


@pytest.fixture(params=["sd3", "sd35", "flux"])
def any_pipe(request):
    return request.getfixturevalue(f"{request.param}_pipe"), request.param


def recorded_calls(pipe, family):
    with CallRecorder(pipe) as rec:
        (flux_call if family == "flux" else sd3_call)(pipe, steps=2)
    return rec.calls


def test_processors_bit_exact(any_pipe):
    pipe, family = any_pipe
    calls = recorded_calls(pipe, family)
    stock = [replay(pipe.transformer, c) for c in calls]
    originals = processors.install(pipe.transformer, EditState())
    try:
        mine = [replay(pipe.transformer, c) for c in calls]
    finally:
        processors.restore(pipe.transformer, originals)
    assert all(torch.equal(a, b) for a, b in zip(stock, mine))
    assert all(torch.equal(a, replay(pipe.transformer, c)) for a, c in zip(stock, calls))


def test_unedited_layers_bit_exact_in_pipeline(any_pipe):
    pipe, family = any_pipe
    call = flux_call if family == "flux" else sd3_call
    stock = call(pipe)
    with da.apply(pipe, da.SoftPAG(heads=["L1"], u=0.0)):  # u = 0: the edit changes nothing
        assert torch.equal(call(pipe), stock)
    with da.apply(pipe, da.SoftPAG(heads=["L1H0"], u=1.0)):
        assert not torch.equal(call(pipe), stock)
    assert torch.equal(call(pipe), stock)


def test_remove_restores_original_objects(sd35_pipe):
    transformer = sd35_pipe.transformer
    before = dict(transformer.attn_processors)
    block = transformer.transformer_blocks[0]
    assert block.attn.processor is block.attn2.processor  # SD3.5 shares one object
    handle = da.apply(sd35_pipe, da.HeadGuidance(heads=["L0H1"]))
    assert block.attn.processor is not before["transformer_blocks.0.attn.processor"]
    handle.remove()
    handle.remove()  # twice is fine
    after = transformer.attn_processors
    assert all(after[k] is v for k, v in before.items())
    assert block.attn.processor is block.attn2.processor
    assert "step" not in vars(sd35_pipe.scheduler)
    assert not transformer._diffusers_hook.hooks


def capture_attention(monkeypatch, module):
    """Record (q, k, v, plan, out) of every kernels.attention call a processor module makes."""
    seen = []
    original = module.kernels.attention

    def spy(q, k, v, plan=None, **kwargs):
        out = original(q, k, v, plan, **kwargs)
        seen.append((q, k, v, plan, out, kwargs.get("layout", "BHSD")))
        return out

    monkeypatch.setattr(module.kernels, "attention", spy)
    return seen


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_only_selected_heads_change(family, monkeypatch, request):
    import dit_attn.processors.dispatch as flux_module  # FLUX's processor makes its kernel call there
    import dit_attn.processors.sd3 as sd3_module

    pipe = request.getfixturevalue(f"{family}_pipe")
    seen = capture_attention(monkeypatch, flux_module if family == "flux" else sd3_module)
    call = flux_call if family == "flux" else sd3_call
    with da.apply(pipe, da.SoftPAG(heads=["L1H2", (2, 0), (2, 3)], u=0.5, scope="joint")):
        call(pipe, steps=1)
    layers = da.layers(pipe)
    selected = {1: {2}, 2: {0, 3}}
    # SD3 layers always call dit-attn's kernels; FLUX's unedited layers make diffusers' own dispatch call
    called = list(range(len(layers))) if family == "sd3" else sorted(selected)
    assert len(seen) == len(called)
    for index, (q, k, v, plan, out, layout) in zip(called, seen):
        if layout == "BSHD":
            q, k, v, out = (x.transpose(1, 2) for x in (q, k, v, out))
        stock = F.scaled_dot_product_attention(q, k, v)
        changed = {h for h in range(q.shape[1]) if not torch.equal(out[:, h], stock[:, h])}
        assert changed == selected.get(index, set()), f"layer {index}"
        for h in changed:  # and the change is the SoftPAG blend toward V
            assert (out[:, h] - (0.5 * stock[:, h] + 0.5 * v[:, h])).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_processors_bit_exact_in_bfloat16(family):
    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

    pipe = (build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8, qk_norm="rms_norm") if family == "sd3"
            else build_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8))
    pipe.set_progress_bar_config(disable=True)
    calls = recorded_calls(pipe, family)
    pipe.transformer.to(torch.bfloat16)
    calls = [{k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in c.items()}
             for c in calls]
    stock = [replay(pipe.transformer, c) for c in calls]
    for edits in ((da.SoftPAG(["L0"], u=0.0),), (da.SoftPAG(["L1H0"], u=1.0),)):
        with da.apply(pipe.transformer, *edits):
            mine = [replay(pipe.transformer, c) for c in calls]
        if edits[0].u == 0:
            assert all(torch.equal(a, b) for a, b in zip(stock, mine))
        else:  # the edit changes only what it selects: layer 0 stays exact, so the output differs
            assert all(not torch.equal(a, b) for a, b in zip(stock, mine))
