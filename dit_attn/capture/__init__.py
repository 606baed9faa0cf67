"""Attention maps captured during a pipeline call (`da.Capture`) and heatmaps of them over images."""
from __future__ import annotations

from .recorder import CaptureResult

__all__ = ["CaptureResult", "overlay", "overlay_frames"]


def __getattr__(name: str):
    if name == "overlay":  # PIL loads with it
        from .heatmap import overlay

        return overlay
    if name == "overlay_frames":
        from .video import overlay_frames

        return overlay_frames
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
