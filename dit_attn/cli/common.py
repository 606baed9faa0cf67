"""Options and helpers the sub-commands share."""
from __future__ import annotations

import argparse
import sys

from ..io import SizeError, parse_size

TINY, DEMO = "tiny", "demo"
DTYPES = ("float32", "float16", "bfloat16")
MODEL_HELP = "local pipeline directory, hub id, or an embedded model: 'tiny', 'demo'"


def size_argument(text: str) -> tuple[int, int]:
    """argparse type: 'N' or 'WIDTHxHEIGHT' → (height, width)."""
    try:
        return parse_size(text)
    except SizeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_options(parser: argparse.ArgumentParser, default: str = TINY) -> None:
    parser.add_argument("--model", default=default, help=f"{MODEL_HELP} (default: {default!r})")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default=None, help="e.g. cuda; default: where the pipeline loads")


def load(args, device: str | None = None):
    """The pipeline of --model/--dtype/--device, with its progress bar off (the commands show their own)."""
    from ..loading import load_pipeline

    pipe = load_pipeline(args.model, dtype=args.dtype, device=device or args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def warn_skipped(path: str, bad_lines) -> None:
    for line in bad_lines:
        print(f"dit-attn: {path}:{line.line}: skipped: {line.reason}", file=sys.stderr)
