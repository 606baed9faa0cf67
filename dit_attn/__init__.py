"""dit-attn: edit and guide the attention of diffusion transformers in stock diffusers pipelines."""
from .apply import Handle, apply, layers
from .edits import HeadGuidance, SoftPAG
from .heads import PRESETS, LayerInfo
from .loading import load_pipeline

__version__ = "0.1.0"

__all__ = ["PRESETS", "Handle", "HeadGuidance", "LayerInfo", "SoftPAG", "apply", "layers", "load_pipeline", "__version__"]
