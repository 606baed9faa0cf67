"""Guidance inside the transformer call a pipeline already makes.

- `CallHook` (on the transformer) records the text length of each call and plans its
  extra rows (`RowPlan`): on a guided call, copies of the conditional rows that fork at the
  first perturbed layer; with a TextPatch, source-prompt rows appended to the inputs and
  dropped after the last patched layer. The call returns the stock rows, and keeps ε_c
  and ε_p for the scheduler step.
- `RowFork` (on every block and on `norm_out`) selects each stage's rows from the block
  inputs: blocks before the fork run once for the conditional and perturbed rows (shared
  prefix), blocks after the last patched layer without the source rows.
- `GuidedStep` wraps `scheduler.step` and adds s·(ε_c − ε_p) to the pipeline's final ε,
  so CFG, true CFG and skip-layer guidance stay the pipeline's own arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import inspect

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..edits import HeadGuidance
from ..processors.grid import flux_grid, sd3_grid
from ..processors.state import EditState, RowPlan, plan_rows
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

    def fork_for_call(self, batch: int, kwargs: dict, context: str | None) -> torch.Tensor | None:
        """The conditional rows to copy (as perturbed rows) in this call, or None."""
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
        return cond

    def finish_call(self, output, plan: RowPlan, cond: torch.Tensor):
        sample = output[0]
        eps_perturbed = sample[plan.final.perturbed.to(sample.device)]
        eps_cond = sample.index_select(0, cond.to(sample.device))
        self.pending = PendingGuidance(eps_cond, eps_perturbed, denoising_step(self.pipe)[0], self.pipe.scheduler.timesteps)
        return stock_output(output, plan.stock_rows)

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


def stock_output(output, rows: int):
    """The transformer output with only its first `rows` rows (the pipeline's own)."""
    sample = output[0]
    if sample.shape[0] == rows:
        return output
    if isinstance(output, tuple):
        return (sample[:rows],) + tuple(output[1:])
    return type(output)(sample=sample[:rows])


def named_arguments(forward, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of a call turned into keyword arguments."""
    names = list(inspect.signature(forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


class CallHook(ModelHook):
    """Sees every transformer call; adds the extra rows of HeadGuidance and TextPatch.

    text: None, or a controller with `sources_for_call(batch, kwargs, context)` returning
    None or an object with `sources` ({target row: source row}), `patch_end` (first layer
    without source rows) and `extend(kwargs)` (the inputs with the source rows appended).
    """

    _is_stateful = True  # so diffusers hands it the cache context ("cond"/"uncond")

    def __init__(self, state: EditState, controller: GuidanceController | None, text=None):
        super().__init__()
        self.state = state
        self.controller = controller
        self.text = text
        self.cache = StateManager(_NoState)

    def reset_state(self, module):
        return module

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if args:
            kwargs = named_arguments(forward, args, kwargs)
        hidden = kwargs["hidden_states"]
        text_states = kwargs.get("encoder_hidden_states")
        self.state.text_len = text_states.shape[1] if text_states is not None else 0
        if self.state.local is not None:
            self._record_grid(module, hidden, kwargs)
        if self.controller is None and self.text is None:
            return forward(**kwargs)
        context = self.cache._context.name if self.cache._context is not None else None
        batch = hidden.shape[0]
        cond = self.controller.fork_for_call(batch, kwargs, context) if self.controller is not None else None
        patch = self.text.sources_for_call(batch, kwargs, context) if self.text is not None else None
        if cond is None and patch is None:
            return forward(**kwargs)
        plan = plan_rows(
            batch,
            sources=patch.sources if patch is not None else None,
            patch_end=patch.patch_end if patch is not None else None,
            cond=cond,
            fork_layer=self.controller.fork_layer if cond is not None else None,
        )
        if patch is not None:
            kwargs = patch.extend(kwargs)
        self.state.rows = plan
        try:
            output = forward(**kwargs)
        finally:
            self.state.rows = None
        if cond is not None:
            return self.controller.finish_call(output, plan, cond)
        return stock_output(output, batch)

    def _record_grid(self, module, hidden: torch.Tensor, kwargs: dict) -> None:
        if hidden.ndim == 4:  # SD3 latents (B, C, H, W)
            self.state.grid, self.state.grid_problem = sd3_grid(module, hidden), ""
        else:  # FLUX packed tokens (B, S, C)
            self.state.grid, self.state.grid_problem = flux_grid(kwargs.get("img_ids"), hidden.shape[1])


class RowFork(ModelHook):
    """Give a block (or `norm_out`) the rows of its stage of the call's RowPlan.

    Stream inputs (hidden states, text states) come from the previous block: where a new
    stage starts they are re-selected. Inputs computed once before the blocks (temb) hold
    the call's rows and are mapped to the stage's rows at every block.
    """

    STREAM_ARGS = ("hidden_states", "encoder_hidden_states", "x")
    CALL_ARGS = ("temb", "conditioning_embedding")

    def __init__(self, state: EditState, layer: int, module: torch.nn.Module):
        super().__init__()
        self.state = state
        self.layer = layer
        self.names = list(inspect.signature(type(module).forward).parameters)[1:]  # without self

    @staticmethod
    def _select(value, index: torch.Tensor):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.index_select(0, index.to(value.device))
        return value

    def pre_forward(self, module, *args, **kwargs):
        plan = self.state.rows
        if plan is None:
            return args, kwargs
        stage = plan.stage_at(self.layer)
        new_rows = stage.layer == self.layer and not stage.keeps_rows
        if not new_rows and stage.is_call_rows:
            return args, kwargs
        values = {**dict(zip(self.names, args)), **kwargs}
        for name in self.STREAM_ARGS:
            if new_rows and name in values:
                values[name] = self._select(values[name], stage.select)
        for name in self.CALL_ARGS:
            if name in values and not stage.is_call_rows:
                values[name] = self._select(values[name], stage.from_call)
        positional = tuple(values.pop(name) for name in self.names[: len(args)])
        return positional, values


def fork_points(transformer) -> list[tuple[torch.nn.Module, int]]:
    """Modules that receive batch-carrying inputs after the blocks start, with their layer
    (`norm_out` counts as the layer after the last block)."""
    blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", ()))
    return [(block, i) for i, block in enumerate(blocks)] + [(transformer.norm_out, len(blocks))]


def install_hooks(transformer, state: EditState, controller: GuidanceController | None, text=None) -> None:
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.register_hook(CallHook(state, controller, text), CALL_HOOK)
    if controller is not None or text is not None:
        for module, layer in fork_points(transformer):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(RowFork(state, layer, module), FORK_HOOK)
    root.invalidate_child_registries_cache()


def remove_hooks(transformer, controller: GuidanceController | None, text=None) -> None:
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.remove_hook(CALL_HOOK, recurse=False)
    root.remove_hook(FORK_HOOK, recurse=True)
    root.invalidate_child_registries_cache()
    if controller is not None:
        controller.unwrap()
    if text is not None:
        text.unwrap()
