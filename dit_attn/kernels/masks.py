"""The pipelines' own attention masks, as the backends read them.

A mask is what diffusers hands to SDPA: a bool keep-mask (False: the key gets no weight) or
a float mask added to the logits (Chroma's blocks pass a float 0/1 mask, so "masked" keys
there get +0 and the others +1), broadcastable to (B, H, S, S). Perturbations replace the
q·k logits and keep the mask: the uniform target is softmax(mask) over the keys (the mean
over unmasked keys for a bool mask), the identity target is V, and the image-scope targets
add the mask to their edited logits (the uniform image block is the mean logit over the
image keys the query may see).
"""
from __future__ import annotations

import torch


def as_four_d(mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, S_k), (B, S_q, S_k) or 4-D → 4-D (B|1, H|1, S_q|1, S_k); shape errors name what is valid."""
    if mask.ndim == 2:
        mask = mask[:, None, None, :]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[-1] != seq_len or mask.shape[-2] not in (1, seq_len):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, {seq_len}, {seq_len})")
    return mask


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as a float bias: bool → 0 / -inf, float → itself (in `dtype`)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def rows(mask: torch.Tensor | None, run) -> torch.Tensor | None:
    """The mask of batch rows `run` (a slice), or the mask itself when it broadcasts over rows."""
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[run]


def queries(mask: torch.Tensor | None, segment: slice) -> torch.Tensor | None:
    """The mask of query positions `segment`, or the mask itself when it broadcasts over queries."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., segment, :]


def image_query_bias(bias: torch.Tensor, image: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """For the image queries: (bias over all keys, the constant bias over the image keys), each
    (B|1, H|1, N|1, ·). Raises when the bias varies over the image keys of an image query
    (pipelines mask text padding only; local windows and pooled keys need the image keys alike)."""
    per_query = queries(bias, image)
    image_part = per_query[..., image]
    constant = image_part[..., :1]
    if torch.compiler.is_compiling():  # the checks read values (graph breaks); eager runs of the same call check
        return per_query, constant
    if not torch.equal(image_part, constant.expand_as(image_part)):
        raise ValueError("LocalAttention supports attention masks that treat all image keys of an image query alike "
                         "(masks of text padding); this mask varies over the image keys")
    if bool(torch.isinf(constant).any()):
        raise ValueError("the attention mask hides every image key from some image query")
    return per_query, constant


def text_key_bias(bias: torch.Tensor, image: slice, text: list[slice]) -> torch.Tensor:
    """The bias of the text keys relative to the image keys, shared by every image query:
    (B|1, H|1, 1, S_txt). Raises when image queries differ in what they see (tiled needs one row)."""
    per_query, constant = image_query_bias(bias, image)
    first = per_query[..., :1, :]
    if not torch.compiler.is_compiling() and not torch.equal(per_query, first.expand_as(per_query)):
        raise ValueError("the tiled kernel supports attention masks shared by all image queries (key masks)")
    text_part = torch.cat([first[..., s] for s in text], dim=-1) if text else first[..., :0]
    return text_part - constant[..., :1, :]
