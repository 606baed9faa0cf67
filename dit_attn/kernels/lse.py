"""Attention with the log-sum-exp of each query's scaled logits, and the merge of attentions over disjoint key sets.

NAG's token path attends the image queries over [image ; positive text] and over [image ; negative text]; from
each part's output and log-sum-exp the image keys' part runs once for both (`merge`). torch returns the
log-sum-exp only from its fused kernels' own ops: on the CPU `_scaled_dot_product_flash_attention_for_cpu` (any
float dtype, an additive key mask), on CUDA flash attention's and cuDNN's (float16 / bfloat16, no mask: a masked
text's few keys go by matrix products, `masked_lse`). A CUDA op serves a (device, dtype, head dim) only once it
matched the float32 definition on a small input there (`usable`), the first of them that does; where none does,
or where gradients are on (the ops give the log-sum-exp none), callers make their plain attention calls instead.
"""
from __future__ import annotations

import math
import threading
import warnings

import torch

CUDA_DTYPES = (torch.float16, torch.bfloat16)
# the largest mismatch an op may show on the check's input, relative to max(|reference|, 1)
TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}

_verdicts: dict[tuple[str, torch.dtype, int], str | None] = {}  # (device, dtype, head dim) → the op's name or None
_lock = threading.Lock()


def _cpu(q, k, v, bias=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)[:2]


def _cudnn(q, k, v, bias=None):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]


def _flash(q, k, v, bias=None):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]


# in the order they are tried: flash attention's kernel takes any sequence length; cuDNN picks its plans by shape,
# so its check on one small input says less
CUDA_OPS = {"flash": _flash, "cudnn": _cudnn}


def usable(q: torch.Tensor) -> bool:
    """`attention_with_lse` may serve these (B, H, L, D) queries."""
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    if q.device.type == "cpu":
        return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    return q.device.type == "cuda" and _cuda_op(str(q.device), q.dtype, q.shape[-1]) is not None


@torch.compiler.assume_constant_result
def _cuda_op(device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    key = (device, dtype, head_dim)
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _first_passing(*key)
        return _verdicts[key]


def _first_passing(device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    if dtype not in CUDA_DTYPES:
        return None
    errors = []
    for name, op in CUDA_OPS.items():
        error = mismatch(op, device, dtype, head_dim)
        if error is None:
            return name
        errors.append(f"{name}: {error}")
    warnings.warn(f"dit-attn: no CUDA attention op returned a correct log-sum-exp for {dtype}, head dim {head_dim} on "
                  f"{_device_name(device)} ({'; '.join(errors)}; torch {torch.__version__}): NAG makes "
                  "two attention calls a layer there", RuntimeWarning, stacklevel=3)
    return None


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device


def mismatch(op, device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when `op` gives the output and the log-sum-exp of the float32 definition on a small input (strided views,
    as the token path passes them), else the error or the largest mismatch."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 45, 2, head_dim, generator=generator).to(device, dtype).transpose(1, 2) for _ in range(3))
    q, k, v = q[:, :, 3:], k[:, :, :29], v[:, :, :29]
    logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(head_dim)
    expected = (logits.softmax(-1) @ v.float(), logits.logsumexp(-1))
    try:
        got = attention_with_lse(q, k, v, op=op)
    except Exception as err:  # an op this torch, device or dtype does not run
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    for name, a, b in zip(("output", "log-sum-exp"), got, expected):
        if a.shape != b.shape:
            return f"{name} of shape {tuple(a.shape)}, not {tuple(b.shape)}"
        error = float(((a.float() - b).abs() / b.abs().clamp(min=1)).max())
        if not error <= TOLERANCES[dtype]:
            return f"{name} off by {error:.3g}"
    return None


def attention_with_lse(q, k, v, bias=None, op=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) → (softmax attention (B, H, L, D), the log-sum-exp of each query's scaled logits (B, H, L) float32);
    bias: an additive key mask (B, 1, 1, keys) in q's dtype, off the CPU for a few keys (a text's: `masked_lse`).
    Call where `usable`."""
    if bias is not None and q.device.type != "cpu" and op is None:
        return masked_lse(q, k, v, bias)
    if op is None:
        op = _cpu if q.device.type == "cpu" else CUDA_OPS[_cuda_op(str(q.device), q.dtype, q.shape[-1])]
    if op is not _cpu:
        q, k, v = (x.contiguous() for x in (q, k, v))
    out, lse = op(q, k, v, bias)
    # (B, H, L), (B, H, L, 1) or padded along L, as the op gives it
    return out, lse.reshape(*q.shape[:2], -1)[..., : q.shape[2]].float()


# the float32 logits `masked_lse` holds at once, in elements (256 MB)
MASKED_LOGITS = 1 << 26


def masked_lse(q, k, v, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` under an additive key mask by matrix products in float32, queries in chunks of at most
    `MASKED_LOGITS` logits: for a few keys (the fused CUDA ops take no mask)."""
    scale = 1 / math.sqrt(q.shape[-1])
    chunk = max(1, MASKED_LOGITS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    k_t, v, bias = k.float().transpose(-1, -2), v.float(), bias.float()
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, start : start + chunk].float(), k_t).mul_(scale).add_(bias)
        lse = logits.logsumexp(-1)
        outs.append(torch.matmul(logits.sub_(lse.unsqueeze(-1)).exp_(), v).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention over the union of two disjoint key sets from each set's (output, lse)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    weight = torch.sigmoid(lse_b - lse_a).unsqueeze(-1)  # the share of the softmax mass on b's keys
    # one pass in the outputs' dtype: a half-precision weight rounds below the outputs' own rounding
    return torch.lerp(out_a, out_b.to(out_a.dtype), weight.to(out_a.dtype))


def verdicts() -> dict[str, str | None]:
    """This process's choices so far: {"device dtype, head dim D": the CUDA op's name, or None (two calls)}."""
    with _lock:
        return {f"{device} {str(dtype).removeprefix('torch.')}, head dim {dim}": op
                for (device, dtype, dim), op in _verdicts.items()}


def forget() -> None:
    """Drop this process's verdicts on the CUDA ops."""
    with _lock:
        _verdicts.clear()
