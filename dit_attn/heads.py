"""The layer/head map of a diffusion transformer and head addressing.

Layers are numbered in forward order: SD3 `transformer_blocks.i` → i; FLUX
`transformer_blocks.i` → i, then `single_transformer_blocks.j` → (number of double blocks) + j.
Heads are given as `(layer, head)`, `"L{layer}H{head}"`, `"L{layer}"` (every head of a
layer) or a preset name such as `"sd3:dark"`.

A two-expert pipeline (Wan 2.2: `transformer` for the high-noise steps, then `transformer_2`) has one map
per expert: `"E1:L3H2"` addresses expert E1 (`transformer`, the steps at or above the boundary timestep,
which come first), `"E2:L3H2"` expert E2 (`transformer_2`); a plain address means the same head of both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Union

if TYPE_CHECKING:
    import torch

HeadSpec = Union[str, tuple, list]


@dataclass(frozen=True)
class LayerInfo:
    index: int
    name: str  # module name of the attention, e.g. "transformer_blocks.3.attn"
    kind: str  # "joint" (SD3), "double" or "single" (FLUX)
    heads: int
    head_dim: int
    dual_attention: bool = False  # SD3.5 block with an extra image-only attn2 (left stock)


@dataclass(frozen=True)
class Preset:
    heads: tuple[str, ...]
    provenance: str
    family: str = "sd3"  # the model family whose layer/head map the heads address
    layout: tuple[int, int] | None = None  # (layers, heads per layer) of the one model it was found on, if it is model-specific


_SD3_PAPER = "HeadHunter paper (v4), SD3-medium, heads named in the paper"
_FLUX_PAPER = "HeadHunter paper (v4), FLUX.1-dev, heads named in the paper (layers 0-56)"
PRESETS: dict[str, Preset] = {
    "sd3:dark": Preset(("L1H2", "L1H10"), _SD3_PAPER),
    "sd3:white": Preset(("L0H15", "L1H19"), _SD3_PAPER),
    "sd3:golden-hour": Preset(("L18H11", "L0H17", "L2H3"), _SD3_PAPER),
    "sd3:shearing": Preset(("L11H15",), _SD3_PAPER),
    "sd3:shadow": Preset(("L13H17",), _SD3_PAPER),
    "sd3:blue": Preset(("L0H23",), _SD3_PAPER),
    "sd3:red": Preset(("L0H3",), _SD3_PAPER),
    "sd3:horizontal-banding": Preset(("L16H3",), _SD3_PAPER),
    "flux:glossy": Preset(("L43H17",), _FLUX_PAPER, "flux"),
    "flux:vintage-film": Preset(("L51H23",), _FLUX_PAPER, "flux"),
    "flux:warm-red": Preset(("L52H22",), _FLUX_PAPER, "flux"),
    "flux:bokeh": Preset(("L34H0",), _FLUX_PAPER, "flux"),
    "flux:cool-tone": Preset(("L52H6",), _FLUX_PAPER, "flux"),
    "flux:golden-hour": Preset(("L38H18",), _FLUX_PAPER, "flux"),
    "flux:green-filter": Preset(("L52H12",), _FLUX_PAPER, "flux"),
    "tiny:red": Preset(("L0H1", "L1H4"), (
        "dit-attn hunt on the embedded tiny model (benchmarks/hunt_quality.py): objective color:red, 12 shape "
        "prompts x seeds 0, 1, 12 steps, CFG 7, s=3, u=1, k=1, 2 rounds, min_z 1.5 confirmed on seeds 2, 3 "
        "(418 s, 2 threads). Held-out, 24 prompts x seeds 100, 101: red share 0.0175 without guidance, "
        "0.0228 with these 2 heads, 0.0204 with all 6 heads of L3 (the best layer on the hunt prompts)"),
        "sd3", (6, 6)),
    "tiny:yellow": Preset(("L4H5", "L5H3", "L4H3", "L5H0"), (
        "dit-attn hunt on the embedded tiny model (benchmarks/hunt_quality.py): objective color:yellow, 24 shape "
        "prompts x seeds 0, 1, 12 steps, CFG 7, s=3, u=1, k=2, 2 rounds, min_z 1.5 confirmed on seeds 2, 3 "
        "(1096 s, 1 thread). Held-out, 24 prompts x seeds 100, 101: yellow share 0.0425 without guidance, "
        "0.0539 with these 4 heads, 0.0520 with all 6 heads of L3 (the best layer on the hunt prompts)"),
        "sd3", (6, 6)),
}

def model_family(transformer) -> str:
    """The family name of a transformer ("sd3", "flux", ...): the namespace of its presets."""
    from .families import family_of

    return family_of(transformer).name


def model_layers(transformer) -> list[LayerInfo]:
    """The attention layers of a transformer in forward order (from its family spec)."""
    from .families import family_of

    return family_of(transformer).layers(transformer)


def head_dim(attn) -> int:
    if hasattr(attn, "head_dim"):
        return attn.head_dim
    return attn.inner_dim // attn.heads


_HEAD_RE = re.compile(r"^L(\d+)(?:H(\d+))?$")
_EXPERT_RE = re.compile(r"^(E\d+):(.*)$")
# the pipeline attribute of each expert of a two-expert pipeline, in the order its steps run them
EXPERTS = {"E1": "transformer", "E2": "transformer_2"}


def split_expert(spec: HeadSpec) -> tuple[str | None, HeadSpec]:
    """("E1", "L3H2") from "E1:L3H2"; (None, spec) for a plain address."""
    if not isinstance(spec, str):
        return None, spec
    match = _EXPERT_RE.match(spec.strip())
    if match is None:
        return None, spec
    if match.group(1) not in EXPERTS:
        raise ValueError(f"unknown expert in {spec!r}: the experts are E1 (transformer, the high-noise steps) "
                         "and E2 (transformer_2, the low-noise steps)")
    return match.group(1), match.group(2)


def maps_differ(maps: dict[str, list[LayerInfo]]) -> bool:
    """Whether the experts' layer maps differ (layer count, heads or head dim of a layer)."""
    return len({tuple((info.heads, info.head_dim) for info in layers) for layers in maps.values()}) > 1


def heads_by_expert(heads: Iterable[HeadSpec], maps: dict[str, list[LayerInfo]]) -> dict[str, list[HeadSpec]]:
    """The head addresses of each expert in `maps` (E1/E2 → its layer map; the experts an apply edits):
    the plain ones (every expert) and those prefixed with its name (prefix removed). Experts that get
    no address are left out."""
    heads = list(heads)
    by_expert: dict[str, list[HeadSpec]] = {}
    plain = False
    for spec in heads:
        expert, rest = split_expert(spec)
        if expert is not None and expert not in maps:
            raise ValueError(f"{spec!r} addresses expert {expert}, which this apply does not edit "
                             f"(it edits {', '.join(maps)})")
        plain = plain or expert is None
        for name in maps if expert is None else (expert,):
            by_expert.setdefault(name, []).append(rest)
    if plain and maps_differ(maps):
        shapes = "; ".join(f"{name}: {len(layers)} layers of {'/'.join(sorted({str(i.heads) for i in layers}))} heads"
                           for name, layers in maps.items())
        raise ValueError(f"the experts' layer maps differ ({shapes}): address each expert's heads "
                         "as 'E1:L3H2' or 'E2:L3H2' instead of plain 'L3H2'")
    return {name: by_expert[name] for name in maps if name in by_expert}


def _expand(spec: HeadSpec, family: str | None = None) -> Iterable[tuple[int, int | None]]:
    """Yield (layer, head or None for all heads) from one spec entry."""
    if isinstance(spec, str):
        if spec in PRESETS:
            preset_family = PRESETS[spec].family
            if family is not None and preset_family != family:
                valid = ", ".join(name for name, p in PRESETS.items() if p.family == family) or "none"
                raise ValueError(f"preset {spec!r} is for {preset_family} models, this is a {family} model; its presets: {valid}")
            for name in PRESETS[spec].heads:
                yield from _expand(name)
            return
        match = _HEAD_RE.match(spec.strip())
        if match is None:
            presets = ", ".join(PRESETS)
            raise ValueError(f"cannot read head {spec!r}: use 'L<layer>H<head>', 'L<layer>', a (layer, head) tuple or a preset ({presets})")
        yield int(match.group(1)), None if match.group(2) is None else int(match.group(2))
        return
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        yield int(spec[0]), int(spec[1])
        return
    raise TypeError(f"a head is a (layer, head) tuple of ints or a string like 'L1H10', got {spec!r}")


def normalize_heads(heads: HeadSpec | Iterable[HeadSpec]) -> tuple:
    """Make a head list hashable for frozen edits: a lone spec becomes a one-element tuple."""
    if isinstance(heads, str) or (isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads)):
        heads = [heads]
    try:
        items = list(heads)
    except TypeError:
        raise TypeError(f"heads must be a list of (layer, head) tuples or strings, got {heads!r}") from None
    out = []
    for item in items:
        out.append(tuple(item) if isinstance(item, list) else item)
        list(_expand(split_expert(out[-1])[1]))  # syntax check now; ranges are checked against the model on apply
    return tuple(out)


def _check_layout(spec: HeadSpec, layers: list[LayerInfo]) -> None:
    """A model-specific preset addresses the heads of that one model: refuse it on another."""
    preset = PRESETS.get(spec) if isinstance(spec, str) else None
    if preset is None or preset.layout is None or not layers:
        return
    have = (len(layers), layers[0].heads)
    if have != preset.layout:
        raise ValueError(f"preset {spec!r} was found on a model of {preset.layout[0]} layers x {preset.layout[1]} heads, "
                         f"this one has {have[0]} x {have[1]}; find your model's heads with dit-attn hunt")


def resolve_heads(heads: Iterable[HeadSpec], layers: list[LayerInfo], family: str | None = None) -> dict[int, tuple[int, ...]]:
    """Map layer index → sorted head indices, checking every address (and preset family) against the model."""
    selected: dict[int, set[int]] = {}
    for spec in heads:
        if split_expert(spec)[0] is not None:
            raise ValueError(f"{spec!r} addresses an expert: 'E1:'/'E2:' addresses are for two-expert pipelines "
                             "(Wan 2.2's transformer and transformer_2); this model has one transformer")
        _check_layout(spec, layers)
        for layer, head in _expand(spec, family):
            if not 0 <= layer < len(layers):
                raise ValueError(f"layer {layer} (from {spec!r}) out of range: this model has layers 0-{len(layers) - 1}")
            n_heads = layers[layer].heads
            if head is None:
                selected.setdefault(layer, set()).update(range(n_heads))
            elif not 0 <= head < n_heads:
                raise ValueError(f"head {head} of layer {layer} (from {spec!r}) out of range: valid heads are 0-{n_heads - 1}")
            else:
                selected.setdefault(layer, set()).add(head)
    if not selected:
        raise ValueError("no heads selected: give at least one head")
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(selected.items())}


def format_layers(layers: list[LayerInfo]) -> str:
    """A plain-text table of the layer/head map."""
    lines = [f"{'layer':>5}  {'kind':<6} {'heads':>5} {'dim':>4}  module"]
    for info in layers:
        note = "  (+ image-only attn2, left stock)" if info.dual_attention else ""
        lines.append(f"{info.index:>5}  {info.kind:<6} {info.heads:>5} {info.head_dim:>4}  {info.name}{note}")
    total = sum(info.heads for info in layers)
    lines.append(f"{len(layers)} layers, {total} heads")
    return "\n".join(lines)
