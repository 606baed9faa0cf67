"""IP-Adapters beside dit-attn's processors, in both orders.

diffusers' IP-Adapter processors are stock attention plus an image-prompt branch. dit-attn's
processor for such a layer carries that branch (`FluxIPAdapterProcessor`, `SD3IPAdapterProcessor`):
it takes over the IP processor's modules and scale, so the checkpoint keys, `set_ip_adapter_scale`
and `unload_ip_adapter` see an IP-Adapter processor.

- load, then apply: `install` gives an IP layer the carrying processor.
- apply, then load (or unload): diffusers swaps the processors (`set_attn_processor`); the next
  transformer call finds them (`adopt`) and puts dit-attn's back, carrying the new branch or none.
  Any other replacement (fused QKV, a foreign processor) is still an error at that call.
"""
from __future__ import annotations

import torch

from .state import LayerProcessor

_TAKEN_ATTRIBUTES = ("scale", "hidden_size", "cross_attention_dim")


def take_over_image_prompt(processor: torch.nn.Module, image_prompt: torch.nn.Module | None) -> None:
    """Give `processor` the modules and settings of a stock IP-Adapter processor (shared, not copied)."""
    if image_prompt is None:
        return
    for name, child in image_prompt.named_children():
        processor.add_module(name, child)
    for name in _TAKEN_ATTRIBUTES:
        if hasattr(image_prompt, name):
            setattr(processor, name, getattr(image_prompt, name))


def carrying(processor: LayerProcessor, image_prompt) -> LayerProcessor:
    """dit-attn's processor for a layer whose stock processor is the IP-Adapter processor `image_prompt`."""
    from .flux import FluxAttnProcessor, FluxIPAdapterProcessor
    from .sd3 import SD3AttnProcessor, SD3IPAdapterProcessor

    if type(processor) is SD3AttnProcessor:
        return SD3IPAdapterProcessor(processor.layer_index, processor.state, processor.joint, image_prompt)
    if type(processor) is FluxAttnProcessor:
        return FluxIPAdapterProcessor(processor.layer_index, processor.state, image_prompt)
    raise TypeError(f"{type(processor).__name__} does not carry IP-Adapter branches")


def replacing(family, transformer, key: str, original, state) -> LayerProcessor:
    """dit-attn's processor for processor key `key` in place of `original` (a stock or IP-Adapter one),
    with diffusers' attention backend and context-parallel settings kept."""
    processor = family.processor_for(key, family.layer_of_key(key, transformer), state)
    if is_image_prompt(original, family):
        processor = carrying(processor, original)
    for name in ("_attention_backend", "_parallel_config"):
        if hasattr(processor, name):
            setattr(processor, name, getattr(original, name, None))
    return processor


def is_image_prompt(processor, family) -> bool:
    """A stock IP-Adapter processor of this family (not one of dit-attn's)."""
    return type(processor).__name__ in family.ip_adapter_processors


def _blank(processor) -> bool:
    """One of dit-attn's processors that diffusers rebuilt as `type(p)()`: it computes stock attention."""
    return isinstance(processor, LayerProcessor) and processor.state.released


def adopt(transformer, family, state, originals: dict) -> bool:
    """After an IP-Adapter load or unload on an applied model: dit-attn's processors put back (carrying
    the new image-prompt branches or none) and `originals` updated to what `remove()` must restore.
    Returns False, changing nothing, when the processors were replaced by anything else."""
    current = family.attention_processors(transformer)
    replaced = {key: p for key, p in current.items() if getattr(p, "state", None) is not state}
    loaded = any(is_image_prompt(p, family) for p in replaced.values())
    unloaded = any(type(p).__name__ in family.stock_processors and is_image_prompt(originals.get(key), family)
                   for key, p in replaced.items())
    known = all(is_image_prompt(p, family) or _blank(p) or type(p).__name__ in family.stock_processors
                for p in replaced.values())
    if not replaced or not (loaded or unloaded) or not known:
        return False
    new = dict(current)
    for key, p in replaced.items():
        new[key] = replacing(family, transformer, key, p, state)
        if not _blank(p):
            originals[key] = p
    family.set_processors(transformer, new)
    return True
