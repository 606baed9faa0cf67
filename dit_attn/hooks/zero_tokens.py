"""SD3 without T5 (`text_encoder_3=None`) pads every prompt with `max_sequence_length` identical
zero text tokens (256 by default). Identical keys act on a softmax like one key whose logit is
raised by log n, and identical text tokens stay identical through the blocks, so the call can
run with one zero token and that bias on its key: the same output up to rounding, at a fraction
of the attention cost. `collapse_zero_tokens(pipe)` installs this as a transformer hook.

It acts only while the transformer's attention uses the stock processors (dit-attn's own
processors see the full call), through a `TorchFunctionMode` that adds the bias to the SDPA
call of each joint attention module (entered only around those modules: a mode over the whole
call would route every torch operation of the call through Python).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from ..families import family_of
from .calls import named_arguments

ZERO_TOKENS_HOOK = "dit_attn.zero_tokens"


class _LastKeyBias(TorchFunctionMode):
    """Adds `bias` to the last key's logit of SDPA calls with `keys` keys and no mask of their own."""

    def __init__(self, keys: int, bias: float):
        super().__init__()
        self.keys, self.bias = keys, bias

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) >= 3 \
                and args[1].shape[-2] == self.keys:
            key = args[1]
            mask = torch.zeros(self.keys, dtype=key.dtype, device=key.device)
            mask[-1] = self.bias
            kwargs = {**kwargs, "attn_mask": mask.view(1, 1, 1, -1)}
        return func(*args, **kwargs)


class _BiasedAttention(ModelHook):
    """On each attention module: enters the collapse's bias while a collapsed call runs."""

    def __init__(self, collapse: "ZeroTokenCollapse"):
        super().__init__()
        self.collapse = collapse

    def new_forward(self, module, *args, **kwargs):
        bias = self.collapse.bias
        if bias is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        with bias:
            return self.fn_ref.original_forward(*args, **kwargs)


class ZeroTokenCollapse(ModelHook):
    def __init__(self, leading_tokens: int):
        super().__init__()
        self.leading_tokens = leading_tokens  # CLIP tokens before the zero (T5) tokens
        self.bias: _LastKeyBias | None = None  # set while a collapsed call runs

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        call = named_arguments(forward, args, kwargs) if args else kwargs
        text, hidden = call.get("encoder_hidden_states"), call.get("hidden_states")
        n = 0 if text is None else text.shape[1] - self.leading_tokens
        family = family_of(module)
        if n <= 1 or hidden is None or hidden.ndim != 4 or not self._stock(module, family) \
                or bool(text[:, self.leading_tokens:].any()):
            return forward(**call)
        rows, cols = family.grid(module, call)[0]
        call = {**call, "encoder_hidden_states": text[:, : self.leading_tokens + 1]}
        self.bias = _LastKeyBias(rows * cols + self.leading_tokens + 1, math.log(n))
        try:
            return forward(**call)
        finally:
            self.bias = None

    @staticmethod
    def _stock(module, family) -> bool:
        return all(type(p).__name__ in family.stock_processors and getattr(p, "_attention_backend", None) is None
                   for p in module.attn_processors.values())


def collapse_zero_tokens(pipe) -> None:
    """Install the collapse on an SD3 pipeline that has no T5 encoder (its text states are the CLIP
    tokens, `pipe.tokenizer_max_length` of them, then zeros)."""
    if getattr(pipe, "text_encoder_3", None) is not None:
        raise ValueError("the pipeline has a T5 encoder: its text tokens are not zeros")
    transformer = pipe.transformer
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(ZERO_TOKENS_HOOK) is not None:
        return
    collapse = ZeroTokenCollapse(pipe.tokenizer_max_length)
    registry.register_hook(collapse, ZERO_TOKENS_HOOK)
    for info in family_of(transformer).layers(transformer):
        attention = transformer.get_submodule(info.name)
        HookRegistry.check_if_exists_or_initialize(attention).register_hook(_BiasedAttention(collapse), ZERO_TOKENS_HOOK)
    registry.invalidate_child_registries_cache()
