"""Options and helpers the sub-commands share, and the checks every command makes before it loads a model:
files it reads exist, folders it writes can be written, numbers are finite and in range (`dit_attn.limits`)."""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

from ..io import SizeError, parse_radius, parse_size

TINY, DEMO = "tiny", "demo"
DTYPES = ("float32", "float16", "bfloat16")
MODEL_HELP = "local pipeline directory, hub id, or an embedded model: 'tiny', 'demo'"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): 'dit-attn generate: error: ... (see --help)'."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def size_argument(text: str) -> tuple[int, int]:
    """argparse type: 'N' or 'WIDTHxHEIGHT' → (height, width)."""
    try:
        return parse_size(text)
    except SizeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def radius_argument(text: str) -> float | tuple[float, float, float]:
    """argparse type: a local-attention radius, 'R' (image models) or 'T,H,W' (video models)."""
    try:
        return parse_radius(text, "the radius")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def finite_float(text: str) -> float:
    """argparse type: a float that is a number (nan, inf and -inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


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


# --- checks made before a model loads ------------------------------------------------------------------------


def check_input_file(option: str, path: str) -> str:
    """A file the command reads: it exists, is a file and can be opened."""
    if not os.path.exists(path):
        raise ValueError(f"{option} {path!r}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a folder; give a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path!r}: cannot read it ({err.strerror})") from None
    return path


def _folder_problem(folder: str) -> str | None:
    """Why files cannot be written in `folder` (made now, with its parents), or None."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder!r} is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        return f"cannot make the folder {folder!r} ({err.strerror})"
    try:
        with tempfile.TemporaryFile(prefix=".dit-attn-write-test-", dir=folder):
            pass
    except OSError as err:
        return f"cannot write in the folder {folder!r} ({err.strerror})"
    return None


def check_out_dir(option: str, path: str) -> str:
    """A folder the command writes into: made now (with its parents) and written to once, so a bad one fails
    before a model loads, not after the work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a file; give a folder")
    problem = _folder_problem(path)
    if problem:
        raise ValueError(f"{option}: {problem}")
    return path


def check_out_file(option: str, path: str, example: str = "out.json") -> str:
    """A file the command writes: not a folder, and its folder can be written."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a folder; give a file name, e.g. {os.path.join(path, example)}")
    problem = _folder_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise ValueError(f"{option} {path!r}: {problem}")
    return path


def check_prompt(option: str, text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{option} is empty; give a prompt")
    return text


def check_seeds(option: str, seeds) -> None:
    from ..limits import check_seed

    for seed in seeds:
        check_seed(seed, option)


def check_call_flags(args, steps: str = "num_inference_steps", guidance: str = "guidance_scale",
                     size: str = "size") -> None:
    """--num-inference-steps, --guidance-scale, --size and --max-sequence-length (where the command has them)
    against the limits, before a model loads (the model's own size limits are checked once it has loaded)."""
    from ..limits import check_guidance_scale, check_pixels, check_steps, whole_number

    if getattr(args, steps, None) is not None:
        check_steps(getattr(args, steps), "--" + ("steps" if steps == "steps" else "num-inference-steps"))
    if getattr(args, guidance, None) is not None:
        check_guidance_scale(getattr(args, guidance), "--" + guidance.replace("_", "-"))
    if getattr(args, size, None) is not None:
        height, width = getattr(args, size)
        try:
            check_pixels(height, width)
        except ValueError as err:
            raise ValueError(f"--size: {err}") from None
    if getattr(args, "max_sequence_length", None) is not None:
        whole_number("--max-sequence-length", args.max_sequence_length, 1)
