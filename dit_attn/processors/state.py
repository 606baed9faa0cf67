"""State shared by the installed processors of one model: which heads each layer
perturbs, and — during a guided transformer call — which rows are the perturbed copies.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import AttentionPlan, Perturbation


@dataclass(frozen=True)
class LayerEdit:
    u: torch.Tensor  # (H,) strength per head, 0 for heads left alone
    target: str
    scope: str


@dataclass(frozen=True)
class Fork:
    """Rows added inside one transformer call, from the fork layer on.

    row_map: indices into the rows entering the call; rows ≥ rows_before are copies
    of conditional rows and carry the guidance perturbation.
    """

    rows_before: int
    row_map: torch.Tensor
    first_layer: int

    @property
    def perturbed_rows(self) -> slice:
        return slice(self.rows_before, self.row_map.numel())


@dataclass
class EditState:
    model_edits: dict[int, list[LayerEdit]] = field(default_factory=dict)  # every row
    guided_edits: dict[int, LayerEdit] = field(default_factory=dict)  # perturbed rows of a guided call
    fork: Fork | None = None
    text_len: int = 0  # text tokens of the current call (FLUX single blocks need it)

    def plan(self, layer: int, batch: int, image_tokens: tuple[int, int] | None) -> AttentionPlan | None:
        """The attention plan of `layer` for a batch of `batch` rows, None when stock."""
        perturbations = [
            Perturbation(edit.u.expand(batch, -1), edit.target, edit.scope) for edit in self.model_edits.get(layer, ())
        ]
        guided = self.guided_edits.get(layer)
        if guided is not None and self.fork is not None and batch == self.fork.row_map.numel():
            u = torch.zeros(batch, guided.u.numel(), dtype=guided.u.dtype)
            u[self.fork.perturbed_rows] = guided.u
            perturbations.append(Perturbation(u, guided.target, guided.scope))
        if not perturbations:
            return None
        return AttentionPlan(tuple(perturbations), image_tokens)


class LayerProcessor:
    """Base of the dit-attn processors: the layer index it serves and the shared state."""

    def __init__(self, layer: int, state: EditState):
        self.layer = layer
        self.state = state
