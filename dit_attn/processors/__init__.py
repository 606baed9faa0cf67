"""Install one dit-attn processor per attention module, and put the originals back."""
from __future__ import annotations

import torch

from ..families import family_of
from .flux import FluxAttnProcessor
from .ip_adapter import is_image_prompt, replacing
from .sd3 import SD3AttnProcessor
from .state import EditState, LayerEdit, LayerProcessor, RowPlan


def install(transformer: torch.nn.Module, state: EditState) -> dict:
    """Give every attention module its own processor; returns the original processors by key.

    Only the family's stock processors are replaced, and its IP-Adapter processors (by one carrying
    their image-prompt branch): another adapter's processor would be silently dropped otherwise.
    """
    family = family_of(transformer)
    originals = family.attention_processors(transformer)
    for key, processor in originals.items():
        released = isinstance(processor, LayerProcessor) and processor.state.released  # stock attention, see restore
        stock = type(processor).__name__ in family.stock_processors or is_image_prompt(processor, family)
        if not stock and not released:
            if "Fused" in type(processor).__name__:
                raise TypeError(f"{key.removesuffix('.processor')} has fused QKV projections ({type(processor).__name__}): "
                                "call unfuse_qkv_projections() before applying dit-attn edits")
            raise TypeError(
                f"{key.removesuffix('.processor')} has a {type(processor).__name__}; dit-attn edits models whose "
                f"attention uses the stock processors ({', '.join(family.stock_processors)}): unload adapters first"
            )
    family.set_processors(transformer, {key: replacing(family, transformer, key, processor, state)
                                        for key, processor in originals.items()})
    return originals


def restore(transformer: torch.nn.Module, originals: dict, state: EditState | None = None) -> None:
    """Put back the original processor objects (shared objects stay shared) where dit-attn's are still
    installed; a processor something else put in after apply (fused QKV) stays. The state's edits are
    cleared, so a dit-attn processor that diffusers kept a reference to (and may put back, as
    `unfuse_qkv_projections` does) computes the stock attention."""
    family = family_of(transformer)
    if state is None:  # put every original back
        family.set_processors(transformer, originals)
        return
    current = family.attention_processors(transformer)
    family.set_processors(transformer, {key: originals[key] if getattr(processor, "state", None) is state else processor
                                        for key, processor in current.items()})
    state.clear()


__all__ = ["EditState", "FluxAttnProcessor", "LayerEdit", "RowPlan", "SD3AttnProcessor", "install", "restore"]
