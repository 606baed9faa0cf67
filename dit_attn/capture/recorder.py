"""`Capture` inside a pipeline call: which calls and rows it records, the maps of each attention call,
and their accumulation over the denoising steps.

The processors hand every attention call's q and k (with the layer's plan and the pipeline's mask) to
`CaptureRecorder.record`; the call hook brackets each transformer call with `begin_call` / `end_call`.
A call is recorded when it is the one HeadGuidance and TextPatch act on (`hooks.selection`: the first
call of the step, its conditional rows) and its step is one of `Capture.steps`; only the pipeline's own
conditional rows are read (not HeadGuidance's perturbed copies or TextPatch's source rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..edits import Capture
from ..hooks.pipeline import MethodWrap, capture_prompts
from ..hooks.selection import CallSelector
from ..hooks.steps import denoising_step
from ..kernels import masks
from ..kernels.plan import Perturbation
from .maps import chunks, edited_columns
from .words import TEXT_SEGMENTS, word_positions, words_from_encoder


@dataclass
class CaptureResult:
    """The maps of the last pipeline call.

    maps: reduce="mean": (rows, layers, heads, tokens, H, W), the mean over the captured steps;
        reduce=None: (steps, rows, layers, heads, tokens, H, W). rows are the call's conditional rows
        (one per image), H×W the generated-token grid. cross: the probability of each image query on
        the token (a word: the sum over its tokens); self: each chosen location's probabilities over
        the image keys; concept: each image token's softmax over the concepts.
    """

    kind: str
    maps: torch.Tensor
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    tokens: tuple[str, ...]  # a label per map: the word, "t<index>" or "y,x"
    steps: tuple[int, ...]
    grid: tuple[int, int]
    reduce: str | None

    def settings(self) -> dict:
        """JSON-ready description (everything but the maps)."""
        return {"kind": self.kind, "layers": list(self.layers), "heads": list(self.heads), "tokens": list(self.tokens),
                "steps": list(self.steps), "grid": list(self.grid), "reduce": self.reduce,
                "shape": list(self.maps.shape)}


@dataclass
class _Pending:
    rows: torch.Tensor
    step: int
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    concept_call: bool = False  # the concept rows' own call is running (its rows: the conditional ones, then theirs)


class CaptureRecorder:
    def __init__(self, pipe, family, edit: Capture, layer_map):
        if pipe is None:
            raise TypeError("Capture needs a pipeline (it reads the denoising steps and the prompt); pass the pipeline, "
                            "not the transformer")
        self.pipe, self.family, self.edit = pipe, family, edit
        last = len(layer_map) - 1
        layers = edit.layers if edit.layers is not None else tuple(range(len(layer_map)))
        bad = [i for i in layers if i > last]
        if bad:
            raise ValueError(f"Capture layers {bad} do not exist: this model has layers 0-{last}")
        self.layers = tuple(layers)
        fewest = min(layer_map[i].heads for i in self.layers)
        heads = edit.heads if edit.heads is not None else tuple(range(fewest))
        bad = [h for h in heads if h >= fewest]
        if bad:
            raise ValueError(f"Capture heads {bad} do not exist: the captured layers have heads 0-{fewest - 1}")
        self.heads = tuple(heads)
        self.words = edit.kind == "cross" and edit.tokens is not None and isinstance(edit.tokens[0], str)
        self.concept_rows = None
        if edit.kind == "concept":
            self.concept_rows = self._concepts(pipe, family, edit.tokens)
        self.selector = CallSelector(pipe, family, "Capture")
        self._wrap = self._encoder_wrap = None
        self._encoder_awaited = False
        self._prompt_columns: list[list[list[int]]] | None = None  # per prompt, per word: text positions
        self._pending: _Pending | None = None
        self._reset()

    def _concepts(self, pipe, family, words: tuple[str, ...]):
        """The concept rows' controller (it finds each concept's text positions in those rows at each call)."""
        from .concept import ConceptRows

        if not family.nag or family.text_edits_unsupported:
            raise NotImplementedError(f"Capture(kind='concept') does not run on {family.name} models yet: its processors "
                                      "do not share image tokens across rows")
        return ConceptRows(pipe, family, self.layers, words)

    # --- the pipeline call -------------------------------------------------------------------
    def install(self) -> None:
        if self.concept_rows is not None:
            self.concept_rows.install()
        if not self.words:
            return
        if callable(getattr(self.pipe, "check_inputs", None)) and words_from_encoder(self.pipe) is not None:
            self._wrap = capture_prompts(self.pipe, self._awaiting_encoder)
            self._encoder_wrap = MethodWrap(self.pipe, "encode_prompt", self._reading_encoder)
        elif callable(getattr(self.pipe, "check_inputs", None)):
            self._wrap = capture_prompts(self.pipe, self._new_pipeline_call)
        elif callable(getattr(self.pipe, "encode_prompt", None)):  # Z-Image: no check_inputs, one encode_prompt a call
            self._wrap = MethodWrap(self.pipe, "encode_prompt", self._reading_prompt)
        else:
            raise ValueError(f"Capture cannot read the prompt of {type(self.pipe).__name__} calls (no check_inputs): "
                             "give text-token indices instead of words")

    def _reading_prompt(self, original):
        def encode_prompt(prompt=None, *args, **kwargs):
            self._new_pipeline_call(prompt, kwargs.get("max_sequence_length"))
            return original(prompt, *args, **kwargs)
        return encode_prompt

    def _awaiting_encoder(self, prompt) -> None:
        self._reset()
        self._prompt_columns = None
        self._encoder_awaited = True

    def _reading_encoder(self, original):
        """The words are looked up in the prompt and inputs of the pipeline call's first `encode_prompt` call (the
        next ones encode its negative prompt, or another edit's prompts)."""
        def encode_prompt(*args, **kwargs):
            if self._encoder_awaited:
                self._encoder_awaited = False
                inputs = {name: kwargs.get(name) for name in words_from_encoder(self.pipe)}
                self._new_pipeline_call(kwargs.get("prompt", args[0] if args else None),
                                        inputs.get("max_sequence_length"), inputs.get("image"))
            return original(*args, **kwargs)
        return encode_prompt

    def undo(self) -> None:
        if self.concept_rows is not None:
            self.concept_rows.undo()
        if self._encoder_wrap is not None:
            self._encoder_wrap.undo()
            self._encoder_wrap = None
        if self._wrap is not None:
            self._wrap.undo()
            self._wrap = None

    def _reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._per_step: list[torch.Tensor] = []
        self._steps: list[int] = []
        self._grid: tuple[int, int] | None = None
        self._timesteps = None  # the scheduler's timesteps of the pipeline call the maps are from

    def _new_pipeline_call(self, prompt, max_tokens: int | None = None, image=None) -> None:
        self._reset()
        self._prompt_columns = None
        if not self.words:
            return
        if prompt is None:
            raise ValueError("Capture with words needs the prompt text: call the pipeline with prompt=..., not prompt_embeds "
                             "(or give text-token indices)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._prompt_columns = [word_positions(self.pipe, self.family.name, p, self.edit.tokens, max_tokens, image)
                                for p in prompts]

    # --- one transformer call ----------------------------------------------------------------
    def begin_call(self, batch: int, call: dict, context: str | None) -> None:
        self._pending = None
        rows = self.selector.select(batch, call, context)
        if rows is None:
            return
        if self.pipe.scheduler.timesteps is not self._timesteps:  # a new pipeline call: its maps start afresh
            self._reset()
            self._timesteps = self.pipe.scheduler.timesteps
        step, total = denoising_step(self.pipe)
        if self.edit.steps is not None:
            if max(self.edit.steps) >= total:
                raise ValueError(f"Capture steps {[s for s in self.edit.steps if s >= total]} do not exist: "
                                 f"this call runs steps 0-{total - 1}")
            if step not in self.edit.steps:
                return
        self._pending = _Pending(rows, step)
        self.selected_rows = rows

    def concept_call(self, call: dict):
        """After a captured call of a concept capture: (inputs, concept rows) of the call that computes the
        concept tokens' outputs; None otherwise."""
        pending = self._pending
        if self.concept_rows is None or pending is None:
            return None
        pending.concept_call = True
        pending.rows = torch.arange(pending.rows.numel())
        return self.concept_rows.call_for(call, self.selected_rows)

    def discard_call(self) -> None:
        """The transformer call failed: nothing of it is kept."""
        self._pending = None

    def end_call(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        missing = [i for i in self.layers if i not in pending.layers]
        if missing:
            raise RuntimeError(f"Capture: layers {missing} made no attention call in this transformer call")
        maps = torch.stack([pending.layers[i] for i in self.layers], dim=1)  # (R, L, heads, T, H, W)
        if self.edit.reduce is None:
            self._per_step.append(maps)
        else:
            self._sum = maps if self._sum is None else self._sum + maps
        self._steps.append(pending.step)

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, plan, attention_mask, image_range,
               scale: float | None, layout: str, call) -> None:
        """One attention call of `layer`: q, k (B, H, S, D) for layout "BHSD", (B, S, H, D) for "BSHD"."""
        pending = self._pending
        if pending is None or layer not in self.layers:
            return
        if image_range is None:
            raise ValueError("Capture needs the image tokens of each call (this call's layers do not know them)")
        if call.grid is None:
            raise ValueError(f"Capture needs the image tokens of each call on a full row-major grid: {call.grid_problem}")
        self._grid = call.grid
        if self.edit.kind == "concept":
            return  # its maps come from the attention outputs (record_output)
        with torch.no_grad():
            pending.layers[layer] = self._maps(query, key, plan, attention_mask, image_range, scale, layout, call,
                                               pending.rows)

    def record_output(self, layer: int, out: torch.Tensor, layout: str, call) -> None:
        """A concept capture: the attention output of `layer`, (B, H, S, D) for "BHSD", (B, S, H, D) for "BSHD"."""
        pending = self._pending
        if self.edit.kind != "concept" or pending is None or not pending.concept_call or layer not in self.layers:
            return
        plan = call.rows
        stage = plan.stage_at(layer) if plan is not None else None
        if stage is None or stage.size != out.shape[0]:
            raise RuntimeError(f"Capture: layer {layer} ran without the concept rows")
        if layout == "BSHD":
            out = out.transpose(1, 2)
        source_of = dict(zip(stage.patch_targets.tolist(), stage.patch_sources.tolist()))
        start, stop = call.image_range
        generated = math.prod(call.grid)  # (rows, cols), or (frames, rows, cols) of a video call
        heads = torch.tensor(self.heads, device=out.device)
        text = self._text_columns(start, stop, out.shape[2]).to(out.device)
        maps = []
        with torch.no_grad():
            for row in pending.rows.tolist():
                image = out[row].index_select(0, heads)[:, start:start + generated].float()  # (heads, N, D)
                concept = out[source_of[row]].index_select(0, heads).float()
                concepts = torch.stack([concept[:, text[cols]].mean(dim=1) for cols in self.concept_rows.columns], dim=1)
                scores = torch.softmax(image @ concepts.transpose(-1, -2), dim=-1)  # (heads, N, C): over the concepts
                maps.append(scores.transpose(1, 2).reshape(len(self.heads), -1, *call.grid))
        pending.layers[layer] = torch.stack(maps).cpu()

    def _maps(self, query, key, plan, attention_mask, image_range, scale, layout, call, rows) -> torch.Tensor:
        if layout == "BSHD":
            query, key = query.transpose(1, 2), key.transpose(1, 2)
        rows = rows.to(query.device)
        heads = torch.tensor(self.heads, device=query.device)
        q = query.index_select(0, rows).index_select(1, heads)
        k = key.index_select(0, rows).index_select(1, heads)
        seq_len = q.shape[-2]
        start, stop = image_range
        image = slice(start, stop)
        generated = math.prod(call.grid)  # (rows, cols), or (frames, rows, cols) of a video call
        if generated > stop - start:
            raise ValueError(f"Capture: a {'×'.join(map(str, call.grid))} grid for {stop - start} image tokens")
        bias = None
        if attention_mask is not None:
            bias = masks.additive(masks.as_four_d(attention_mask, seq_len), torch.float32)
            bias = bias.index_select(0, rows) if bias.shape[0] > 1 else bias
            bias = bias.index_select(1, heads.to(bias.device)) if bias.shape[1] > 1 else bias
        perturbations, window = (), None
        if plan is not None:
            window = plan.window
            perturbations = tuple(Perturbation(p.u.to(q.device).index_select(0, rows).index_select(1, heads),
                                               p.target, p.scope) for p in plan.perturbations)

        def probabilities(positions, columns):
            return edited_columns(q, k, positions, columns.to(q.device), image, scale, bias, window, perturbations)

        batch, n_heads = q.shape[0], q.shape[1]
        if self.edit.kind == "self":
            positions = start + self._locations(call.grid)
            keys = torch.arange(start, start + generated)
            out = torch.cat([probabilities(p.to(q.device), keys) for p in chunks(positions, batch, n_heads, seq_len)],
                            dim=2)  # (R, heads, T, N)
            return out.reshape(batch, n_heads, -1, *call.grid).float().cpu()
        text = self._text_columns(start, stop, seq_len)
        groups = self._text_groups(text.numel(), rows)  # (T,) text indices shared by all rows, or per row: T lists
        pieces = []
        for positions in chunks(torch.arange(start, start + generated, device=q.device), batch, n_heads, seq_len):
            if isinstance(groups, torch.Tensor):
                pieces.append(probabilities(positions, text[groups]))
                continue
            p = probabilities(positions, text)  # (R, heads, n, text tokens)
            pieces.append(torch.stack([torch.stack([p[r][..., cols].sum(-1) for cols in groups[r]], dim=-1)
                                       for r in range(batch)]))
        out = torch.cat(pieces, dim=2)  # (R, heads, N, T)
        return out.permute(0, 1, 3, 2).reshape(batch, n_heads, -1, *call.grid).float().cpu()

    def _text_columns(self, start: int, stop: int, seq_len: int) -> torch.Tensor:
        """The text tokens' positions. In [text ; image] calls everything from the image start on is image
        tokens, reference-image tokens after the generated ones included (they end the image range early at
        a local layer); in [image ; text] calls the text follows the image range."""
        if self.family.text_first:
            return torch.arange(0, start)
        return torch.cat([torch.arange(0, start), torch.arange(stop, seq_len)])

    def _locations(self, grid: tuple[int, ...]) -> torch.Tensor:
        """The chosen cells of the call's (rows, cols) or (frames, rows, cols) grid, as flat indices."""
        axes = ("frame", "row", "col") if len(grid) == 3 else ("row", "col")
        cell, sizes = f"({', '.join(axes)})", "×".join(map(str, grid))
        what = "video-token" if len(grid) == 3 else "token"
        flat = []
        for t in self.edit.tokens:
            if isinstance(t, tuple):
                if len(t) != len(grid):
                    raise ValueError(f"Capture location {t} is not a {cell} cell of this call's {sizes} {what} grid")
                if any(v >= n for v, n in zip(t, grid)):
                    ranges = ", ".join(f"{a} 0-{n - 1}" for a, n in zip(("frames", "rows", "columns")[-len(grid):], grid))
                    raise ValueError(f"Capture location {t} is outside the {sizes} {what} grid ({ranges})")
                flat.append(sum(v * math.prod(grid[i + 1:]) for i, v in enumerate(t)))
            else:
                if t >= math.prod(grid):
                    raise ValueError(f"Capture location {t} is outside the {sizes} {what} grid "
                                     f"(flat indices 0-{math.prod(grid) - 1})")
                flat.append(t)
        return torch.tensor(flat, dtype=torch.long)

    def _text_groups(self, text_len: int, rows: torch.Tensor) -> torch.Tensor | list[list[list[int]]]:
        tokens = self.edit.tokens
        if tokens is None:
            return torch.arange(text_len)
        if not self.words:
            bad = [t for t in tokens if t >= text_len]
            if bad:
                raise ValueError(f"Capture text-token indices {bad} do not exist: this call has text tokens 0-{text_len - 1}")
            return torch.tensor(tokens, dtype=torch.long)
        prompts = self._prompt_columns
        if prompts is None:
            raise ValueError("Capture with words needs the prompt text of the pipeline call")
        if rows.numel() % len(prompts):
            raise RuntimeError(f"Capture: {rows.numel()} conditional rows for {len(prompts)} prompts")
        per_prompt = rows.numel() // len(prompts)
        # a T5 stream cut at the call's text length ends in its </s>: the last position is never a word's token
        limit = text_len - 1 if self.family.name in TEXT_SEGMENTS else text_len
        groups = []
        for r in range(rows.numel()):
            kept = [[c for c in cols if c < limit] for cols in prompts[r // per_prompt]]
            cut = [w for w, cols in zip(self.edit.tokens, kept) if not cols]
            if cut:
                raise ValueError(f"Capture: the words {cut} lie past this call's {text_len} text tokens "
                                 "(a longer max_sequence_length keeps them)")
            groups.append(kept)
        return groups

    # --- after the call ------------------------------------------------------------------------
    def labels(self) -> tuple[str, ...]:
        tokens = self.edit.tokens
        if self.edit.kind == "self":
            return tuple(",".join(map(str, t)) if isinstance(t, tuple) else f"i{t}" for t in tokens)
        if self.edit.kind == "concept":
            return tuple(tokens)
        if tokens is None:
            count = 0 if self._grid is None else (self._sum if self._sum is not None else self._per_step[0]).shape[3]
            return tuple(f"t{i}" for i in range(count))
        return tuple(tokens) if self.words else tuple(f"t{t}" for t in tokens)

    def result(self) -> CaptureResult:
        if not self._steps:
            raise RuntimeError("no maps captured yet: call the pipeline with the edits applied first "
                               "(or the Capture steps were not among the call's steps)")
        if self.edit.reduce is None:
            maps = torch.stack(self._per_step)
        else:
            maps = self._sum / len(self._steps)
        return CaptureResult(self.edit.kind, maps, self.layers, self.heads, self.labels(), tuple(self._steps),
                             self._grid, self.edit.reduce)
