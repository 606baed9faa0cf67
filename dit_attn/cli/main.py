"""`dit-attn`: the parser tree and the entry point."""
from __future__ import annotations

import argparse
import sys

from . import generate, ic, localization, search, serve, training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-attn", description="Attention editing and head guidance for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, search, serve, localization, ic, training):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # optional-backend notices are noise on the command line
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError) as err:
        print(f"dit-attn {args.command}: error: {err}", file=sys.stderr)
        return 2
