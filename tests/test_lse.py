"""`kernels.lse`: attention with its log-sum-exp, checked against the float32 definition, and the check that decides
which CUDA op (if any) serves NAG's shared-image-keys merge (run here on the CPU op and on broken stand-ins)."""
import math

import pytest
import torch

from dit_attn.kernels import lse


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
    assert lse._first_passing("cpu", torch.bfloat16, 32) == "right"


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
