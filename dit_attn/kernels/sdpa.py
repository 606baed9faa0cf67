"""SoftPAG on top of torch SDPA with no S×S tensor.

Because the output is linear in the map, (1 - u)·A + u·T gives (1 - u)·SDPA(Q, K, V) + u·T·V:
T·V = V for the identity and mean(V) for the uniform target (HeadHunter, Eq. for SoftPAG).
Image-scope targets only need each image query's attention over the text keys and its
log-normaliser, O(S_img · S_txt), plus one logit per query for the image keys.
Rows and query positions whose plain attention is fully replaced are never computed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .plan import AttentionPlan, Perturbation, text_positions

# bound on the logits tensor of one chunk of image→text attention (elements)
_CHUNK_ELEMENTS = 1 << 22


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp, chunked over queries. (B,H,N,D) → (B,H,N,D), (B,H,N)."""
    batch, heads, n, _ = q.shape
    if k.shape[-2] == 0:
        return torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * k.shape[-2]))
    outs, lses = [], []
    for start in range(0, n, chunk):
        logits = (q[:, :, start : start + chunk] @ k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.exp(logits - lse[..., None]) @ v)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def image_scope_target(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Perturbation, image: slice, scale: float) -> torch.Tensor:
    """T·V for the image queries under an image-scope target. Returns (B, H, N_img, D)."""
    seq_len = q.shape[-2]
    text = text_positions(seq_len, image).to(q.device)
    q_img, k_img, v_img = q[:, :, image], k[:, :, image], v[:, :, image]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_img32, k_img32 = q_img.to(compute), k_img.to(compute)
    text_out, text_lse = attend_with_lse(q_img32, k[:, :, text].to(compute), v[:, :, text].to(compute), scale)
    if p.target == "identity":
        image_logit = (q_img32 * k_img32).sum(-1) * scale
        image_value = v_img.to(compute)
    else:
        n_img = k_img.shape[-2]
        mean_key = k_img32.mean(dim=-2, keepdim=True)
        image_logit = (q_img32 @ mean_key.transpose(-1, -2)).squeeze(-1) * scale + math.log(n_img)
        image_value = v_img.to(compute).mean(dim=-2, keepdim=True)
    image_weight = torch.sigmoid(image_logit - text_lse)[..., None]
    return (image_weight * image_value + (1 - image_weight) * text_out).to(q.dtype)


def blend(out: torch.Tensor, q, k, v, p: Perturbation, image: slice, scale: float) -> torch.Tensor:
    rows = p.touched_rows().nonzero().flatten()
    if rows.numel() == 0:
        return out
    whole = rows.numel() == out.shape[0]
    pick = (lambda x: x) if whole else (lambda x: x.index_select(0, rows.to(x.device)))
    u = pick(p.u).to(device=out.device, dtype=out.dtype)[:, :, None, None]
    q_r, k_r, v_r, out_r = pick(q), pick(k), pick(v), pick(out)
    if p.scope == "joint":
        target = v_r if p.target == "identity" else v_r.mean(dim=-2, keepdim=True)
        blended = (1 - u) * out_r + u * target
    else:
        blended = out_r.clone()
        target = image_scope_target(q_r, k_r, v_r, p, image, scale)
        blended[:, :, image] = (1 - u) * out_r[:, :, image] + u * target
    if whole:
        return blended
    out = out.clone()
    out[rows.to(out.device)] = blended
    return out


def base_queries(plan: AttentionPlan, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows need plain attention for all queries, and which only for text queries."""
    none = torch.zeros(batch, dtype=torch.bool)
    text_only = torch.zeros(batch, dtype=torch.bool)
    for p in plan.perturbations:
        full = p.full_rows().cpu()
        if p.scope == "joint":
            none |= full
        else:
            text_only |= full
    text_only &= ~none
    return ~(none | text_only), text_only


def sdpa_attention(q, k, v, plan: AttentionPlan, scale: float | None = None) -> torch.Tensor:
    """(B, H, S, D) → (B, H, S, D)."""
    if plan.is_plain:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=scale)
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, seq_len = q.shape[0], q.shape[-2]
    image = plan.image_slice(seq_len)
    all_queries, text_queries = base_queries(plan, batch)
    if bool(all_queries.all()):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        out = torch.zeros_like(q)
        rows = all_queries.nonzero().flatten().to(q.device)
        if rows.numel():
            out[rows] = F.scaled_dot_product_attention(q[rows], k[rows], v[rows], scale=scale)
        rows = text_queries.nonzero().flatten().to(q.device)
        text = text_positions(seq_len, image).to(q.device)
        if rows.numel() and text.numel():
            partial = torch.zeros_like(q[rows])
            partial[:, :, text] = F.scaled_dot_product_attention(q[rows][:, :, text], k[rows], v[rows], scale=scale)
            out[rows] = partial
    for p in plan.perturbations:
        out = blend(out, q, k, v, p, image, scale_value)
    return out
