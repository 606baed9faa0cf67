"""NAG with the negative text as extra text tokens of each row, not as extra rows (SD3 / SD3.5 first).

The call's text states become [positive text ; negative text] along the token dimension, so the
image stream is computed once per row. At a NAG layer the processor gives the image queries two
attention calls, over [image ; positive text] (Z⁺) and over [image ; negative text] (Z⁻), and the
negative text queries attend [image ; negative text]: what the negative rows of the row path
compute, since there each negative row takes its positive row's image q/k/v at every NAG layer.
That holds when the NAG layers are 0…k (the default: every layer); otherwise the row path runs,
where the negative rows' own image stream feeds the non-NAG layers before the last NAG layer.

The negative text keeps its own modulation: the blocks (`NAGTokenBlock`) modulate the negative
tokens with the time-text embedding of the negative pooled projection, as a negative row would
be. Rows that NAG does not guide (CFG's unconditional rows) carry the negative tokens too; their
image queries never see them. From block k+1 on the negative tokens are dropped.
The FLUX layout (FLUX.1 and the models on its blocks, Chroma, FLUX.2) runs the same path in its double and
single blocks: `hooks.nag_tokens_flux`; Qwen-Image in its dual-stream blocks, the negative text at the positive
text's rotary positions and with its own text mask. Z-Image's main blocks take one [image ; caption] stream per row:
the negative caption segment, embedded and refined once per call as the model does a caption (each distinct one where
the rows have their own, the shorter padded under a key mask), joins every row's stream at the first block
([image ; caption ; negative caption]), its rotary positions shifted per row so that the image sits where it would
after the negative caption (as in a negative row, whose image follows its own caption).
HunyuanImage and HunyuanVideo 1.5 likewise append the negative text (context), prepared as the model prepares a row's
(once per call, or per row where the rows have their own negative prompts), to every row's text in the first block,
with its own key mask (the text has no positions).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..processors.state import EditState, plan_rows
from .nag_tokens_flux import NAGTokenBlockHook, NAGTokenFluxBlock, flux_token_call, modulated_text, text_after_attention
from .private import z_image_caption_segment, z_image_first_axis_rotation

NAG_TOKEN_HOOK = "dit_attn.nag_tokens"
# families whose blocks carry the negative text as tokens
TOKEN_FAMILIES = ("sd3", "flux", "chroma", "bria", "longcat_image", "ovis_image", "flux2", "qwen_image", "z_image",
                  "hunyuan_image", "hunyuan_video15")


@dataclass(frozen=True)
class NAGTokens:
    """The negative text tokens of the call running now."""

    text_len: int  # positive text tokens of each row; the negative ones follow them
    # (call rows, D) the time-text embedding with the negative pooled projection; None: the blocks modulate
    # the text independently of the prompt (Chroma)
    temb: torch.Tensor | None
    end: int  # the first block without the negative tokens
    # {first layer of a RowPlan stage (0 without a plan): its rows NAG guides}: the conditional rows and their
    # perturbed copies, found before the blocks run (no data-dependent indexing inside them)
    stage_rows: dict[int, torch.Tensor]
    # the negative text (1 or rows, L, D) the first block appends to every row's stream, and Z-Image: each row's
    # rotary table for it (rows, L, ·) and its key mask (rows, L; None: every key valid) (text_len: the positive
    # caption segment's length, the rows' longest padded caption); HunyuanImage and HunyuanVideo 1.5: its key mask
    # (1 or rows, L)
    negative: tuple | None = None

    def rows_of(self, stage) -> torch.Tensor:
        """The rows NAG guides in a RowPlan stage (None: the call's rows)."""
        return self.stage_rows[0 if stage is None else stage.layer]

    def negative_temb(self, plan, layer: int) -> torch.Tensor:
        """`temb` for the rows of the RowPlan stage that runs block `layer` (plan None: the call's rows)."""
        from .calls import take_call_rows

        if plan is None:
            return self.temb
        stage = plan.stage_at(layer)
        return self.temb if stage.is_call_rows else take_call_rows(self.temb, stage.from_call, plan.call_rows)


@contextlib.contextmanager
def row_path():
    """NAG on its row path (negative rows through the blocks) on every family, for comparisons (benchmarks/)."""
    global TOKEN_FAMILIES
    families, TOKEN_FAMILIES = TOKEN_FAMILIES, ()
    try:
        yield
    finally:
        TOKEN_FAMILIES = families


def carries_tokens(family, state: EditState, call: dict | None = None) -> bool:
    """NAG runs on the token path: a family whose blocks carry it, NAG layers 0…k (and a call they fit); each row
    may have its own negative prompt."""
    nag = state.nag
    return (nag is not None and family.name in TOKEN_FAMILIES
            and nag.layers == frozenset(range(max(nag.layers) + 1))
            and (call is None or family.nag_tokens_fit(call)))


def nag_tokens_forward(hook, module, forward, call: dict, current, cond, patch):
    """The transformer call with the negative prompt's text appended to every row's text (see the module
    docstring); with HeadGuidance its perturbed copies are forked as usual and NAG-guided as their rows."""
    batch = hook.family.batch_size(call)
    at_call = hook.family.widen_at_call
    plan = None
    if cond is not None:
        plan = plan_rows(batch, cond=cond, fork_layer=0 if at_call else hook.guidance.fork_layer)
        call = hook.rows_at_call(call, plan) if at_call else call
    negative, temb = None, None
    if hook.family.name == "z_image":
        text_len, negative = _z_image_negative_segment(module, call, patch, _row_sources(patch, plan, batch))
    elif hook.family.name == "hunyuan_image":
        negative = _hunyuan_image_negative_text(module, call, _negatives_of_rows(call, patch, plan, batch),
                                                hook.family)
        text_len = negative[0].shape[1]
    elif hook.family.name == "hunyuan_video15":
        negative = _hunyuan_video15_negative_context(module, call, _negatives_of_rows(call, patch, plan, batch),
                                                     hook.family)
        text_len = negative[0].shape[1]
    else:
        text_len = call["encoder_hidden_states"].shape[1]  # these families fork HeadGuidance's copies at a block
        if hook.family.name == "sd3":
            call, temb = _sd3_token_call(module, call, patch, batch)
        elif hook.family.name == "qwen_image":
            call = _qwen_token_call(call, patch, batch)
        else:
            call, temb = flux_token_call(module, call, patch, batch)
    stages = plan.stages if plan is not None else ()
    stage_rows = {stage.layer: torch.isin(stage.from_call, patch.targets).nonzero().flatten() for stage in stages}
    current.rows = plan
    current.nag_tokens = NAGTokens(text_len, temb, patch.patch_end, stage_rows or {0: patch.targets}, negative)
    try:
        output = forward(**call)
    finally:
        current.rows, current.nag_tokens = None, None
    if cond is not None:
        return hook.guidance.finish_call(output, plan, cond)
    return output


def _sd3_token_call(module, call: dict, patch, batch: int) -> tuple[dict, torch.Tensor]:
    """(the call with [positive ; negative] text, the negative text's time-text embedding (call rows, D))."""
    text, pooled = call["encoder_hidden_states"], call["pooled_projections"]
    negative = patch.per_call_row(patch.embeds.to(text), batch)
    temb = module.time_text_embed(call["timestep"], patch.per_call_row(patch.pooled.to(pooled), batch))
    return {**call, "encoder_hidden_states": torch.cat([text, negative], dim=1)}, temb


def _row_sources(patch, plan, batch: int) -> torch.Tensor | None:
    """The source row (index into `patch.embeds`) of each row of a call widened at the call (`plan`'s first stage;
    None: the call's `batch` rows); a row NAG does not guide takes the first source, which its image queries never
    see. None where one negative prompt serves every row."""
    if patch.one_source:
        return None
    return patch.source_index(plan.stages[0].from_call if plan is not None else torch.arange(batch))


def _z_image_negative_segment(module, call: dict, patch, sources) -> tuple[int, tuple]:
    """(the positive caption segment's length, `NAGTokens.negative`). A row's image follows its own padded caption on
    the first rotary axis; the negative caption's positions move by (that caption's length − its own) in each row.
    sources (`_row_sources`): each row's negative caption; segments of other lengths are padded to the longest with
    zero states and tables under a key mask, as the model pads its rows."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    padded = [len(c) + (-len(c)) % SEQ_MULTI_OF for c in call["cap_feats"]]
    rows = [0] * len(padded) if sources is None else sources.tolist()
    segments = {}
    for k in sorted(set(rows)):
        caption = patch.embeds[k, : int((patch.pooled[k] != 0).sum())].to(call["cap_feats"][0])
        segments[k] = z_image_caption_segment(module, caption)
    lengths = [segments[k][0].shape[1] for k in rows]
    shift = z_image_first_axis_rotation(module, [p - length for p, length in zip(padded, lengths)])
    if sources is None:
        states, rotary = segments[0]
        return max(padded), (states, rotary * shift[:, None], None)
    longest = max(lengths)

    def padded_to_longest(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1]))

    states = torch.cat([padded_to_longest(segments[k][0]) for k in rows])
    rotary = torch.cat([padded_to_longest(segments[k][1]) for k in rows]) * shift[:, None]
    mask = None
    if min(lengths) < longest:
        mask = torch.arange(longest, device=states.device)[None] < torch.tensor(lengths, device=states.device)[:, None]
    return max(padded), (states, rotary, mask)


def _negatives_of_rows(call: dict, patch, plan, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text states, extra, timestep) of the negative prompt that HunyuanImage and HunyuanVideo 1.5 prepare for the
    rows of the call (`_row_sources`): one negative prompt's once (its one row, the call's first timestep), or each
    row's own source prompt's with the row's timestep."""
    sources = _row_sources(patch, plan, batch)
    if sources is None:
        return patch.embeds[:1], patch.pooled[:1], call["timestep"][:1]
    embeds = patch.embeds.index_select(0, sources.to(patch.embeds.device))
    return embeds, patch.pooled.index_select(0, sources.to(patch.pooled.device)), call["timestep"]


def _hunyuan_image_negative_text(module, call: dict, negatives, family) -> tuple[torch.Tensor, torch.Tensor]:
    """`NAGTokens.negative`: the negative prompt's text (`_negatives_of_rows`) as the model's forward prepares a row's
    before the blocks, refined by its token refiner at the timestep and, with ByT5 glyph states, joined with them;
    with their key masks. The model reorders each row's tokens valid first: the text has no positions, so the order
    changes nothing but the summation order of attention. Every prompt of the call is padded to its lengths."""
    embeds, extra, timestep = negatives
    inputs = family.text_inputs(call, embeds, extra)
    mask = inputs["encoder_attention_mask"].bool()
    text = module.context_embedder(inputs["encoder_hidden_states"], timestep, mask)
    glyphs = inputs.get("encoder_hidden_states_2")
    if module.context_embedder_2 is None or glyphs is None:
        return text, mask
    glyph_mask = inputs["encoder_attention_mask_2"].bool()
    return torch.cat([module.context_embedder_2(glyphs), text], dim=1), torch.cat([glyph_mask, mask], dim=1)


def _hunyuan_video15_negative_context(module, call: dict, negatives, family) -> tuple[torch.Tensor, torch.Tensor]:
    """`NAGTokens.negative`: each row's negative context as the model's forward prepares a row's before the blocks:
    the row's image context (SigLIP states of image-to-video; zeros, masked, when the call's are all zero), the
    negative prompt's glyph states and its Qwen text (`_negatives_of_rows`) refined at the timestep, each with its
    context-type embedding, with their key masks. As on HunyuanImage the model's valid-first reordering changes
    nothing (the context has no positions), and every prompt of the call is padded to its lengths."""
    embeds, extra, timestep = negatives
    inputs = family.text_inputs(call, embeds, extra)
    mask = inputs["encoder_attention_mask"]
    text = module.context_embedder(inputs["encoder_hidden_states"], timestep, mask)
    glyphs = module.context_embedder_2(inputs["encoder_hidden_states_2"])
    image_embeds = call["image_embeds"]
    image = module.image_embedder(image_embeds)
    text_to_video = bool(torch.all(image_embeds == 0))
    image_mask = torch.full(image.shape[:2], not text_to_video, dtype=torch.bool, device=image.device)
    image = image * 0.0 if text_to_video else image
    parts = [(image, image_mask), (glyphs, inputs["encoder_attention_mask_2"].bool()), (text, mask.bool())]
    rows = image.shape[0]
    states = [x + module.cond_type_embed(torch.full_like(x[:, :, 0], kind, dtype=torch.long))
              for kind, (x, _) in ((2, parts[0]), (1, parts[1]), (0, parts[2]))]
    return (torch.cat([x.expand(rows, -1, -1) for x in states], dim=1),
            torch.cat([m.expand(rows, -1) for _, m in parts], dim=1))


def _qwen_token_call(call: dict, patch, batch: int) -> dict:
    """The call with [positive ; negative] text and its text mask ([the call's ; the negative prompt's own])."""
    text, mask = call["encoder_hidden_states"], call.get("encoder_hidden_states_mask")
    negative = patch.per_call_row(patch.embeds.to(text), batch)
    # Qwen-Image's spec keeps the text mask where others pool
    negative_mask = patch.per_call_row(patch.pooled.to(text.device), batch)
    out = {**call, "encoder_hidden_states": torch.cat([text, negative], dim=1)}
    if mask is not None or not bool(negative_mask.bool().all()):
        mask = torch.ones(text.shape[:2], dtype=negative_mask.dtype, device=text.device) if mask is None else mask
        out["encoder_hidden_states_mask"] = torch.cat([mask, negative_mask.to(mask.dtype)], dim=1)
    return out


def token_block_hooks(family, state: EditState, transformer) -> list[tuple[torch.nn.Module, ModelHook]]:
    """(block, hook) of every block that runs a token-path call (see `carries_tokens`)."""
    if family.name == "sd3":
        return [(block, NAGTokenBlock(state, layer, block)) for layer, block in enumerate(transformer.transformer_blocks)]
    if family.name == "qwen_image":
        return [(block, NAGTokenQwenBlock(state, layer, block)) for layer, block in enumerate(transformer.transformer_blocks)]
    if family.name == "z_image":
        return [(block, NAGTokenZImageBlock(state, layer, block)) for layer, block in enumerate(transformer.layers)]
    if family.name == "hunyuan_image":
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        return [(block, NAGTokenHunyuanImageBlock(state, layer, block)) for layer, block in enumerate(blocks)]
    if family.name == "hunyuan_video15":
        return [(block, NAGTokenHunyuanVideo15Block(state, layer, block))
                for layer, block in enumerate(transformer.transformer_blocks)]
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    keeps = family.name == "flux2"
    return [(block, NAGTokenFluxBlock(state, layer, block, keeps)) for layer, block in enumerate(blocks)]


class NAGTokenBlock(NAGTokenBlockHook):
    """Runs an SD3 `JointTransformerBlock` on [positive text ; negative text] during a token-path call:
    diffusers' block step by step, with each text segment modulated by its own time-text embedding."""

    def token_forward(self, module, forward, values: dict, tokens):
        text = values["encoder_hidden_states"]
        if self.layer >= tokens.end:
            if text.shape[1] > tokens.text_len:
                values["encoder_hidden_states"] = text[:, : tokens.text_len]
            return forward(**values)
        return self._segmented(module, values, tokens)

    def _segmented(self, block, values: dict, tokens: NAGTokens):
        hidden, text, temb = values["hidden_states"], values["encoder_hidden_states"], values["temb"]
        kwargs = values.get("joint_attention_kwargs") or {}
        temb_neg = tokens.negative_temb(self.state.call.rows, self.layer)
        if block.use_dual_attention:
            norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden2, gate_msa2 = block.norm1(hidden, emb=temb)
        else:
            norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb)
        norm_text, text, text_modulation = modulated_text(block, text, tokens.text_len, temb, temb_neg)

        attn_output, text_attn_output = block.attn(hidden_states=norm_hidden, encoder_hidden_states=norm_text, **kwargs)
        hidden = hidden + gate_msa.unsqueeze(1) * attn_output
        if block.use_dual_attention:
            hidden = hidden + gate_msa2.unsqueeze(1) * block.attn2(hidden_states=norm_hidden2, **kwargs)
        norm_hidden = block.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden = hidden + gate_mlp.unsqueeze(1) * block.ff(norm_hidden)

        if block.context_pre_only:
            return None, hidden
        return text_after_attention(block, text, text_attn_output, text_modulation), hidden


class NAGTokenQwenBlock(NAGTokenBlockHook):
    """Runs a Qwen-Image block during a token-path call: stock at a NAG layer (its modulation does not depend on the
    prompt); from `end` on without the negative tokens, their mask and their rotary table (the model reads only the
    image stream after its last block)."""

    def token_forward(self, module, forward, values: dict, tokens):
        if self.layer >= tokens.end:
            n = tokens.text_len
            values["encoder_hidden_states"] = values["encoder_hidden_states"][:, :n]
            mask, rotary = values.get("encoder_hidden_states_mask"), values.get("image_rotary_emb")
            if mask is not None:
                values["encoder_hidden_states_mask"] = mask[:, :n]
            if rotary is not None:
                values["image_rotary_emb"] = (rotary[0], rotary[1][:n])
        return forward(**values)


class NAGTokenAppendingBlock(NAGTokenBlockHook):
    """Runs a block whose stream gains the negative text at the first block (`NAGTokens.negative`) during a
    token-path call: a NAG layer gets the per-block tables (`extend`) with the negative tokens' too; from `end` on
    the block runs without them (the models read only the image tokens after their blocks)."""

    stream = ""  # the input that carries the negative tokens from block to block

    def stock_length(self, values: dict, tokens) -> int:
        raise NotImplementedError

    def extend(self, values: dict, tokens) -> None:
        raise NotImplementedError

    def token_forward(self, module, forward, values: dict, tokens):
        stream = values[self.stream]
        if self.layer >= tokens.end:
            values[self.stream] = stream[:, : self.stock_length(values, tokens)]
            return forward(**values)
        if self.layer == 0:
            values[self.stream] = torch.cat([stream, tokens.negative[0].expand(stream.shape[0], -1, -1)], dim=1)
        self.extend(values, tokens)
        return forward(**values)


class NAGTokenZImageBlock(NAGTokenAppendingBlock):
    """A Z-Image main block: one [image ; caption] stream per row, the negative caption segment after it with its
    rows' rotary tables and key mask."""

    stream = "x"

    def stock_length(self, values: dict, tokens) -> int:
        return values["freqs_cis"].shape[1]  # the model passes its own tables to each block

    def extend(self, values: dict, tokens) -> None:
        mask, (negative, rotary, negative_mask) = values["attn_mask"], tokens.negative
        stock = values["freqs_cis"].shape[1]
        values["freqs_cis"] = torch.cat([values["freqs_cis"], rotary], dim=1)
        if mask is None and negative_mask is None:
            return
        rows = rotary.shape[0]
        if mask is None:
            mask = torch.ones(rows, stock, dtype=torch.bool, device=rotary.device)
        keep = mask.new_ones(rows, negative.shape[1]) if negative_mask is None else negative_mask.to(mask.dtype)
        values["attn_mask"] = torch.cat([mask, keep], dim=1)


class NAGTokenHunyuanImageBlock(NAGTokenAppendingBlock):
    """A HunyuanImage double or single block: the negative text after each row's text, with its own key mask."""

    stream = "encoder_hidden_states"

    def stock_length(self, values: dict, tokens) -> int:
        return tokens.text_len

    def extend(self, values: dict, tokens) -> None:
        mask = values["attention_mask"]  # (B, 1, 1, image + text), bool
        negative_mask = tokens.negative[1][:, None, None, :].expand(mask.shape[0], 1, 1, -1)
        values["attention_mask"] = torch.cat([mask, negative_mask.to(mask.dtype)], dim=-1)


class NAGTokenHunyuanVideo15Block(NAGTokenHunyuanImageBlock):
    """A HunyuanVideo 1.5 block: the negative context after each row's context, its key mask after the call's
    context mask (B, context), which the model hands every block."""

    def extend(self, values: dict, tokens) -> None:
        mask = values["attention_mask"]
        values["attention_mask"] = torch.cat([mask, tokens.negative[1].to(mask.dtype).expand(mask.shape[0], -1)], dim=1)
