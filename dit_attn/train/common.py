"""Small pieces every trainer here shares: per-step seeds, seeded initialisation, the flow-matching loss, the LR
schedule, one optimizer update."""
from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager

import torch


def start_over(work: str, restart: bool) -> None:
    """restart=True: remove the work directory's checkpoints and caches, so the run starts from step 0."""
    if restart and os.path.isdir(work):
        shutil.rmtree(work)


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step: a resumed run draws the same batches and noise."""
    return seed * 1_000_003 + step


@contextmanager
def seeded(seed: int):
    """Inside: torch's global generators (the CPU's and every initialised CUDA device's) seeded with `seed`;
    after: as they were. For initialisations that draw from the global generators, such as peft's LoRA
    weights, so that two runs with one seed start from the same weights."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float, max_norm: float = 1.0) -> None:
    """One update at learning rate `lr`, with gradients clipped to `max_norm`."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
