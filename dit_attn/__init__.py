"""dit-attn: edit and guide the attention of diffusion transformers in stock diffusers pipelines.

The public names load on first use: `import dit_attn` imports neither torch nor diffusers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "apply": ".handle", "Handle": ".handle", "experts": ".handle", "layers": ".handle",
    "Capture": ".edits", "HeadGuidance": ".edits", "LocalAttention": ".edits", "NAG": ".edits", "SoftPAG": ".edits", "TextGuard": ".edits",
    "TextPatch": ".edits", "edit_from_dict": ".edits",
    "PRESETS": ".heads", "LayerInfo": ".heads",
    "Atlas": ".guidance.atlas", "atlas": ".guidance.atlas",
    "HuntResult": ".guidance.search", "hunt": ".guidance.search",
    "ScreenResult": ".guidance.screening", "screen_heads": ".guidance.screening",
    "call_defaults": ".loading", "load_pipeline": ".loading",
    "LocalizationResult": ".localization", "TextEdit": ".localization", "edit_text": ".localization",
    "localize": ".localization", "localized_lora_config": ".localization",
}
_MODULES = {"capture": ".capture", "ic": ".ic", "judge": ".toy.judge", "families": ".families", "localization": ".localization"}  # da.ic.generate_set, da.judge.adherence

__all__ = sorted([*_EXPORTS, *_MODULES, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
