"""Hooks on the transformer and its blocks (diffusers `ModelHook`s):

- `CallHook` (on the transformer) sees every call: records the call's text length and image
  grid in the per-call state, and plans the call's extra rows (`RowPlan`): on a guided call,
  copies of the conditional rows forked at the first perturbed layer; with a TextPatch,
  source-prompt rows appended to the inputs and dropped after the last patched layer. The
  call returns the stock rows only.
- `RowFork` (on every block and the final norm, the family's fork points) selects each
  stage's rows from the block inputs.
"""
from __future__ import annotations

import inspect

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..families import Family
from ..processors.ip_adapter import adopt
from ..processors.state import EditState, plan_rows
from .nag_tokens import NAG_TOKEN_HOOK, carries_tokens, nag_tokens_forward, token_block_hooks
from .private import cache_context_name

CALL_HOOK = "dit_attn.call"
FORK_HOOK = "dit_attn.fork"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _Hook(ModelHook):
    """Base of dit-attn's hooks: can stand inert in a module's hook chain, refuses deep copies."""

    active = True

    def __deepcopy__(self, memo):
        raise TypeError("copy.deepcopy of a model with dit-attn edits applied would run the original model's "
                        "weights (diffusers' hook chain keeps pointing at it): remove() the edits, copy, then apply "
                        "to each copy")


def take_rows(value, index: torch.Tensor):
    """Rows `index` of a per-row input: a tensor (dim 0) or a list with one entry per row; other values unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, (list, tuple)):
        return type(value)(value[i] for i in index.tolist())
    return value


def take_call_rows(value, index: torch.Tensor, call_rows: int):
    """Rows `index` (rows of the call) of an input the model computed once per call: one row per call
    row, k·N rows for the N call rows (k blocks of them, e.g. a timestep embedding for [t ; 0]), or a
    single row that broadcasts."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != call_rows:
        if value.shape[0] == 1:
            return value
        if value.shape[0] % call_rows == 0:
            index = torch.cat([index + j * call_rows for j in range(value.shape[0] // call_rows)])
    return take_rows(value, index)


def _each_call_rows(value, index: torch.Tensor, call_rows: int):
    """`take_call_rows` of a tensor, or of each tensor of a list (one per IP-Adapter)."""
    if isinstance(value, (list, tuple)):
        return type(value)(take_call_rows(v, index, call_rows) for v in value)
    return take_call_rows(value, index, call_rows)


def image_prompt_entries(family: Family) -> dict[str, set[str]]:
    """{keyword dict of the call: its per-row IP-Adapter entries} (the image embeddings the pipeline passes,
    the image states the transformer puts there for its blocks)."""
    entries: dict[str, set[str]] = {}
    for dotted in family.rows.block_kwargs_args:
        container, entry = dotted.split(".")
        entries.setdefault(container, {"ip_adapter_image_embeds"}).add(entry)
    return entries


def _append_rows(value, targets: torch.Tensor, batch: int):
    if isinstance(value, (list, tuple)):
        return type(value)(_append_rows(v, targets, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value.index_select(0, targets.to(value.device))])
    return value


def with_image_prompt_rows(call: dict, targets: torch.Tensor, batch: int, family: Family) -> dict:
    """The call with its keyword dicts' per-row IP-Adapter entries widened like the rows appended to the
    call (each takes its target row's image prompt), in new dicts."""
    out = dict(call)
    for container, names in image_prompt_entries(family).items():
        given = call.get(container)
        if given and names & set(given):
            out[container] = {key: _append_rows(value, targets, batch) if key in names else value
                              for key, value in given.items()}
    return out


def row_count(value) -> int:
    """Rows of a per-row value: a tensor (dim 0) or a list with one entry per row."""
    return len(value) if isinstance(value, (list, tuple)) else value.shape[0]


def stock_output(output, rows: int):
    """The transformer output with only its first `rows` rows (the pipeline's own)."""
    sample = output[0]
    if row_count(sample) == rows:
        return output
    if isinstance(output, tuple):
        return (sample[:rows],) + tuple(output[1:])
    return type(output)(sample=sample[:rows])


def named_arguments(forward, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of a call turned into keyword arguments."""
    names = list(inspect.signature(forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


class CallHook(_Hook):
    """Sees every transformer call; adds the extra rows of HeadGuidance and TextPatch.

    guidance: None, or a controller with `fork_for_call(batch, call, context)` (the conditional
    rows to copy as Python ints, or None), `fork_layer` and `finish_call(output, plan, cond)`.
    This runs inside a whole-model `torch.compile`: the row planning reads Python values and tensor
    shapes, no tensor's values, and the source prompts are encoded before the call.
    text: None, or a controller with `sources_for_call(batch, call, context)` returning None or
    an object with `sources` ({target row: source row}), `patch_end` (first layer without
    source rows) and `extend(call)` (the inputs with the source rows appended).
    """

    _is_stateful = True  # so diffusers hands it the cache context ("cond"/"uncond")

    def __init__(self, family: Family, state: EditState, guidance=None, text=None, attention_modules=(), originals=None):
        super().__init__()
        self.originals = originals  # the processors remove() puts back, kept current by IP-Adapter loads
        self.family = family
        self.state = state
        self.guidance = guidance
        self.text = text
        self.attention_modules = tuple(attention_modules)  # modules whose processor must stay dit-attn's
        self.cache = StateManager(_NoState)
        self.grid_watch = None  # the pipeline method watched for each call's grid
        self.grid_hint: tuple[int, int] | None = None  # the grid the pipeline built for its current call

    def check_processors(self, transformer) -> None:
        """Put dit-attn's processors back after an IP-Adapter load or unload (`processors.ip_adapter.adopt`);
        raise if anything else replaced them after apply (fuse_qkv_projections, set_attn_processor): the edits
        would be silently gone."""
        if all(getattr(module.processor, "state", None) is self.state for module in self.attention_modules):
            return
        if self.originals is not None and adopt(transformer, self.family, self.state, self.originals):
            return
        for module in self.attention_modules:
            if getattr(module.processor, "state", None) is not self.state:
                raise RuntimeError(f"the attention processors were replaced after dit-attn's apply (this module now has "
                                   f"a {type(module.processor).__name__}, e.g. from fuse_qkv_projections or "
                                   f"set_attn_processor): remove() the edits, change the model, then apply again")

    def reset_state(self, module):
        return module

    def watch_pipeline(self, pipe) -> None:
        """Take each pipeline call's image grid from the pipeline (as Python ints, before the transformer
        runs) on families whose grid is not in the call's shapes, so a compiled transformer need not read it
        from tensor values (`Family.watch_grid`)."""
        watch = getattr(self.family, "watch_grid", None)
        if pipe is not None and watch is not None:
            self.grid_watch = watch(pipe, self._set_grid_hint)

    def _set_grid_hint(self, grid) -> None:
        self.grid_hint = grid

    def unwatch_pipeline(self) -> None:
        if self.grid_watch is not None:
            self.grid_watch.undo()
        self.grid_watch, self.grid_hint = None, None

    def call_grid(self, module, call: dict):
        """(grid, why not): the pipeline's grid where the family checks it against the call, else the family's
        grid from the call."""
        if self.grid_hint is not None:
            grid = self.family.known_grid(module, call, self.grid_hint)
            if grid is not None:
                return grid, ""
        return self.family.grid(module, call)

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if not self.active:
            return forward(*args, **kwargs)
        self.check_processors(module)
        call = named_arguments(forward, args, kwargs) if args else kwargs
        current = self.state.call
        current.text_len = self.family.text_length(call)
        current.image_len = self.family.image_length(call)
        if self.state.local is not None or self.state.capture is not None:
            current.grid, current.grid_problem = self.call_grid(module, call)
        capture = self.state.capture
        if capture is None:
            return self._edited_forward(module, forward, call, current)
        capture.begin_call(self.family.batch_size(call), call, cache_context_name(self.cache))
        try:
            output = self._edited_forward(module, forward, call, current)
            concept = capture.concept_call(call)
            if concept is not None:
                self._concept_forward(forward, *concept, current)
        except BaseException:
            capture.discard_call()
            raise
        capture.end_call()
        return output

    def _concept_forward(self, forward, call: dict, patch, current) -> None:
        """A concept Capture's second call: the conditional rows with their concept rows appended."""
        if any(names & set(call.get(container) or {}) for container, names in image_prompt_entries(self.family).items()):
            raise NotImplementedError("Capture(kind='concept') does not run with an IP-Adapter image prompt yet")
        plan = plan_rows(self.family.batch_size(call), sources=patch.sources,
                         patch_end=None if self.family.widen_at_call else patch.patch_end)
        current.rows = plan
        try:
            forward(**patch.extend(call))
        finally:
            current.rows = None

    def _edited_forward(self, module, forward, call: dict, current):
        """The call with HeadGuidance's and TextPatch's extra rows (if they act on it)."""
        if self.guidance is None and self.text is None:
            return forward(**call)
        context = cache_context_name(self.cache)
        batch = self.family.batch_size(call)
        cond = self.guidance.fork_for_call(batch, call, context) if self.guidance is not None else None
        patch = self.text.sources_for_call(batch, call, context) if self.text is not None else None
        self._check_controlnet(call, cond, patch)
        nag_text = None
        if patch is not None and self.state.nag is not None:
            nag_text = self.family.nag_text_states(module, patch.embeds[:1] if patch.one_source else patch.embeds)
        if nag_text is not None:  # NAG in a cross-attention: the negative text rides in the call state, not in rows
            return self._cross_attention_nag_forward(module, forward, call, current, cond, patch, nag_text)
        if patch is not None and carries_tokens(self.family, self.state, call):
            return nag_tokens_forward(self, module, forward, call, current, cond, patch)
        if cond is None and patch is None:
            return forward(**call)
        at_call = self.family.widen_at_call
        plan = plan_rows(
            batch,
            sources=patch.sources if patch is not None else None,
            patch_end=patch.patch_end if patch is not None and not at_call else None,
            cond=cond,
            fork_layer=(0 if at_call else self.guidance.fork_layer) if cond is not None else None,
        )
        if patch is not None:
            call = with_image_prompt_rows(patch.extend(call), patch.targets, batch, self.family)
        if at_call:
            call = self.rows_at_call(call, plan)
        current.rows = plan
        try:
            output = forward(**call)
        finally:
            current.rows = None
        if row_count(output[0]) != plan.final.size:
            raise RuntimeError(f"{type(module).__name__} returned {row_count(output[0])} rows for a call widened to "
                               f"{plan.final.size}: this model does not carry extra rows through its blocks")
        if cond is not None:
            return self.guidance.finish_call(output, plan, cond)
        return stock_output(output, batch)

    def _check_controlnet(self, call: dict, cond, patch) -> None:
        """Refuse a call with ControlNet residuals that the edits would widen: the model adds them to the image
        stream of the call's rows. NAG on its token path keeps the call's rows."""
        if not any(call.get(name) is not None for name in self.family.rows.controlnet_args):
            return
        if cond is not None:
            raise NotImplementedError("HeadGuidance does not support ControlNet residuals yet")
        if patch is None:
            return
        if self.state.nag is None:
            raise NotImplementedError(f"{self.text.selector.edit_name} does not support ControlNet residuals yet")
        if not carries_tokens(self.family, self.state, call):
            raise NotImplementedError("NAG runs with ControlNet residuals on its token path only: give layers=None "
                                      "(every layer) or 0…k, not another layer set")

    def rows_at_call(self, call: dict, plan) -> dict:
        """A family widened at the call: the call's per-row inputs taken for the first stage of its RowPlan."""
        if plan.stages[0].keeps_rows:
            return call
        return {name: take_rows(value, plan.stages[0].select) if name in self.family.rows.call_args else value
                for name, value in call.items()}

    def _cross_attention_nag_forward(self, module, forward, call: dict, current, cond, patch, nag_text):
        """The call with NAG's negative text states in the call state (one for every guided row, or each guided
        row's); NAG guides the conditional rows and, with HeadGuidance, their perturbed copies (appended at the
        call)."""
        plan, targets = None, patch.targets
        if cond is not None:
            plan = plan_rows(self.family.batch_size(call), cond=cond, fork_layer=0)
            call = self.rows_at_call(call, plan)
            rows = torch.isin(plan.stages[0].from_call, targets).nonzero().flatten()
            call_rows = plan.stages[0].from_call[rows]
        else:
            rows = call_rows = targets
        if not patch.one_source:
            nag_text = nag_text.index_select(0, patch.source_index(call_rows).to(nag_text.device))
        current.rows, current.nag_text, current.nag_rows = plan, nag_text, rows
        try:
            output = forward(**call)
        finally:
            current.rows, current.nag_text, current.nag_rows = None, None, None
        if plan is None:
            return output
        if row_count(output[0]) != plan.final.size:
            raise RuntimeError(f"{type(module).__name__} returned {row_count(output[0])} rows for a call widened to "
                               f"{plan.final.size}: this model does not carry extra rows through its blocks")
        return self.guidance.finish_call(output, plan, cond)


class RowFork(_Hook):
    """Give a block (or the final norm) the rows of its stage of the call's RowPlan.

    Stream inputs (hidden states, text states) come from the previous block: where a new
    stage starts they are re-selected. Inputs computed once before the blocks (temb) hold
    the call's rows and are mapped to the stage's rows at every block.
    """

    def __init__(self, family: Family, state: EditState, layer: int, module: torch.nn.Module):
        super().__init__()
        self.stream_args = family.rows.block_stream_args
        self.call_args = family.rows.block_call_args
        self.kwargs_args: dict[str, tuple[str, ...]] = {}  # keyword dict → its per-row entries
        for dotted in family.rows.block_kwargs_args:
            container, entry = dotted.split(".")
            self.kwargs_args[container] = self.kwargs_args.get(container, ()) + (entry,)
        self.state = state
        self.layer = layer
        self.names = list(inspect.signature(type(module).forward).parameters)[1:]  # without self

    def pre_forward(self, module, *args, **kwargs):
        if not self.active:
            return args, kwargs
        plan = self.state.call.rows
        if plan is None:
            return args, kwargs
        stage = plan.stage_at(self.layer)
        new_rows = stage.layer == self.layer and not stage.keeps_rows
        if not new_rows and stage.is_call_rows:
            return args, kwargs
        values = {**dict(zip(self.names, args)), **kwargs}
        for name in self.stream_args:
            if new_rows and name in values:
                values[name] = take_rows(values[name], stage.select)
        for name in self.call_args:
            if name in values and not stage.is_call_rows:
                values[name] = take_call_rows(values[name], stage.from_call, plan.call_rows)
        for container, entries in self.kwargs_args.items():
            given = values.get(container)
            if given and not stage.is_call_rows and any(entry in given for entry in entries):
                values[container] = {key: _each_call_rows(value, stage.from_call, plan.call_rows) if key in entries
                                     else value for key, value in given.items()}
        positional = tuple(values.pop(name) for name in self.names[: len(args)])
        return positional, values


def _register(module: torch.nn.Module, hook: _Hook, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    left = registry.get_hook(name)
    if left is not None:  # an inert hook left in place by an earlier remove (see `_unregister`): take its place
        if left.active:
            raise RuntimeError(f"{type(module).__name__} already has an active {name} hook")
        left.__dict__.update({k: v for k, v in vars(hook).items() if k != "fn_ref"})
        left.active = True
        return
    registry.register_hook(hook, name)
    hook.forward_installed = module.forward


def _unregister(module: torch.nn.Module, name: str) -> None:
    """Take a hook out of a module's chain. If something outside diffusers' registry wrapped the
    module's forward after it (e.g. accelerate's offload hooks), removing it would drop that
    wrapper: the hook stays in place, inert."""
    registry = module.__dict__.get("_diffusers_hook")  # not getattr: a module without it raises inside
    hook = registry.get_hook(name) if registry is not None else None
    if hook is None:
        return
    wrapped_after = list(registry.hooks)[-1] == name and module.forward is not getattr(hook, "forward_installed", None)
    if wrapped_after:
        hook.active = False
    else:
        registry.remove_hook(name, recurse=False)


def install_hooks(transformer, family: Family, state: EditState, guidance=None, text=None, originals=None,
                  pipe=None) -> None:
    modules = [transformer.get_submodule(info.name) for info in family.layers(transformer)]
    _register(transformer, CallHook(family, state, guidance, text, modules, originals), CALL_HOOK)
    if state.local is not None:
        HookRegistry.check_if_exists_or_initialize(transformer).get_hook(CALL_HOOK).watch_pipeline(pipe)
    if carries_tokens(family, state):  # inside RowFork's hooks: a block sees its stage's rows
        for block, hook in token_block_hooks(family, state, transformer):
            _register(block, hook, NAG_TOKEN_HOOK)
    if (guidance is not None or text is not None or state.shared_image_layers) and not family.widen_at_call:
        for module, layer in family.fork_points(transformer):
            _register(module, RowFork(family, state, layer, module), FORK_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def remove_hooks(transformer) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    call_hook = registry.get_hook(CALL_HOOK) if registry is not None else None
    if call_hook is not None:
        call_hook.unwatch_pipeline()
    _unregister(transformer, CALL_HOOK)
    for module in transformer.modules():
        _unregister(module, FORK_HOOK)
        _unregister(module, NAG_TOKEN_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
