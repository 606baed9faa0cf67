"""dit-attn: edit and guide the attention of diffusion transformers in stock diffusers pipelines."""
from .apply import Handle, apply, layers
from .edits import HeadGuidance, LocalAttention, SoftPAG
from .heads import PRESETS, LayerInfo
from .guidance.atlas import Atlas, atlas
from .guidance.search import HuntResult, hunt
from .loading import call_defaults, load_pipeline
from .models import judge  # da.judge.judge(images), da.judge.adherence(images, prompts)
from .edits import TextGuard, TextPatch
from .localization import LocalizationResult, TextEdit, edit_text, localize, localized_lora_config
from . import ic  # da.ic.caption, da.ic.compose / split, da.ic.generate_set (in-context sets)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "Atlas", "Handle", "HeadGuidance", "HuntResult", "LayerInfo", "LocalAttention", "SoftPAG", "apply",
    "atlas", "call_defaults", "hunt", "judge", "layers", "load_pipeline", "__version__",
]
__all__ += ["ic"]
__all__ += ["LocalizationResult", "TextEdit", "TextGuard", "TextPatch", "edit_text", "localize", "localized_lora_config"]
