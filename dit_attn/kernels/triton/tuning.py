"""Block sizes and warps of the Triton kernels, the inference forwards (`softpag`, `local`)
and the backward's two kernels (`flash_dq`, `flash_dkdv`, each tuned on its own): timed once
per (GPU, kernel, head dim, dtype, length bucket), kept in memory and in a JSON file; fixed
fallback configs where nothing is timed (the CPU interpreter, `DIT_ATTN_AUTOTUNE=0`). The
training forward keeps the local kernel's fallback block; the backward builds block lists
for the block size it picks (`Sparsity.with_block`).

The cache file is `$DIT_ATTN_CACHE/triton-blocks.json` (default `~/.cache/dit_attn`),
written atomically; a damaged file is ignored and rewritten. It also holds the self-check's
failures (`kernels.selfcheck`, keys starting with "selfcheck|"), read and written with
`stored` and `store`.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import tempfile
from typing import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

# square blocks over block lists (`sparsity`): the local forward and both backward kernels
_SQUARE_BLOCKS = tuple(dict(block=b, num_warps=w) for b, w in ((32, 4), (64, 4), (64, 8), (128, 8)))

# each kernel's tunable launch settings: block sizes and warps per program
CANDIDATES: dict[str, tuple[dict, ...]] = {
    "softpag": tuple(dict(block_m=m, block_n=n, num_warps=w) for m, n, w in
                     ((32, 32, 4), (64, 32, 4), (64, 64, 4), (128, 64, 8), (128, 32, 4))),
    "local": _SQUARE_BLOCKS,
    "flash_dq": _SQUARE_BLOCKS,
    "flash_dkdv": _SQUARE_BLOCKS,
}

_memory: dict[str, dict] = {}
_untimed = contextvars.ContextVar("dit_attn_triton_untimed", default=False)


def fallback(kernel: str, q: torch.Tensor) -> dict:
    """Deterministic settings: small blocks in the interpreter and for fp32 (register pressure),
    64-row blocks for half precision at head dim ≤ 64. The backward's match the local kernel's,
    so by default it reuses the training forward's block lists."""
    if kernel not in CANDIDATES:
        raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(CANDIDATES)}")
    half = q.dtype in (torch.float16, torch.bfloat16)
    big = q.is_cuda and half and q.shape[-1] <= 64
    if kernel == "softpag":
        return dict(block_m=64, block_n=64, num_warps=4) if big else dict(block_m=32, block_n=32, num_warps=4)
    return dict(block=64, num_warps=4) if big else dict(block=32, num_warps=4)


def cache_path() -> str:
    root = os.environ.get("DIT_ATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dit_attn")
    return os.path.join(root, "triton-blocks.json")


def tuning_key(kernel: str, q: torch.Tensor) -> str:
    device = torch.cuda.get_device_name(q.device) if q.is_cuda else "cpu"
    bucket = 2 ** max(7, math.ceil(math.log2(max(q.shape[-2], 1))))  # lengths share a config per power of two
    return f"{device}|{kernel}|d{q.shape[-1]}|{str(q.dtype).removeprefix('torch.')}|s{bucket}"


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: str, key: str, config: dict) -> None:
    data = _read(path)
    data[key] = config
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".triton-blocks-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def stored(key: str) -> object:
    """The cache file's entry for `key`, or None."""
    return _read(cache_path()).get(key)


def store(key: str, value: object) -> None:
    _write(cache_path(), key, value)


def tune(key: str, candidates: tuple[dict, ...], run: Callable[[dict], object], bench: Callable[[Callable], float],
         path: str) -> dict:
    """The cached config for `key`, else the candidate with the lowest `bench(lambda: run(config))`
    (candidates that fail to launch, e.g. out of shared memory, are skipped), then cached."""
    if key in _memory:
        return _memory[key]
    stored = _read(path).get(key)
    if isinstance(stored, dict) and stored in candidates:
        _memory[key] = stored
        return stored
    timings = []
    for config in candidates:
        try:
            timings.append((bench(lambda: run(config)), config))
        except Exception as err:  # a config this GPU cannot launch
            logger.debug("triton config %s failed for %s: %s", config, key, err)
    if not timings:
        raise RuntimeError(f"no Triton launch config ran for {key}")
    best = min(timings, key=lambda item: item[0])[1]
    logger.info("triton blocks for %s: %s (%d configs timed)", key, best, len(timings))
    _memory[key] = best
    _write(path, key, best)
    return best


def _do_bench(fn: Callable) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


def timed(q: torch.Tensor) -> bool:
    """Whether launch settings for inputs like `q` are timed: on CUDA, unless DIT_ATTN_AUTOTUNE=0
    or inside `untimed()`."""
    return q.is_cuda and os.environ.get("DIT_ATTN_AUTOTUNE", "1") != "0" and not _untimed.get()


@contextlib.contextmanager
def untimed() -> Iterator[None]:
    """Fallback configs for every launch inside (small inputs, e.g. the self-check, are not worth timing)."""
    token = _untimed.set(True)
    try:
        yield
    finally:
        _untimed.reset(token)


def choose(kernel: str, q: torch.Tensor, run: Callable[[dict], object]) -> dict:
    """Launch settings for `kernel` on inputs like `q`; `run(config)` launches the kernel once."""
    if not timed(q):
        return fallback(kernel, q)
    return tune(tuning_key(kernel, q), CANDIDATES[kernel], run, _do_bench, cache_path())
