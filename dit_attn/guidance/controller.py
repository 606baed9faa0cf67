"""HeadGuidance inside the transformer call a pipeline already makes.

The call hook (`dit_attn.hooks.calls`) asks `fork_for_call` which conditional rows to copy
as perturbed rows; `finish_call` keeps ε_c and ε_p of the call; the wrapped scheduler step
adds s·(ε_c − ε_p) to the pipeline's final ε, so CFG, true CFG and skip-layer guidance stay
the pipeline's own arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..edits import HeadGuidance
from ..families import Family
from ..hooks.calls import stock_output, take_rows
from ..hooks.pipeline import wrap_scheduler_step
from ..hooks.selection import CallSelector
from ..hooks.steps import denoising_step
from ..processors.state import RowPlan
from .formulas import perturbation_guidance


@dataclass
class PendingGuidance:
    eps_cond: torch.Tensor
    eps_perturbed: torch.Tensor
    step: int
    timesteps: torch.Tensor  # the scheduler's schedule of that run: a new run has a new tensor

    def is_for(self, pipe) -> bool:
        return self.timesteps is pipe.scheduler.timesteps and self.step == denoising_step(pipe)[0]


class GuidanceController:
    """Decides which calls are guided and carries ε_c, ε_p from the call to the step."""

    def __init__(self, pipe, family: Family, edit: HeadGuidance, first_layer: int):
        self.pipe = pipe
        self.edit = edit
        self.fork_layer = first_layer if edit.share_prefix else 0
        self.family = family
        self.selector = CallSelector(pipe, family, "HeadGuidance")
        self.pending: PendingGuidance | None = None
        self.wraps: list = []
        self._wrap_step()  # now, not in the first guided call: a compiled call then finds the same scheduler.step

    def _wrap_step(self) -> None:
        wrap = wrap_scheduler_step(self.pipe.scheduler, self.guide, owner=self)
        if wrap is not None:
            self.wraps.append(wrap)

    def fork_for_call(self, batch: int, call: dict, context: str | None) -> tuple[int, ...] | None:
        """The conditional rows to copy (as perturbed rows) in this call, as Python ints, or None."""
        step, total = denoising_step(self.pipe)
        if not self.edit.active_at(step / total):
            return None
        cond = self.selector.select_rows(batch, call, context)
        if cond is None:
            return None
        if not torch.compiler.is_compiling():  # a scheduler set after apply (the one at apply is wrapped)
            self._wrap_step()
        return cond

    def finish_call(self, output, plan: RowPlan, cond):
        sample = output[0]
        copies = plan.final.copied_call_rows  # the perturbed copies of the conditional rows (not of TextPatch's source rows)
        eps_perturbed = self.family.prediction(take_rows(sample, torch.tensor(copies, dtype=torch.long)))
        eps_cond = self.family.prediction(take_rows(sample, torch.tensor(list(cond), dtype=torch.long)))
        self.pending = PendingGuidance(eps_cond, eps_perturbed, denoising_step(self.pipe)[0], self.pipe.scheduler.timesteps)
        return stock_output(output, plan.stock_rows)

    def guide(self, model_output: torch.Tensor) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is None or not pending.is_for(self.pipe):
            return model_output
        eps_cond, eps_perturbed = pending.eps_cond, pending.eps_perturbed
        if eps_cond.shape != model_output.shape and self.family.reference_tokens_trail and eps_cond.ndim == 3 \
                and eps_cond.shape[0] == model_output.shape[0] and eps_cond.shape[1] > model_output.shape[1]:
            generated = model_output.shape[1]  # the reference-image tokens the pipeline dropped
            eps_cond, eps_perturbed = eps_cond[:, :generated], eps_perturbed[:, :generated]
        if eps_cond.shape != model_output.shape:
            raise RuntimeError(
                f"HeadGuidance: the scheduler got a prediction of shape {tuple(model_output.shape)}, "
                f"but the conditional rows had {tuple(pending.eps_cond.shape)}"
            )
        return perturbation_guidance(model_output, eps_cond, eps_perturbed, self.edit.scale)

    def unwrap(self) -> None:
        for wrap in reversed(self.wraps):
            wrap.undo()
        self.wraps.clear()
        self.pending = None
        self.selector.reset()
