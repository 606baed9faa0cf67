"""The `dit-attn app` web page (Gradio): Generate, Compare, Head atlas, Text edit and Sets tabs.

Needs the `app` extra: `pip install -e ".[app]"`.
"""
from .models import ModelRegistry, embedded_models
from .server import create_app, serve

__all__ = ["ModelRegistry", "create_app", "embedded_models", "serve"]
