"""What an attention call should compute besides plain softmax attention.

A plan is data only: per-(batch row, head) SoftPAG strengths and where the image
tokens sit in the joint sequence. Backends read it; processors build it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import SCOPES, TARGETS
from .window import LocalWindow



@dataclass(frozen=True)
class Perturbation:
    """SoftPAG on some (row, head) pairs: the attention map A becomes (1 - u)·A + u·T.

    u: (B, H) strengths in [0, 1]; 0 leaves a (row, head) untouched.
    target: "identity" (T = I) or "uniform" (T = 1/S over the keys).
    scope: "joint" applies T over the whole joint sequence (HeadHunter);
        "image" replaces only the image→image logits of image queries (for identity:
        each image query keeps its own key and all text keys, as diffusers' SD3 PAG
        masks them; for uniform: the image→image logits become their row mean) and
        leaves text queries untouched.
    """

    u: torch.Tensor
    target: str = "identity"
    scope: str = "joint"
    # (touched, full) when every row has the same strengths and this is known without reading u (a model
    # edit): the kernels then choose rows without data-dependent branches (no torch.compile graph break)
    same_rows: tuple[bool, bool] | None = None
    # (B,) bool: rows blended even where u is 0, so that gradients with respect to u reach every head of
    # them (head screening differentiates at u = 0)
    blended_rows: torch.Tensor | None = None
    # (touched, full) per row when the rows differ but are known without reading u (HeadGuidance's
    # perturbed copies): again no data-dependent branch
    known_rows: tuple[tuple[bool, ...], tuple[bool, ...]] | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.u.ndim != 2:
            raise ValueError(f"u must have shape (batch, heads), got {tuple(self.u.shape)}")

    def full_rows(self) -> torch.Tensor:
        """(B,) bool: rows where every head is fully replaced (u == 1)."""
        return (self.u == 1).all(dim=1)

    def touched_rows(self) -> torch.Tensor:
        """(B,) bool: rows where any head is perturbed (or that are blended for gradients)."""
        touched = (self.u != 0).any(dim=1)
        return touched if self.blended_rows is None else touched | self.blended_rows.to(touched.device)

    def touched_runs(self) -> list[slice]:
        """Contiguous runs of the touched rows, as slices."""
        if self.same_rows is not None:
            return [slice(0, self.u.shape[0])] if self.same_rows[0] else []
        if self.known_rows is not None:
            return row_runs(self.known_rows[0])
        return row_runs(self.touched_rows().cpu())

    def full_row_list(self) -> list[bool]:
        if self.same_rows is not None:
            return [self.same_rows[1]] * self.u.shape[0]
        if self.known_rows is not None:
            return list(self.known_rows[1])
        return self.full_rows().cpu().tolist()


def row_runs(mask: torch.Tensor | tuple[bool, ...]) -> list[slice]:
    """Contiguous runs of True in a (B,) bool mask, as slices (views, not copies, of a batch)."""
    runs, start = [], None
    for i, flag in enumerate((mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(slice(start, i))
            start = None
    return runs


@dataclass(frozen=True)
class AttentionPlan:
    """Perturbations applied in order, a local window, and the image-token range.

    image_tokens: (start, stop) of the image tokens in the joint sequence; None means
    every token is an image token (an image-only attention such as SD3.5's attn2).
    window: CLEAR local attention of the image queries (None: global attention); the
        perturbations blend their targets into the windowed attention.
    """

    perturbations: tuple[Perturbation, ...] = ()
    image_tokens: tuple[int, int] | None = None
    window: LocalWindow | None = None

    @property
    def is_plain(self) -> bool:
        return len(self.perturbations) == 0 and self.window is None  # (a tuple truth test breaks torch.compile graphs)

    def image_slice(self, seq_len: int) -> slice:
        if self.image_tokens is None:
            return slice(0, seq_len)
        start, stop = self.image_tokens
        if not 0 <= start <= stop <= seq_len:
            raise ValueError(f"image_tokens {self.image_tokens} outside a sequence of {seq_len} tokens")
        return slice(start, stop)


def check_plan(q: torch.Tensor, plan: AttentionPlan) -> None:
    batch, heads = q.shape[0], q.shape[1]
    for p in plan.perturbations:
        if tuple(p.u.shape) != (batch, heads):
            raise ValueError(f"perturbation u has shape {tuple(p.u.shape)}, expected (batch, heads) = ({batch}, {heads})")
