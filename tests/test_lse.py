"""`kernels.lse`: attention with its log-sum-exp, checked against the float32 definition, and the check that decides
which CUDA op (if any) serves NAG's shared-image-keys merge (run here on the CPU op and on broken stand-ins)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dit_attn.hooks import nag_tokens_flux
from dit_attn.kernels import lse

DEVICE = os.environ.get("DIT_ATTN_TEST_DEVICE", "cpu")  # cuda in the GPU run (benchmarks/gpu/stage_tests.py)


def definition(q, k, v, bias=None):
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.double()
    return logits.softmax(-1) @ v.double(), logits.logsumexp(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_passes_the_check(dtype):
    assert lse.mismatch(lse._cpu, "cpu", dtype, 32) is None


def test_attention_with_lse_on_strided_views_and_a_key_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 19, 3, 16).transpose(1, 2) for _ in range(3))
    q, k, v = q[:, :, 2:], k[:, :, 1:12], v[:, :, 1:12]
    bias = torch.zeros(2, 1, 1, 11).masked_fill(torch.rand(2, 1, 1, 11) < 0.3, float("-inf"))
    bias[..., 0] = 0  # every row keeps a key
    out, row_lse = lse.attention_with_lse(q, k, v, bias)
    expected, expected_lse = definition(q, k, v, bias)
    assert row_lse.dtype == torch.float32 and row_lse.shape == (2, 3, 17)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row_lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_masked_lse_in_query_chunks(monkeypatch):
    """The matrix-product path CUDA takes under a key mask, here on the CPU with chunks of 3 queries."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 16, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 10, dtype=torch.bfloat16)
    bias[0, ..., 4:] = float("-inf")
    monkeypatch.setattr(lse, "MASKED_LOGITS", 2 * 3 * 10 * 3)
    out, row_lse = lse.masked_lse(q, k, v, bias)
    expected, expected_lse = definition(q, k, v, bias)
    assert out.dtype == torch.bfloat16 and row_lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(row_lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_merge_of_two_key_sets_is_attention_over_their_union():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    merged = lse.merge(lse.attention_with_lse(q, k[:, :, :10], v[:, :, :10]),
                       lse.attention_with_lse(q, k[:, :, 10:], v[:, :, 10:]))
    torch.testing.assert_close(merged.double(), definition(q, k, v)[0], atol=1e-5, rtol=1e-5)


def _shifted_lse(q, k, v, bias=None):
    out, row_lse = lse._cpu(q, k, v, bias)
    return out, row_lse + 0.5


def _per_token_layout(q, k, v, bias=None):  # the lse as (B, L, H): the wrong axis order
    out, row_lse = lse._cpu(q, k, v, bias)
    return out, row_lse.transpose(1, 2).contiguous()


def _unsupported(q, k, v, bias=None):
    raise RuntimeError("No available kernel.\nAborting execution.")


@pytest.mark.parametrize("op, message", [(_shifted_lse, "log-sum-exp off by"),
                                         (_per_token_layout, "log-sum-exp off by"),
                                         (_unsupported, "RuntimeError: No available kernel.")])
def test_the_check_catches_a_wrong_op(op, message):
    error = lse.mismatch(op, "cpu", torch.bfloat16, 32)
    assert error is not None and error.startswith(message), error


def test_the_first_op_that_passes_serves(monkeypatch):
    monkeypatch.setattr(lse, "CUDA_OPS", {"unsupported": _unsupported, "shifted": _shifted_lse, "right": lse._cpu})
    lse.forget()
    assert lse._cuda_op("cpu", torch.bfloat16, 32) == "right"
    assert lse.verdicts() == {"cpu bfloat16, head dim 32": "right"}
    lse.forget()


def test_without_a_passing_op_a_warning_names_each_failure(monkeypatch):
    monkeypatch.setattr(lse, "CUDA_OPS", {"unsupported": _unsupported, "shifted": _shifted_lse})
    with pytest.warns(RuntimeWarning, match=r"unsupported: RuntimeError.*shifted: log-sum-exp off by.*two attention"):
        assert lse._first_passing("cpu", torch.float16, 64) is None


def test_float32_on_cuda_takes_no_op(monkeypatch):
    monkeypatch.setattr(lse, "CUDA_OPS", {"right": lse._cpu})
    assert lse._first_passing("cpu", torch.float32, 32) is None  # the CUDA ops run half precision only


def test_no_merge_where_gradients_flow():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    assert lse.usable(q.detach())
    assert not lse.usable(q)
    with torch.no_grad():
        assert lse.usable(q)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="needs DIT_ATTN_TEST_DEVICE=cuda (the GPU run)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_cuda_op_passes_the_check(dtype, head_dim):
    lse.forget()
    assert lse._cuda_op(str(torch.device(DEVICE)), dtype, head_dim) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked, texts_by_products", [(False, False), (True, False), (True, True)])
def test_nag_shared_image_keys_equals_two_attention_calls(dtype, masked, texts_by_products, monkeypatch):
    """FLUX's layout, (B, S, H, D) of [positive text ; negative text ; image] on the test device, with or without a
    key mask on the texts (Qwen-Image's padded prompts): the merge's text and image outputs against two SDPA calls
    over [positive text ; image] and [negative text ; image] under that mask. texts_by_products: the masked texts'
    part by `masked_lse`, as on CUDA (on the CPU the fused op takes the mask)."""
    if texts_by_products:
        fused = lse.attention_with_lse
        monkeypatch.setattr(lse, "attention_with_lse", lambda q, k, v, bias=None:
                            fused(q, k, v) if bias is None else lse.masked_lse(q, k, v, bias))
    generator = torch.Generator().manual_seed(2)
    n, image, heads, dim = 24, 300, 4, 64
    q, k, v = (torch.randn(2, 2 * n + image, heads, dim, generator=generator).to(DEVICE, dtype) for _ in range(3))
    if not lse.usable(q.transpose(1, 2)):
        pytest.skip(f"no log-sum-exp op for {dtype} on {DEVICE}")
    keys = torch.ones(2, 2 * n + image, dtype=torch.bool, device=DEVICE)
    if masked:
        keys[0, 10:n] = False  # the first row's positive text is 10 tokens, the second row's negative text 5
        keys[1, n + 5 : 2 * n] = False
    shared, text_bias = nag_tokens_flux._text_key_bias(keys if masked else None, n, dtype)
    assert shared
    text, z_pos, z_neg = nag_tokens_flux.shared_image_keys_attention(q, k, v, n, text_bias)
    positive, negative = ([torch.cat([x[:, part], x[:, 2 * n:]], 1).transpose(1, 2) for x in (q, k, v)]
                          for part in (slice(0, n), slice(n, 2 * n)))
    masks = [torch.cat([keys[:, part], keys[:, 2 * n:]], 1)[:, None, None] for part in (slice(0, n), slice(n, 2 * n))]
    out, out_neg = (F.scaled_dot_product_attention(*side, attn_mask=mask if masked else None).transpose(1, 2)
                    for side, mask in zip((positive, negative), masks))
    tolerance = lse.TOLERANCES[dtype]
    for got, want in ((text[:, :n], out[:, :n]), (text[:, n:], out_neg[:, :n]), (z_pos, out[:, n:]),
                      (z_neg, out_neg[:, n:])):
        assert float((got.float() - want.float()).abs().max()) <= tolerance
