"""Capture on HunyuanVideo 1.5: cross and self maps of the joint [video ; context] attention, checked against
dense softmax maps computed here from the q, k and bool key mask the processor passes to its attention calls,
on the (frames, rows, cols) video-token grid."""
import math

import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.processors import dispatch as dispatch_module
from dit_attn.toy.hunyuan_video15 import (HUNYUAN_VIDEO15_RUN, build_hunyuan_video15_i2v_pipeline,
                                          build_hunyuan_video15_pipeline)

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square cat"]
GRID = (3, 4, 4)  # 3 latent frames of 4×4 tokens at HUNYUAN_VIDEO15_RUN
VIDEO = math.prod(GRID)
LAYERS = 2


@pytest.fixture(scope="module")
def pipe():
    pipe = build_hunyuan_video15_pipeline(num_layers=LAYERS, num_heads=4, head_dim=8, guidance_scale=4.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt="a red circle", steps=2, **kwargs):
    args = dict(num_inference_steps=steps, output_type="latent", **HUNYUAN_VIDEO15_RUN) | kwargs
    args = {name: value for name, value in args.items() if value is not None}  # None: the argument is not passed
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **args).frames


class AttentionSpy:
    """(q, k as (B, H, S, D), the bool mask as (B, 1, S|1, S)) of every block attention call, in call order."""

    def __init__(self, monkeypatch):
        self.calls = []
        kernel, dispatch = dispatch_module.kernels.attention, dispatch_module.dispatch_attention_fn

        def add(q, k, mask):
            mask = mask if mask.ndim == 4 else mask[:, None, None, :]
            self.calls.append((q.transpose(1, 2).detach().clone(), k.transpose(1, 2).detach().clone(), mask.clone()))

        def kernel_spy(q, k, v, plan=None, **kwargs):
            add(q, k, kwargs["attn_mask"])
            return kernel(q, k, v, plan, **kwargs)

        def dispatch_spy(q, k, v, **kwargs):
            add(q, k, kwargs["attn_mask"])
            return dispatch(q, k, v, **kwargs)

        monkeypatch.setattr(dispatch_module.kernels, "attention", kernel_spy)
        monkeypatch.setattr(dispatch_module, "dispatch_attention_fn", dispatch_spy)


def video_rows(q, k, mask, keep=None):
    """(B, H, VIDEO, S): the video queries' softmax(q·kᵀ/√D) over the keys the mask (and `keep`, (VIDEO, S)) allow."""
    logits = (q[:, :, :VIDEO].double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = mask[:, :, :VIDEO] if mask.shape[2] > 1 else mask
    if keep is not None:
        allowed = allowed & keep
    return torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)


def test_cross_maps_with_cfg_batch_2_per_step_and_their_mean(pipe, monkeypatch):
    spy = AttentionSpy(monkeypatch)
    tokens = [0, 3, 9, 20]  # context positions: glyph/Qwen tokens and padding (masked: probability 0)
    with da.apply(pipe, da.Capture(kind="cross", tokens=tokens, heads=[1, 3], reduce=None)) as handle:
        run(pipe, PROMPTS)
        result = handle.maps
    assert result.maps.shape == (2, 2, LAYERS, 2, 4, *GRID) and result.grid == GRID and result.steps == (0, 1)
    assert result.tokens == ("t0", "t3", "t9", "t20")
    assert len(spy.calls) == 2 * 2 * LAYERS  # 2 steps × (cond, uncond) × blocks
    for step in range(2):
        for layer in range(LAYERS):
            q, k, mask = spy.calls[2 * step * LAYERS + layer]  # the conditional call comes first in a step
            assert q.shape[0] == 2 and not torch.equal(mask[0], mask[1])  # the two prompts' masks differ
            full = video_rows(q[:, [1, 3]], k[:, [1, 3]], mask)
            expected = full[..., [VIDEO + t for t in tokens]].permute(0, 1, 3, 2).unflatten(-1, GRID).float()
            assert (result.maps[step, :, layer] - expected).abs().max() < 1e-6, (step, layer)
    assert result.maps[..., 3, :, :, :].abs().max() == 0  # context position 20: padding in both rows
    with da.apply(pipe, da.Capture(kind="cross", tokens=tokens, heads=[1, 3])) as handle:
        run(pipe, PROMPTS)
        assert (handle.maps.maps - result.maps.mean(dim=0)).abs().max() < 1e-6


def test_cross_maps_under_text_patch_use_the_source_rows_context(pipe, monkeypatch):
    """At a patched layer the target row's video queries attend to its source row's context keys under that
    row's key mask: the map is over those keys."""
    spy = AttentionSpy(monkeypatch)
    edits = (da.TextPatch(layers=[1], source_prompt='a sign "hi" square cat'), da.Capture(kind="cross", steps=[0]))
    with da.apply(pipe, *edits) as handle:
        run(pipe, steps=1)
        result = handle.maps
    for layer in range(LAYERS):
        q, k, mask = spy.calls[layer]
        assert q.shape[0] == 2  # the conditional row and its source row
        assert torch.equal(k[0, :, VIDEO:], k[1, :, VIDEO:]) == (layer == 1)
        assert torch.equal(mask[0, 0, 0, VIDEO:], mask[1, 0, 0, VIDEO:]) == (layer == 1)  # the source's glyph mask
        expected = video_rows(q[:1], k[:1], mask[:1])[..., VIDEO:].permute(0, 1, 3, 2).unflatten(-1, GRID).float()
        assert (result.maps[:, layer] - expected).abs().max() < 1e-6, layer


def word_columns(pipe, prompts, words, images=0):
    """Each row's context positions of `words` (one token each), from the pipeline's own masks and token ids: the
    model's context is [valid image-context ; valid ByT5 ; valid Qwen ; padding] per row."""
    _, qwen_mask, _, glyph_mask = pipe.encode_prompt(prompt=prompts, batch_size=len(prompts), num_videos_per_prompt=1)
    crop = pipe.prompt_template_encode_start_idx
    columns = []
    for r, prompt in enumerate(prompts):
        messages = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}]
        ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        ids = ids[crop:][:int(qwen_mask[r].sum())]
        ahead = images + int(glyph_mask[r].sum())
        columns.append([ahead + ids.index(pipe.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0])
                        for w in words])
    return columns, glyph_mask.sum(dim=1)


def check_words(pipe, prompts, columns, **kwargs):
    with da.apply(pipe, da.Capture(kind="cross", tokens=["square", "cat"], layers=[1], steps=[0])) as handle:
        run(pipe, prompts, steps=1, **kwargs)
        words = handle.maps
    assert words.tokens == ("square", "cat")
    for r in range(len(prompts)):
        with da.apply(pipe, da.Capture(kind="cross", tokens=columns[r], layers=[1], steps=[0])) as handle:
            run(pipe, prompts, steps=1, **kwargs)
            assert torch.equal(words.maps[r], handle.maps.maps[r]), r


def test_words_are_their_qwen_tokens_after_the_glyph_tokens(pipe):
    """The quoted word makes glyph tokens in the second prompt only, so the same word sits at different
    context positions."""
    prompts = ["a red square cat", 'a sign "hi" square cat']
    columns, glyphs = word_columns(pipe, prompts, ["square", "cat"])
    assert glyphs[0] == 0 < glyphs[1] and columns[0] != columns[1]
    check_words(pipe, prompts, columns)
    with pytest.raises(ValueError, match="'dog' not in the prompt"):
        with da.apply(pipe, da.Capture(kind="cross", tokens=["dog"])):
            run(pipe, prompts, steps=1)


def test_words_on_image_to_video_come_after_the_image_context():
    pipe = build_hunyuan_video15_i2v_pipeline(num_layers=2, num_heads=2, head_dim=8, guidance_scale=1.0)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red square cat"]
    columns, _ = word_columns(pipe, prompts, ["square", "cat"], images=pipe.vision_num_semantic_tokens)
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    check_words(pipe, prompts, columns, image=image, height=None, width=None)


def box_keep(radius):
    """(VIDEO, VIDEO) the 3-D box window |dt| < rt, |dh| < rh, |dw| < rw."""
    cells = torch.tensor([(t, y, x) for t in range(GRID[0]) for y in range(GRID[1]) for x in range(GRID[2])],
                         dtype=torch.float64)
    return ((cells[:, None] - cells[None]).abs() < torch.tensor(radius, dtype=torch.float64)).all(-1)


def test_self_maps_with_a_3d_local_window_and_softpag(pipe, monkeypatch):
    radius = (1.0, 1.5, 2.5)
    edits = (da.LocalAttention(radius=radius, layers=[0], shape="box"), da.SoftPAG(heads=["L1H2"], u=0.5))
    locations = [(0, 0, 0), (2, 1, 3), 21]
    flat = [0, (2 * 4 + 1) * 4 + 3, 21]
    with da.apply(pipe, *edits):
        plain = run(pipe, PROMPTS, steps=1)
    spy = AttentionSpy(monkeypatch)
    with da.apply(pipe, *edits, da.Capture(kind="self", tokens=locations)) as handle:
        assert torch.equal(run(pipe, PROMPTS, steps=1), plain)
        result = handle.maps
    assert result.tokens == ("0,0,0", "2,1,3", "i21") and result.maps.shape == (2, LAYERS, 4, 3, *GRID)
    for layer in range(LAYERS):
        q, k, mask = spy.calls[layer]  # the conditional call
        seq = q.shape[2]
        keep = torch.ones(VIDEO, seq, dtype=torch.bool)
        if layer == 0:
            keep[:, :VIDEO] = box_keep(radius)
        full = video_rows(q, k, mask, keep)
        if layer == 1:  # SoftPAG's identity target (each query's own key) blended in on head 2
            full[:, 2] = 0.5 * full[:, 2] + 0.5 * torch.eye(VIDEO, seq, dtype=torch.float64)
        expected = full[:, :, flat, :VIDEO].unflatten(-1, GRID).float()  # (B, heads, locations, F, H, W)
        assert (result.maps[:, layer] - expected).abs().max() < 1e-6, layer
    corner = result.maps[:, 0, :, 0]  # (0, 0, 0) sees no other frame at rt = 1, nor rows beyond 1, columns beyond 2
    assert corner[:, :, 1:].abs().max() == 0 and corner[:, :, 0, 2:].abs().max() == 0
    assert corner[:, :, 0, :, 3:].abs().max() == 0 and corner[:, :, 0, 1, 2].min() > 0


def test_bad_input(pipe):
    for tokens, message in [([(0, 0)], "not a \\(frame, row, col\\) cell of this call's 3×4×4 video-token grid"),
                            ([(3, 0, 0)], "frames 0-2, rows 0-3, columns 0-3"), ([48], "flat indices 0-47")]:
        with pytest.raises(ValueError, match=message), da.apply(pipe, da.Capture(kind="self", tokens=tokens)):
            run(pipe, steps=1)
    with pytest.raises(ValueError, match="text-token indices \\[24\\] do not exist: this call has text tokens 0-23"):
        with da.apply(pipe, da.Capture(kind="cross", tokens=[24])):
            run(pipe, steps=1)
