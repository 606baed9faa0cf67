"""Interceptions on the pipeline object: the scheduler's `step` (HeadGuidance adds its term to
the pipeline's final prediction) and `check_inputs` (TextGuard reads each call's prompt).
Both are instance attributes set over the class's method and removed again on undo; an
instance-level attribute someone else set first is put back."""
from __future__ import annotations

import inspect
from typing import Callable


class MethodWrap:
    """Wrap `obj.name` (an instance attribute shadowing the class's method) until `undo()`."""

    def __init__(self, obj, name: str, make: Callable[[Callable], Callable]):
        self.obj, self.name = obj, name
        self.shadowed = vars(obj).get(name)
        wrapper = make(getattr(obj, name))
        wrapper._dit_attn_wrap = self
        setattr(obj, name, wrapper)

    @staticmethod
    def installed(obj, name: str, owner) -> bool:
        wrap = getattr(getattr(obj, name), "_dit_attn_wrap", None)
        return wrap is not None and getattr(wrap, "owner", None) is owner

    def undo(self) -> None:
        if self.shadowed is not None:
            setattr(self.obj, self.name, self.shadowed)
        elif self.name in vars(self.obj):
            delattr(self.obj, self.name)


def wrap_scheduler_step(scheduler, transform: Callable, owner) -> MethodWrap | None:
    """scheduler.step(model_output, ...) → step(transform(model_output), ...); None if `owner` wrapped it already."""
    if MethodWrap.installed(scheduler, "step", owner):
        return None

    def make(original):
        def step(model_output, *args, **kwargs):
            return original(transform(model_output), *args, **kwargs)
        return step

    wrap = MethodWrap(scheduler, "step", make)
    wrap.owner = owner
    return wrap


def capture_prompts(pipe, record: Callable) -> MethodWrap:
    """Call record(prompt) with the prompt of every pipeline call (every supported pipeline calls
    `check_inputs(prompt, ...)` first)."""
    def make(original):
        def check_inputs(prompt, *args, **kwargs):
            record(prompt)
            return original(prompt, *args, **kwargs)
        return check_inputs

    return MethodWrap(pipe, "check_inputs", make)


def prompt_count(method: Callable, args: tuple, kwargs: dict) -> int | None:
    """How many prompts a pipeline call has, from the arguments of its `method(*args, **kwargs)` call (its
    `check_inputs` or `encode_prompt`): its prompt (a string: 1; a list: its length) or, without one, its prompt
    embeddings (their rows; Z-Image: a list); None if neither."""
    try:
        given = inspect.signature(method).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        given = kwargs
    prompt, embeds = given.get("prompt"), given.get("prompt_embeds")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    if isinstance(embeds, (list, tuple)):
        return len(embeds)
    return int(embeds.shape[0]) if getattr(embeds, "ndim", 0) >= 2 else None
