"""Install one dit-attn processor per attention module, and put the originals back."""
from __future__ import annotations

import torch

from ..heads import model_family
from .flux import FluxAttnProcessor
from .sd3 import SD3AttnProcessor
from .state import EditState, LayerEdit, RowPlan


def _processor_for(key: str, family: str, n_double: int, state: EditState):
    # keys look like "transformer_blocks.3.attn.processor"
    parts = key.split(".")
    block_list, index, module = parts[0], int(parts[1]), parts[2]
    if family == "sd3":
        return SD3AttnProcessor(index, state, joint=(module == "attn"))
    layer = index if block_list == "transformer_blocks" else n_double + index
    return FluxAttnProcessor(layer, state)


STOCK_PROCESSORS = ("JointAttnProcessor2_0", "FluxAttnProcessor")


def install(transformer: torch.nn.Module, state: EditState) -> dict:
    """Give every attention module its own processor; returns the original processors by key.

    Only stock processors are replaced: an adapter's processor (e.g. IP-Adapter) would be
    silently dropped otherwise.
    """
    family = model_family(transformer)
    originals = dict(transformer.attn_processors)
    for key, processor in originals.items():
        if type(processor).__name__ not in STOCK_PROCESSORS:
            raise TypeError(
                f"{key.removesuffix('.processor')} has a {type(processor).__name__}; dit-attn edits models whose "
                f"attention uses the stock processors ({', '.join(STOCK_PROCESSORS)}): unload adapters first"
            )
    n_double = len(transformer.transformer_blocks)
    new = {key: _processor_for(key, family, n_double, state) for key in originals}
    for key, processor in new.items():  # keep diffusers' attention backend / context-parallel settings
        for name in ("_attention_backend", "_parallel_config"):
            if hasattr(processor, name):
                setattr(processor, name, getattr(originals[key], name, None))
    transformer.set_attn_processor(new)  # set_attn_processor empties the dict it is given
    return originals


def restore(transformer: torch.nn.Module, originals: dict) -> None:
    """Put back the original processor objects (shared objects stay shared)."""
    transformer.set_attn_processor(dict(originals))


__all__ = ["EditState", "FluxAttnProcessor", "LayerEdit", "RowPlan", "SD3AttnProcessor", "install", "restore"]
