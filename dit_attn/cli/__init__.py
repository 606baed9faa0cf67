"""The `dit-attn` command: one argparse tree, one module per group of sub-commands.

A leaf: nothing else under `dit_attn` imports this package. Parsers are built without
importing torch or diffusers; each command imports what it runs.
"""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
