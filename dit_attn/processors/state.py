"""State shared by the installed processors of one model: which heads each layer
perturbs, and — during a guided transformer call — which rows are the perturbed copies.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kernels import AttentionPlan, LocalWindow, LocalWindow3D, Perturbation

POOL_MODULE = "local_pool"  # attribute of an attention module holding its LocalPool
NO_LAYER = -1  # the edit key of a layer with no edit: no edit is keyed by it


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
    radius: float | tuple[float, float, float]  # a 3-tuple: (frames, height, width) for video grids
    layers: frozenset[int]
    downsample: int | None = None
    train_tokens: int | None = None
    shape: str = "ellipsoid"  # of a 3-D window: "ellipsoid" or "box"


@dataclass(frozen=True)
class NAGSetting:
    layers: frozenset[int]
    scale: float
    tau: float
    alpha: float
    norm: str = "l1"


@dataclass(frozen=True)
class LayerEdit:
    # (H,) strength per head, 0 for heads left alone; for guided edits also (R, H): one
    # row of strengths per conditional row of the call (head search scores many head sets at once)
    u: torch.Tensor
    target: str
    scope: str
    same_rows: tuple[bool, bool] | None = None  # (touched, full) of every row, for a model edit (see Perturbation)


@dataclass(frozen=True)
class RowStage:
    """The rows a transformer call runs from block `layer` on, until the next stage.

    Every tensor is (R,) for the R rows of the stage:
    select: the row of the previous stage (for the first stage: of the call's inputs) each row comes from;
    from_call: the row of the call's inputs each row comes from (for inputs such as temb that
        the model computes once, before the blocks);
    perturbed_of: for HeadGuidance's copies of the conditional rows (and of their source rows),
        which carry its perturbation, the index of their conditional row among the copied ones
        (guided strengths may have one row each); -1 for the other rows;
    patch_targets / patch_sources: rows whose text-stream keys/values a TextPatch replaces, and the
        rows (of this stage) they take them from.
    """

    layer: int
    select: torch.Tensor
    from_call: torch.Tensor
    perturbed_of: torch.Tensor
    patch_targets: torch.Tensor
    patch_sources: torch.Tensor
    keeps_rows: bool  # select is the identity: the rows entering this stage run on unchanged
    is_call_rows: bool  # from_call is the identity: the stage runs the call's rows
    perturbed_rows: tuple[int, ...] = ()  # the rows of `perturbed`, as Python ints (no data-dependent branch)
    copied_call_rows: tuple[int, ...] = ()  # of those, the copies of the pipeline's own rows (not of source rows)

    @property
    def size(self) -> int:
        return self.select.numel()

    @property
    def perturbed(self) -> torch.Tensor:
        return self.perturbed_of >= 0


@dataclass(frozen=True)
class RowPlan:
    """How the rows of one transformer call change from block to block.

    The first `stock_rows` rows are the pipeline's own; they come first in every stage and
    are all the call returns. Extra rows: a TextPatch's source rows (appended to the call's
    inputs, run up to the last patched layer) and HeadGuidance's perturbed copies of the
    conditional rows (forked at its first layer, run to the end).
    """

    stock_rows: int
    stages: tuple[RowStage, ...]

    def stage_at(self, layer: float) -> RowStage:
        current = self.stages[0]
        for stage in self.stages[1:]:
            if stage.layer > layer:
                break
            current = stage
        return current

    @property
    def final(self) -> RowStage:
        return self.stages[-1]

    @property
    def call_rows(self) -> int:
        """Rows of the call's inputs: the first stage runs all of them, besides any perturbed copies."""
        return self.stages[0].size - len(self.stages[0].perturbed_rows)


def plan_rows(stock_rows: int, sources: dict[int, int] | None = None, patch_end: int | None = None,
              cond: Sequence[int] | None = None, fork_layer: int | None = None) -> RowPlan:
    """The RowPlan of a call with `stock_rows` pipeline rows.

    sources: {target row: source row} with source rows numbered from stock_rows on (the
        inputs the call gets after they are appended); they are dropped from `patch_end` on.
    cond, fork_layer: rows copied (as perturbed rows) at block `fork_layer`, with their
        source rows while those run. Every row index is a Python int: the plan is Python structure (and tensors
        made from it), so a compiled call traces it without reading a tensor value.
    """
    sources = sources or {}
    call_rows = stock_rows + len(sources)
    copy_index = {}  # call row of a copied row → index of its conditional row
    cond = None if cond is None else [int(c) for c in cond]
    for k, c in enumerate(cond or []):
        copy_index[c] = k
        if c in sources:
            copy_index[sources[c]] = k
    # a row is (row of the call's inputs, perturbed copy?): unique within a stage
    previous = [(i, False) for i in range(call_rows)]
    layers = sorted({0} | {x for x in (patch_end, fork_layer) if x is not None})
    stages = []
    for layer in layers:
        rows = list(previous)
        if patch_end is not None and layer >= patch_end:
            rows = [r for r in rows if r[0] < stock_rows]
        if cond is not None and layer == fork_layer:
            copies = list(cond)
            # the perturbed model patches its copies with a perturbed run of their source prompts
            copies += [sources[c] for c in copies if (sources.get(c), False) in rows]
            rows += [(c, True) for c in copies]
        if stages and rows == previous:
            continue
        position = {r: i for i, r in enumerate(rows)}
        select = [previous.index(r) if r in previous else previous.index((r[0], False)) for r in rows]
        targets = [i for i, r in enumerate(rows) if (sources.get(r[0]), r[1]) in position]
        stages.append(RowStage(
            layer=layer,
            select=torch.tensor(select, dtype=torch.long),
            from_call=torch.tensor([r[0] for r in rows], dtype=torch.long),
            perturbed_of=torch.tensor([copy_index[r[0]] if r[1] else -1 for r in rows], dtype=torch.long),
            patch_targets=torch.tensor(targets, dtype=torch.long),
            patch_sources=torch.tensor([position[(sources[rows[i][0]], rows[i][1])] for i in targets], dtype=torch.long),
            keeps_rows=select == list(range(len(previous))),
            is_call_rows=[r[0] for r in rows] == list(range(call_rows)) and not any(r[1] for r in rows),
            perturbed_rows=tuple(i for i, r in enumerate(rows) if r[1]),
            copied_call_rows=tuple(i for i, r in enumerate(rows) if r[1] and r[0] < stock_rows),
        ))
        previous = rows
    return RowPlan(stock_rows, tuple(stages))


@dataclass
class CallState:
    """What the processors need to know about the transformer call running now (set by the call hook)."""

    rows: RowPlan | None = None  # extra rows of the call (TextPatch sources, HeadGuidance copies)
    text_len: int = 0  # text tokens of the call (FLUX single blocks need it)
    image_len: int | None = None  # image tokens of the call, where the family reads them from the call (Z-Image)
    grid: tuple[int, int] | None = None  # image-token grid of the call
    grid_problem: str = ""  # why the call has no grid
    # NAG in a cross-attention (Wan): the negative text states as the blocks see them (1 or a row per source row,
    # S, D), and the rows of the call that NAG guides (its conditional rows and their perturbed copies)
    nag_text: torch.Tensor | None = None
    nag_rows: torch.Tensor | None = None
    nag_tokens: object | None = None  # NAG's negative text as extra tokens of each row (`hooks.nag_tokens.NAGTokens`)
    image_range: tuple[int, int] | None = None  # image tokens of the layer's last plan request (read by a Capture)


@dataclass
class EditState:
    """The static configuration of one `apply` (which heads, layers, windows), and the per-call
    state apart from it: `call` is the state of the call running in this thread."""

    model_edits: dict[int, list[LayerEdit]] = field(default_factory=dict)  # every row
    guided_edits: dict[int, LayerEdit] = field(default_factory=dict)  # perturbed rows of a guided call
    patch_layers: frozenset[int] = frozenset()  # layers whose text keys/values a TextPatch replaces
    local: LocalSetting | None = None
    # NAG's layers and settings (its negative rows are the stage's patch sources, or its negative text rides as
    # extra tokens: `hooks.nag_tokens`)
    nag: NAGSetting | None = None
    local_backend: str = "auto"  # LocalAttention's backend choice, for calls with a window
    capture: object | None = None  # a Capture's recorder (`dit_attn.capture.recorder`): gets each attention call's q, k
    # layers where the source rows take their target rows' image q/k/v as NAG's do (a concept Capture's concept rows)
    shared_image_layers: frozenset[int] = frozenset()
    released: bool = False  # its handle was removed (see `clear`)
    _calls: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def __deepcopy__(self, memo):
        """A copy with its own (empty) per-call state; the configuration is copied."""
        import copy

        fresh = EditState(copy.deepcopy(self.model_edits, memo), copy.deepcopy(self.guided_edits, memo),
                          self.patch_layers, self.local, self.nag, self.local_backend)
        memo[id(self)] = fresh
        return fresh

    def clear(self) -> None:
        """Forget every edit: processors left with this state compute stock attention."""
        self.model_edits, self.guided_edits, self.patch_layers, self.local, self.nag = {}, {}, frozenset(), None, None
        self.capture, self.shared_image_layers = None, frozenset()
        self.released = True

    @property
    def call(self) -> CallState:
        current = getattr(self._calls, "state", None)
        if current is None:
            current = self._calls.state = CallState()
        return current

    def edit_key(self, layer: int) -> int:
        """The index the processor of `layer` looks its edits up by, taken when the processor is made (so it covers
        every later change that keeps the edited layers: HeadGuidance's and head search's new strengths).

        torch.compile specializes a block's graph on it, so layers that compute the same thing share one key:
        a layer with an edit of its own (strengths, a text patch, NAG, a Capture's recording) keeps its index;
        the layers whose only edit is LocalAttention's window (the same on each) take the first of them; a layer
        with no edit takes NO_LAYER, which no edit is keyed by.
        """
        if self._edits_own(layer):
            return layer
        if self.local is not None and layer in self.local.layers:
            return min(at for at in self.local.layers if not self._edits_own(at))
        return NO_LAYER

    def _edits_own(self, layer: int) -> bool:
        if self.capture is not None:  # records each layer by its index
            return True
        touched = any(e.same_rows is None or e.same_rows[0] for e in self.model_edits.get(layer, ()))
        nag = self.nag is not None and layer in self.nag.layers
        return touched or nag or layer in self.guided_edits or layer in self.patch_layers or layer in self.shared_image_layers

    def scale_for(self, layer: int, image_tokens: int, head_dim: int) -> float | None:
        """The softmax scale of a local layer with length adjustment; None: the default 1/sqrt(D)."""
        if self.local is None or self.local.train_tokens is None or layer not in self.local.layers:
            return None
        return math.sqrt(math.log(max(image_tokens, 2)) / math.log(self.local.train_tokens) / head_dim)

    def backend_for(self, plan: AttentionPlan | None) -> str:
        return self.local_backend if plan is not None and plan.window is not None else "auto"

    def window(self, layer: int, pool: LocalPool | None) -> LocalWindow | LocalWindow3D | None:
        if self.local is None or layer not in self.local.layers:
            return None
        call = self.call
        if call.grid is None:
            raise ValueError(f"LocalAttention needs the image tokens of each call on a full row-major grid: {call.grid_problem}")
        if len(call.grid) == 3 or isinstance(self.local.radius, tuple):
            return LocalWindow3D.for_call(self.local.radius, call.grid, self.local.downsample, self.local.shape)
        weight = pool.spatial_weight if pool is not None else None
        return LocalWindow(self.local.radius, call.grid, self.local.downsample, weight)

    def plan(self, layer: int, batch: int, image_tokens: tuple[int, int] | None, pool: LocalPool | None = None,
             perturbed: bool = True) -> AttentionPlan | None:
        """The attention plan of `layer` for a batch of `batch` rows, None when stock.

        perturbed=False: the local window only (SD3.5's image-only attn2 is never perturbed).
        """
        if self.capture is not None:
            self.call.image_range = image_tokens
        window = self.window(layer, pool)
        if not perturbed:
            return AttentionPlan((), image_tokens, window) if window is not None else None
        perturbations = [  # a model edit of strength 0 changes nothing: leave the layer stock
            Perturbation(edit.u.expand(batch, -1), edit.target, edit.scope, edit.same_rows)
            for edit in self.model_edits.get(layer, ()) if edit.same_rows is None or edit.same_rows[0]
        ]
        guided = self.guided_edits.get(layer)
        rows = self.call.rows
        stage = rows.stage_at(layer) if rows is not None else None
        if guided is not None and stage is not None and batch == stage.size and stage.perturbed_rows:
            u = torch.zeros(batch, guided.u.shape[-1], dtype=guided.u.dtype)
            copies = list(stage.perturbed_rows)
            u[copies] = guided.u if guided.u.ndim == 1 else guided.u[stage.perturbed_of[copies]]
            blended = stage.perturbed if guided.u.requires_grad else None
            known = None
            if guided.u.ndim == 1 and blended is None and guided.same_rows is not None:
                touched, full = guided.same_rows
                known = (tuple(touched and i in copies for i in range(batch)), tuple(full and i in copies for i in range(batch)))
            perturbations.append(Perturbation(u, guided.target, guided.scope, blended_rows=blended, known_rows=known))
        if not perturbations and window is None:
            return None
        return AttentionPlan(tuple(perturbations), image_tokens, window)

    def patch_text(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TextPatch: the text-stream keys and values of the target rows replaced by their
        source rows' ones. key, value: (B, ...) text tokens only, batch first."""
        rows = self.call.rows
        if layer not in self.patch_layers or rows is None:
            return key, value
        stage = rows.stage_at(layer)
        if stage.size != key.shape[0] or stage.patch_targets.numel() == 0:
            return key, value
        targets, sources = stage.patch_targets.to(key.device), stage.patch_sources.to(key.device)
        return (key.index_copy(0, targets, key.index_select(0, sources)),
                value.index_copy(0, targets, value.index_select(0, sources)))

    def _nag_rows(self, layer: int, batch: int, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positive rows, their negative rows) of this stage at a NAG layer, or None. shared: also at the
        layers whose source rows share their targets' image tokens for another reason (a concept Capture)."""
        rows = self.call.rows
        nag = self.nag is not None and layer in self.nag.layers
        if not (nag or (shared and layer in self.shared_image_layers)) or rows is None:
            return None
        stage = rows.stage_at(layer)
        if stage.size != batch or stage.patch_targets.numel() == 0:
            return None
        return stage.patch_targets, stage.patch_sources

    def nag_image_inputs(self, layer: int, tensors: tuple[torch.Tensor, ...], text_len: int = 0) -> tuple[torch.Tensor, ...]:
        """NAG, before attention: the negative rows take their positive rows' image-token queries, keys
        and values. tensors: batch first; image tokens only, or (text_len > 0) (B, S, ...) with the
        text tokens leading."""
        pairs = self._nag_rows(layer, tensors[0].shape[0], shared=True)
        if pairs is None:
            return tensors
        targets, sources = (p.to(tensors[0].device) for p in pairs)
        out = []
        for x in tensors:
            image = x[:, text_len:] if text_len else x
            image = image.index_copy(0, sources, image.index_select(0, targets))
            out.append(torch.cat([x[:, :text_len], image], dim=1) if text_len else image)
        return tuple(out)

    def nag_tokens_at(self, layer: int, batch: int) -> tuple[int, torch.Tensor] | None:
        """NAG on the token path at this layer of the call: (positive text tokens, the stage's rows it guides)."""
        tokens = self.call.nag_tokens
        if tokens is None or self.nag is None or layer not in self.nag.layers:
            return None
        rows = self.call.rows
        stage = rows.stage_at(layer) if rows is not None else None
        if stage is not None and stage.size != batch:
            return None
        return tokens.text_len, tokens.rows_of(stage)

    def nag_guide(self, layer: int, hidden: torch.Tensor, image: slice) -> torch.Tensor:
        """NAG, after attention: the positive rows' image-token outputs (Z⁺) combined with their
        negative rows' (Z⁻). hidden: (B, S, H·D) attention outputs, heads merged; image: their tokens."""
        pairs = self._nag_rows(layer, hidden.shape[0])
        if pairs is None:
            return hidden
        targets, sources = (p.to(hidden.device) for p in pairs)
        out = hidden.clone()
        out[targets, image] = nag_combination(self.nag, hidden[targets, image], hidden[sources, image]).to(hidden.dtype)
        return out


def nag_combination(nag: NAGSetting, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """NAG's output from Z⁺ and Z⁻ (…, tokens, channels): extrapolate by the scale, clip each token's norm
    ratio at tau, blend by alpha."""
    guided = torch.lerp(negative, positive, nag.scale)  # scale·Z⁺ − (scale − 1)·Z⁻; Z⁺ itself at scale 1
    # the factor that brings the ratio ‖Z̃‖/‖Z⁺‖ down to tau where it exceeds it: tau·‖Z⁺‖/‖Z̃‖ below 1; 1 elsewhere,
    # and where both norms are 0 (0/0)
    factor = _token_norm(positive, nag.norm) * nag.tau / _token_norm(guided, nag.norm)
    factor = torch.where(factor < 1.0, factor, 1.0)
    return torch.lerp(positive, guided * factor.to(guided.dtype), nag.alpha)  # Z⁺ itself at alpha 0


def _token_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Each token's L1 or L2 norm over its channels (…, tokens, 1), accumulated and returned in float32 or wider.
    Contiguous first: the sum's order, and so its rounding, does not depend on the layout the attention output comes in."""
    x, dtype = x.contiguous(), torch.promote_types(x.dtype, torch.float32)
    if norm == "l1":
        return x.abs().sum(-1, keepdim=True, dtype=dtype)  # linalg.vector_norm's L1 is several times slower on the CPU
    return torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=dtype)


def nag_guided_rows(nag: NAGSetting, positive: torch.Tensor, negative: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Z⁺ (B, tokens, channels) with the guided rows' outputs combined with their Z⁻ (`negative`, the same rows);
    rows: distinct row indices (all of them: no copy, no indexing)."""
    if rows.numel() == positive.shape[0]:  # every row, in some order: the combination is per row
        return nag_combination(nag, positive, negative).to(positive.dtype)
    rows = rows.to(positive.device)
    out = positive.clone()
    out[rows] = nag_combination(nag, positive[rows], negative[rows]).to(positive.dtype)
    return out


class LayerProcessor:
    """Base of the dit-attn processors: the layer index it serves and the shared state.

    `layer` is the index its edits are looked up by (`EditState.edit_key`): its own where an edit is its
    own, else one it shares with the layers that compute the same (so their blocks trace to one graph).
    """

    def __init__(self, layer: int = -1, state: EditState | None = None):
        # diffusers rebuilds processors as `type(p)()` (load_ip_adapter): such a one edits nothing
        self.layer_index = layer
        self.state = state if state is not None else EditState(released=True)
        self.layer = self.state.edit_key(layer)
