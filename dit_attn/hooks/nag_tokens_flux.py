"""NAG's negative text as extra text tokens of each row on the FLUX layout (FLUX.1, Chroma, Bria,
LongCat-Image, Ovis-Image, FLUX.2); its attention (`nag_token_attend`) also serves Qwen-Image's processor, its
image-first form (`image_first_nag_token_attend`) Z-Image's, HunyuanImage's and HunyuanVideo 1.5's, and its
shared-image-keys merge SD3's.

The token path of `hooks.nag_tokens`, for double blocks ([text ; image] with separate text and image
projections) and single blocks (one stream): the call's text becomes [positive ; negative] (the negative
text gets the text ids the pipeline gives every prompt of that length, so its own rotary positions; on
Chroma its own text mask). At a NAG layer the image queries attend [positive text ; image] (Z⁺) and
[negative text ; image] (Z⁻), the positive text queries [positive text ; image] (their stock update), the
negative text queries [negative text ; image]: what the negative rows of the row path compute, where each
negative row takes its positive row's image q/k/v at every NAG layer (SD3's choice, followed here).
Where the layer's attention is the default SDPA, unmasked or with a mask on text keys only, on the CPU or on CUDA
where `kernels.lse` found an op that returns the log-sum-exp, and the image has enough tokens, the image queries'
attention over the image keys, shared by Z⁺ and Z⁻, runs once (`shared_image_keys_attention`); elsewhere two
attention calls.

FLUX.1 modulates the negative text with the time-text embedding of the negative pooled projection
(`NAGTokenFluxBlock` runs the block step by step); the modulation of Chroma, Bria, LongCat-Image and
Ovis-Image does not depend on the prompt (no pooled projection), so their stock blocks run. From block
`end` on the negative tokens leave the text stream (Chroma's single blocks carry one [text ; image] stream
whose text length the model reads from the last double block: there the negative tokens stay in the stream,
untouched, and each block runs without them).
"""
from __future__ import annotations

import inspect

import torch
from diffusers.hooks import ModelHook
from diffusers.models.embeddings import apply_rotary_emb

from ..kernels import lse
from ..processors.state import POOL_MODULE, EditState, nag_guided_rows
from .private import flux_qkv_projections


def flux_token_call(module, call: dict, patch, batch: int) -> tuple[dict, torch.Tensor | None]:
    """(the call with [positive ; negative] text, the negative text's time-text embedding (call rows, D) or
    None where the modulation does not depend on the prompt (Chroma))."""
    text = call["encoder_hidden_states"]
    n = text.shape[1]
    negative = patch.per_call_row(patch.embeds.to(text), batch)
    out = {**call, "encoder_hidden_states": torch.cat([text, negative], dim=1)}
    ids = call["txt_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    out["txt_ids"] = torch.cat([ids, ids])  # the pipelines' text ids depend on the text length only
    mask = call.get("attention_mask")
    if mask is not None:  # Chroma: the negative prompt's own text mask
        out["attention_mask"] = torch.cat([mask[:, :n], patch.per_call_row(patch.pooled.to(mask), batch), mask[:, n:]], 1)
    pooled = call.get("pooled_projections")
    if pooled is None:
        return out, None
    dtype = module.x_embedder.weight.dtype  # as the model casts timestep and guidance
    timestep = call["timestep"].to(dtype) * 1000
    guidance = call.get("guidance")
    negative_pooled = patch.per_call_row(patch.pooled.to(pooled), batch)
    if guidance is None:
        return out, module.time_text_embed(timestep, negative_pooled)
    return out, module.time_text_embed(timestep, guidance.to(dtype) * 1000, negative_pooled)


def without_negative(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """[positive text ; negative text ; image] along `dim` (n tokens each text) → [positive text ; image]."""
    return torch.cat([x.narrow(dim, 0, n), x.narrow(dim, 2 * n, x.shape[dim] - 2 * n)], dim=dim)


def _split_mask(mask: torch.Tensor | None, n: int):
    """(mask over [positive text ; image], mask over [negative text ; image]) of a mask over the call's
    sequence: (B, S) keys, or (B, 1, S or 1, S) queries × keys (Chroma's outer product)."""
    if mask is None:
        return None, None
    positive, negative = without_negative(mask, n, -1), mask[..., n:]
    if mask.ndim == 4 and mask.shape[-2] == mask.shape[-1]:
        positive, negative = without_negative(positive, n, -2), negative[..., n:, :]
    return positive, negative


# the image tokens from which the shared-image-keys merge replaces two attention calls (0: always, None: never);
# below, its extra calls and merges cost more than the pass over the image keys they save
# (`python benchmarks/nag_attention.py`: the crossover lies at 100-200 image tokens on one CPU thread)
SHARED_IMAGE_KEYS_FROM: int | None = 160
# the same on CUDA, not measured yet (`benchmarks/gpu/stage_steps.py` times both ways): from 1024² images of FLUX.1's
# layout, where the merge attends ≈ 60% of the two calls' query-key pairs, enough to win against a faster kernel in
# those calls (the merge's log-sum-exp op may be flash attention where SDPA takes cuDNN's)
SHARED_IMAGE_KEYS_FROM_CUDA: int | None = 4096


def shares_image_keys(query: torch.Tensor, capture, image_tokens: int) -> bool:
    """The shared-image-keys merge may replace two default SDPA calls on these (B, H, L, D) queries."""
    start = {"cpu": SHARED_IMAGE_KEYS_FROM, "cuda": SHARED_IMAGE_KEYS_FROM_CUDA}.get(query.device.type)
    return start is not None and image_tokens >= start and capture is None and lse.usable(query)


def layer_shares_image_keys(processor, query: torch.Tensor, image_tokens: int) -> bool:
    """The layer's attention is diffusers' default SDPA with nothing recorded: `shared_image_keys_attention` may
    replace its two calls on these (B, S, H, D) queries."""
    return (processor._attention_backend is None and processor._parallel_config is None
            and shares_image_keys(query.transpose(1, 2), processor.state.capture, image_tokens))


def _text_key_bias(mask: torch.Tensor | None, n: int, dtype) -> tuple[bool, torch.Tensor | None]:
    """(whether `shared_image_keys_attention` applies, its additive bias over the [positive ; negative] text keys
    (B, 1, 1, 2n) or None): without a mask, or with a bool key mask (B, S) / (B, 1, 1, S) that keeps every image key
    and at least one key of each text in every row (Qwen-Image's padded prompts). Not while torch.compile traces:
    the checks read the mask's values."""
    if mask is None:
        return True, None
    key_mask = mask.ndim == 2 or (mask.ndim == 4 and mask.shape[-2] == 1)
    if torch.compiler.is_compiling() or mask.dtype != torch.bool or not key_mask:
        return False, None
    keys = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
    if not bool(keys[..., 2 * n:].all()):
        return False, None
    return _each_text_key_bias(keys[..., :n], keys[..., n : 2 * n], dtype)


def _each_text_key_bias(positive: torch.Tensor, negative: torch.Tensor, dtype):
    """(whether every row keeps a key of each text, the additive biases of the two texts' (B, 1, 1, ·) bool key masks
    concatenated along the keys); the check reads the masks' values: never while torch.compile traces."""
    if torch.compiler.is_compiling() or not (bool(positive.any(-1).all()) and bool(negative.any(-1).all())):
        return False, None
    bias = [torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
            for keep in (positive, negative)]
    return True, torch.cat(bias, dim=-1)


def shared_image_keys_attention(query, key, value, n: int, text_bias: torch.Tensor | None = None):
    """Attention over [positive text ; image] and over [negative text ; image] from the (B, S, H, D) q/k/v of
    [positive text ; negative text ; image] (n text tokens each; text_bias: `_text_key_bias`'s), by
    `attention_sharing_image_keys`. (text outputs (B, 2n, H, D): the positive text's over [positive text ; image],
    the negative's over [negative text ; image]; image outputs (B, S_img, H, D) over [positive text ; image] (Z⁺)
    and over [negative text ; image] (Z⁻))."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    parts = [slice(2 * n, None), slice(0, n), slice(n, 2 * n)]  # image, positive text, negative text
    biases = (None, None) if text_bias is None else (text_bias[..., :n], text_bias[..., n:])
    on_positive, on_negative = attention_sharing_image_keys(
        *(q[:, :, part] for part in parts), *((k[:, :, part], v[:, :, part]) for part in parts), biases)
    image = on_negative.shape[2] - n
    text = torch.cat([on_positive[:, :, :n], on_negative[:, :, image:]], dim=2)
    return text.transpose(1, 2), on_positive[:, :, n:].transpose(1, 2), on_negative[:, :, :image].transpose(1, 2)


def image_first_attention_sharing_image_keys(positive: tuple, negative: tuple, image_tokens: int):
    """The two unmasked attention calls of SD3's token path from their (B, H, S, D) q/k/v, [image ; positive text]
    and [image ; negative text] (the same image part), by `attention_sharing_image_keys`: (output of the first
    call, of the second)."""
    i = image_tokens
    (q, k, v), (q_neg, k_neg, v_neg) = positive, negative
    on_positive, on_negative = attention_sharing_image_keys(
        q[:, :, :i], q[:, :, i:], q_neg[:, :, i:], (k[:, :, :i], v[:, :, :i]), (k[:, :, i:], v[:, :, i:]),
        (k_neg[:, :, i:], v_neg[:, :, i:]))
    text = on_positive.shape[2] - i
    return torch.cat([on_positive[:, :, text:], on_positive[:, :, :text]], dim=2), on_negative


def image_first_nag_token_attend(processor, attn, query, key, value, keys: torch.Tensor | None, image: int,
                                 text_len: int, tokens_rows: torch.Tensor, image_len: int) -> torch.Tensor:
    """NAG on the token path for a sequence [image ; positive text ; negative text] (Z-Image, HunyuanImage, HunyuanVideo
    1.5), from its (B, S, H, D) q/k/v after rotary: the attention output (B, S, H·D), heads merged, the guided rows'
    image outputs Z⁺ (over [image ; positive text]) combined with Z⁻ (over [image ; negative text]), each text's own
    output over [image ; its text]. keys: the (B, S) bool key mask or None, every image key valid; image: the image
    tokens (with any image padding NAG combines), image_len: those the layer's plan treats as image."""
    n = image + text_len
    plan = processor.state.plan(processor.layer, query.shape[0], (0, image_len), getattr(attn, POOL_MODULE, None))
    dtype = query.dtype
    shared, bias = False, None
    if plan is None and layer_shares_image_keys(processor, query, image):
        shared = keys is None
        if keys is not None:
            shared, bias = _each_text_key_bias(keys[:, None, None, image:n], keys[:, None, None, n:], dtype)
    if shared:
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        parts = slice(0, image), slice(image, n), slice(n, None)
        biases = (None, None) if bias is None else (bias[..., :text_len], bias[..., text_len:])
        on_positive, on_negative = attention_sharing_image_keys(
            *(q[:, :, part] for part in parts), *((k[:, :, part], v[:, :, part]) for part in parts), biases)
        out = torch.cat([on_positive[:, :, text_len:], on_positive[:, :, :text_len]], dim=2).transpose(1, 2)
        out_neg = on_negative.transpose(1, 2)
    else:
        mask = keys[:, None, None, :] if keys is not None else None
        positive = [x[:, :n] for x in (query, key, value)]
        negative = [torch.cat([x[:, :image], x[:, n:]], dim=1) for x in (query, key, value)]
        out = processor.attend(*positive, plan, mask[..., :n] if mask is not None else None, image_len)
        negative_mask = torch.cat([mask[..., :image], mask[..., n:]], dim=-1) if mask is not None else None
        out_neg = processor._attention(*negative, plan, negative_mask, image_len)
    out, out_neg = out.flatten(2, 3).to(dtype), out_neg.flatten(2, 3).to(dtype)
    combined = nag_guided_rows(processor.state.nag, out[:, :image], out_neg[:, :image], tokens_rows)
    return torch.cat([combined, out[:, image:], out_neg[:, image:]], dim=1)


def attention_sharing_image_keys(image_query, positive_query, negative_query, image: tuple, positive: tuple,
                                 negative: tuple, biases=(None, None)):
    """The image queries and the positive text's attending [image ; positive text], the image queries and the
    negative text's attending [image ; negative text], from (B, H, ·, D) queries and the (key, value) of the image
    and of each text: every query's attention over the image keys, the bulk of both, computed once and merged with
    its attention over its text by log-sum-exp (biases: additive key masks of the two texts, or None).
    (the outputs of [positive text ; image] (the image's: Z⁺), of [image ; negative text] (the image's: Z⁻)): the
    queries ride as [positive text ; image ; negative text], so that each side is one slice of them."""
    p = positive_query.shape[2]
    queries = torch.cat([positive_query, image_query, negative_query], dim=2)
    out, out_lse = lse.attention_with_lse(queries, *image)
    positive_side = slice(None, p + image_query.shape[2])
    on_positive = lse.merge((out[:, :, positive_side], out_lse[:, :, positive_side]),
                            lse.attention_with_lse(queries[:, :, positive_side], *positive, biases[0]))
    on_negative = lse.merge((out[:, :, p:], out_lse[:, :, p:]),
                            lse.attention_with_lse(queries[:, :, p:], *negative, biases[1]))
    return on_positive, on_negative


def nag_token_attention(processor, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                        tokens: tuple[int, torch.Tensor]):
    """`FluxAttnProcessor.attention` at a NAG layer of a token-path call: (its output, the image queries before
    rotary or None in a single block)."""
    query, key, value = processor.joint_inputs(attn, *flux_qkv_projections(attn, hidden_states, encoder_hidden_states))
    image_query = query[:, 2 * tokens[0]:] if encoder_hidden_states is not None else None
    text, image = nag_token_outputs(processor, attn, query, key, value, attention_mask, image_rotary_emb, tokens)
    if encoder_hidden_states is None:
        return torch.cat([text, image], dim=1), None
    image = attn.to_out[1](attn.to_out[0](image))
    return (image, attn.to_add_out(text)), image_query


def nag_token_outputs(processor, attn, query, key, value, attention_mask, image_rotary_emb,
                      tokens: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A FLUX-layout processor's attention at a NAG layer of a token-path call, from the (B, S, H, D) joint q/k/v
    of [positive text ; negative text ; image] before rotary (n text tokens each): (text outputs (B, 2n, H·D),
    image outputs (B, S_img, H·D)), heads merged, the guided rows' image outputs Z⁺ combined with Z⁻."""
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return nag_token_attend(processor, attn, query, key, value, attention_mask, tokens)


def nag_token_attend(processor, attn, query, key, value, attention_mask,
                     tokens: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`nag_token_outputs` from q/k/v after rotary (any family with [text ; image] order); attention_mask: over the
    call's keys (B, S) or (B, 1, 1 or S, S)."""
    n, rows = tokens
    image_stop = processor.local_image_stop(n, query.shape[1] - n)
    plan = processor.state.plan(processor.layer, query.shape[0], (n, image_stop), getattr(attn, POOL_MODULE, None))
    dtype = query.dtype
    shared, text_bias = False, None
    # before the mask's checks: they sync a GPU
    if plan is None and layer_shares_image_keys(processor, query, query.shape[1] - 2 * n):
        shared, text_bias = _text_key_bias(attention_mask, n, dtype)
    if shared:
        text, z_pos, z_neg = (x.flatten(2, 3).to(dtype)
                              for x in shared_image_keys_attention(query, key, value, n, text_bias))
    else:
        positive = [without_negative(x, n, 1) for x in (query, key, value)]
        negative = [x[:, n:] for x in (query, key, value)]
        mask, negative_mask = _split_mask(attention_mask, n)
        out = processor.attend(*positive, plan, mask, image_stop - n).flatten(2, 3).to(dtype)
        out_neg = processor._attention(*negative, plan, negative_mask, image_stop - n).flatten(2, 3).to(dtype)
        text, z_pos, z_neg = torch.cat([out[:, :n], out_neg[:, :n]], dim=1), out[:, n:], out_neg[:, n:]
    return text, nag_guided_rows(processor.state.nag, z_pos, z_neg, rows)


def _fp16_clip(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def per_token_modulation(positive: torch.Tensor, negative: torch.Tensor, n: int, image: int = 0) -> torch.Tensor:
    """(B, C) modulations → (B, 2n + image, C): positive for the positive text (n tokens) and the image, negative for
    the negative text (n tokens)."""
    parts = [positive[:, None].expand(-1, n, -1), negative[:, None].expand(-1, n, -1)]
    if image:
        parts.append(positive[:, None].expand(-1, image, -1))
    return torch.cat(parts, dim=1)


def modulated_text(block, text: torch.Tensor, n: int, temb: torch.Tensor, temb_neg: torch.Tensor):
    """(the block's modulated text input (B, 2n, C), the text as rows (2B, n, C), the block's four text modulations
    for after attention (2B, 1, C); none for a `context_pre_only` block): each row's positive and negative segments
    (n tokens each: the negative prompt is encoded, or given, at the call's text length) as two rows of one call of
    the block's own norm1_context, modulated by temb and temb_neg."""
    batch, tokens, channels = text.shape
    text = text.reshape(2 * batch, n, channels)
    embeddings = torch.stack([temb, temb_neg], dim=1).flatten(0, 1)
    if getattr(block, "context_pre_only", False):  # SD3's last block (FLUX.1's double blocks have no such flag)
        return block.norm1_context(text, embeddings).view(batch, tokens, channels), text, ()
    norm_text, *modulation = block.norm1_context(text, emb=embeddings)
    return norm_text.view(batch, tokens, channels), text, [m[:, None] for m in modulation]


def text_after_attention(block, text: torch.Tensor, text_attn_output: torch.Tensor, modulation) -> torch.Tensor:
    """The text stream's rest of an SD3 / FLUX.1 double block from `modulated_text`'s text rows and modulations and the
    text's attention output (B, 2n, C): (B, 2n, C)."""
    c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = modulation
    rows = text + c_gate_msa * text_attn_output.reshape(text.shape)
    norm_text = block.norm2_context(rows) * (1 + c_scale_mlp) + c_shift_mlp
    rows = rows + c_gate_mlp * block.ff_context(norm_text)
    return rows.reshape(text_attn_output.shape)


class NAGTokenBlockHook(ModelHook):
    """A block's hook for the token path: stock forward outside token-path calls; in them `token_forward` gets
    the block's inputs by name."""

    active = True

    def __init__(self, state: EditState, layer: int, module: torch.nn.Module):
        super().__init__()
        self.state, self.layer = state, layer
        self.names = list(inspect.signature(type(module).forward).parameters)[1:]

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        tokens = self.state.call.nag_tokens
        if not self.active or tokens is None:
            return forward(*args, **kwargs)
        return self.token_forward(module, forward, {**dict(zip(self.names, args)), **kwargs}, tokens)

    def token_forward(self, module, forward, values: dict, tokens):
        raise NotImplementedError


class NAGTokenFluxBlock(NAGTokenBlockHook):
    """Runs a FLUX-layout block (double or single) during a token-path call: at a NAG layer FLUX.1's blocks step by
    step, each text segment modulated by its own time-text embedding (the others' as they are); from `end` on the
    block without the negative tokens. keeps_negative_text: the model strips the call's whole text length after
    its last block (FLUX.2), so a double block past `end` hands the negative tokens on, untouched."""

    def __init__(self, state: EditState, layer: int, module: torch.nn.Module, keeps_negative_text: bool = False):
        super().__init__(state, layer, module)
        self.double = hasattr(module, "norm1_context")
        self.keeps_negative_text = keeps_negative_text

    def token_forward(self, module, forward, values: dict, tokens):
        if self.layer >= tokens.end:
            if self.keeps_negative_text and values.get("encoder_hidden_states") is not None:
                n, text = tokens.text_len, values["encoder_hidden_states"]
                text_out, hidden = self._without_negative(forward, values, n)
                return torch.cat([text_out, text[:, n:]], dim=1), hidden
            return self._without_negative(forward, values, tokens.text_len)
        if tokens.temb is None:
            return forward(**values)
        temb_neg = tokens.negative_temb(self.state.call.rows, self.layer)
        if self.double:
            return self._double(module, values, tokens.text_len, temb_neg)
        return self._single(module, values, tokens.text_len, temb_neg)

    @staticmethod
    def _without_negative(forward, values: dict, n: int):
        rotary = values.get("image_rotary_emb")
        if rotary is not None:
            values["image_rotary_emb"] = tuple(without_negative(x, n, 0) for x in rotary)
        mask = values.get("attention_mask")
        if mask is not None:
            values["attention_mask"] = without_negative(mask, n, 1)
        text = values.get("encoder_hidden_states")
        if text is not None:  # text and image streams apart: the text loses its negative tokens for good
            if text.shape[1] > n:
                values["encoder_hidden_states"] = text[:, :n]
            return forward(**values)
        hidden = values["hidden_states"]  # Chroma's single blocks: one [text ; image] stream
        if rotary is None or hidden.shape[1] != rotary[0].shape[0]:
            return forward(**values)
        values["hidden_states"] = without_negative(hidden, n, 1)
        out = forward(**values)
        return torch.cat([out[:, :n], hidden[:, n : 2 * n], out[:, n:]], dim=1)

    @staticmethod
    def _double(block, values: dict, n: int, temb_neg: torch.Tensor):
        """diffusers' `FluxTransformerBlock.forward`, the negative text modulated by temb_neg."""
        hidden, text, temb = values["hidden_states"], values["encoder_hidden_states"], values["temb"]
        kwargs = values.get("joint_attention_kwargs") or {}
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb)
        norm_text, text, text_modulation = modulated_text(block, text, n, temb, temb_neg)

        outputs = block.attn(hidden_states=norm_hidden, encoder_hidden_states=norm_text,
                             image_rotary_emb=values.get("image_rotary_emb"), **kwargs)
        attn_output, text_attn_output = outputs[:2]
        hidden = hidden + gate_msa.unsqueeze(1) * attn_output
        norm_hidden = block.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden = hidden + gate_mlp.unsqueeze(1) * block.ff(norm_hidden)
        if len(outputs) == 3:  # an IP-Adapter's image-prompt output
            hidden = hidden + outputs[2]
        return _fp16_clip(text_after_attention(block, text, text_attn_output, text_modulation)), hidden

    @staticmethod
    def _single(block, values: dict, n: int, temb_neg: torch.Tensor):
        """diffusers' `FluxSingleTransformerBlock.forward`, the negative text modulated by temb_neg."""
        hidden, text, temb = values["hidden_states"], values["encoder_hidden_states"], values["temb"]
        kwargs = values.get("joint_attention_kwargs") or {}
        text_len = text.shape[1]
        joint = torch.cat([text, hidden], dim=1)
        norm = block.norm
        shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
        shift_neg, scale_neg, gate_neg = norm.linear(norm.silu(temb_neg)).chunk(3, dim=1)
        image = hidden.shape[1]
        scale, shift = per_token_modulation(scale, scale_neg, n, image), per_token_modulation(shift, shift_neg, n, image)
        norm_joint = norm.norm(joint) * (1 + scale) + shift
        mlp = block.act_mlp(block.proj_mlp(norm_joint))
        attn_output = block.attn(hidden_states=norm_joint, image_rotary_emb=values.get("image_rotary_emb"), **kwargs)
        out = per_token_modulation(gate, gate_neg, n, image) * block.proj_out(torch.cat([attn_output, mlp], dim=2))
        joint = _fp16_clip(joint + out)
        return joint[:, :text_len], joint[:, text_len:]
