"""The registry of DiT family specs: `family_of(transformer)` finds the spec of a model.

Adding a family: one module here with a `Family` subclass, its processor(s) in
`dit_attn/processors/`, an entry in `_SPECS`, and tests (see docs/architecture.md).
"""
from __future__ import annotations

import importlib

from .base import CallRows, Family

# transformer class name → (module, spec class); modules load on first use
_SPECS = {
    "SD3Transformer2DModel": (".sd3", "SD3"),
    "FluxTransformer2DModel": (".flux", "Flux"),
    "ChromaTransformer2DModel": (".chroma", "Chroma"),
    "Flux2Transformer2DModel": (".flux2", "Flux2"),
    "QwenImageTransformer2DModel": (".qwen_image", "QwenImage"),
    "ZImageTransformer2DModel": (".z_image", "ZImage"),
    "HunyuanImageTransformer2DModel": (".hunyuan_image", "HunyuanImage"),
    "LongCatImageTransformer2DModel": (".longcat_image", "LongCatImage"),
    "OvisImageTransformer2DModel": (".ovis_image", "OvisImage"),
    "BriaTransformer2DModel": (".bria", "Bria"),
    "WanTransformer3DModel": (".wan", "Wan"),
    "HunyuanVideo15Transformer3DModel": (".hunyuan_video15", "HunyuanVideo15"),
}
_LOADED: dict[str, Family] = {}

SUPPORTED_MODELS = tuple(_SPECS)


def family_of(transformer) -> Family:
    """The spec of a transformer model; TypeError naming the supported classes for any other."""
    return family_named(type(transformer).__name__)


def family_named(name: str) -> Family:
    """The spec of the transformer class called `name` (e.g. as a pipeline's model_index.json lists it)."""
    if name not in _SPECS:
        raise TypeError(f"unsupported transformer class {name}; supported: {', '.join(SUPPORTED_MODELS)}")
    if name not in _LOADED:
        module, cls = _SPECS[name]
        _LOADED[name] = getattr(importlib.import_module(module, __name__), cls)()
    return _LOADED[name]


def family_of_pipeline(pipe) -> Family:
    return family_of(pipe.transformer)


def check_image_pipeline(pipe, what: str) -> None:
    """`what` scores images: refuse a video pipeline with one clear line."""
    if family_of(pipe.transformer).makes_videos:
        raise NotImplementedError(f"{what} scores images; {type(pipe).__name__} makes videos: not supported yet")


__all__ = ["CallRows", "Family", "SUPPORTED_MODELS", "check_image_pipeline", "family_named", "family_of",
           "family_of_pipeline"]
