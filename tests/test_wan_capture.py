"""Capture on Wan: cross maps are attn2's softmax over the text keys and self maps attn1's edited map, both
checked against dense maps from the q/k the processors pass to their attention calls, on the
(frames, height, width) video-token grid."""
import math

import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.capture.video import latent_frame
from dit_attn.processors import dispatch as dispatch_module
from dit_attn.processors import wan as wan_module
from dit_attn.toy.wan import WAN_RUN, build_wan22_pipeline, build_wan_pipeline

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square cat"]
VIDEO = dict(num_frames=9, height=48, width=48, max_sequence_length=16)  # 3 latent frames of 3×3 tokens
GRID = (3, 3, 3)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_wan_pipeline(num_layers=3, num_heads=4, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt="a red circle", steps=2, size=VIDEO, **kwargs):
    args = dict(num_inference_steps=steps, output_type="latent", guidance_scale=3.0, **size) | kwargs
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **args).frames


class AttentionSpy:
    """(q, k) as (B, H, S, D) of every attn1 call (dit-attn's kernels or diffusers' dispatch) and every attn2
    call (the Wan processor's dispatch), in call order."""

    def __init__(self, monkeypatch):
        self.self_calls, self.cross_calls = [], []
        kernel, dispatch, cross = dispatch_module.kernels.attention, dispatch_module.dispatch_attention_fn, \
            wan_module.dispatch_attention_fn

        def add(into, q, k, layout):
            if layout == "BSHD":
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            into.append((q.detach().clone(), k.detach().clone()))

        def kernel_spy(q, k, v, plan=None, **kwargs):
            add(self.self_calls, q, k, kwargs.get("layout", "BHSD"))
            return kernel(q, k, v, plan, **kwargs)

        def dispatch_spy(q, k, v, **kwargs):
            add(self.self_calls, q, k, "BSHD")
            return dispatch(q, k, v, **kwargs)

        def cross_spy(q, k, v, **kwargs):
            add(self.cross_calls, q, k, "BSHD")
            return cross(q, k, v, **kwargs)

        monkeypatch.setattr(dispatch_module.kernels, "attention", kernel_spy)
        monkeypatch.setattr(dispatch_module, "dispatch_attention_fn", dispatch_spy)
        monkeypatch.setattr(wan_module, "dispatch_attention_fn", cross_spy)


def softmax_map(q, k, keep=None):
    """(B, H, Sq, Sk) softmax(q·kᵀ/√D) over the keys `keep` allows ((Sq, Sk) bool, None: all), in float64."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if keep is not None:
        logits = logits.masked_fill(~keep, -math.inf)
    return torch.softmax(logits, dim=-1)


def test_cross_maps_are_attn2_softmax_over_the_text_keys(pipe, monkeypatch):
    """Batch 2, CFG on, HeadGuidance in the same apply (its perturbed copies are not captured); per step."""
    guidance = da.HeadGuidance(heads=["L1H1"], scale=2.0)
    with da.apply(pipe, guidance):
        plain = run(pipe, PROMPTS)
    spy = AttentionSpy(monkeypatch)
    capture = da.Capture(kind="cross", tokens=[0, 2, 5], layers=[0, 2], heads=[1, 3], reduce=None)
    with da.apply(pipe, guidance, capture) as handle:
        assert torch.equal(run(pipe, PROMPTS), plain)
        result = handle.maps
    assert result.maps.shape == (2, 2, 2, 2, 3, *GRID) and result.grid == GRID and result.steps == (0, 1)
    assert result.tokens == ("t0", "t2", "t5")
    layers = 3
    assert len(spy.cross_calls) == 2 * 2 * layers  # 2 steps × (cond, uncond) × 3 blocks
    for step in range(2):
        for n, layer in enumerate((0, 2)):
            q, k = spy.cross_calls[2 * step * layers + layer]  # the conditional call comes first in a step
            assert q.shape[0] == 4 and k.shape[2] == 16  # 2 conditional rows + their 2 perturbed copies; 16 text keys
            full = softmax_map(q[:2, [1, 3]], k[:2, [1, 3]])  # (2, 2, 27, 16)
            expected = full[..., [0, 2, 5]].permute(0, 1, 3, 2).unflatten(-1, GRID).float()
            assert (result.maps[step, :, n] - expected).abs().max() < 1e-6, (step, layer)
    # every video query's probabilities over all text keys sum to one
    with da.apply(pipe, da.Capture(kind="cross", layers=[1])) as handle:
        run(pipe, steps=1)
        assert (handle.maps.maps.sum(dim=3) - 1).abs().max() < 1e-5


def test_cross_maps_under_text_patch_use_the_patched_keys(pipe, monkeypatch):
    spy = AttentionSpy(monkeypatch)
    edits = (da.TextPatch(layers=[1], source_prompt="a blue square cat"), da.Capture(kind="cross", layers=[0, 1]))
    with da.apply(pipe, *edits) as handle:
        run(pipe, steps=1)
        result = handle.maps
    for n, layer in enumerate((0, 1)):
        q, k = spy.cross_calls[layer]
        assert q.shape[0] == 2  # the conditional row and its source row
        expected = softmax_map(q[:1], k[:1]).permute(0, 1, 3, 2).unflatten(-1, GRID).float()
        assert (result.maps[:, n] - expected).abs().max() < 1e-6
        assert torch.equal(k[0], k[1]) == (layer == 1)  # layer 1's target row attends to the source's keys


def test_words_are_their_t5_tokens(pipe):
    prompts = ["a red square cat", "a blue square cat"]
    ids = [pipe.tokenizer(p)["input_ids"] for p in prompts]
    square, cat = (pipe.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("square", "cat"))
    assert len(square) == len(cat) == 1
    columns = [[row.index(square[0]), row.index(cat[0])] for row in ids]
    assert columns[0] == columns[1]
    with da.apply(pipe, da.Capture(kind="cross", tokens=["square", "cat"], layers=[1])) as handle:
        run(pipe, prompts, steps=1)
        words = handle.maps
    with da.apply(pipe, da.Capture(kind="cross", tokens=columns[0], layers=[1])) as handle:
        run(pipe, prompts, steps=1)
        indices = handle.maps
    assert words.tokens == ("square", "cat") and torch.equal(words.maps, indices.maps)
    with pytest.raises(ValueError, match="'dog' not in the prompt"):
        with da.apply(pipe, da.Capture(kind="cross", tokens=["dog"])):
            run(pipe, prompts, steps=1)


def ellipsoid_keep(grid, radius):
    cells = torch.tensor([(t, y, x) for t in range(grid[0]) for y in range(grid[1]) for x in range(grid[2])],
                         dtype=torch.float64)
    d = cells[:, None] - cells[None]
    return ((d / torch.tensor(radius, dtype=torch.float64)) ** 2).sum(-1) < 1


def test_self_maps_with_3d_local_attention_and_softpag(pipe, monkeypatch):
    radius = (1.0, 1.5, 1.5)
    edits = (da.LocalAttention(radius=radius, layers=[0, 1]), da.SoftPAG(heads=["L1H2"], u=0.5))
    locations = [(0, 0, 0), (2, 1, 2), 13]
    with da.apply(pipe, *edits):
        plain = run(pipe, steps=1)
    spy = AttentionSpy(monkeypatch)
    with da.apply(pipe, *edits, da.Capture(kind="self", tokens=locations, steps=[0])) as handle:
        assert torch.equal(run(pipe, steps=1), plain)
        result = handle.maps
    assert result.tokens == ("0,0,0", "2,1,2", "i13") and result.maps.shape == (1, 3, 4, 3, *GRID)
    flat = [0, (2 * 3 + 1) * 3 + 2, 13]
    keep = ellipsoid_keep(GRID, radius)
    for layer in range(3):
        q, k = spy.self_calls[layer]  # the conditional call of step 0
        full = softmax_map(q, k, keep if layer < 2 else None)
        if layer == 1:  # SoftPAG's identity target blended in on head 2 (the window does not restrict it)
            full[:, 2] = 0.5 * full[:, 2] + 0.5 * torch.eye(27, dtype=torch.float64)
        expected = full[0][:, flat].unflatten(-1, GRID).float()  # (heads, locations, F, H, W)
        assert (result.maps[0, layer] - expected).abs().max() < 1e-6, layer
    corner = result.maps[0, 0, :, 0]  # (0, 0, 0) sees no other frame at rt = 1, nor cells beyond 1.5 in-frame
    assert corner[:, 1:].abs().max() == 0 and corner[:, 0, 2:].abs().max() == 0 and corner[:, 0, 1, 1].min() > 0


def test_bad_input_and_two_experts():
    pipe = build_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for tokens, message in [([(0, 0)], "not a \\(frame, row, col\\) cell of this call.s 2×2×2 video-token grid"),
                            ([(2, 0, 0)], "frames 0-1, rows 0-1, columns 0-1"), ([8], "flat indices 0-7")]:
        with pytest.raises(ValueError, match=message), da.apply(pipe, da.Capture(kind="self", tokens=tokens)):
            run(pipe, steps=1, size=WAN_RUN)
    two = build_wan22_pipeline()
    two.set_progress_bar_config(disable=True)
    with da.apply(two, da.Capture(kind="cross", reduce=None), expert="E2") as handle:
        run(two, steps=4, size=WAN_RUN)
        assert handle.maps.steps == (2, 3)  # E2 runs the steps below the boundary
    with pytest.raises(ValueError, match="layer maps differ and Capture addresses layers by index"):
        da.apply(build_wan22_pipeline(num_layers_2=3), da.Capture(kind="cross"))


def test_two_experts_each_steps_maps_from_the_expert_that_ran_it(monkeypatch):
    pipe = build_wan22_pipeline()
    pipe.set_progress_bar_config(disable=True)
    spy = AttentionSpy(monkeypatch)
    with da.apply(pipe, da.Capture(kind="cross", tokens=[1, 3], reduce=None)) as handle:
        run(pipe, steps=4, size=WAN_RUN)
        result = handle.maps
    assert result.steps == (0, 1, 2, 3) and result.maps.shape == (4, 1, 2, 2, 2, 2, 2, 2)
    layers, grid = 2, (2, 2, 2)
    for step in range(4):
        for layer in range(layers):
            q, k = spy.cross_calls[2 * step * layers + layer]
            expected = softmax_map(q, k)[..., [1, 3]].permute(0, 1, 3, 2).unflatten(-1, grid).float()
            assert (result.maps[step, :, layer] - expected).abs().max() < 1e-6, (step, layer)


def test_overlay_frames_puts_each_latent_frames_map_on_its_frames():
    assert [latent_frame(i, 3) for i in range(9)] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    frames = [Image.new("RGB", (48, 32), (10 * i, 0, 0)) for i in range(9)]
    maps = torch.rand(3, 2, 3)
    out = da.capture.overlay_frames(frames, maps)
    assert len(out) == 9 and all(o.size == (48, 32) for o in out)
    for i in (0, 3, 8):
        assert out[i].tobytes() == da.capture.overlay(frames[i], maps[(i + 3) // 4]).tobytes()
    with pytest.raises(ValueError, match="3 latent frames decode to 9 video frames, got 5"):
        da.capture.overlay_frames(frames[:5], maps)
    with pytest.raises(ValueError, match="maps must be \\(frames, H, W\\)"):
        da.capture.overlay_frames(frames, maps[0])
    # a VAE compressing 2 frames into one latent frame (HunyuanVideo 1.5's toy): latent j holds frames 2j-1, 2j
    halved = da.capture.overlay_frames(frames[:5], maps, temporal_factor=2)
    for i, latent in enumerate([0, 1, 1, 2, 2]):
        assert halved[i].tobytes() == da.capture.overlay(frames[i], maps[latent]).tobytes()
    with pytest.raises(ValueError, match="temporal_factor must be a whole number >= 1"):
        da.capture.overlay_frames(frames, maps, temporal_factor=0)

