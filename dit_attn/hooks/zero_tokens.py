"""SD3 without T5 (`text_encoder_3=None`) pads every prompt with `max_sequence_length` identical
zero text tokens (256 by default). Identical keys act on a softmax like one key whose logit is
raised by log n, and identical text tokens stay identical through the blocks, so the call can
run with one zero token and that bias on its key: the same output up to rounding, at a fraction
of the attention cost. `collapse_zero_tokens(pipe)` installs this on the pipeline's transformer.

It acts only while the transformer's attention uses the stock processors (dit-attn's own
processors see the full call), through a `TorchFunctionMode` that adds the bias to the SDPA
call of each joint attention module (entered only around those modules: a mode over the whole
call would route every torch operation of the call through Python). It uses torch's module
hooks, which take the module at call time, so a `copy.deepcopy` of the transformer runs its
own weights (diffusers' `HookRegistry` chains keep pointing at the original module).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..families import family_of


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


class ZeroTokenCollapse:
    """The hooks of one transformer: `call` (forward pre-hook on the transformer) shortens the text and
    arms the bias, `done` disarms it; `enter`/`leave` wrap each attention module in the bias."""

    def __init__(self, leading_tokens: int):
        self.leading_tokens = leading_tokens  # CLIP tokens before the zero (T5) tokens
        self.bias: _LastKeyBias | None = None  # set while a collapsed call runs
        self.handles: list = []

    def call(self, module, args, kwargs):
        text, hidden = kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")
        n = 0 if text is None else text.shape[1] - self.leading_tokens
        family = family_of(module)
        if n <= 1 or hidden is None or hidden.ndim != 4 or not self._stock(module, family) \
                or bool(text[:, self.leading_tokens:].any()):
            return None
        rows, cols = family.grid(module, kwargs)[0]
        self.bias = _LastKeyBias(rows * cols + self.leading_tokens + 1, math.log(n))
        return args, {**kwargs, "encoder_hidden_states": text[:, : self.leading_tokens + 1]}

    def done(self, module, args, kwargs, output):
        self.bias = None

    def enter(self, module, args):
        if self.bias is not None:
            self.bias.__enter__()

    def leave(self, module, args, output):
        if self.bias is not None:
            self.bias.__exit__(None, None, None)

    @staticmethod
    def _stock(module, family) -> bool:
        return all(type(p).__name__ in family.stock_processors and getattr(p, "_attention_backend", None) is None
                   for p in family.attention_processors(module).values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def collapse_zero_tokens(pipe) -> ZeroTokenCollapse:
    """Install the collapse on an SD3 pipeline that has no T5 encoder (its text states are the CLIP
    tokens, `pipe.tokenizer_max_length` of them, then zeros); returns it (`.remove()` undoes it)."""
    if getattr(pipe, "text_encoder_3", None) is not None:
        raise ValueError("the pipeline has a T5 encoder: its text tokens are not zeros")
    transformer = pipe.transformer
    existing = getattr(transformer, "_dit_attn_zero_tokens", None)
    if existing is not None and existing.handles:
        return existing
    collapse = ZeroTokenCollapse(pipe.tokenizer_max_length)
    collapse.handles.append(transformer.register_forward_pre_hook(collapse.call, with_kwargs=True))
    collapse.handles.append(transformer.register_forward_hook(collapse.done, with_kwargs=True, always_call=True))
    for info in family_of(transformer).layers(transformer):
        attention = transformer.get_submodule(info.name)
        collapse.handles.append(attention.register_forward_pre_hook(collapse.enter))
        collapse.handles.append(attention.register_forward_hook(collapse.leave, always_call=True))
    transformer._dit_attn_zero_tokens = collapse
    return collapse
