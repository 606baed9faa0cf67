"""State shared by the installed processors of one model: which heads each layer
perturbs, and — during a guided transformer call — which rows are the perturbed copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels import AttentionPlan, LocalWindow, Perturbation

POOL_MODULE = "local_pool"  # attribute of an attention module holding its LocalPool


class LocalPool(torch.nn.Module):
    """CLEAR's learnable pooling of one attention module: (f, f) weights per pooled cell."""

    def __init__(self, factor: int):
        super().__init__()
        self.spatial_weight = torch.nn.Parameter(torch.full((factor, factor), 1.0 / factor**2))

    @property
    def factor(self) -> int:
        return self.spatial_weight.shape[0]


@dataclass(frozen=True)
class LocalSetting:
    radius: float
    layers: frozenset[int]
    downsample: int | None = None
    train_tokens: int | None = None


@dataclass(frozen=True)
class LayerEdit:
    # (H,) strength per head, 0 for heads left alone; for guided edits also (R, H): one
    # row of strengths per conditional row of the call (head search scores many head sets at once)
    u: torch.Tensor
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
    local: LocalSetting | None = None
    grid: tuple[int, int] | None = None  # image-token grid of the current call
    grid_problem: str = ""  # why the current call has no grid
    local_backend: str = "auto"  # LocalAttention's backend choice, for calls with a window

    def scale_for(self, layer: int, image_tokens: int, head_dim: int) -> float | None:
        """The softmax scale of a local layer with length adjustment; None: the default 1/sqrt(D)."""
        if self.local is None or self.local.train_tokens is None or layer not in self.local.layers:
            return None
        return math.sqrt(math.log(max(image_tokens, 2)) / math.log(self.local.train_tokens) / head_dim)

    def backend_for(self, plan: AttentionPlan | None) -> str:
        return self.local_backend if plan is not None and plan.window is not None else "auto"

    def window(self, layer: int, pool: LocalPool | None) -> LocalWindow | None:
        if self.local is None or layer not in self.local.layers:
            return None
        if self.grid is None:
            raise ValueError(f"LocalAttention needs the image tokens of each call on a full row-major grid: {self.grid_problem}")
        weight = pool.spatial_weight if pool is not None else None
        return LocalWindow(self.local.radius, self.grid, self.local.downsample, weight)

    def plan(self, layer: int, batch: int, image_tokens: tuple[int, int] | None, pool: LocalPool | None = None,
             perturbed: bool = True) -> AttentionPlan | None:
        """The attention plan of `layer` for a batch of `batch` rows, None when stock.

        perturbed=False: the local window only (SD3.5's image-only attn2 is never perturbed).
        """
        window = self.window(layer, pool)
        if not perturbed:
            return AttentionPlan((), image_tokens, window) if window is not None else None
        perturbations = [
            Perturbation(edit.u.expand(batch, -1), edit.target, edit.scope) for edit in self.model_edits.get(layer, ())
        ]
        guided = self.guided_edits.get(layer)
        if guided is not None and self.fork is not None and batch == self.fork.row_map.numel():
            u = torch.zeros(batch, guided.u.shape[-1], dtype=guided.u.dtype)
            u[self.fork.perturbed_rows] = guided.u
            perturbations.append(Perturbation(u, guided.target, guided.scope))
        if not perturbations and window is None:
            return None
        return AttentionPlan(tuple(perturbations), image_tokens, window)


class LayerProcessor:
    """Base of the dit-attn processors: the layer index it serves and the shared state."""

    def __init__(self, layer: int, state: EditState):
        self.layer = layer
        self.state = state
