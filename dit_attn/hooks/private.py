"""The diffusers internals dit-attn cannot reach through a public mechanism, in one place.

- the name of the active cache context ("cond"/"uncond"), which diffusers hands only to
  stateful hooks through a `StateManager` (read from its `_context`);
- FLUX's q/k/v projection helper, so the FLUX processor projects exactly like the stock one;
- the Z-Image pipelines' `cfg_truncation` setting of the running call (`_cfg_truncation`), which
  decides per step whether the call carries negative rows;
- Z-Image's caption preparation (`_pad_with_ids`, `_prepare_sequence`, its context refiner and rotary embedder),
  so NAG's negative caption segment is built exactly as the model builds a caption's.

All were checked on the diffusers versions in `SUPPORTED_DIFFUSERS`.
"""
from __future__ import annotations

SUPPORTED_DIFFUSERS = (">=0.42", "<0.43")


def check_diffusers_version() -> None:
    import diffusers
    from packaging.version import Version

    version = Version(diffusers.__version__)
    if not Version("0.42") <= version < Version("0.43"):
        raise RuntimeError(f"dit-attn is tested with diffusers {','.join(SUPPORTED_DIFFUSERS)}; this is diffusers "
                           f"{diffusers.__version__}: pip install 'diffusers>=0.42,<0.43'")


def cache_context_name(state_manager) -> str | None:
    """The active `cache_context(...)` name seen by a stateful hook's StateManager, or None."""
    context = getattr(state_manager, "_context", None)
    return context.name if context is not None else None


def flux_qkv_projections(attn, hidden_states, encoder_hidden_states):
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


def z_image_cfg_truncation(pipe) -> float | None:
    """The `cfg_truncation` a Z-Image pipeline's running call was given (None outside a call)."""
    return getattr(pipe, "_cfg_truncation", None)


def z_image_caption_segment(transformer, caption):
    """Z-Image's caption segment of one caption (L, D) as its forward builds it before the main blocks: padded with
    the model's pad token to a multiple of 32, embedded, refined by the context refiner. ((1, L', dim) states, their
    (1, L', rotary) table: positions 1…L' on the first axis)."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    device = caption.device
    padded_len = len(caption) + (-len(caption)) % SEQ_MULTI_OF
    feats, positions, pad_mask, _, _ = transformer._pad_with_ids(caption, (padded_len, 1, 1), (1, 0, 0), device)
    feats, rotary, mask, _, _ = transformer._prepare_sequence(
        [transformer.cap_embedder(feats)], [positions], [pad_mask], transformer.cap_pad_token, None, device)
    for layer in transformer.context_refiner:
        feats = layer(feats, mask, rotary)
    return feats, rotary


def z_image_first_axis_rotation(transformer, offsets: list[int]):
    """(len(offsets), rotary) Z-Image rotary factors that move a token by each offset along the first position axis
    (the caption's): multiplying a table by them shifts its positions."""
    import torch

    ids = torch.tensor([[abs(d), 0, 0] for d in offsets], dtype=torch.int32, device=transformer.device)
    rotation = transformer.rope_embedder(ids)
    backward = torch.tensor([d < 0 for d in offsets], device=rotation.device)[:, None]
    return torch.where(backward, rotation.conj(), rotation)
