"""`apply(pipe_or_transformer, *edits)`: install edits on a stock pipeline; `Handle.remove()` undoes it."""
from __future__ import annotations

import torch

from . import processors
from .edits import NAG, Capture, HeadGuidance, LocalAttention, SoftPAG, TextGuard, TextPatch
from .families import SUPPORTED_MODELS, Family, family_of
from .guidance.controller import GuidanceController
from .heads import LayerInfo, resolve_heads
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


def layers(pipe_or_transformer) -> list[LayerInfo]:
    """The layer/head map: index, module name, kind, heads."""
    transformer = split_target(pipe_or_transformer)[1]
    return family_of(transformer).layers(transformer)


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
    from .localization.patching import TextPatchController

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
        raise NotImplementedError(f"NAG does not run on {family.name} models yet (SD3/SD3.5, FLUX.1, Chroma, Qwen-Image, FLUX.2 and Wan)")
    if pipe is None:
        raise TypeError(f"{name} needs a pipeline (it encodes prompts with the pipeline's text encoders); pass the pipeline, not the transformer")
    check_pipeline(pipe, family, name)
    layers = tuple(range(len(layer_map))) if isinstance(edit, NAG) and edit.layers is None else edit.layers
    bad = [i for i in layers if i >= len(layer_map)]
    if bad:
        raise ValueError(f"{name} layers {bad} do not exist: this model has layers 0-{len(layer_map) - 1}")
    if isinstance(edit, NAG):
        if edit.inert:
            return None
        state.nag = NAGSetting(frozenset(layers), float(edit.scale), float(edit.tau), float(edit.alpha), edit.norm)
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
    if family.makes_videos:
        raise NotImplementedError(f"Capture does not run on {family.name} models yet: its maps are on an image grid, "
                                  "these calls are video (frames × height × width)")
    from .capture.recorder import CaptureRecorder

    if pipe is not None:
        check_pipeline(pipe, family, "Capture")
    return CaptureRecorder(pipe, family, captures[0], layer_map)


def apply(pipe_or_transformer, *edits) -> Handle:
    """Install edits on a pipeline (or a transformer, for model edits such as SoftPAG).

    Returns a Handle: `remove()` restores the stock model; `with apply(...):` does it on exit.
    """
    check_diffusers_version()
    pipe, transformer = split_target(pipe_or_transformer)
    for edit in edits:
        if not isinstance(edit, EDIT_TYPES):
            raise TypeError(f"not an edit: {edit!r}; edits are {', '.join(t.__name__ for t in EDIT_TYPES)}")
    if not edits:
        raise ValueError("apply needs at least one edit")
    existing = getattr(transformer, _MARK, None)
    if existing is not None and existing.active:
        raise RuntimeError("this model is already edited by dit-attn: call remove() on the first handle (or leave its with-block) before applying again")

    family = family_of(transformer)
    layer_map = family.layers(transformer)
    state = EditState()
    guidance = [e for e in edits if isinstance(e, HeadGuidance)]
    if len(guidance) > 1:
        raise ValueError("give at most one HeadGuidance per apply (merge their heads into one)")
    local_edits = [e for e in edits if isinstance(e, LocalAttention)]
    if len(local_edits) > 1:
        raise ValueError("give at most one LocalAttention per apply")
    if local_edits:
        state.local = local_setting(local_edits[0], layer_map)
        state.local_backend = local_edits[0].backend
    for edit in edits:
        if isinstance(edit, SoftPAG):
            for layer, layer_edit in _layer_edits(edit.heads, edit.u, edit.target, edit.scope, layer_map, family.name).items():
                state.model_edits.setdefault(layer, []).append(layer_edit)
    controller = None
    if guidance:
        if pipe is None:
            raise TypeError("HeadGuidance needs a pipeline (it guides the sampling loop); pass the pipeline, not the transformer")
        check_pipeline(pipe, family, "HeadGuidance")
        edit = guidance[0]
        state.guided_edits = _layer_edits(edit.heads, edit.u, edit.target, edit.scope, layer_map, family.name)
        controller = GuidanceController(pipe, family, edit, first_layer=min(state.guided_edits))

    text = _text_controller(pipe, family, edits, state, layer_map)
    capture = _capture_recorder(pipe, family, edits, layer_map)
    if capture is not None and capture.concept_rows is not None:
        if text is not None:
            raise ValueError("Capture(kind='concept') shares image tokens across rows as NAG does: give it without "
                             "TextPatch, TextGuard or NAG in the same apply")
        state.shared_image_layers = frozenset(capture.layers)

    local = install_local(transformer, local_edits[0], state.local, layer_map) if local_edits else None
    try:
        originals = processors.install(transformer, state)
    except BaseException:
        if local is not None:
            local.undo()
        raise
    if text is not None:
        text.install()
    if capture is not None:
        capture.install()
        state.capture = capture
    install_hooks(transformer, family, state, controller, text)
    handle = Handle(transformer, originals, controller, tuple(edits), state, local, text, capture)
    setattr(transformer, _MARK, handle)
    return handle
