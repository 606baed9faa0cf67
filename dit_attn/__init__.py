"""dit-attn: edit and guide the attention of diffusion transformers in stock diffusers pipelines."""
from .apply import Handle, apply, layers
from .edits import HeadGuidance, LocalAttention, SoftPAG
from .heads import PRESETS, LayerInfo
from .loading import load_pipeline
from .models import judge  # da.judge.judge(images), da.judge.adherence(images, prompts)

__version__ = "0.1.0"

__all__ = ["PRESETS", "Handle", "HeadGuidance", "LayerInfo", "LocalAttention", "SoftPAG", "apply", "layers", "judge", "load_pipeline", "__version__"]
