"""Guidance inside the transformer call a pipeline already makes.

- `CallHook` (on the transformer) records the text length of each call and, on a guided
  call, appends copies of the conditional rows that fork at the first perturbed layer:
  the call returns the stock rows, and keeps ε_c and ε_p for the scheduler step.
- `RowFork` (on every block from the fork on, and on `norm_out`) widens the batch-carrying
  inputs to the forked rows: blocks before the fork run once for both (shared prefix).
- `GuidedStep` wraps `scheduler.step` and adds s·(ε_c − ε_p) to the pipeline's final ε,
  so CFG, true CFG and skip-layer guidance stay the pipeline's own arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..edits import HeadGuidance
from ..processors.grid import flux_grid, sd3_grid
from ..processors.state import EditState, Fork
from .formulas import perturbation_guidance
from .rows import conditional_rows
from .schedule import denoising_step

CALL_HOOK = "dit_attn.call"
FORK_HOOK = "dit_attn.fork"
_CONTROLNET_ARGS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


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

    def __init__(self, pipe, edit: HeadGuidance, first_layer: int):
        self.pipe = pipe
        self.edit = edit
        self.fork_layer = first_layer if edit.share_prefix else 0
        self.pending: PendingGuidance | None = None
        self.wrapped_schedulers: list = []

    def fork_for_call(self, batch: int, kwargs: dict, context: str | None) -> tuple[Fork, torch.Tensor] | None:
        step, total = denoising_step(self.pipe)
        if not self.edit.active_at(step / total):
            return None
        if self.pending is not None and self.pending.is_for(self.pipe):
            # the conditional call comes first; pipelines without cache contexts (e.g.
            # FluxImg2ImgPipeline with true CFG) make the negative call next in the same step
            return None
        cond = conditional_rows(self.pipe, batch, kwargs, context)
        if cond is None:
            return None
        if any(kwargs.get(name) is not None for name in _CONTROLNET_ARGS):
            raise NotImplementedError("HeadGuidance does not support ControlNet residuals yet")
        self._wrap_scheduler()
        row_map = torch.cat([torch.arange(batch), cond])
        return Fork(rows_before=batch, row_map=row_map, first_layer=self.fork_layer), cond

    def finish_call(self, output, fork: Fork, cond: torch.Tensor):
        sample = output[0]
        eps_perturbed = sample[fork.perturbed_rows]
        eps_cond = sample.index_select(0, cond.to(sample.device))
        self.pending = PendingGuidance(eps_cond, eps_perturbed, denoising_step(self.pipe)[0], self.pipe.scheduler.timesteps)
        stock = sample[: fork.rows_before]
        if isinstance(output, tuple):
            return (stock,) + tuple(output[1:])
        return type(output)(sample=stock)

    def guide(self, model_output: torch.Tensor) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is None or not pending.is_for(self.pipe):
            return model_output
        if pending.eps_cond.shape != model_output.shape:
            raise RuntimeError(
                f"HeadGuidance: the scheduler got a prediction of shape {tuple(model_output.shape)}, "
                f"but the conditional rows had {tuple(pending.eps_cond.shape)}"
            )
        return perturbation_guidance(model_output, pending.eps_cond, pending.eps_perturbed, self.edit.scale)

    def _wrap_scheduler(self) -> None:
        scheduler = self.pipe.scheduler
        if getattr(scheduler.step, "_dit_attn_controller", None) is self:
            return
        original = scheduler.step
        shadowed = vars(scheduler).get("step")  # an instance-level step set by someone else

        def step(model_output, *args, **kwargs):
            return original(self.guide(model_output), *args, **kwargs)

        step._dit_attn_controller = self
        scheduler.step = step
        self.wrapped_schedulers.append((scheduler, shadowed))

    def unwrap(self) -> None:
        for scheduler, shadowed in reversed(self.wrapped_schedulers):
            if shadowed is not None:
                scheduler.step = shadowed
            elif "step" in vars(scheduler):
                del scheduler.step
        self.wrapped_schedulers.clear()
        self.pending = None


class CallHook(ModelHook):
    _is_stateful = True  # so diffusers hands it the cache context ("cond"/"uncond")

    def __init__(self, state: EditState, controller: GuidanceController | None):
        super().__init__()
        self.state = state
        self.controller = controller
        self.cache = StateManager(_NoState)

    def reset_state(self, module):
        return module

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[1] if len(args) > 1 else None)
        self.state.text_len = text.shape[1] if text is not None else 0
        if self.state.local is not None:
            self._record_grid(module, hidden, kwargs)
        if self.controller is None:
            return forward(*args, **kwargs)
        context = self.cache._context.name if self.cache._context is not None else None
        plan = self.controller.fork_for_call(hidden.shape[0], kwargs, context)
        if plan is None:
            return forward(*args, **kwargs)
        fork, cond = plan
        self.state.fork = fork
        try:
            output = forward(*args, **kwargs)
        finally:
            self.state.fork = None
        return self.controller.finish_call(output, fork, cond)


    def _record_grid(self, module, hidden: torch.Tensor, kwargs: dict) -> None:
        if hidden.ndim == 4:  # SD3 latents (B, C, H, W)
            self.state.grid, self.state.grid_problem = sd3_grid(module, hidden), ""
        else:  # FLUX packed tokens (B, S, C)
            self.state.grid, self.state.grid_problem = flux_grid(kwargs.get("img_ids"), hidden.shape[1])


class RowFork(ModelHook):
    """Widen batch-carrying tensor inputs from the rows entering the call to the forked rows."""

    def __init__(self, state: EditState, layer: float):
        super().__init__()
        self.state = state
        self.layer = layer

    def _widen(self, value, fork: Fork):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == fork.rows_before:
            return value.index_select(0, fork.row_map.to(value.device))
        return value

    def pre_forward(self, module, *args, **kwargs):
        fork = self.state.fork
        if fork is None or self.layer < fork.first_layer:
            return args, kwargs
        args = tuple(self._widen(a, fork) for a in args)
        kwargs = {k: self._widen(v, fork) for k, v in kwargs.items()}
        return args, kwargs


def fork_points(transformer) -> list[tuple[torch.nn.Module, float]]:
    """Modules that receive batch-carrying inputs after the blocks start, with their layer."""
    blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", ()))
    return [(block, float(i)) for i, block in enumerate(blocks)] + [(transformer.norm_out, float("inf"))]


def install_hooks(transformer, state: EditState, controller: GuidanceController | None) -> None:
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.register_hook(CallHook(state, controller), CALL_HOOK)
    if controller is not None:
        for module, layer in fork_points(transformer):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(RowFork(state, layer), FORK_HOOK)
    root.invalidate_child_registries_cache()


def remove_hooks(transformer, controller: GuidanceController | None) -> None:
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.remove_hook(CALL_HOOK, recurse=False)
    root.remove_hook(FORK_HOOK, recurse=True)
    root.invalidate_child_registries_cache()
    if controller is not None:
        controller.unwrap()
