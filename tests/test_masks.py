"""Perturbations and local windows under the pipelines' own attention masks.

The reference backend is checked against hand-built dense maps (SDPA with an explicit
mask, softmax of the bias); sdpa and tiled are checked against the reference.
"""
import pytest
import torch
import torch.nn.functional as F

from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, attention
from dit_attn.kernels.window import dense_mask

torch.set_num_threads(1)

BATCH, HEADS, DIM = 3, 4, 8


def qkv(seq, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(BATCH, HEADS, seq, DIM, generator=g, dtype=dtype) for _ in range(3))


def text_keep(text: int, image: int, text_first: bool, kept=(5, 3, 7)) -> torch.Tensor:
    """(B, S) bool: row b keeps its first kept[b] text tokens and every image token (padded prompts)."""
    txt = torch.arange(text)[None, :] < torch.tensor(kept)[:, None]
    img = torch.ones(BATCH, image, dtype=torch.bool)
    return torch.cat([txt, img] if text_first else [img, txt], dim=1)


def masks_of(keep: torch.Tensor, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The mask forms pipelines pass: a bool key mask (Qwen-Image, HunyuanImage), Chroma's float
    0/1 outer product added to the logits, and a bool per-query mask."""
    as_float = keep.to(dtype)
    return {
        "bool keys": keep[:, None, None, :],
        "float 0/1 outer": as_float[:, None, None, :] * as_float[:, None, :, None],
        "bool 2-d": keep,
    }


def strengths(u: float) -> torch.Tensor:
    s = torch.zeros(BATCH, HEADS, dtype=torch.float64)
    s[1, :2] = u
    s[2, :] = u
    return s


LAYOUTS = [(6, 18, True), (6, 18, False), (0, 20, True)]  # text tokens, image tokens, text first


@pytest.mark.parametrize("target", ["identity", "uniform"])
@pytest.mark.parametrize("scope", ["joint", "image"])
@pytest.mark.parametrize("u", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("text,image,text_first", LAYOUTS)
def test_sdpa_equals_reference_under_masks(target, scope, u, text, image, text_first):
    seq = text + image
    q, k, v = qkv(seq)
    tokens = (text, seq) if text_first else (0, image)
    plan = AttentionPlan((Perturbation(strengths(u), target, scope),), tokens)
    for name, mask in masks_of(text_keep(text, image, text_first, kept=(min(text, 5), min(text, 3), text))).items():
        ref = attention(q, k, v, plan, attn_mask=mask, backend="reference")
        fast = attention(q, k, v, plan, attn_mask=mask, backend="sdpa")
        assert (ref - fast).abs().max() < 1e-12, name
        stock = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask.ndim == 4 else mask[:, None, None])
        assert torch.equal(fast[0], stock[0]), name  # an untouched row is the stock masked attention


def test_reference_definitions_under_a_bool_mask():
    """u = 1 against dense maps built here: the mask keeps its meaning inside every target."""
    text, image = 6, 18
    seq = text + image
    q, k, v = qkv(seq)
    keep = text_keep(text, image, text_first=True)
    key_mask = keep[:, None, None, :]
    one = torch.ones(BATCH, HEADS, dtype=torch.float64)
    tokens = (text, seq)
    out = attention(q, k, v, AttentionPlan((Perturbation(one, "identity", "joint"),), tokens), attn_mask=key_mask,
                    backend="reference")
    assert (out - v).abs().max() < 1e-12
    out = attention(q, k, v, AttentionPlan((Perturbation(one, "uniform", "joint"),), tokens), attn_mask=key_mask,
                    backend="reference")
    mean_kept = (keep[:, None, :, None] * v).sum(-2, keepdim=True) / keep.sum(-1)[:, None, None, None]
    assert (out - mean_kept).abs().max() < 1e-12  # the mean over unmasked keys
    # image identity: image queries see the kept text keys and their own key (diffusers' PAG mask ∧ the key mask)
    allowed = key_mask.expand(BATCH, 1, seq, seq).clone()
    pag = torch.zeros(seq, seq, dtype=torch.bool)
    pag[:, :text] = True
    pag[text:, text:] = torch.eye(image, dtype=torch.bool)
    pag[:text] = True
    allowed[:, :, text:] &= pag[text:]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = attention(q, k, v, AttentionPlan((Perturbation(one, "identity", "image"),), tokens), attn_mask=key_mask,
                    backend="reference")
    assert (out - want).abs().max() < 1e-12
    # image uniform: the image→image logits are the mean logit over the image keys (all kept here)
    logits = (q @ k.transpose(-1, -2)) / DIM**0.5
    logits[..., text:, text:] = logits[..., text:, text:].mean(-1, keepdim=True)
    want_img = torch.softmax(logits.masked_fill(~key_mask, float("-inf")), -1) @ v
    out = attention(q, k, v, AttentionPlan((Perturbation(one, "uniform", "image"),), tokens), attn_mask=key_mask,
                    backend="reference")
    assert (out[..., text:, :] - want_img[..., text:, :]).abs().max() < 1e-12
    stock = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    assert (out[..., :text, :] - stock[..., :text, :]).abs().max() < 1e-12  # text queries untouched


def test_float_mask_uniform_target_is_softmax_of_the_bias():
    text, image = 5, 12
    q, k, v = qkv(text + image)
    keep = text_keep(text, image, text_first=True, kept=(2, 4, 5)).to(torch.float64)
    outer = keep[:, None, None, :] * keep[:, None, :, None]
    one = torch.ones(BATCH, HEADS, dtype=torch.float64)
    for backend in ("reference", "sdpa"):
        out = attention(q, k, v, AttentionPlan((Perturbation(one, "uniform", "joint"),), (text, text + image)),
                        attn_mask=outer, backend=backend)
        assert (out - torch.softmax(outer, -1) @ v).abs().max() < 1e-12, backend


def test_masks_change_the_perturbed_output():
    """A masked and an unmasked perturbation differ (the mask is not ignored)."""
    text, image = 6, 18
    q, k, v = qkv(text + image)
    plan = AttentionPlan((Perturbation(strengths(0.7), "uniform", "image"),), (text, text + image))
    keep = text_keep(text, image, True)
    for backend in ("reference", "sdpa"):
        masked = attention(q, k, v, plan, attn_mask=keep, backend=backend)
        plain = attention(q, k, v, plan, backend=backend)
        assert (masked[1] - plain[1]).abs().max() > 1e-3  # row 1 keeps 3 of its 6 text tokens


LOCAL_CASES = [  # rows, cols, radius, text, text first, pool
    (6, 5, 2.5, 7, True, None),
    (8, 8, 3, 5, False, 2),
    (7, 9, 1.5, 4, True, None),
]


@pytest.mark.parametrize("rows,cols,radius,text,text_first,pool", LOCAL_CASES)
def test_local_window_under_masks(rows, cols, radius, text, text_first, pool):
    n = rows * cols
    seq = n + text
    q, k, v = qkv(seq, dtype=torch.float32, seed=rows)
    tokens = (text, seq) if text_first else (0, n)
    weight = torch.rand(pool, pool, generator=torch.Generator().manual_seed(1)) if pool else None
    window = LocalWindow(radius, (rows, cols), pool, weight)
    keep = text_keep(text, n, text_first, kept=(3, 1, text))
    u = torch.tensor([[0.0] * HEADS, [0.5] * HEADS, [1.0, 0.2, 0.0, 1.0]])
    plans = [AttentionPlan((), tokens, window),
             AttentionPlan((Perturbation(u, "uniform", "image"), Perturbation(u.flip(0), "identity", "joint")), tokens, window)]
    for mask in masks_of(keep, torch.float32).values():
        for plan in plans:
            ref = attention(q, k, v, plan, attn_mask=mask, backend="reference")
            assert (attention(q, k, v, plan, attn_mask=mask, backend="tiled") - ref).abs().max() < 1e-5
    if pool is None:  # the reference's window under a bool mask is SDPA with (window ∧ mask)
        allowed = dense_mask(seq, slice(*tokens), window)[None, None] & keep[:, None, None, :]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        got = attention(q, k, v, plans[0], attn_mask=keep, backend="reference")
        assert (got - want).abs().max() < 1e-5


def test_masks_the_kernels_cannot_take_are_refused_with_a_reason():
    rows, cols, text = 5, 5, 4
    seq = rows * cols + text
    q, k, v = qkv(seq, dtype=torch.float32)
    plan = AttentionPlan((), (text, seq), LocalWindow(2.0, (rows, cols)))
    keep = text_keep(text, rows * cols, True)
    with pytest.raises(ValueError, match="flex kernel does not take"):
        attention(q, k, v, plan, attn_mask=keep, backend="flex")
    image_masked = keep.clone()
    image_masked[0, -1] = False  # an image key hidden: a local window cannot honour it
    with pytest.raises(ValueError, match="image keys"):
        attention(q, k, v, plan, attn_mask=image_masked, backend="tiled")
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, AttentionPlan((Perturbation(strengths(1.0).float(), "uniform", "joint"),), (text, seq)),
                  attn_mask=keep[:, :-1], backend="sdpa")
