"""One functional attention API with backends chosen by capability.

`attention(q, k, v, plan)` is the only call processors make. Backends are tried in a
fixed preference order; each has a `can_run` check that returns the reason it cannot
run, logged at debug level when `backend="auto"` skips it. `DIT_ATTN_BACKEND`
overrides the choice of `auto`. Before `auto` first takes `triton` for a configuration,
`selfcheck` compares it with the reference on a small input.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import masks, selfcheck
from .plan import SCOPES, TARGETS, AttentionPlan, Perturbation, check_plan
from .reference import reference_attention
from .flex import flex_local_attention
from .sdpa import blend, sdpa_attention
from .tiled import tiled_attention
from .window import LocalWindow, LocalWindow3D

logger = logging.getLogger(__name__)

LAYOUTS = ("BHSD", "BSHD")


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[..., torch.Tensor]
    # returns None when the backend can run, else the reason it cannot; (q, plan, attn_mask or None)
    why_not: Callable[..., str | None]


def _sdpa_why_not(q: torch.Tensor, plan: AttentionPlan, mask: torch.Tensor | None = None) -> str | None:
    if plan.window is not None:
        return "local windows are computed by the tiled/flex backends (or reference)"
    return None


def _tiled_why_not(q: torch.Tensor, plan: AttentionPlan, mask: torch.Tensor | None = None) -> str | None:
    if plan.window is None:
        return "no local window in the plan"
    if q.is_cuda and mask is None and not isinstance(plan.window, LocalWindow3D):
        return "on CUDA the block-sparse flex kernel is faster"
    return None


def _flex_why_not(q: torch.Tensor, plan: AttentionPlan, mask: torch.Tensor | None = None) -> str | None:
    if plan.window is None:
        return "no local window in the plan"
    if mask is not None:
        return "the flex kernel does not take a pipeline's attention mask (the tiled kernel does)"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401 (availability check)
    except ImportError as err:
        return f"this torch has no flex_attention ({err})"
    if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        return "flex_attention has no backward on the CPU"
    return None


REFERENCE_MAX_BYTES = 8 << 30


def _reference_why_not(q: torch.Tensor, plan: AttentionPlan, mask: torch.Tensor | None = None) -> str | None:
    batch, heads, seq = q.shape[0], q.shape[1], q.shape[2]
    needed = 3 * batch * heads * seq * seq * 4  # logits, map and a target map in float32
    if needed > REFERENCE_MAX_BYTES:
        return f"it would materialise {needed / 2**30:.1f} GiB of attention maps (limit {REFERENCE_MAX_BYTES / 2**30:.0f} GiB)"
    return None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _triton_why_not(q: torch.Tensor, plan: AttentionPlan, mask: torch.Tensor | None = None) -> str | None:
    if plan.is_plain:
        return "plain attention: torch SDPA is as fast"
    if mask is not None:
        return "the triton kernels do not take a pipeline's attention mask (sdpa and tiled do)"
    if isinstance(plan.window, LocalWindow3D) and _needs_grad(q):
        return "the triton 3-D local kernel has no backward (tiled computes gradients)"
    if isinstance(plan.window, LocalWindow) and plan.image_tokens is not None and 0 < plan.image_tokens[0] and plan.image_tokens[1] < q.shape[-2]:
        return "the triton local kernel takes global tokens on one side of the image grid only (reference-image tokens follow it)"
    if torch.is_grad_enabled() and any(p.u.requires_grad for p in plan.perturbations):
        return "gradients with respect to the SoftPAG strengths (head screening) are computed by sdpa"
    dim = q.shape[-1]
    if dim < 16 or dim & (dim - 1):
        return f"head dim {dim} is not a power of two >= 16"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA device (or TRITON_INTERPRET=1, for tests)"
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def _triton_run(q, k, v, plan: AttentionPlan, scale: float | None = None) -> torch.Tensor:
    if isinstance(plan.window, LocalWindow3D):
        from .triton.local3d import video_window_attention

        if _needs_grad(q, k, v):
            raise ValueError("the triton 3-D local kernel has no backward: use backend='tiled' for gradients")
        image = plan.image_slice(q.shape[-2])
        out = video_window_attention(q, k, v, plan.window, image, scale)
        scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        for p in plan.perturbations:
            blend(out, q, k, v, p, image, scale_value)
        return out
    if _needs_grad(q, k, v):
        from .triton.backward import trainable_attention

        return trainable_attention(q, k, v, plan, scale)
    if plan.window is not None:
        from .triton.local import local_window_attention

        return local_window_attention(q, k, v, plan.window, plan.image_slice(q.shape[-2]), plan.perturbations, scale)
    from .triton.softpag import softpag_attention

    return softpag_attention(q, k, v, plan.perturbations, plan.image_tokens, scale)


# fixed preference order for backend="auto"
BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", _triton_run, _triton_why_not),
    "tiled": Backend("tiled", tiled_attention, _tiled_why_not),
    "flex": Backend("flex", flex_local_attention, _flex_why_not),
    "sdpa": Backend("sdpa", sdpa_attention, _sdpa_why_not),
    "reference": Backend("reference", reference_attention, _reference_why_not),
}


def available_backends() -> tuple[str, ...]:
    return tuple(BACKENDS)


def choose_backend(q: torch.Tensor, plan: AttentionPlan, backend: str = "auto", mask: torch.Tensor | None = None) -> Backend:
    """The backend that will run: the named one, the environment's, or the first that can run."""
    if backend == "auto":
        backend = os.environ.get("DIT_ATTN_BACKEND", "auto") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid: 'auto', {', '.join(map(repr, BACKENDS))}")
        reason = BACKENDS[backend].why_not(q, plan, mask)
        if reason is not None:
            raise ValueError(f"attention backend {backend!r} cannot run here: {reason}")
        return BACKENDS[backend]
    for candidate in BACKENDS.values():
        reason = candidate.why_not(q, plan, mask)
        if reason is None and candidate.name == "triton" and isinstance(plan.window, LocalWindow3D):
            reason = "the triton 3-D local kernel runs when named (backend='triton'): not yet measured against tiled on a GPU"
        elif reason is None and candidate.name == "triton":
            reason = selfcheck.failure(selfcheck.configuration(q, plan))
        if reason is None:
            return candidate
        if not torch.compiler.is_compiling():  # a logging call breaks the compiled graph
            logger.debug("attention backend %r skipped: %s", candidate.name, reason)
    raise RuntimeError("no attention backend can run these inputs")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan | None = None,
    *,
    layout: str = "BHSD",
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention with the plan's local window and SoftPAG perturbations.

    q, k, v: (B, H, S, D) for layout "BHSD" (SD3) or (B, S, H, D) for "BSHD" (FLUX);
    the output has the same layout. With no plan this is exactly torch SDPA.
    attn_mask: the pipeline's mask, a bool keep-mask or a float bias, (B, S), (B, S, S) or
    broadcastable to (B, H, S, S); perturbations keep it (see `kernels.masks`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: 'auto', {', '.join(map(repr, BACKENDS))}")
    if layout == "BSHD":
        q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    if plan is None or (attn_mask is not None and plan.is_plain):  # stock attention: nothing to choose
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return out.permute(0, 2, 1, 3) if layout == "BSHD" else out
    check_plan(q, plan)
    if attn_mask is None:
        out = choose_backend(q, plan, backend).run(q, k, v, plan, scale=scale)
    else:
        attn_mask = masks.as_four_d(attn_mask, k.shape[-2])
        out = choose_backend(q, plan, backend, attn_mask).run(q, k, v, plan, scale=scale, attn_mask=attn_mask)
    return out.permute(0, 2, 1, 3) if layout == "BSHD" else out


__all__ = [
    "SCOPES",
    "TARGETS",
    "AttentionPlan",
    "LocalWindow",
    "LocalWindow3D",
    "Perturbation",
    "attention",
    "available_backends",
    "choose_backend",
]
