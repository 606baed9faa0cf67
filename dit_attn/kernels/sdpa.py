"""SoftPAG on top of torch SDPA with no S×S tensor and no output-sized temporaries.

Because the output is linear in the map, (1 - u)·A + u·T gives (1 - u)·SDPA(Q, K, V) + u·T·V:
T·V = V for the identity and mean(V) for the uniform target (HeadHunter's SoftPAG).
Image-scope targets need each image query's attention over the text keys and its
log-normaliser, O(S_img · S_txt), plus one logit per query for the image keys; they are
computed in chunks of queries. Blends are in place on the SDPA output (lerp_), rows are
taken as views where they are contiguous, and rows or query positions whose plain
attention is fully replaced are never computed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import masks
from .plan import AttentionPlan, Perturbation

# bound on the elements of one chunk's temporaries (logits or per-query products)
_CHUNK_ELEMENTS = 1 << 16


def text_segments(seq_len: int, image: slice) -> list[slice]:
    return [s for s in (slice(0, image.start), slice(image.stop, seq_len)) if s.stop > s.start]


def take_text(x: torch.Tensor, segments: list[slice]) -> torch.Tensor:
    """The tokens of `segments` (B, H, ·, D), concatenated in order (a view for one segment)."""
    if len(segments) == 1:
        return x[:, :, segments[0]]
    return torch.cat([x[:, :, s] for s in segments], dim=2)


def image_key(q_rows, k_rows, v_rows, target: str, image_means, n_img: int, scale: float, bias=None):
    """The one image key each image query's image-scope target map keeps: its logit (B, H, n)
    and value, the query's own key (identity) or mean(K_img) with multiplicity N_img (uniform;
    image_means = (mean K_img, mean V_img), each (B, H, 1, D)).

    bias: the mask's bias of these queries over the image keys (B|1, H|1, n|1, N_img), or None.
    With it, the identity key gets its own bias and the uniform key stands for the image keys
    the query may see: mean key over them, value and log-multiplicity from softmax(bias)."""
    if target == "identity":
        logit = torch.linalg.vecdot(q_rows, k_rows) * scale
        if bias is not None:
            own = bias.diagonal(dim1=-2, dim2=-1) if bias.shape[-2] > 1 else bias[..., 0, :]
            logit = logit + own
        return logit, v_rows
    if bias is None:
        mean_key, mean_value = image_means
        return (q_rows @ mean_key.transpose(-1, -2)).squeeze(-1) * scale + math.log(n_img), mean_value
    k_img, v_img = image_means  # the image keys and values themselves
    seen = torch.isfinite(bias).to(q_rows.dtype)
    mean_key = (seen @ k_img) / seen.sum(dim=-1, keepdim=True)  # (B, H, n|1, D)
    logit = torch.linalg.vecdot(q_rows, mean_key) * scale + torch.logsumexp(bias, dim=-1)
    return logit, torch.softmax(bias, dim=-1) @ v_img


def toward_image_key(text_out, text_lse, image_logit, image_value):
    """Softmax over the text keys and the image key, from the text keys' output and log-normaliser;
    text_out None (no text keys) gives the image value."""
    if text_out is None:
        return image_value.expand(*image_logit.shape, image_value.shape[-1])
    return torch.lerp(text_out, image_value.expand_as(text_out), torch.sigmoid(image_logit - text_lse)[..., None])


def blend_image_scope(out, q, k, v, u, target: str, image: slice, scale: float, bias=None) -> None:
    """In place on out[:, :, image]: (1 - u)·out + u·T·V for an image-scope target.

    T for image queries: identity keeps each query's own image key and all text keys
    (diffusers' SD3 PAG mask); uniform replaces the image→image logits by their row mean,
    i.e. one key mean(K_img) with multiplicity N_img. bias: the pipeline's mask as a float
    bias of these rows (B|1, H|1, S|1, S), added to every logit.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    segments = text_segments(q.shape[-2], image)
    k_txt = take_text(k, segments).to(compute) if segments else None
    v_txt = take_text(v, segments).to(compute) if segments else None
    n_img = image.stop - image.start
    means = None
    if target == "uniform":
        if bias is None:
            means = tuple(x[:, :, image].to(compute).mean(dim=-2, keepdim=True) for x in (k, v))
        else:
            means = tuple(x[:, :, image].to(compute) for x in (k, v))
    batch, heads, _, dim = q.shape
    width = max(dim, k_txt.shape[-2] if k_txt is not None else 0, n_img if bias is not None else 0)
    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * width))
    for start in range(image.start, image.stop, chunk):
        rows = slice(start, min(start + chunk, image.stop))
        q_c = q[:, :, rows].to(compute)
        row_bias = masks.queries(bias, rows)
        # identity keeps the own key only: the mask's (rows, rows) block, whose diagonal image_key takes
        image_bias = None if bias is None else row_bias[..., rows if target == "identity" else image]
        image_logit, image_value = image_key(q_c, k[:, :, rows].to(compute), v[:, :, rows].to(compute), target, means,
                                             n_img, scale, image_bias)
        text_out = text_lse = None
        if k_txt is not None:
            logits = (q_c @ k_txt.transpose(-1, -2)) * scale  # chunk-sized: out-of-place keeps autograd simple
            if bias is not None:
                logits = logits + torch.cat([row_bias[..., s] for s in segments], dim=-1)
            text_lse = torch.logsumexp(logits, dim=-1)
            text_out = torch.softmax(logits, dim=-1) @ v_txt  # attention over the text keys alone
        mixed = toward_image_key(text_out, text_lse, image_logit, image_value)
        out[:, :, rows].lerp_(mixed.to(out.dtype), u)


def blend(out: torch.Tensor, q, k, v, p: Perturbation, image: slice, scale: float, attn_mask=None) -> None:
    """Apply one perturbation in place to the rows it touches; attn_mask: the pipeline's mask (4-D)."""
    u = p.u.to(device=out.device, dtype=out.dtype)[:, :, None, None]
    bias = None
    if attn_mask is not None and p.scope == "image":
        bias = masks.additive(attn_mask, torch.float64 if q.dtype == torch.float64 else torch.float32)
    for run in p.touched_runs():
        if p.scope == "joint":
            if p.target == "identity":
                target = v[run]
            elif attn_mask is None:
                target = v[run].mean(dim=-2, keepdim=True)
            else:  # softmax(mask) over the keys: attention with all-zero logits
                target = F.scaled_dot_product_attention(torch.zeros_like(q[run]), k[run], v[run],
                                                        attn_mask=masks.rows(attn_mask, run))
            out[run].lerp_(target.expand_as(out[run]), u[run])
        else:
            blend_image_scope(out[run], q[run], k[run], v[run], u[run], p.target, image, scale, masks.rows(bias, run))


def base_queries(plan: AttentionPlan, batch: int) -> tuple[list[int], list[int]]:
    """Which rows need plain attention for all queries, and which only for text queries."""
    none = [False] * batch
    text_only = [False] * batch
    for p in plan.perturbations:
        target = none if p.scope == "joint" else text_only
        for row, full in enumerate(p.full_row_list()):
            target[row] = target[row] or full
    all_rows = [r for r in range(batch) if not (none[r] or text_only[r])]
    text_rows = [r for r in range(batch) if text_only[r] and not none[r]]
    return all_rows, text_rows


def sdpa_attention(q, k, v, plan: AttentionPlan, scale: float | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, S, D) → (B, H, S, D); attn_mask: the pipeline's mask, 4-D (see `masks`)."""
    if plan.is_plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale)
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    image = plan.image_slice(q.shape[-2])
    all_queries, text_queries = base_queries(plan, q.shape[0])
    if len(all_queries) == q.shape[0]:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    else:
        # one row at a time: SDPA cannot write into `out`, so this bounds its temporary to a row
        out = torch.zeros_like(q)  # rows fully replaced below; zeros keep lerp_ finite
        for row in all_queries:
            one = slice(row, row + 1)
            out[one] = F.scaled_dot_product_attention(q[one], k[one], v[one], attn_mask=masks.rows(attn_mask, one), scale=scale)
        for row in text_queries:
            one = slice(row, row + 1)
            for segment in text_segments(q.shape[-2], image):
                out[one, :, segment] = F.scaled_dot_product_attention(
                    q[one, :, segment], k[one], v[one], attn_mask=masks.queries(masks.rows(attn_mask, one), segment), scale=scale)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out = out.clone()  # SDPA's backward needs its own output intact
    for p in plan.perturbations:
        blend(out, q, k, v, p, image, scale_value, attn_mask)
    return out
