import logging
import os

import pytest
import torch
import torch.nn.functional as F

from dit_attn.kernels import AttentionPlan, Perturbation, attention, choose_backend

torch.set_num_threads(1)

DEVICE = os.environ.get("DIT_ATTN_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def on_test_device():
    """DIT_ATTN_TEST_DEVICE=cuda runs these tests on the GPU (new tensors are made there)."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def qkv(batch=3, heads=4, seq=24, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype, device="cpu").to(DEVICE) for _ in range(3))


def dense_masked(q, k, v, mask):
    """Independent definition for the diffusers-PAG map: masked softmax with −inf outside `mask`."""
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("target", ["identity", "uniform"])
@pytest.mark.parametrize("scope", ["joint", "image"])
@pytest.mark.parametrize("u", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("image_tokens", [None, (0, 16), (8, 24)])
def test_sdpa_equals_reference(target, scope, u, image_tokens):
    q, k, v = qkv()
    strength = torch.zeros(3, 4, dtype=torch.float64)
    strength[1, :2] = u  # some heads of one row
    strength[2, :] = u  # all heads of another; row 0 stock
    plan = AttentionPlan((Perturbation(strength, target, scope),), image_tokens)
    ref = attention(q, k, v, plan, backend="reference")
    fast = attention(q, k, v, plan, backend="sdpa")
    assert (ref - fast).abs().max() < 1e-12
    stock = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(fast[0], stock[0])  # untouched row
    assert torch.equal(fast[1, 2:], stock[1, 2:])  # untouched heads
    if u > 0:
        assert (fast[1, :2] - stock[1, :2]).abs().max() > 1e-3


def test_composed_perturbations_equal_reference():
    q, k, v = qkv()
    first = Perturbation(torch.full((3, 4), 0.4, dtype=torch.float64), "identity", "joint")
    second = Perturbation(torch.tensor([[0, 1, 0.5, 1]] * 3, dtype=torch.float64), "uniform", "image")
    third = Perturbation(torch.tensor([[1.0] * 4, [0.0] * 4, [0.2] * 4], dtype=torch.float64), "identity", "image")
    plan = AttentionPlan((first, second, third), (0, 16))
    ref = attention(q, k, v, plan, backend="reference")
    assert (ref - attention(q, k, v, plan, backend="sdpa")).abs().max() < 1e-12


def test_definitions_against_dense_maps():
    """u = 1 against hand-built maps: identity → V, uniform → mean(V), image identity = diffusers PAG mask."""
    q, k, v = qkv(batch=1)
    one = torch.ones(1, 4, dtype=torch.float64)
    out = attention(q, k, v, AttentionPlan((Perturbation(one, "identity", "joint"),)))
    assert (out - v).abs().max() < 1e-12
    out = attention(q, k, v, AttentionPlan((Perturbation(one, "uniform", "joint"),)))
    assert (out - v.mean(-2, keepdim=True)).abs().max() < 1e-12
    # SD3 layout [image ; text]: image rows keep themselves and the text keys, text rows untouched
    n_img, seq = 16, 24
    mask = torch.ones(seq, seq, dtype=torch.bool)
    mask[:n_img, :n_img] = torch.eye(n_img, dtype=torch.bool)
    for backend in ("sdpa", "reference"):
        out = attention(q, k, v, AttentionPlan((Perturbation(one, "identity", "image"),), (0, n_img)), backend=backend)
        assert (out - dense_masked(q, k, v, mask)).abs().max() < 1e-12


def test_float32_and_bshd_layout():
    q, k, v = qkv(dtype=torch.float32)
    strength = torch.rand(3, 4, generator=torch.Generator().manual_seed(1), device="cpu").to(DEVICE)
    plan = AttentionPlan((Perturbation(strength, "uniform", "image"),), (8, 24))
    ref = attention(q, k, v, plan, backend="reference")
    fast = attention(*(x.transpose(1, 2) for x in (q, k, v)), plan, layout="BSHD").transpose(1, 2)
    assert (ref - fast).abs().max() < 1e-5


def test_plain_is_exactly_sdpa_and_image_only_sequence():
    q, k, v = qkv(dtype=torch.float32)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    one = torch.ones(3, 4)
    # no text tokens (SD3.5 attn2-like): image-scope identity is the identity
    out = attention(q, k, v, AttentionPlan((Perturbation(one, "identity", "image"),), None))
    assert (out - v).abs().max() < 1e-6


def test_bad_plans_and_backends(monkeypatch, caplog):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="target must be one of"):
        Perturbation(torch.ones(3, 4), "blur", "joint")
    with pytest.raises(ValueError, match="scope must be one of"):
        Perturbation(torch.ones(3, 4), "identity", "text")
    with pytest.raises(ValueError, match="expected \\(batch, heads\\)"):
        attention(q, k, v, AttentionPlan((Perturbation(torch.ones(2, 4)),)))
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'; valid: 'auto'"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="layout must be one of"):
        attention(q, k, v, layout="BSD")
    monkeypatch.setenv("DIT_ATTN_BACKEND", "reference")
    assert choose_backend(q, AttentionPlan()).name == "reference"
    monkeypatch.delenv("DIT_ATTN_BACKEND")
    assert choose_backend(q, AttentionPlan()).name == "sdpa"


@pytest.mark.parametrize("scope", ["joint", "image"])
def test_gradients_match_reference(scope):
    q, k, v = qkv(batch=2)
    strength = torch.tensor([[0.0, 0.3, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    plan = AttentionPlan((Perturbation(strength, "identity", scope), Perturbation(strength.flip(1), "uniform", scope)), (4, 24))
    grads = []
    for backend in ("reference", "sdpa"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attention(*leaves, plan, backend=backend).pow(2).sum().backward()
        grads.append([x.grad for x in leaves])
    for ref, fast in zip(*grads):
        assert (ref - fast).abs().max() < 1e-10


def test_auto_explains_skipped_backends(monkeypatch, caplog):
    import dit_attn.kernels as kernels

    q = torch.zeros(1, 1, 4, 2)
    monkeypatch.setattr(kernels, "BACKENDS", {"reference": kernels.BACKENDS["reference"], "sdpa": kernels.BACKENDS["sdpa"]})
    monkeypatch.setattr(kernels, "REFERENCE_MAX_BYTES", 10)
    with caplog.at_level(logging.DEBUG, logger="dit_attn.kernels"):
        assert choose_backend(q, AttentionPlan()).name == "sdpa"
    assert "attention backend 'reference' skipped: it would materialise" in caplog.text
    with pytest.raises(ValueError, match="'reference' cannot run here"):
        choose_backend(q, AttentionPlan(), "reference")
