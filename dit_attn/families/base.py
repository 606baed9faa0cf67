"""What dit-attn must know about a DiT family, in one object (see docs/architecture.md).

A spec answers, for one family: its layers and their attention modules, the processor
that replaces each, where text sits in the joint sequence, how a call's text length and
image grid are read, which call inputs carry one entry per row (and so are widened for
extra rows), which modules get per-row inputs after the blocks start, which rows of which
call are the conditional ones in its pipelines, how a prompt is encoded, and how a
flow-matching training call is made. Nothing outside `families/` tests class names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..heads import LayerInfo


@dataclass(frozen=True)
class CallRows:
    """How a family's transformer call carries its batch.

    call_args: inputs of the transformer call with one entry per row (dim 0); extra rows are
        appended to these.
    block_stream_args: block inputs that flow from block to block (re-selected where the rows change).
    block_call_args: block inputs the model computes once per call from per-row inputs (e.g. temb):
        mapped to each stage's rows at every block.
    controlnet_args: call inputs of ControlNet residuals (per row, added to the image stream by the model: refused
        by edits that widen the call's rows).
    block_kwargs_args: per-row entries the model computes once per call into a block's keyword dict,
        as "dict.entry" (IP-Adapter's image states in `joint_attention_kwargs`; a list holds one
        tensor per adapter): mapped to each stage's rows like block_call_args.
    """

    call_args: tuple[str, ...]
    block_stream_args: tuple[str, ...]
    block_call_args: tuple[str, ...]
    controlnet_args: tuple[str, ...] = ()
    block_kwargs_args: tuple[str, ...] = ()


def appended_text(call: dict, embeds: "torch.Tensor") -> "torch.Tensor":
    """The call's text states with the rows of `embeds` (source prompts, encoded at the call's length) appended."""
    import torch

    text = call["encoder_hidden_states"]
    if embeds.shape[1:] != text.shape[1:]:
        raise RuntimeError(f"TextPatch: the source prompt encodes to {tuple(embeds.shape[1:])} text states, "
                           f"the call has {tuple(text.shape[1:])}")
    return torch.cat([text, embeds.to(text)])


class Family:
    """Base of the family specs; each subclass is one DiT family."""

    name: str = ""  # preset namespace and the name in messages, e.g. "sd3"
    transformer_classes: tuple[str, ...] = ()
    stock_processors: tuple[str, ...] = ()  # processor classes dit-attn replaces (others are refused)
    # diffusers' IP-Adapter processors of the family: dit-attn's processor there carries their image-prompt branch
    ip_adapter_processors: tuple[str, ...] = ()
    guided_pipelines: tuple[str, ...] = ()  # pipelines whose calls the family knows (HeadGuidance, TextPatch)
    # pipelines whose transformer calls also carry ControlNet residuals: NAG on its token path runs there (the rows
    # stay the call's), edits that add rows do not
    controlnet_pipelines: tuple[str, ...] = ()
    rows: CallRows = CallRows((), (), ())
    text_first: bool = False  # joint sequence order: [text ; image] (True) or [image ; text]
    # the model reshapes with its *input* batch after the blocks (Wan, HunyuanVideo): extra rows are
    # appended to the call's inputs instead of forked at a block (no prefix sharing; source rows run to the end)
    widen_at_call: bool = False
    rotary: bool = False  # positions are rotary embeddings from a `pos_embed` with a `theta` base
    packs_latents: bool = False  # the transformer takes 2×2-packed latent tokens (B, S, 4C), not (B, C, H, W)
    # its edit pipelines append reference-image tokens after the generated ones and hand the scheduler
    # the leading tokens of the prediction: HeadGuidance's term is taken on those
    reference_tokens_trail: bool = False
    nag: bool = False  # its processors apply NAG (EditState.nag_image_inputs / nag_guide)
    # NAG's negative prompt given as embeddings (`NAG.negative_prompt_embeds`): the tensor its calls take with them,
    # "pooled" (negative_pooled_prompt_embeds, required), "mask" (negative_prompt_embeds_mask) or "" (none);
    # None: not taken on this family
    negative_embeds_extra: str | None = None
    negative_mask_required: bool = False
    # NAG's defaults where the official code sets them per model (`NAG.resolved`): alpha, and end per pipeline class
    nag_alpha: float = 0.25
    nag_end_of_pipeline: dict[str, float] = {}
    text_edits_unsupported: str = ""  # why TextPatch/TextGuard/localize cannot run on this family ("" : they can)
    makes_videos: bool = False  # its pipelines return `.frames` (videos), not `.images`
    # its processors feed `capture.video.VideoCaptureRecorder` (cross maps from the cross-attention, self from attn1)
    video_capture: bool = False

    # --- layers and processors -------------------------------------------------------------
    def layers(self, transformer) -> list["LayerInfo"]:
        raise NotImplementedError

    def processor_for(self, key: str, layer: int, state):
        """The dit-attn processor for processor key `key` (an entry of `attention_processors`) of `layer`."""
        raise NotImplementedError

    def attention_processors(self, transformer) -> dict:
        """The processors dit-attn replaces, by key ('<attention module>.processor'): diffusers' `attn_processors`
        (a module's attribute lookups on its class: a missing one costs an exception on the module)."""
        return {f"{name}.processor": module.get_processor() for name, module in transformer.named_modules()
                if hasattr(type(module), "get_processor")}

    def set_processors(self, transformer, processors: dict) -> None:
        """Give the attention modules of these keys these processors (`set_attn_processor`'s per-module call; it
        wants a processor for every attention module of the model)."""
        for key, processor in processors.items():
            transformer.get_submodule(key.removesuffix(".processor")).set_processor(processor)

    def layer_of_key(self, key: str, transformer) -> int:
        """The layer index of a processor key such as 'transformer_blocks.3.attn.processor'."""
        raise NotImplementedError

    def fork_points(self, transformer) -> list[tuple["torch.nn.Module", int]]:
        """Modules that receive per-row inputs after the blocks start, with their layer (the module
        after the last block counts as the layer after it)."""
        raise NotImplementedError

    # --- one transformer call ----------------------------------------------------------------
    def batch_size(self, call: dict) -> int:
        """Rows of a transformer call."""
        return call["hidden_states"].shape[0]

    def text_length(self, call: dict) -> int:
        text = call.get("encoder_hidden_states")
        return text.shape[1] if text is not None else 0

    def image_length(self, call: dict) -> int | None:
        """Image tokens of the call, for processors that cannot tell them from their inputs (None: not needed)."""
        return None

    def grid(self, transformer, call: dict) -> tuple[tuple[int, int] | None, str]:
        """(rows, cols) of the call's image-token grid, or (None, why not)."""
        raise NotImplementedError

    # --- its pipelines -------------------------------------------------------------------------
    def supports_pipeline(self, pipe, controlnet: bool = False) -> bool:
        """The family knows the pipeline's calls (controlnet: also a ControlNet pipeline's)."""
        name = type(pipe).__name__
        return name in self.guided_pipelines or (controlnet and name in self.controlnet_pipelines)

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None) -> "range | None":
        """Indices of the conditional rows of this call (Python ints: a compiled call reads no tensor value for
        them), or None when the call is not one to edit."""
        raise NotImplementedError

    def prediction(self, sample: "torch.Tensor") -> "torch.Tensor":
        """The pipeline's prediction from the transformer's output rows, when its pipelines transform it
        linearly before the scheduler step (e.g. negate it); HeadGuidance's term is taken in that space."""
        return sample

    def encode_prompts(self, pipe, prompts: list[str], max_sequence_length: int | None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(text states (N, S, D), pooled embeddings (N, P) or what else the call takes per prompt) from the
        pipeline's own `encode_prompt`."""
        raise NotImplementedError

    def encoder_inputs(self, pipe) -> tuple[str, ...]:
        """Keyword inputs of the pipeline's own `encode_prompt` call that `encode_prompts` takes too, e.g. the
        reference image an edit pipeline encodes each prompt with (recorded from that call)."""
        return ()

    def source_text_padded(self, extra: "torch.Tensor") -> bool:
        """Whether source rows' `extra` (from `encode_prompts`) marks padded text tokens (read where the prompts
        are encoded; `append_text_rows` gets the answer)."""
        return True

    def append_text_rows(self, call: dict, embeds: "torch.Tensor", extra: "torch.Tensor", padded: bool = True) -> dict:
        """The text inputs of `call` with rows appended: (embeds, extra) from `encode_prompts` (TextPatch's
        source prompts), as {call input: widened value}; `padded`: `source_text_padded(extra)`."""
        import torch

        out = {"encoder_hidden_states": appended_text(call, embeds)}
        pooled = call.get("pooled_projections")
        if pooled is not None:
            out["pooled_projections"] = torch.cat([pooled, extra.to(pooled)])
        return out

    def check_given_negative(self, nag) -> None:
        """At `apply`: this family takes NAG's given negative embeddings with the extra tensors given."""
        kind = self.negative_embeds_extra
        if kind is None:
            from . import SUPPORTED_MODELS, family_named

            takes = [family_named(m).name for m in SUPPORTED_MODELS if family_named(m).negative_embeds_extra is not None]
            raise NotImplementedError(f"NAG takes negative_prompt_embeds on {', '.join(takes)} models, not on "
                                      f"{self.name}: give negative_prompt")
        pooled, mask = nag.negative_pooled_prompt_embeds, nag.negative_prompt_embeds_mask
        masked = kind in ("mask", "glyphs")
        if kind == "pooled" and pooled is None:
            raise ValueError(f"NAG on {self.name} needs negative_pooled_prompt_embeds with negative_prompt_embeds")
        if kind != "pooled" and pooled is not None:
            raise ValueError(f"{self.name} models take no negative_pooled_prompt_embeds")
        if masked and self.negative_mask_required and mask is None:
            raise ValueError(f"NAG on {self.name} needs negative_prompt_embeds_mask with negative_prompt_embeds")
        if not masked and mask is not None:
            raise ValueError(f"{self.name} models take no negative_prompt_embeds_mask")
        if kind == "glyphs" and nag.negative_prompt_embeds_2 is None:
            raise ValueError(f"NAG on {self.name} needs the ByT5 glyph states with negative_prompt_embeds: "
                             "negative_prompt_embeds_2 and negative_prompt_embeds_mask_2 (from its encode_prompt)")
        if kind != "glyphs" and nag.negative_prompt_embeds_2 is not None:
            raise ValueError(f"{self.name} models take no negative_prompt_embeds_2 (HunyuanImage's ByT5 glyph states)")

    def given_negative(self, nag, text_len: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(text states, extra) of NAG's negative prompt given as embeddings (checked by `check_given_negative`), as
        `encode_prompts` gives a prompt encoded at the call's `text_len` text tokens: here of that length."""
        embeds = self.at_call_length(nag.negative_prompt_embeds, text_len)
        if self.negative_embeds_extra == "pooled":
            return embeds, nag.negative_pooled_prompt_embeds
        if self.negative_embeds_extra == "mask":
            mask = nag.negative_prompt_embeds_mask
            return embeds, mask if mask is not None else self.all_tokens(embeds)
        return embeds, embeds.new_zeros(embeds.shape[0], 0)  # as `encode_prompts` where the calls take no extra

    @staticmethod
    def at_call_length(embeds: "torch.Tensor", text_len: int) -> "torch.Tensor":
        """Given negative text states, refused in one line unless they have the call's `text_len` tokens."""
        if embeds.shape[1] != text_len:
            raise ValueError(f"NAG's negative_prompt_embeds have {embeds.shape[1]} text tokens, this call's prompt "
                             f"{text_len}: encode the negative prompt as the call's (the same max_sequence_length)")
        return embeds

    @staticmethod
    def all_tokens(embeds: "torch.Tensor") -> "torch.Tensor":
        """A text mask keeping every token of (N, S, D) text states."""
        import torch

        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def nag_text_states(self, transformer, embeds: "torch.Tensor") -> "torch.Tensor | None":
        """For a family whose text enters only through cross-attention: the negative prompt's text states
        (from `encode_prompts`) as its blocks see them, so NAG needs no negative rows; None: NAG's negative
        text rides as extra rows of the call."""
        return None

    def nag_tokens_fit(self, call: dict) -> bool:
        """Where the family's blocks carry NAG's negative text as tokens (`hooks.nag_tokens`): whether this call
        can (else its negative text rides as rows)."""
        return True

    def sequence_length_of_call(self, pipe, text_length: int) -> int:
        """The `max_sequence_length` that encodes a prompt to `text_length` text tokens of a call."""
        return text_length

    # --- image latents (in-context sets and the trainers) ----------------------------------------
    # Latents are exchanged on the VAE's (B, C, h, w) latent grid, scaled or normalised as the transformer
    # sees them; `call_latents` / `step_latents` / `grid_of_output` convert to and from the pipelines' layouts.
    def supports_image_latents(self) -> bool:
        return type(self).encode_image_latents is not Family.encode_image_latents

    def image_latents_refusal(self) -> str:
        return (f"in-context sets and the trainers encode images to the transformer's latents; {self.name} "
                "pipelines use another latent format (not supported yet): use an SD3/SD3.5, FLUX.1-layout "
                "(FLUX.1, Chroma, LongCat-Image, ...), FLUX.2 or Qwen-Image pipeline")

    def encode_image_latents(self, pipe, pixels: "torch.Tensor") -> "torch.Tensor":
        """Latents (B, C, h, w) of images (B, 3, H, W) in [-1, 1] as the transformer sees them (deterministic:
        the posterior's mode)."""
        raise TypeError(self.image_latents_refusal())

    def decode_image_latents(self, pipe, latents: "torch.Tensor") -> "torch.Tensor":
        """Images (B, 3, H, W) in [-1, 1] from latents of :meth:`encode_image_latents`."""
        raise TypeError(self.image_latents_refusal())

    def latent_channels(self, pipe) -> int:
        return int(pipe.vae.config.latent_channels)

    def call_latents(self, latents: "torch.Tensor") -> "torch.Tensor":
        """Grid latents (B, C, h, w) as the pipeline call's `latents=` takes them."""
        from .image_latents import pack

        return pack(latents) if self.packs_latents else latents

    def step_latents(self, call_latents: "torch.Tensor") -> "torch.Tensor":
        """A call's `latents=` as its denoising loop holds them (the transformer's input, `callback_on_step_end`)."""
        return call_latents

    def grid_of_output(self, pipe, latents: "torch.Tensor", latent_hw: tuple[int, int]) -> "torch.Tensor":
        """Grid latents (B, C, h, w) from what a call with output_type="latent" returns."""
        from .image_latents import unpack

        return unpack(latents, *latent_hw) if self.packs_latents else latents

    # --- training --------------------------------------------------------------------------------
    def max_token_side(self, transformer) -> int | None:
        """The most latent tokens along an image side the model can address (None: no limit)."""
        return None

    def latent_patch(self, transformer) -> int:
        """Latent pixels per token side."""
        return int(transformer.config.patch_size)

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw: tuple[int, int], guidance: float = 1.0):
        """The velocity prediction for noisy latents at flow time t ∈ (0, 1) (B,)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<dit-attn family {self.name}>"
