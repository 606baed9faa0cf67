"""`apply(pipe_or_transformer, *edits)`: install edits on a stock pipeline; `Handle.remove()` undoes it."""
from __future__ import annotations

import torch

from . import processors
from .edits import NAG, Capture, HeadGuidance, LocalAttention, SoftPAG, TextGuard, TextPatch
from .families import SUPPORTED_MODELS, Family, family_of
from .guidance.controller import GuidanceController
from .heads import EXPERTS, LayerInfo, heads_by_expert, maps_differ, resolve_heads
from .hooks.calls import install_hooks, remove_hooks
from .hooks.private import check_diffusers_version
from .hooks.selection import check_pipeline
from .local_attention import LocalInstall, install_local, local_setting
from .processors.state import EditState, LayerEdit, NAGSetting

EDIT_TYPES = (SoftPAG, HeadGuidance, LocalAttention, TextPatch, TextGuard, NAG, Capture)
_MARK = "_dit_attn_handle"


def split_target(obj) -> tuple[object | None, torch.nn.Module]:
    """(pipeline or None, transformer) from a pipeline or a transformer model."""
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        family_of(transformer)
        return obj, transformer
    if isinstance(obj, torch.nn.Module):
        family_of(obj)
        return None, obj
    raise TypeError(
        f"expected a diffusers pipeline or transformer, got {type(obj).__name__}; "
        f"supported transformers: {', '.join(SUPPORTED_MODELS)}"
    )


def _layer_edits(heads, u: float, target: str, scope: str, layer_map: list[LayerInfo], family: str) -> dict[int, LayerEdit]:
    edits = {}
    for layer, head_ids in resolve_heads(heads, layer_map, family).items():
        strength = torch.zeros(layer_map[layer].heads)
        strength[list(head_ids)] = float(u)
        touched = float(u) != 0
        edits[layer] = LayerEdit(strength, target, scope, (touched, float(u) == 1 and len(head_ids) == layer_map[layer].heads))
    return edits


class Handle:
    """Undo for `apply`; also a context manager."""

    def __init__(self, transformer, originals: dict, controller: GuidanceController | None, edits: tuple,
                 state: EditState, local: LocalInstall | None = None, text=None, capture=None):
        self.transformer = transformer
        self.edits = edits
        self.state = state
        self._originals = originals
        self._controller = controller
        self._local = local
        self._text = text
        self._capture = capture
        self.active = True
        # on a two-expert pipeline: {"E1": handle, "E2": handle} of the edited experts (this handle is one);
        # removing this one removes them all
        self.experts: dict[str, "Handle"] = {}

    @property
    def maps(self):
        """The attention maps a Capture recorded in the last pipeline call (`dit_attn.capture.CaptureResult`)."""
        if self._capture is None:
            raise ValueError("this apply has no Capture edit: apply da.Capture(...) with the other edits to record maps")
        return self._capture.result()

    def remove(self) -> None:
        """Restore the original processors, hooks and scheduler. Safe to call twice."""
        if not self.active:
            return
        for part in self.experts.values():
            if part is not self:
                part.remove()
        processors.restore(self.transformer, self._originals, self.state)
        remove_hooks(self.transformer)
        if self._capture is not None:
            self._capture.undo()
        if self._controller is not None:
            self._controller.unwrap()
        if self._text is not None:
            self._text.unwrap()
        if self._local is not None:
            self._local.undo()
        if getattr(self.transformer, _MARK, None) is self:
            delattr(self.transformer, _MARK)
        self.active = False

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle(active={self.active}, edits={self.edits!r})"


def _text_controller(pipe, family: Family, edits: tuple, state: EditState, layer_map: list[LayerInfo]):
    """The controller of a TextPatch, TextGuard or NAG (at most one per apply: each adds source-prompt
    rows), or None."""
    from .localization.guard import GuardController
    from .localization.patching import GivenNegativeController, PerPromptNegativeController, TextPatchController

    text_edits = [e for e in edits if isinstance(e, (TextPatch, TextGuard, NAG))]
    if not text_edits:
        return None
    if len(text_edits) > 1:
        if any(isinstance(e, NAG) for e in text_edits):
            raise ValueError("give at most one NAG per apply, and not with a TextPatch or TextGuard (each adds its own prompt's rows)")
        raise ValueError("give at most one TextPatch or TextGuard per apply")
    edit = text_edits[0]
    name = type(edit).__name__
    if family.text_edits_unsupported:
        raise NotImplementedError(f"{name} does not run on {family.name} models: {family.text_edits_unsupported}")
    if isinstance(edit, NAG) and not family.nag:
        raise NotImplementedError(f"NAG does not run on {family.name} models yet")
    if pipe is None:
        raise TypeError(f"{name} needs a pipeline (it encodes prompts with the pipeline's text encoders); pass the pipeline, not the transformer")
    check_pipeline(pipe, family, name, controlnet=isinstance(edit, NAG))
    given = isinstance(edit, NAG) and edit.negative_prompt_embeds is not None
    if given:
        family.check_given_negative(edit)
    elif "text_encoder" in pipe.components and pipe.text_encoder is None:
        hint = " (or give NAG negative_prompt_embeds)" if isinstance(edit, NAG) else ""
        raise ValueError(f"{name} encodes its prompt with the pipeline's own text encoder, and this {type(pipe).__name__} "
                         f"has text_encoder=None: load the pipeline with its text encoder{hint}")
    layers = tuple(range(len(layer_map))) if isinstance(edit, NAG) and edit.layers is None else edit.layers
    bad = [i for i in layers if i >= len(layer_map)]
    if bad:
        raise ValueError(f"{name} layers {bad} do not exist: this model has layers 0-{len(layer_map) - 1}")
    if isinstance(edit, NAG):
        if edit.inert:
            return None
        state.nag = NAGSetting(frozenset(layers), float(edit.scale), float(edit.tau), float(edit.alpha), edit.norm)
        if given:
            return GivenNegativeController(pipe, family, layers, edit)
        if edit.per_prompt:
            return PerPromptNegativeController(pipe, family, layers, edit)
        return TextPatchController(pipe, family, layers, edit.start, lambda rows: [edit.negative_prompt] * rows,
                                   "NAG", edit.end)
    state.patch_layers = frozenset(edit.layers)
    if isinstance(edit, TextGuard):
        return GuardController(pipe, family, edit)
    return TextPatchController(pipe, family, edit.layers, edit.start, lambda rows: [edit.source_prompt] * rows)


def _capture_recorder(pipe, family: Family, edits: tuple, layer_map: list[LayerInfo]):
    """The recorder of the Capture edit (at most one per apply), or None."""
    captures = [e for e in edits if isinstance(e, Capture)]
    if not captures:
        return None
    if len(captures) > 1:
        raise ValueError("give at most one Capture per apply")
    from .capture.recorder import CaptureRecorder
    from .capture.video import VideoCaptureRecorder

    if pipe is not None:
        check_pipeline(pipe, family, "Capture")
    recorder = VideoCaptureRecorder if family.video_capture else CaptureRecorder
    return recorder(pipe, family, captures[0], layer_map)


def experts(pipe_or_transformer) -> dict[str, torch.nn.Module]:
    """The transformers a pipeline's steps run: {"E1": transformer, "E2": transformer_2} for a two-expert
    pipeline (Wan 2.2: E1 takes the steps at or above the boundary timestep, the high-noise ones that come
    first; E2 the rest), else {"": its one transformer}."""
    pipe, transformer = split_target(pipe_or_transformer)
    second = getattr(pipe, "transformer_2", None) if pipe is not None else None
    if not isinstance(second, torch.nn.Module):
        return {"": transformer}
    if family_of(second).name != family_of(transformer).name:
        raise TypeError(f"transformer_2 is a {type(second).__name__}, transformer a {type(transformer).__name__}: "
                        "dit-attn edits two experts of the same family")
    return {name: getattr(pipe, attribute) for name, attribute in EXPERTS.items()}


def _selected_experts(pipe_or_transformer, expert: str | None) -> dict[str, torch.nn.Module]:
    models = experts(pipe_or_transformer)
    if expert is None:
        return models
    if "" in models:
        raise ValueError(f"expert={expert!r} is for two-expert pipelines (Wan 2.2's transformer and transformer_2); "
                         "this one has one transformer")
    if expert not in models:
        raise ValueError(f"expert must be one of {', '.join(models)} (or None: both), got {expert!r}")
    return {expert: models[expert]}


def layers(pipe_or_transformer, expert: str | None = None) -> list[LayerInfo]:
    """The layer/head map: index, module name, kind, heads (of `expert`, "E1" or "E2", on a two-expert
    pipeline; E1's by default)."""
    models = _selected_experts(pipe_or_transformer, expert)
    transformer = next(iter(models.values()))
    return family_of(transformer).layers(transformer)


def apply(pipe_or_transformer, *edits, expert: str | None = None) -> Handle:
    """Install edits on a pipeline (or a transformer, for model edits such as SoftPAG).

    On a two-expert pipeline (Wan 2.2) the edits go to both experts, or to `expert` ("E1": `transformer`,
    "E2": `transformer_2`) alone; heads are addressed per expert as "E1:L3H2" / "E2:L3H2" (plain "L3H2":
    both), and an expert no edit addresses stays stock.
    Returns a Handle: `remove()` restores the stock model(s); `with apply(...):` does it on exit.
    """
    check_diffusers_version()
    pipe, transformer = split_target(pipe_or_transformer)
    for edit in edits:
        if not isinstance(edit, EDIT_TYPES):
            raise TypeError(f"not an edit: {edit!r}; edits are {', '.join(t.__name__ for t in EDIT_TYPES)}")
    if not edits:
        raise ValueError("apply needs at least one edit")
    every_expert = experts(pipe_or_transformer)
    models = _selected_experts(pipe_or_transformer, expert)
    for model in every_expert.values():
        existing = getattr(model, _MARK, None)
        if existing is not None and existing.active:
            raise RuntimeError("this model is already edited by dit-attn: call remove() on the first handle (or leave "
                               "its with-block) before applying again")

    family = family_of(transformer)
    edits = tuple(e.resolved(family, type(pipe).__name__) if isinstance(e, NAG) else e for e in edits)
    maps = {name: family.layers(model) for name, model in models.items()}
    states = {name: EditState() for name in models}
    guidance = [e for e in edits if isinstance(e, HeadGuidance)]
    if len(guidance) > 1:
        raise ValueError("give at most one HeadGuidance per apply (merge their heads into one)")
    local_edits = [e for e in edits if isinstance(e, LocalAttention)]
    if len(local_edits) > 1:
        raise ValueError("give at most one LocalAttention per apply")
    if local_edits and local_edits[0].weights is not None and len(models) > 1:
        raise ValueError("LocalAttention weights are trained for one transformer: give expert='E1' or expert='E2'")
    for name, state in states.items():
        if local_edits:
            state.local = local_setting(local_edits[0], maps[name])
            state.local_backend = local_edits[0].backend
    for edit in edits:
        if isinstance(edit, SoftPAG):
            for name, heads in _expert_heads(edit.heads, maps).items():
                layer_edits = _layer_edits(heads, edit.u, edit.target, edit.scope, maps[name], family.name)
                for layer, layer_edit in layer_edits.items():
                    states[name].model_edits.setdefault(layer, []).append(layer_edit)
    controller = None
    if guidance:
        if pipe is None:
            raise TypeError("HeadGuidance needs a pipeline (it guides the sampling loop); pass the pipeline, not the transformer")
        check_pipeline(pipe, family, "HeadGuidance")
        edit = guidance[0]
        for name, heads in _expert_heads(edit.heads, maps).items():
            states[name].guided_edits = _layer_edits(heads, edit.u, edit.target, edit.scope, maps[name], family.name)
        first_layer = min(min(state.guided_edits) for state in states.values() if state.guided_edits)
        controller = GuidanceController(pipe, family, edit, first_layer=first_layer)

    first = next(iter(models))
    text = _text_controller(pipe, family, edits, states[first], maps[first])
    if text is not None:
        _check_same_maps(maps, "TextPatch, TextGuard and NAG address layers by index")
        for state in states.values():
            state.patch_layers, state.nag = states[first].patch_layers, states[first].nag
    capture = _capture_recorder(pipe, family, edits, maps[first])
    if capture is not None:
        _check_same_maps(maps, "Capture addresses layers by index")
    if capture is not None and capture.concept_rows is not None:
        if text is not None:
            raise ValueError("Capture(kind='concept') shares image tokens across rows as NAG does: give it without "
                             "TextPatch, TextGuard or NAG in the same apply")
        # the concept rows see the conditional rows' image at every layer up to the last captured one
        states[first].shared_image_layers = frozenset(range(max(capture.layers) + 1))

    # an expert no edit addresses (E1-only heads, say) keeps its stock processors and no hooks
    edited = [name for name, state in states.items() if len(models) == 1 or state.model_edits or state.guided_edits
              or local_edits or text is not None or capture is not None] or [first]
    for state in states.values():  # before the processors: Wan's cross-attention gets dit-attn's processor for it
        state.capture = capture  # one recorder: each step's maps come from the expert that ran it
    installed = []  # (expert, its LocalInstall, its original processors)
    try:
        for name in edited:
            model, state = models[name], states[name]
            local = install_local(model, local_edits[0], state.local, maps[name]) if local_edits else None
            try:
                originals = processors.install(model, state)
            except BaseException:
                if local is not None:
                    local.undo()
                raise
            installed.append((name, local, originals))
    except BaseException:
        for name, local, originals in reversed(installed):
            processors.restore(models[name], originals, states[name])
            if local is not None:
                local.undo()
        raise
    if text is not None:
        text.install()
    if capture is not None:
        capture.install()
    handles = {}
    for name, local, originals in installed:
        model, state = models[name], states[name]
        install_hooks(model, family, state, controller if state.guided_edits else None, text, originals, pipe)
        shared = not handles  # the first handle owns the pipeline-wide controllers
        handles[name] = Handle(model, originals, controller if shared else None, tuple(edits), state, local,
                               text if shared else None, capture if shared else None)
        setattr(model, _MARK, handles[name])
    handle = next(iter(handles.values()))
    if "" not in models:
        handle.experts = handles
    return handle


def _expert_heads(heads, maps: dict[str, list[LayerInfo]]) -> dict[str, list]:
    """{expert: its head addresses}; a one-transformer model ({"": map}) takes the addresses as given."""
    if "" in maps:
        return {"": list(heads)}
    return heads_by_expert(heads, maps)


def _check_same_maps(maps: dict[str, list[LayerInfo]], why: str) -> None:
    """Refuse edits given for both experts when the experts' layer maps differ."""
    if maps_differ(maps):
        raise ValueError(f"the experts' layer maps differ and {why}: give expert='E1' or expert='E2'")
