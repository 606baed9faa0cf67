"""Load a pipeline by name: a local directory, a hub id, or an embedded model ("tiny", "demo")."""
from __future__ import annotations

import json
import os

DEMO = "demo"
TINY = "tiny"
EMBEDDED_MODELS = (TINY, DEMO)


def call_options(cfg: float | None = None, size: tuple[int, int] | None = None,
                 max_sequence_length: int | None = None) -> dict:
    """Pipeline-call keyword arguments for the settings given (None: the pipeline's default). size: (height, width)."""
    options = {}
    if cfg is not None:
        options["guidance_scale"] = cfg
    if size is not None:
        options["height"], options["width"] = size
    if max_sequence_length is not None:
        options["max_sequence_length"] = max_sequence_length
    return options


def call_pipeline(pipe, **kwargs):
    """`pipe(**kwargs)`, where a `guidance_scale` reaches a pipeline that takes no such argument through the
    place that holds its scale: a copy of its guider at that scale for this call (HunyuanImage 2.1,
    HunyuanVideo 1.5), or `distilled_guidance_scale` (guidance-distilled HunyuanImage, which has no guider)."""
    import inspect

    scale = kwargs.get("guidance_scale")
    parameters = inspect.signature(pipe.__call__).parameters
    if scale is None or "guidance_scale" in parameters:
        return pipe(**kwargs)
    kwargs = {name: value for name, value in kwargs.items() if name != "guidance_scale"}
    guider = getattr(pipe, "guider", None)
    if guider is not None and "guidance_scale" in guider.config:
        pipe.guider = guider.new(guidance_scale=scale)
        try:
            return pipe(**kwargs)
        finally:
            pipe.guider = guider
    if "distilled_guidance_scale" in parameters:
        return pipe(**kwargs, distilled_guidance_scale=scale)
    raise ValueError(f"{type(pipe).__name__} takes no guidance scale (no guidance_scale argument, no guider "
                     "holding one): leave the guidance scale out")


def call_defaults(pipe) -> dict:
    """Pipeline-call settings an embedded model prefers (the tiny model: one zero T5 token, not 256)."""
    return dict(getattr(pipe, "dit_attn_call_defaults", {}))


def sequence_length(pipe, max_sequence_length: int | None) -> int | None:
    """The given T5 length, else the pipeline's call default (None: the pipeline's own default)."""
    return max_sequence_length if max_sequence_length is not None else call_defaults(pipe).get("max_sequence_length")


def _missing_components(path: str) -> dict:
    """Components saved as null (e.g. SD3 without T5) must be passed as None again on load."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        return {}
    with open(index_path) as f:
        index = json.load(f)
    return {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}


DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype) -> "torch.dtype | None":
    """A torch dtype from a torch dtype or its name ('float32', 'float16', 'bfloat16'); None stays None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch dtype or one of {', '.join(DTYPES)}, got {dtype!r}")


def load_pipeline(name_or_path: str = TINY, *, dtype=None, device: str | None = None):
    """A diffusers pipeline from a local directory or a hub id (loaded with `from_pretrained`).

    "tiny" loads the embedded text-to-image model trained on the synthetic world (package
    data, no download). "demo" builds a small random-weight SD3.5-style pipeline in memory,
    for trying the commands on any architecture setting; its images are noise-like.
    """
    import torch
    from diffusers import DiffusionPipeline

    dtype = resolve_dtype(dtype)

    if name_or_path == TINY:
        from .toy.tiny import load_shipped

        pipe = load_shipped(dtype)
    elif name_or_path == DEMO:
        from .toy.configs import build_demo_pipeline

        pipe = build_demo_pipeline()
        if dtype not in (None, torch.float32):
            pipe = pipe.to(dtype=dtype)
    else:
        kwargs = _missing_components(name_or_path) if os.path.isdir(name_or_path) else {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
        except OSError as err:
            raise ValueError(
                f"cannot load a pipeline from {name_or_path!r}: give a local pipeline directory, a hub id "
                f"available offline, or {DEMO!r} ({err})"
            ) from err
    if device is not None:
        pipe = pipe.to(device)
    return pipe
