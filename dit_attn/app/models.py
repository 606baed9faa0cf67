"""The models the web app offers: embedded names and directories allowed at launch, loaded once and cached.

The page only ever sends one of `ModelRegistry.choices`; anything else is refused, so a
user cannot make the server read a path of their choosing.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .. import loading
from ..handle import experts, layers
from ..heads import PRESETS, LayerInfo, model_family, resolve_heads


# The text layers `dit-attn localize` found per embedded model (README, "Text-layer localization"):
# on the tiny model L3 ranks first and L0 second, the others score 0; patching L3 alone edits the
# glyph 40% as often as a prompt swap, L0 and L3 together as often, so the app patches both.
TEXT_LAYERS = {loading.TINY: (0, 3)}


def embedded_models() -> tuple[str, ...]:
    """Names `load_pipeline` builds without a path.

    `loading.EMBEDDED_MODELS`, when that module defines it (e.g. once "tiny" ships), else
    just its demo model.
    """
    return tuple(getattr(loading, "EMBEDDED_MODELS", (loading.DEMO,)))


def check_model_dir(path: str) -> str:
    """The absolute path of a diffusers pipeline directory; ValueError if it is not one."""
    absolute = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(absolute):
        raise ValueError(f"--model-dir {path!r} is not a directory")
    if not os.path.isfile(os.path.join(absolute, "model_index.json")):
        raise ValueError(f"--model-dir {path!r} is not a diffusers pipeline directory (it has no model_index.json)")
    return absolute


@dataclass
class LoadedModel:
    choice: str  # as offered in the page; also the `model` of the settings (a name or a directory)
    pipe: object
    family: str  # the family's name: "sd3", "flux", "wan", ...
    layer_map: list[LayerInfo]  # a two-expert model: E1's
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per pipeline
    expert_maps: dict[str, list[LayerInfo]] = field(default_factory=dict)  # two experts: E1/E2 → map; else empty

    def head_choices(self) -> list[str]:
        """The picker's heads: L<layer>H<head>, each expert's prefixed with E1:/E2: on a two-expert model."""
        maps = self.expert_maps or {"": self.layer_map}
        return [f"{expert}:L{info.index}H{head}" if expert else f"L{info.index}H{head}"
                for expert, layer_map in maps.items() for info in layer_map for head in range(info.heads)]

    def presets(self) -> list[str]:
        """Presets of this model's family whose heads all exist in this model."""
        fitting = []
        for name, preset in PRESETS.items():
            if preset.family != self.family:
                continue
            try:
                resolve_heads([name], self.layer_map, self.family)
            except ValueError:
                continue
            fitting.append(name)
        return fitting

    def text_layers(self) -> tuple[int, ...]:
        """The layers that draw text, when known for this model (else empty: run `dit-attn localize`)."""
        return TEXT_LAYERS.get(self.choice, ())

    def summary(self) -> str:
        def shape(layer_map: list[LayerInfo]) -> str:
            per_layer = "/".join(map(str, sorted({info.heads for info in layer_map})))
            total = sum(info.heads for info in layer_map)
            return f"{len(layer_map)} layers × {per_layer} heads, {total} heads"

        name = f"{type(self.pipe).__name__} ({self.family})"
        if self.expert_maps:
            return f"{name}, two experts: " + "; ".join(f"{expert} {shape(m)}" for expert, m in self.expert_maps.items())
        return f"{name}: {shape(self.layer_map)}"


def load_model(choice: str, pipe) -> LoadedModel:
    """The LoadedModel of a pipeline: its family and layer map (and each expert's on a two-expert pipeline)."""
    names = [name for name in experts(pipe) if name]
    maps = {name: layers(pipe, expert=name) for name in names}
    return LoadedModel(choice, pipe, model_family(pipe.transformer), layers(pipe), expert_maps=maps)


class ModelRegistry:
    """Embedded models plus `model_dirs`; keeps up to `max_loaded` pipelines, least recently used dropped first."""

    def __init__(self, model_dirs=(), *, embedded: tuple[str, ...] | None = None, device: str | None = None,
                 dtype: str = "float32", max_loaded: int = 2):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        names = embedded_models() if embedded is None else tuple(embedded)
        dirs = [check_model_dir(path) for path in model_dirs]
        self.choices: list[str] = list(dict.fromkeys([*names, *dirs]))
        if not self.choices:
            raise ValueError("no models to offer: give --model-dir DIR or keep the embedded models")
        self.device = device
        self.dtype = dtype
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading = threading.Lock()

    @property
    def default(self) -> str:
        return self.choices[0]

    @property
    def dtype_name(self) -> str:
        return self.dtype

    def get(self, choice: str) -> LoadedModel:
        if choice not in self.choices:
            raise ValueError(f"unknown model {choice!r}: choose one of {', '.join(self.choices)}")
        with self._loading:
            model = self._loaded.get(choice)
            if model is None:
                pipe = loading.load_pipeline(choice, dtype=self.dtype, device=self.device)
                pipe.set_progress_bar_config(disable=True)
                model = load_model(choice, pipe)
                self._loaded[choice] = model
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)  # a generation still running keeps its own reference
            self._loaded.move_to_end(choice)
            return model
