"""The limits every entry point checks before it allocates: the Python API, every CLI command and
every app endpoint call these functions, so one request cannot ask for more than the model or the
machine can give, and every refusal names the limit.

The image-size limits come from the model (its family's largest latent grid, e.g. SD3's position-
embedding table, and the pixels a token covers) and from the machine: `DIT_ATTN_MAX_PIXELS`
(pixels an image may have, default 4096×4096) is the memory budget's knob; for videos also
`DIT_ATTN_MAX_VIDEO_PIXELS` (frames × height × width, default 81 frames of 1280×720) and the
model's frame rule (Wan: 4k + 1 frames, its VAE's temporal factor).
"""
from __future__ import annotations

import math
import os

from .checks import MAX_LOCAL_RADIUS  # noqa: F401  (the app checks radii against it)

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
MAX_UPLOAD_BYTES = 64 * 2**20
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_FRAMES = 1001
MAX_FPS = 240.0
DEFAULT_MAX_VIDEO_PIXELS = 81 * 1280 * 720


def whole_number(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools, fractions, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if int(value) < low or (high is not None and int(value) > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {int(value)}")
    return int(value)


def number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """`value` as a finite float in [low, high] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return float(value)


def check_steps(steps, name: str = "num_inference_steps") -> int:
    return whole_number(name, steps, 1, MAX_STEPS)


def check_seed(seed, name: str = "seed") -> int:
    return whole_number(name, seed, 0, MAX_SEED)


def _budget(variable: str, default: int) -> int:
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{variable} must be a whole number of pixels, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{variable} must be >= 1, got {value}")
    return value


def max_pixels() -> int:
    """The machine's pixel budget for one image (DIT_ATTN_MAX_PIXELS, default 4096×4096)."""
    return _budget("DIT_ATTN_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def max_video_pixels() -> int:
    """The machine's budget for one video, frames × height × width (DIT_ATTN_MAX_VIDEO_PIXELS)."""
    return _budget("DIT_ATTN_MAX_VIDEO_PIXELS", DEFAULT_MAX_VIDEO_PIXELS)


def check_frames(num_frames, name: str = "num_frames") -> int:
    return whole_number(name, num_frames, 1, MAX_FRAMES)


def check_fps(fps, name: str = "fps") -> float:
    """Frames per second of a written video: a finite number in (0, MAX_FPS]."""
    value = number(name, fps, high=MAX_FPS)
    if value <= 0:
        raise ValueError(f"{name} must be > 0 and <= {MAX_FPS}, got {fps}")
    return value


def video_call_defaults(pipe) -> dict:
    """The num_frames, height and width a video pipeline's call uses when none is given (its signature's)."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    return {k: parameters[k].default for k in ("num_frames", "height", "width")
            if k in parameters and isinstance(parameters[k].default, int)}


def check_video_size(pipe, num_frames: int | None, height: int | None, width: int | None) -> None:
    """Refuse, before any allocation, a video the model cannot make or the machine cannot hold: the frame
    count (the model's rule: a multiple of its VAE's temporal factor, plus 1), each frame's size
    (`check_image_size`) and frames × height × width within max_video_pixels(). None: the pipeline's default."""
    check_image_size(pipe, height, width)
    defaults = video_call_defaults(pipe)
    frames = defaults.get("num_frames") if num_frames is None else check_frames(num_frames)
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 1))
    if num_frames is not None and temporal > 1 and (num_frames - 1) % temporal:
        below = (num_frames - 1) // temporal * temporal + 1
        raise ValueError(f"num_frames must be {temporal}k + 1 on this model (its VAE's temporal factor is {temporal}), "
                         f"e.g. {below} or {below + temporal}; got {num_frames}")
    height = defaults.get("height") if height is None else height
    width = defaults.get("width") if width is None else width
    if None not in (frames, height, width) and frames * height * width > max_video_pixels():
        raise ValueError(f"{frames} frames of {width}x{height} are {frames * height * width:,} pixels, more than this "
                         f"machine's video budget of {max_video_pixels():,} (DIT_ATTN_MAX_VIDEO_PIXELS)")


def check_pixels(height: int | None, width: int | None) -> None:
    """The machine's budget alone (no model needed): sides >= 1 and height × width within max_pixels()."""
    for name, side in (("height", height), ("width", width)):
        if side is not None:
            whole_number(name, side, 1)
    if height is not None and width is not None and height * width > max_pixels():
        raise ValueError(f"{width}x{height} is {height * width:,} pixels, more than this machine's budget of "
                         f"{max_pixels():,} (DIT_ATTN_MAX_PIXELS)")


def size_multiple(pipe) -> int:
    """Image sides must be whole transformer tokens: VAE scale × the pixels a latent token covers."""
    from .families import family_of

    vae_scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)  # video: spatial
    return int(vae_scale) * family_of(pipe.transformer).latent_patch(pipe.transformer)


def max_side(pipe) -> int | None:
    """The largest image side the model can address (None: no limit from the model)."""
    from .families import family_of

    tokens = family_of(pipe.transformer).max_token_side(pipe.transformer)
    return None if tokens is None else tokens * size_multiple(pipe)


def check_image_size(pipe, height: int | None, width: int | None) -> None:
    """Refuse, before any allocation, a size the model cannot draw or the machine cannot hold.
    None: the pipeline's default size."""
    check_pixels(height, width)
    multiple, largest = size_multiple(pipe), max_side(pipe)
    for name, side in (("height", height), ("width", width)):
        if side is None:
            continue
        if side % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} px on this model (whole tokens), got {side}")
        if largest is not None and side > largest:
            raise ValueError(f"{name} {side} px is more than this model's largest side, {largest} px")


# --- request fields and files (the web app, atlas files) -----------------------------------------------------------

MAX_GUIDANCE_SCALE = 100.0
MAX_TEXT_CHARS = 10_000  # one text field of a request (a prompt, a caption list, a blocklist)
MAX_LIST_ITEMS = 1_000  # one list field of a request (heads ticked, presets)
MAX_ATLAS_LAYERS = 100
MAX_ATLAS_HEADS = 64  # per layer
MAX_THUMBNAIL_SIDE = 256


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """A classifier-free guidance scale: finite, in [0, MAX_GUIDANCE_SCALE]."""
    return number(name, value, 0.0, MAX_GUIDANCE_SCALE)


def check_text(name: str, value, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A text field: a string of at most `max_chars` characters (None reads as empty)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise ValueError(f"{name} has {len(value):,} characters, more than the limit of {max_chars:,}")
    return value


def check_layer_heads(layers, what: str = "an atlas") -> list[int]:
    """Heads per layer of a layer/head map read from a file: 1-MAX_ATLAS_LAYERS layers of 1-MAX_ATLAS_HEADS heads."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"{what} must list heads per layer (a non-empty list of integers)")
    if len(layers) > MAX_ATLAS_LAYERS:
        raise ValueError(f"{what} has {len(layers)} layers, more than the limit of {MAX_ATLAS_LAYERS}")
    for layer, heads in enumerate(layers):
        if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= MAX_ATLAS_HEADS:
            raise ValueError(f"{what}: layer {layer} must have 1-{MAX_ATLAS_HEADS} heads (an integer), got {heads!r}")
    return list(layers)


def check_image_header(image, name: str = "image", max_side: int | None = None) -> None:
    """An opened, not yet decoded PIL image (`Image.open` reads only the header): refuse it before decoding
    when a side exceeds `max_side` or its pixels exceed the machine's budget (max_pixels())."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{name} has no pixels ({width}x{height})")
    if max_side is not None and max(width, height) > max_side:
        raise ValueError(f"{name} is {width}x{height} px; its sides may be at most {max_side} px")
    if width * height > max_pixels():
        raise ValueError(f"{name} is {width}x{height} px, {width * height:,} pixels, more than this machine's budget "
                         f"of {max_pixels():,} (DIT_ATTN_MAX_PIXELS)")


def default_size(pipe) -> tuple[int | None, int | None]:
    """The (height, width) a pipeline draws when none is given (None, None where it does not say)."""
    sample = getattr(pipe, "default_sample_size", None)
    if not isinstance(sample, int) or isinstance(sample, bool):
        return None, None
    side = sample * int(getattr(pipe, "vae_scale_factor", 8))
    return side, side


def check_call(pipe=None, *, height=None, width=None, num_inference_steps=None, guidance_scale=None) -> None:
    """One generation's settings, before it allocates: steps and guidance scale (None: not given, the
    pipeline's default), and the image size against the model (with `pipe`) and the machine. A side left
    None counts at the pipeline's default size for the pixel budget."""
    if num_inference_steps is not None:
        check_steps(num_inference_steps)
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    if pipe is None:
        check_pixels(height, width)
        return
    check_image_size(pipe, height, width)
    default_height, default_width = default_size(pipe)
    check_pixels(height if height is not None else default_height, width if width is not None else default_width)


def check_device(device) -> None:
    """Refuse, before a model loads, a device this machine does not have (None: where the pipeline loads).
    The message says why: no such device name, a torch build without CUDA, no visible GPU, an index too high."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a device name: e.g. cpu, cuda, cuda:1, mps") from None
    kind = parsed.type
    if kind == "cpu" or kind == "meta":
        return
    if kind == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {device!r}: this torch build ({torch.__version__}) has no CUDA support; "
                             "install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is visible on this machine (torch.cuda.is_available() "
                             "is False); check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS (Apple GPU) is not available in this torch build or on this machine")
        return
    available = getattr(getattr(torch, kind, None), "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"device {device!r}: no {kind} device is available on this machine")
