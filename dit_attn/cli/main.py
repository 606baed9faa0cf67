"""`dit-attn`: the parser tree and the entry point.

Every failure ends as one line on stderr, `dit-attn COMMAND: error: ...`, and a non-zero exit: 2 for bad
input (a flag, a file, a setting), 1 for what failed while running (a file system error, the device, out
of memory, another run holding the output's lock). `dit-attn --debug COMMAND ...` shows the traceback.
"""
from __future__ import annotations

import sys

from . import generate, ic, localization, maps, search, serve, training
from .common import Parser

INPUT_ERRORS = (ValueError, TypeError, NotImplementedError)
MAX_MESSAGE = 600  # characters of one error line


def build_parser() -> Parser:
    parser = Parser(prog="dit-attn", description="Attention editing and head guidance for diffusion transformers.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, search, serve, localization, ic, training, maps):
        module.add_commands(sub)
    return parser


def one_line(text: str) -> str:
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def describe(err: BaseException) -> str:
    """The one-line message of an error, naming what to do where it can."""
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename!r}" if err.filename is not None else ""
        also = f" -> {err.filename2!r}" if getattr(err, "filename2", None) is not None else ""
        return one_line(f"{err.strerror}{where}{also}")
    text = one_line(err) or type(err).__name__
    if isinstance(err, AssertionError) and "CUDA" in text:  # torch: "Torch not compiled with CUDA enabled"
        return f"{text}: this torch build has no CUDA support; install a CUDA build of torch or use --device cpu"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return f"out of memory: {text}; try a smaller --size or --batch-size"
    if isinstance(err, INPUT_ERRORS) or isinstance(err, (OSError, RuntimeError)):
        return text
    return f"{type(err).__name__}: {text} (an internal error: rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()  # optional-backend notices are noise on the command line
        if getattr(args, "device", None) is not None:
            from ..limits import check_device

            try:
                check_device(args.device)  # before any model loads
            except ValueError as err:
                raise ValueError(f"--device: {err}") from None
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"dit-attn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure is one line (--debug: the traceback)
        if args.debug:
            raise
        print(f"dit-attn {args.command}: error: {describe(err)}", file=sys.stderr)
        return 2 if isinstance(err, INPUT_ERRORS) else 1
