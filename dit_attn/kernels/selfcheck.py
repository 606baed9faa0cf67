"""The Triton kernels checked against the definition on first use.

The first time `backend="auto"` would choose `triton` for a configuration (kernel, head dim,
dtype, the plan's blends, dense or local window, pooled keys, where the text sits, with or
without gradients) on a device, `failure` runs the Triton backend and `reference` (in
float64) on a small input of that configuration: 2 rows × 2 heads, 63 or 64 image tokens
(a 7×9 grid, 8×8 when pooled by 2), 13 text tokens, u ∈ {0, 0.25, 0.5, 1}, radius 2.5, and
compares the output (and dq, dk, dv with gradients) within `TOLERANCES`, relative to
max(|reference|, 1).

A compile error or a mismatch warns once, naming the configuration, the error and the
Triton and torch versions, and the configuration takes the next backend for the rest of the
process. The failure is stored in the tuning cache file (`triton.tuning.cache_path()`) under a
key with the device name and the Triton, torch and dit-attn versions, so later processes skip
Triton for it without checking again (delete the entry, or the file, to check again). Passes
are kept for the process only. `DIT_ATTN_TRITON_SELFCHECK=0` turns the check off.

Under torch.compile the verdict is a constant of the trace (`assume_constant_result`): the
check runs eagerly while the graph is traced and adds nothing to the graph.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import NamedTuple

import torch

from .plan import AttentionPlan, Perturbation
from .window import LocalWindow

logger = logging.getLogger(__name__)

ENV = "DIT_ATTN_TRITON_SELFCHECK"
# the tests' tolerances for fp32 and fp16; bf16 keeps 3 fewer mantissa bits than fp16
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
CACHE_PREFIX = "selfcheck|"


class Configuration(NamedTuple):
    """What decides which Triton code runs for a call."""

    kernel: str  # "softpag" (dense forward), "local" (windowed forward), "backward" (with autograd)
    head_dim: int
    dtype: str
    blends: tuple[str, ...]  # sorted "scope/target" of the plan's perturbations
    window: str  # "dense" or "local"
    pooled: bool
    layout: str  # "image only", "image first" or "text first"
    device: str

    def describe(self) -> str:
        blends = "+".join(self.blends) or "no blend"
        pooled = ", pooled keys" if self.pooled else ""
        return f"{self.kernel} kernel, head dim {self.head_dim}, {self.dtype}, {blends}, {self.window}{pooled}, {self.layout}"


def configuration(q: torch.Tensor, plan: AttentionPlan) -> tuple:
    """The configuration of a call as plain values (torch.compile turns them into constants)."""
    grad = torch.is_grad_enabled() and q.requires_grad
    window = plan.window
    kernel = "backward" if grad else ("softpag" if window is None else "local")
    blends = tuple(sorted({p.scope + "/" + p.target for p in plan.perturbations}))
    if plan.image_tokens is None:
        layout = "image only"
    elif plan.image_tokens[0] == 0:
        layout = "image first"
    else:
        layout = "text first"
    pooled = window is not None and window.pool is not None
    return (kernel, q.shape[-1], str(q.dtype).removeprefix("torch."), blends,
            "dense" if window is None else "local", pooled, layout, str(q.device))


_verdicts: dict[Configuration, str | None] = {}
_lock = threading.RLock()


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


@torch.compiler.assume_constant_result
def failure(config: tuple) -> str | None:
    """None when Triton may run `config` (its check passed, or checks are off), else why not.
    Checks once per configuration per process."""
    if not enabled():
        return None
    config = Configuration(*config)
    with _lock:
        if config not in _verdicts:
            _verdicts[config] = _first_verdict(config)
        return _verdicts[config]


def verdicts() -> dict[str, str | None]:
    """This process's verdicts so far: {configuration: None (passed) or why Triton is skipped}."""
    with _lock:
        return {config.describe() + f" on {config.device}": verdict for config, verdict in _verdicts.items()}


def forget() -> None:
    """Drop this process's verdicts (the cache file keeps its failures)."""
    with _lock:
        _verdicts.clear()


def device_name(device: str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} (Triton interpreter)"


def versions() -> str:
    import sys

    import triton

    package = getattr(sys.modules.get(__name__.split(".")[0]), "__version__", "unknown")
    return f"triton {triton.__version__}, torch {torch.__version__}, dit-attn {package}"


def cache_key(config: Configuration) -> str:
    return f"{CACHE_PREFIX}{device_name(config.device)}|{versions()}|{config.describe()}"


def _first_verdict(config: Configuration) -> str | None:
    from .triton import tuning

    key = cache_key(config)
    stored = tuning.stored(key)
    if isinstance(stored, dict) and stored.get("passed") is False:
        logger.warning("Triton is skipped for %s: it failed its self-check in an earlier process (%s); "
                       "delete %r from %s to check again", config.describe(), stored.get("error"), key,
                       tuning.cache_path())
        return f"failed its self-check in an earlier process: {stored.get('error')}"
    try:
        error = check(config)
    except Exception as err:  # the reference or the sample itself failed: not Triton's verdict, the call goes on
        logger.warning("the Triton self-check for %s could not run (%s: %s); Triton is used unchecked",
                       config.describe(), type(err).__name__, err)
        return None
    if error is None:
        logger.info("Triton passed its self-check for %s", config.describe())
        return None
    warnings.warn(
        f"dit-attn: the Triton kernel failed its self-check for {config.describe()} on "
        f"{device_name(config.device)}: {error} ({versions()}). This configuration uses the next attention "
        f"backend in this process; the failure is stored in {tuning.cache_path()} so later processes skip "
        f"Triton for it ({ENV}=0 turns the check off).",
        RuntimeWarning, stacklevel=2,
    )
    try:
        tuning.store(key, {"passed": False, "error": error})
    except OSError as err:
        logger.warning("could not store the Triton self-check failure in %s: %s", tuning.cache_path(), err)
    return f"failed its self-check: {error}"


def sample(config: Configuration, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionPlan]:
    """q, k, v (2, 2, S, head dim) on the configuration's device and a plan with its blends and window."""
    generator = torch.Generator().manual_seed(0)
    grid = (8, 8) if config.pooled else (7, 9)
    image = grid[0] * grid[1]
    text = 0 if config.layout == "image only" else 13
    seq = image + text
    q, k, v = (torch.randn(2, 2, seq, config.head_dim, generator=generator).to(config.device, dtype)
               for _ in range(3))
    strengths = torch.tensor([[0.0, 0.5], [1.0, 0.25]], device=config.device)
    perturbations = tuple(Perturbation(strengths.roll(i, dims=1), *blend.split("/")[::-1])
                          for i, blend in enumerate(config.blends))
    tokens = {"image only": None, "image first": (0, image), "text first": (text, seq)}[config.layout]
    window = None
    if config.window == "local":
        pool, weight = (2, torch.rand(2, 2, generator=generator).to(config.device)) if config.pooled else (None, None)
        window = LocalWindow(2.5, grid, pool, weight)
    return q, k, v, AttentionPlan(perturbations, tokens, window)


def _outputs(run, q, k, v, plan: AttentionPlan, grad_out: torch.Tensor | None) -> list[torch.Tensor]:
    if grad_out is None:
        with torch.no_grad():
            return [run(q, k, v, plan)]
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    with torch.enable_grad():
        out = run(*leaves, plan)
        (out.to(grad_out.dtype) * grad_out).sum().backward()
    return [out.detach()] + [x.grad for x in leaves]


def check(config: Configuration) -> str | None:
    """Run Triton and the float64 reference on a small input of `config`: None when they agree,
    else the error (a compile or launch error, or the largest mismatch)."""
    from . import BACKENDS
    from .triton import tuning

    config = Configuration(*config)
    dtype = getattr(torch, config.dtype)
    q, k, v, plan = sample(config, dtype)
    grad_out = None
    if config.kernel == "backward":
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, torch.float64)
    with torch.inference_mode(False):
        wide = AttentionPlan(tuple(Perturbation(p.u.double(), p.target, p.scope) for p in plan.perturbations),
                             plan.image_tokens, plan.window)
        expected = _outputs(BACKENDS["reference"].run, q.double(), k.double(), v.double(), wide, grad_out)
        try:
            with tuning.untimed():
                got = _outputs(BACKENDS["triton"].run, q, k, v, plan, grad_out)
        except Exception as err:  # a compile or launch error is a verdict, not a crash
            message = str(err).strip().splitlines()
            return f"{type(err).__name__}: {message[0][:300] if message else ''}"
    tolerance = TOLERANCES.get(config.dtype, TOLERANCES["float16"])
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, expected):
        if a is None or a.shape != b.shape:
            return f"{name} has shape {None if a is None else tuple(a.shape)}, expected {tuple(b.shape)}"
        error = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1)).item()
        if not error <= tolerance:  # NaN fails too
            return f"{name} differs from the reference by {error:.3g} (tolerance {tolerance:g})"
    return None
