"""In-context sets (In-Context LoRA): joint captions, canvas tiling, set generation, IC training data.

    import dit_attn as da
    text = da.ic.caption(["a red circle ...", "a blue circle ..."], "1x2", task_tag="SET", summary="two panels ...")
    result = da.ic.generate_set(pipe, text, "1x2", size=(64, 128), reference={0: left_panel})
    result.canvas, result.panels

Torch-heavy pieces load on first use, so `import dit_attn` stays light.
"""
from __future__ import annotations

from .canvas import compose, split
from .captions import caption
from .layout import Layout

__all__ = ["Layout", "SetResult", "caption", "compose", "generate_set", "read_set_data", "set_consistency", "split",
           "write_set_data"]

_LAZY = {
    "generate_set": ".generate", "SetResult": ".generate", "read_set_data": ".data", "write_set_data": ".data",
    "set_consistency": ".score",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
