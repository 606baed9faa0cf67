"""Edits say what to change. They hold no model and no tensors (but NAG's negative prompt given
as embeddings); `apply` checks them against the model's layer/head map.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field, fields, replace

from .checks import SCOPES, TARGETS, check_fraction, check_radius, check_window_shape
from .heads import normalize_heads


def _plain(value):
    """JSON-ready: tuples become lists, paths strings."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _tupled(value):
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


class Edit:
    """Base of the edits: `to_dict()` gives JSON-ready settings, `from_dict()` rebuilds the edit."""

    def to_dict(self) -> dict:
        return {"edit": type(self).__name__, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_dict(cls, data: dict) -> "Edit":
        data = dict(data)
        name = data.pop("edit", cls.__name__)
        if cls is Edit:
            return edit_from_dict({"edit": name, **data})
        if name != cls.__name__:
            raise ValueError(f"settings of a {name}, not a {cls.__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**{k: _tupled(v) for k, v in data.items()})


def edit_from_dict(data: dict) -> Edit:
    """The edit whose `to_dict()` gave `data`."""
    if not isinstance(data, dict) or data.get("edit") not in EDITS:
        raise ValueError(f"an edit's settings are a dict with 'edit' one of {', '.join(EDITS)}, got {data!r}")
    return EDITS[data["edit"]].from_dict(data)


def _check_some_heads(edit: str, heads: tuple) -> None:
    if not heads:
        raise ValueError(f"{edit} needs at least one head: e.g. 'L1H10', (1, 10), 'L2' (every head of layer 2) or a preset")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")


@dataclass(frozen=True)
class SoftPAG(Edit):
    """Perturb the model itself: for each selected (layer, head) the attention map
    becomes (1 - u)·A + u·T (SoftPAG; u = 1 with the identity target is PAG).

    target: "identity" or "uniform". scope: "joint" (T over the whole joint sequence,
    as HeadHunter) or "image" (only image→image attention of image queries, as
    diffusers' SD3 PAG).
    """

    heads: tuple = field(default=())
    u: float = 1.0
    target: str = "identity"
    scope: str = "joint"

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", normalize_heads(self.heads))
        _check_some_heads(type(self).__name__, self.heads)
        check_fraction("u", self.u)
        _check_choice("target", self.target, TARGETS)
        _check_choice("scope", self.scope, SCOPES)


@dataclass(frozen=True)
class HeadGuidance(Edit):
    """Guide away from the SoftPAG-perturbed model on the conditional prompt.

    With CFG: ε = ε_u + g·(ε_c − ε_u) + s·(ε_c − ε_p); without: ε = ε_c + s·(ε_c − ε_p),
    where ε_p is the prediction with the selected heads perturbed (HeadHunter, Eq. 5).
    start/end are fractions of the denoising steps; outside [start, end) the step is stock.
    share_prefix computes the blocks before the first perturbed layer once for the
    conditional and perturbed rows (same result, less work).
    """

    heads: tuple = field(default=())
    scale: float = 3.0
    u: float = 1.0
    target: str = "identity"
    scope: str = "joint"
    start: float = 0.0
    end: float = 1.0
    share_prefix: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", normalize_heads(self.heads))
        _check_some_heads(type(self).__name__, self.heads)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale >= 0 or math.isinf(self.scale):
            raise ValueError(f"scale must be a finite number >= 0, got {self.scale!r}")
        check_fraction("u", self.u)
        _check_choice("target", self.target, TARGETS)
        _check_choice("scope", self.scope, SCOPES)
        check_fraction("start", self.start)
        check_fraction("end", self.end)
        if self.start >= self.end:
            raise ValueError(f"start must be < end (fractions of the denoising steps), got start={self.start}, end={self.end}")

    def active_at(self, fraction: float) -> bool:
        return self.start <= fraction < self.end



TEXT_MODES = ("global",)
BACKEND_CHOICES = ("auto", "triton", "tiled", "flex", "reference")


@dataclass(frozen=True)
class LocalAttention(Edit):
    """CLEAR: each image query attends to the image keys within `radius` tokens
    (dy² + dx² < radius², clipped at the borders) and to every text key; text queries
    attend to everything. On video grids (Wan) `radius=(rt, rh, rw)`: each video query
    attends to the keys with (dt/rt)² + (dh/rh)² + (dw/rw)² < 1 (a scalar radius there is
    a ValueError, as a 3-tuple on an image grid); with shape="box", to the keys with
    |dt| < rt, |dh| < rh and |dw| < rw (Sliding Tile Attention's windows: the ellipsoid's
    bounding box, so whole tiles are dense).

    text: "global" (image queries see all text tokens, as CLEAR).
    downsample: None, or a factor f: image queries also see f×f-pooled keys/values of
        the whole image, pooled with a learnable (f, f) `spatial_weight` per attention
        module (average pooling until trained; registered as `<attn>.local_pool`).
    weights: a safetensors file of tensors named by transformer module names (as
        `dit-attn distill-clear` writes), loaded while the edit is applied.
    layers: layer indices to make local (None: every layer).
    train_tokens: None, or the number of image tokens at the resolution the model was
        trained at: local layers then scale their logits by sqrt(log N / log train_tokens)
        for N image tokens (CLEAR's length-adjusted attention scale, for resolutions above
        the training one).
    backend: "auto" or a backend of `dit_attn.kernels` that computes local windows.
    """

    radius: float | tuple[float, float, float]
    text: str = "global"
    downsample: int | None = None
    weights: str | os.PathLike | None = None
    layers: tuple | None = None
    train_tokens: int | None = None
    backend: str = "auto"
    shape: str = "ellipsoid"

    def __post_init__(self) -> None:
        check_window_shape(self.shape)
        if self.shape != "ellipsoid" and not isinstance(self.radius, (tuple, list)):
            raise ValueError(f"shape={self.shape!r} is a 3-D window: give radius=(frames, height, width), "
                             f"got radius={self.radius!r} (image grids use the circle)")
        if isinstance(self.radius, (tuple, list)):
            object.__setattr__(self, "radius", _video_radius(self.radius))
        else:
            check_radius(self.radius)
        _check_choice("text", self.text, TEXT_MODES)
        if self.downsample is not None and (
            isinstance(self.downsample, bool) or not isinstance(self.downsample, int) or self.downsample < 2
        ):
            raise ValueError(f"downsample must be None or an integer factor >= 2, got {self.downsample!r}")
        if self.downsample is not None and isinstance(self.radius, tuple):
            raise ValueError("LocalAttention(downsample=...) (pooled keys) is not implemented for 3-D (video) radii")
        if self.weights is not None:
            if not isinstance(self.weights, (str, os.PathLike)):
                raise TypeError(f"weights must be a path to a .safetensors file, got {type(self.weights).__name__}")
            if not os.path.isfile(self.weights):
                raise ValueError(f"weights file not found: {os.fspath(self.weights)!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"layers must be None or non-empty layer indices >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        if self.train_tokens is not None and (
            isinstance(self.train_tokens, bool) or not isinstance(self.train_tokens, int) or self.train_tokens < 2
        ):
            raise ValueError(f"train_tokens must be None or an integer >= 2, got {self.train_tokens!r}")
        _check_choice("backend", self.backend, BACKEND_CHOICES)


def _video_radius(radius) -> tuple:
    if len(radius) != 3:
        raise ValueError(f"radius must be a number (image grids) or a 3-tuple (frames, height, width) of token radii "
                         f"(video grids), got {radius!r}")
    for r in radius:
        check_radius(r)
    return tuple(radius)


def _check_layers(name: str, layers) -> tuple[int, ...]:
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    try:
        layers = tuple(layers)
    except TypeError:
        raise TypeError(f"{name} must be a list of layer indices, got {layers!r}") from None
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ValueError(f"{name} must be a non-empty list of layer indices >= 0, got {layers!r}")
    return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class TextPatch(Edit):
    """Replace the text-stream keys and values of `layers` by those computed for
    `source_prompt` at the same step and noise, from the `start` fraction of the steps on
    (text-layer localization, "Precise Parameter Localization for Textual Generation").

    SD3/SD3.5: the `add_k_proj`/`add_v_proj` outputs (after their norms); FLUX double blocks
    likewise; FLUX single blocks: the text slice of `to_k`/`to_v`. The source prompt runs as
    extra rows of the pipeline's own transformer call, up to the last patched layer; only
    the conditional rows are patched (CFG's unconditional rows stay stock).
    """

    layers: tuple = field(default=())
    source_prompt: str = ""
    start: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_layers("layers", self.layers))
        if not isinstance(self.source_prompt, str) or not self.source_prompt.strip():
            raise ValueError(f"source_prompt must be a non-empty string, got {self.source_prompt!r}")
        check_fraction("start", self.start)
        if self.start >= 1.0:
            raise ValueError(f"start must be < 1 (the fraction of the steps before patching begins), got {self.start}")


@dataclass(frozen=True)
class TextGuard(Edit):
    """When a quoted word of the prompt (e.g. `a sign that says "WORD"`) is on the
    blocklist, patch `layers` (the text layers `localize` found) with the prompt whose
    blocked words are replaced by `replacement`, from step 0. Prompts without blocked words
    run stock. Matching is case-insensitive and on whole words inside double quotes.
    """

    blocklist: tuple = field(default=())
    replacement: str = "****"
    layers: tuple = field(default=())

    def __post_init__(self) -> None:
        words = (self.blocklist,) if isinstance(self.blocklist, str) else self.blocklist
        try:
            words = tuple(words)
        except TypeError:
            raise TypeError(f"blocklist must be a list of words, got {self.blocklist!r}") from None
        if not words or not all(isinstance(w, str) and w.strip() and '"' not in w for w in words):
            raise ValueError(f"blocklist must be a non-empty list of non-empty words without quotes, got {self.blocklist!r}")
        object.__setattr__(self, "blocklist", tuple(w.strip() for w in words))
        if not isinstance(self.replacement, str) or '"' in self.replacement:
            raise ValueError(f"replacement must be a string without double quotes, got {self.replacement!r}")
        if not self.layers:
            raise ValueError("TextGuard needs layers: the text layers of the model (see da.localize)")
        object.__setattr__(self, "layers", _check_layers("layers", self.layers))


NAG_NORMS = ("l1", "l2")


@dataclass(frozen=True)
class NAG(Edit):
    """Normalized Attention Guidance (Chen et al., arXiv 2505.21179): at the image queries of
    `layers` (None: every layer), Z⁺ is the attention output with the prompt's text and Z⁻ the
    one with `negative_prompt`'s text (same image queries, keys and values);
    Z̃ = scale·Z⁺ − (scale − 1)·Z⁻, r = ‖Z̃‖ / ‖Z⁺‖ per image token over the merged heads,
    Z̃ ← Z̃·tau/r where r > tau, and the output is alpha·Z̃ + (1 − alpha)·Z⁺.

    norm: "l1" (the paper) or "l2" (the official FLUX code). start/end: fractions of the
    denoising steps. alpha / end None: the official code's for the model, resolved at `apply`
    (`resolved`): alpha 0.125 on SD3/SD3.5, 0.25 elsewhere; end 0.25 in FluxKontextPipeline, 1.0
    elsewhere. The negative prompt runs as extra rows of the pipeline's own transformer
    call (one per conditional row), up to the last NAG layer. scale = 1 or alpha = 0 is stock.

    negative_prompt: one string for every prompt of a call, or a list of them, one per prompt (as a
    pipeline's own `negative_prompt` list): the call must have that many prompts.

    Instead of `negative_prompt`, the negative prompt's embeddings as the pipeline takes them (a
    pipeline without its text encoder), N rows: one for every prompt (N = 1) or one per prompt of the
    call (the call must have N prompts): `negative_prompt_embeds` (N, S, D), with
    `negative_pooled_prompt_embeds` (N, P) on SD3 / FLUX.1 and `negative_prompt_embeds_mask` (N, S)
    on Qwen-Image and Chroma (Qwen-Image: optional, all tokens valid without it); HunyuanImage 2.1 and
    HunyuanVideo 1.5 take the Qwen states with their mask and the ByT5 glyph states and mask,
    `negative_prompt_embeds_2` (N, S2, D2) and `negative_prompt_embeds_mask_2` (N, S2), as their
    pipelines' own arguments of those names.
    """

    negative_prompt: str | tuple[str, ...] = ""
    scale: float = 5.0
    tau: float = 2.5
    alpha: float | None = None
    layers: tuple | None = None
    start: float = 0.0
    end: float | None = None
    norm: str = "l1"
    negative_prompt_embeds: object = field(default=None, compare=False, repr=False)
    negative_pooled_prompt_embeds: object = field(default=None, compare=False, repr=False)
    negative_prompt_embeds_mask: object = field(default=None, compare=False, repr=False)
    negative_prompt_embeds_2: object = field(default=None, compare=False, repr=False)
    negative_prompt_embeds_mask_2: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.negative_prompt_embeds is not None:
            if self.negative_prompt != "":
                raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
            self._check_embeds()
        elif any(getattr(self, name) is not None for name in EMBEDDING_SETTINGS):
            raise ValueError(f"{', '.join(EMBEDDING_SETTINGS[1:])} go with negative_prompt_embeds")
        else:
            object.__setattr__(self, "negative_prompt", _check_negative_prompt(self.negative_prompt))
        for name in ("scale", "tau", "alpha"):
            value = getattr(self, name)
            if name == "alpha" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1 (1: no guidance), got {self.scale!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", _check_layers("layers", self.layers))
        check_fraction("start", self.start)
        if self.end is not None:
            check_fraction("end", self.end)
            if self.start >= self.end:
                raise ValueError(f"start must be < end (fractions of the denoising steps), got start={self.start}, "
                                 f"end={self.end}")
        _check_choice("norm", self.norm, NAG_NORMS)

    def _check_embeds(self) -> None:
        import torch

        for name, ndim in (("negative_prompt_embeds", 3), ("negative_pooled_prompt_embeds", 2),
                           ("negative_prompt_embeds_mask", 2), ("negative_prompt_embeds_2", 3),
                           ("negative_prompt_embeds_mask_2", 2)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            rows = self.negative_prompt_embeds.shape[0] if self.negative_prompt_embeds.ndim == 3 else "N"
            if value.ndim != ndim or 0 in value.shape or (name != "negative_prompt_embeds" and value.shape[0] != rows):
                shape = f"({rows}, S, D)" if ndim == 3 else (f"({rows}, P)" if "pooled" in name else f"({rows}, S)")
                raise ValueError(f"{name} must be {shape}, a row per negative prompt (one for every prompt, or one per "
                                 f"prompt of the call), got shape {tuple(value.shape)}")
        glyphs, glyph_mask = self.negative_prompt_embeds_2, self.negative_prompt_embeds_mask_2
        if (glyphs is None) != (glyph_mask is None):
            raise ValueError("negative_prompt_embeds_2 and negative_prompt_embeds_mask_2 go together")
        for suffix in ("", "_2"):
            embeds, mask = getattr(self, f"negative_prompt_embeds{suffix}"), getattr(self, f"negative_prompt_embeds_mask{suffix}")
            if embeds is None:
                continue
            if not embeds.is_floating_point():
                raise TypeError(f"negative_prompt_embeds{suffix} must be floating point, got {embeds.dtype}")
            if mask is not None and mask.shape[1] != embeds.shape[1]:
                raise ValueError(f"negative_prompt_embeds_mask{suffix} covers {mask.shape[1]} tokens, "
                                 f"negative_prompt_embeds{suffix} has {embeds.shape[1]}")

    def __repr__(self) -> str:
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr]
        given = [f"{name}=<tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
                 for name in EMBEDDING_SETTINGS if (value := getattr(self, name)) is not None]
        if given:
            shown = shown[1:] + given  # no negative_prompt
        return f"NAG({', '.join(shown)})"

    @property
    def per_prompt(self) -> bool:
        """The negative prompt is a list, or given embeddings of more than one row: one per prompt of the call."""
        given = self.negative_prompt_embeds
        return isinstance(self.negative_prompt, tuple) or (given is not None and given.shape[0] > 1)

    @property
    def inert(self) -> bool:
        """scale 1 or alpha 0: the output is Z⁺, the stock one (no default alpha is 0)."""
        return self.scale == 1 or self.alpha == 0

    def resolved(self, family, pipeline_name: str) -> "NAG":
        """This NAG with alpha / end left None set to the official code's for the family and pipeline
        (`Family.nag_alpha`, `Family.nag_end_of_pipeline`)."""
        alpha = self.alpha if self.alpha is not None else family.nag_alpha
        end = self.end if self.end is not None else family.nag_end_of_pipeline.get(pipeline_name, 1.0)
        if self.start >= end:
            raise ValueError(f"start must be < end (fractions of the denoising steps), got start={self.start}, end={end} "
                             f"({pipeline_name}'s default end)")
        return replace(self, alpha=alpha, end=end)

    def to_dict(self) -> dict:
        """The settings; embeddings (where given) as their shape, dtype and the SHA-256 of their values (what names
        them exactly: `from_dict` cannot rebuild the tensors)."""
        out = super().to_dict()
        for name in EMBEDDING_SETTINGS:
            value = out.pop(name)
            if value is not None:
                out[name] = tensor_digest(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "NAG":
        if any(isinstance(data.get(name), dict) for name in EMBEDDING_SETTINGS):
            raise ValueError("these NAG settings name its negative prompt's embeddings by digest: rebuild the NAG "
                             "with the tensors (NAG(negative_prompt_embeds=...))")
        return super().from_dict(data)


def _check_negative_prompt(value) -> str | tuple[str, ...]:
    """NAG's negative prompt: a non-empty string, or a non-empty list of them (a tuple)."""
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(p, str) and p.strip() for p in value):
            return tuple(value)
    elif isinstance(value, str) and value.strip():
        return value
    raise ValueError("negative_prompt must be a non-empty string, or a list of them (one per prompt of the call), "
                     f"got {value!r}")


EMBEDDING_SETTINGS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_embeds_mask",
                      "negative_prompt_embeds_2", "negative_prompt_embeds_mask_2")


def tensor_digest(value) -> dict:
    """{"shape", "dtype", "sha256" of the values' bytes}: a tensor named in JSON settings."""
    import torch

    data = value.detach().to("cpu").contiguous()
    return {"shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}


CAPTURE_KINDS = ("cross", "self", "concept")
CAPTURE_REDUCTIONS = ("mean", None)


def _check_index_list(name: str, values) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be None or a list of indices >= 0, got {values!r}") from None
    if not values or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{name} must be None or a non-empty list of indices >= 0, got {values!r}")
    return tuple(sorted(set(values)))


def _capture_tokens(kind: str, tokens):
    """cross: None, words (str) or text-token indices (int); self: image locations, (row, col) or flat indices."""
    if kind == "cross" and tokens is None:
        return None
    if kind == "concept" and tokens is None:
        raise ValueError("Capture(kind='concept') needs tokens: the concept words (they need not be in the prompt), "
                         "e.g. tokens=['cat', 'sky', 'grass']")
    if kind == "self" and tokens is None:
        raise ValueError("Capture(kind='self') needs tokens: the image locations whose attention to capture, "
                         "as (row, col) cells of the token grid or flat indices, e.g. tokens=[(4, 4), (0, 7)]")
    if isinstance(tokens, str):
        tokens = tuple(w for w in re.split(r"[,\s]+", tokens) if w)
    elif isinstance(tokens, int) and not isinstance(tokens, bool):
        tokens = (tokens,)
    try:
        tokens = tuple(tuple(t) if isinstance(t, list) else t for t in tokens)
    except TypeError:
        raise TypeError(f"tokens must be a list, got {tokens!r}") from None
    index = lambda t: isinstance(t, int) and not isinstance(t, bool) and t >= 0  # noqa: E731
    cell = lambda t: isinstance(t, tuple) and len(t) in (2, 3) and all(index(i) for i in t)  # noqa: E731
    if kind == "cross":
        valid = tokens and (all(isinstance(t, str) and t.strip() for t in tokens) or all(index(t) for t in tokens))
        if not valid:
            raise ValueError("Capture(kind='cross') tokens must be None (every text token), words of the prompt "
                             f"or text-token indices >= 0 (not mixed), got {tokens!r}")
        return tuple(t.strip() for t in tokens) if isinstance(tokens[0], str) else tokens
    if kind == "concept":
        if not tokens or not all(isinstance(t, str) and t.strip() and not re.search(r"[,\s]", t.strip()) for t in tokens):
            raise ValueError(f"Capture(kind='concept') tokens must be single concept words, got {tokens!r}")
        return tuple(t.strip() for t in tokens)
    if not tokens or not all(index(t) or cell(t) for t in tokens):
        raise ValueError(f"Capture(kind='self') tokens must be image locations, (row, col) cells (video: (frame, row, col)) "
                         f"or flat indices >= 0, got {tokens!r}")
    return tokens


@dataclass(frozen=True)
class Capture(Edit):
    """Record attention maps of the conditional rows during the pipeline call; read them from
    `handle.maps` afterwards (see `dit_attn.capture`). The image is the one without the capture.

    kind: "cross": the image queries' probabilities on text keys (the joint softmax over all keys,
        with the edits of the same apply in it), one map per token; "self": the attention of a few
        image locations over the image grid; "concept": ConceptAttention (Helbling et al., ICML 2025):
        the concept words run as extra rows whose text attends to the image but not the other way
        round, and each map is the softmax over the concepts of image-token attention outputs ·
        concept-token attention outputs of the same layer and head.
    layers: layer indices (None: every layer); heads: head indices within each layer (None: all).
    tokens: cross: None (every text token), words of the prompt (each word's map is the mass on
        its tokens) or text-token indices; self: (row, col) cells of the token grid ((frame, row, col) on video) or flat indices;
        concept: concept words (in the prompt or not).
    steps: denoising-step indices to capture (None: every step).
    reduce: "mean" (the mean over the captured steps) or None (one map per step).
    """

    layers: tuple | None = None
    heads: tuple | None = None
    tokens: tuple | None = None
    kind: str = "cross"
    steps: tuple | None = None
    reduce: str | None = "mean"

    def __post_init__(self) -> None:
        if self.kind not in CAPTURE_KINDS:
            raise ValueError(f"kind must be one of {CAPTURE_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "layers", _check_index_list("layers", self.layers))
        object.__setattr__(self, "heads", _check_index_list("heads", self.heads))
        object.__setattr__(self, "steps", _check_index_list("steps", self.steps))
        object.__setattr__(self, "tokens", _capture_tokens(self.kind, self.tokens))
        if self.reduce not in CAPTURE_REDUCTIONS:
            raise ValueError(f"reduce must be one of {CAPTURE_REDUCTIONS}, got {self.reduce!r}")


EDITS = {cls.__name__: cls for cls in (SoftPAG, HeadGuidance, LocalAttention, TextPatch, TextGuard, NAG, Capture)}
