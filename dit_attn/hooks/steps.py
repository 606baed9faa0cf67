"""Where a pipeline is in its denoising loop, read from its scheduler."""
from __future__ import annotations


def denoising_step(pipe) -> tuple[int, int]:
    """(index of the current step among the steps this call runs, number of those steps).

    Valid inside a transformer call: the scheduler's step index is None until its first
    `step()` and counts from its begin index (img2img pipelines start past 0).
    """
    scheduler = pipe.scheduler
    begin = getattr(scheduler, "begin_index", None) or 0
    index = getattr(scheduler, "step_index", None)
    current = (begin if index is None else index) - begin
    total = getattr(pipe, "_num_timesteps", None) or len(scheduler.timesteps) - begin
    return current, max(int(total), 1)


def step_fraction(pipe) -> float:
    current, total = denoising_step(pipe)
    return current / total
