"""Videos dit-attn writes: MP4 (H.264 through imageio-ffmpeg, the `video` extra) or, without it, an
animated GIF or lossless animated WebP (Pillow). Every video gets a sidecar JSON beside it,
`<video>.json`: {"settings": the stored settings a PNG carries in its `dit-attn` chunk (see
`workflows.batch`), "video": its file name, format, fps, frame count, size, bytes and SHA-256}. The
checksum lets a resume trust a video only when it is the file its sidecar describes.

Writes are atomic (`io.write_path_atomic`): the video first, then its sidecar, so a sidecar never names
a video that a crash could lose, and a crash in between leaves a sidecar that does not match.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

from .io import write_atomic, write_path_atomic
from .limits import check_fps

VIDEO_FORMATS = ("mp4", "gif", "webp")
DEFAULT_FPS = 16.0  # Wan 2.1's frame rate
MP4_CRF = 18  # x264's "visually lossless" quality
SIDECAR_SUFFIX = ".json"
VIDEO_EXTRA = "pip install 'dit-attn[video]'"


def mp4_available() -> bool:
    """Whether MP4 can be written: imageio-ffmpeg is installed and finds an ffmpeg binary."""
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return False
    import imageio_ffmpeg

    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        return False
    return True


def default_video_format() -> str:
    return "mp4" if mp4_available() else "gif"


def check_video_format(video_format: str | None, name: str = "video_format") -> str:
    """The format to write (None: mp4 where it can be written, else gif)."""
    if video_format is None:
        return default_video_format()
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"{name} must be one of {', '.join(VIDEO_FORMATS)}, got {video_format!r}")
    if video_format == "mp4" and not mp4_available():
        raise ValueError(f"{name} mp4 needs imageio-ffmpeg, which is not installed ({VIDEO_EXTRA}); "
                         "or write gif or webp (Pillow)")
    return video_format


def model_makes_videos(model: str) -> bool:
    """Whether the pipeline `model` names (a local directory or a hub id in the cache) makes videos, read from
    its model_index.json without loading it. The embedded models make images."""
    from .loading import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        return False
    from diffusers import DiffusionPipeline

    from .families import family_named

    try:
        index = DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the pipeline {model!r}: give a local pipeline directory, a hub id available "
                         f"offline, or 'demo' ({err})") from None
    transformer = index.get("transformer")
    if not (isinstance(transformer, list) and len(transformer) == 2 and isinstance(transformer[1], str)):
        raise ValueError(f"the pipeline {model!r} has no transformer in its model_index.json")
    return family_named(transformer[1]).makes_videos


def as_frames(video) -> list:
    """A video as a list of (H, W, 3) uint8 arrays: from PIL images, or an array (F, H, W, 3) of uint8 or of
    floats in [0, 1] (rounded as diffusers rounds them to PIL images)."""
    import numpy as np

    if isinstance(video, (list, tuple)) and video and hasattr(video[0], "convert"):
        return [np.asarray(frame.convert("RGB")) for frame in video]
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3 or not len(array):
        raise ValueError(f"a video must be frames (F, H, W, 3), got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return list(array)


def _write_mp4(frames: list, path: str, fps: float) -> None:
    import imageio_ffmpeg

    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(
        path, (width, height), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", str(MP4_CRF), "-f", "mp4"])
    writer.send(None)
    for frame in frames:
        writer.send(frame.tobytes())
    writer.close()


def _write_animation(frames: list, path: str, fps: float, video_format: str) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    if video_format == "webp":
        # method 0: the fastest lossless encoder (24x faster than method 4 at 832x480, files 19% larger)
        options, duration = {"lossless": True, "quality": 100, "method": 0}, max(1, round(1000 / fps))
    else:  # GIF stores frame times in centiseconds
        options, duration = {"optimize": False}, 10 * max(1, round(100 / fps))
    images[0].save(path, format=video_format.upper(), save_all=True, append_images=images[1:], loop=0,
                   duration=duration, **options)


def sidecar_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def _digest(path: str) -> tuple[int, str]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return os.path.getsize(path), sha.hexdigest()


def write_video_atomic(video, path: str | os.PathLike, settings: dict, fps: float = DEFAULT_FPS,
                       video_format: str | None = None, tmp_prefix: str = ".partial-") -> dict:
    """Write `video` (see `as_frames`) to `path` and its sidecar `<path>.json` holding `settings`; returns the
    sidecar. video_format: from the file name's suffix when None. Never leaves a partial file."""
    path = os.fspath(path)
    video_format = check_video_format(video_format or os.path.splitext(path)[1].lstrip(".").lower())
    fps = check_fps(fps)
    frames = as_frames(video)
    height, width = frames[0].shape[:2]
    if video_format == "mp4" and (height % 2 or width % 2):
        raise ValueError(f"mp4 (H.264, yuv420p) needs even sides, got {width}x{height}; write gif or webp")
    if video_format == "mp4":
        write_path_atomic(path, lambda tmp: _write_mp4(frames, tmp, fps), tmp_prefix)
    else:
        write_path_atomic(path, lambda tmp: _write_animation(frames, tmp, fps, video_format), tmp_prefix)
    size, sha256 = _digest(path)
    sidecar = {"settings": settings, "video": {"file": os.path.basename(path), "format": video_format, "fps": fps,
                                               "frames": len(frames), "height": height, "width": width,
                                               "bytes": size, "sha256": sha256}}
    text = json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomic(sidecar_path(path), lambda f: f.write(text.encode("utf-8")), tmp_prefix)
    return sidecar


def read_video_frames(path: str | os.PathLike) -> list:
    """The frames of a video dit-attn wrote, as (H, W, 3) uint8 arrays."""
    import numpy as np

    path = os.fspath(path)
    if path.lower().endswith(".mp4"):
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        width, height = next(reader)["size"]
        return [np.frombuffer(data, np.uint8).reshape(height, width, 3) for data in reader]
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]


def read_video_settings(path: str | os.PathLike) -> dict:
    """The settings in a video's sidecar (not checked against the video: see `verified_video_settings`)."""
    sidecar = sidecar_path(path)
    try:
        with open(sidecar, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{os.fspath(path)!r} has no sidecar {sidecar!r} (not written by dit-attn)") from None
    except ValueError:
        raise ValueError(f"{sidecar!r} is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict) or not isinstance(data.get("video"), dict):
        raise ValueError(f"{sidecar!r} is not a dit-attn video sidecar (it needs 'settings' and 'video' objects)")
    return data


def verified_video_settings(path: str | os.PathLike) -> dict:
    """The settings of a video whose file is the one its sidecar describes (same name, bytes and SHA-256):
    ValueError if the video or the sidecar is missing, or the video is truncated, damaged or replaced."""
    path = os.fspath(path)
    data = read_video_settings(path)
    video = data["video"]
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is missing")
    size, sha256 = _digest(path)
    if video.get("file") != os.path.basename(path) or video.get("bytes") != size or video.get("sha256") != sha256:
        raise ValueError(f"{path!r} is not the video its sidecar describes (other bytes: truncated, damaged or replaced)")
    return data["settings"]
