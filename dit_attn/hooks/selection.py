"""The one rule for which transformer call of a denoising step an edit acts on, shared by
HeadGuidance and TextPatch: the first call of the step, its conditional rows as the family's
spec reads them (`hooks.calls.CallHook` refuses the ControlNet residuals of a call it would widen)."""
from __future__ import annotations

import torch

from ..families import Family
from .steps import denoising_step


class CallSelector:
    """Remembers the last step it selected a call in; `select` gives the conditional rows or None."""

    def __init__(self, pipe, family: Family, edit_name: str):
        self.pipe = pipe
        self.family = family
        self.edit_name = edit_name
        self._last = None  # (timesteps tensor, step) of the last selected call

    def reset(self) -> None:
        self._last = None

    def selected_this_step(self) -> bool:
        step = denoising_step(self.pipe)[0]
        return self._last is not None and self._last[0] is self.pipe.scheduler.timesteps and self._last[1] == step

    def select(self, batch: int, call: dict, context: str | None) -> torch.Tensor | None:
        rows = self.select_rows(batch, call, context)
        return None if rows is None else torch.tensor(rows, dtype=torch.long)

    def select_rows(self, batch: int, call: dict, context: str | None) -> tuple[int, ...] | None:
        """The conditional rows as Python ints, read from no tensor (torch.compile may be tracing the call)."""
        if self.selected_this_step():
            # the conditional call comes first; a second call in the same step is a negative
            # (true CFG without cache contexts) or skip-layer call
            return None
        cond = self.family.conditional_rows(self.pipe, batch, call, context)
        if cond is None:
            return None
        self._last = (self.pipe.scheduler.timesteps, denoising_step(self.pipe)[0])
        return tuple(int(row) for row in cond)


def check_pipeline(pipe, family: Family, edit_name: str, controlnet: bool = False) -> None:
    """Refuse a pipeline the family's spec does not know (controlnet: its ControlNet pipelines are known too)."""
    if not family.supports_pipeline(pipe, controlnet):
        known = family.guided_pipelines + (family.controlnet_pipelines if controlnet else ())
        hint = ""
        if type(pipe).__name__ in family.controlnet_pipelines:
            hint = " (of the edits that act on a pipeline's calls only NAG runs with ControlNet residuals)"
        raise TypeError(f"{edit_name} does not support {type(pipe).__name__}{hint}; supported pipelines: {', '.join(known)}")
