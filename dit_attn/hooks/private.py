"""The diffusers internals dit-attn cannot reach through a public mechanism, in one place.

- the name of the active cache context ("cond"/"uncond"), which diffusers hands only to
  stateful hooks through a `StateManager` (read from its `_context`);
- FLUX's q/k/v projection helper, so the FLUX processor projects exactly like the stock one;
- the Z-Image pipelines' `cfg_truncation` setting of the running call (`_cfg_truncation`), which
  decides per step whether the call carries negative rows.

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
