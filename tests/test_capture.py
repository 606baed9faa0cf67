"""Capture: attention maps recorded in the pipeline's own call, checked against dense attention maps
built here from the q and k every processor hands to its attention call."""
import json
import math

import pytest
import torch

import dit_attn as da
import dit_attn.processors.dispatch as dispatch_module
import dit_attn.processors.sd3 as sd3_module
from dit_attn.toy.chroma import build_chroma_pipeline
from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline
from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline
from dit_attn.toy.qwen_image import build_qwen_image_pipeline
from dit_attn.toy.z_image import build_z_image_pipeline

from .conftest import SIZE, flux_call, sd3_call

torch.set_num_threads(1)
STEPS = 3


@pytest.fixture(scope="module")
def chroma_pipe():
    pipe = build_chroma_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class AttentionInputs:
    """Every attention call's (q, k, mask) as (B, H, S, D), from the two places processors call attention:
    dit-attn's kernels and diffusers' dispatch (FLUX-layout layers with nothing to edit)."""

    def __init__(self, monkeypatch):
        self.calls, self.values = [], []
        assert sd3_module.kernels is dispatch_module.kernels
        original = sd3_module.kernels.attention

        def spy(q, k, v, plan=None, **kwargs):
            self._add(q, k, kwargs.get("attn_mask"), kwargs.get("layout", "BHSD"), v)
            return original(q, k, v, plan, **kwargs)

        monkeypatch.setattr(sd3_module.kernels, "attention", spy)
        dispatch = dispatch_module.dispatch_attention_fn

        def dispatch_spy(q, k, v, attn_mask=None, **kwargs):
            self._add(q, k, attn_mask, "BSHD", v)
            return dispatch(q, k, v, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(dispatch_module, "dispatch_attention_fn", dispatch_spy)

    def _add(self, q, k, mask, layout, v=None):
        if layout == "BSHD":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = None if v is None else v.transpose(1, 2)
        self.calls.append((q.detach().clone(), k.detach().clone(), None if mask is None else mask.clone()))
        self.values.append(None if v is None else v.detach().clone())


def dense_map(q, k, mask=None, keep=None):
    """(B, H, S, S) softmax(q·kᵀ/√D + mask) over the keys `keep` allows ((S, S) bool, None: all)."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        mask = mask if mask.ndim == 4 else mask[:, None, None, :]
        logits = logits + (mask.double() if mask.dtype != torch.bool else torch.where(mask, 0.0, -math.inf))
    if keep is not None:
        logits = logits.masked_fill(~keep, -math.inf)
    return torch.softmax(logits, dim=-1)


def disc_keep(seq_len, image, grid, radius):
    """Local attention: an image query sees image keys with dy² + dx² < r² and every text key."""
    keep = torch.ones(seq_len, seq_len, dtype=torch.bool)
    cells = torch.tensor([(y, x) for y in range(grid[0]) for x in range(grid[1])])
    d2 = ((cells[:, None] - cells[None]) ** 2).sum(-1)
    keep[image, image] = d2 < radius**2
    return keep


def cross_of(full, image, text_cols, grid):
    """(B, H, S, S) map → (B, H, T, h, w): image queries' probabilities on each text column (a list: summed)."""
    rows = full[:, :, image]
    cols = [rows[..., c].sum(-1) if isinstance(c, list) else rows[..., c] for c in text_cols]
    return torch.stack(cols, dim=2).unflatten(-1, grid).float()


def layer_calls(calls, layers, steps, per_step=1, first=0):
    """The attention inputs of the recorded call `first` of each step, by layer: {step: [per layer]}."""
    out = {}
    for step in range(steps):
        start = (step * per_step + first) * layers
        out[step] = calls[start:start + layers]
    return out


def sd3_pipe_for_capture():
    pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3():
    return sd3_pipe_for_capture()


@pytest.fixture(scope="module")
def flux():
    pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_cross_all_tokens_per_step_and_mean(sd3, monkeypatch):
    """[image ; text]: every text token, the conditional row (second half of CFG's batch), each step."""
    spy = AttentionInputs(monkeypatch)
    with da.apply(sd3, da.Capture(reduce=None)) as handle:
        sd3_call(sd3, steps=STEPS)
        per_step = handle.maps
    assert per_step.maps.shape[:3] == (STEPS, 1, 3) and per_step.grid == (8, 8) and per_step.steps == (0, 1, 2)
    image = slice(0, 64)
    for step, calls in layer_calls(spy.calls, 3, STEPS).items():
        for layer, (q, k, _) in enumerate(calls):
            assert q.shape[0] == 2
            full = dense_map(q[1:], k[1:])
            expected = cross_of(full, image, list(range(64, q.shape[2])), (8, 8))[0]
            assert (per_step.maps[step, 0, layer] - expected).abs().max() < 1e-6, (step, layer)
    with da.apply(sd3, da.Capture()) as handle:
        sd3_call(sd3, steps=STEPS)
        mean = handle.maps
    assert mean.maps.shape == per_step.maps.shape[1:]
    assert (mean.maps - per_step.maps.mean(dim=0)).abs().max() < 1e-7


def test_sd35_words_heads_steps_and_the_image_unchanged(monkeypatch):
    """SD3.5 with image-only attn2 in blocks 0 and 1 (not captured); words, heads, layers and a step chosen."""
    sd35 = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    sd35.set_progress_bar_config(disable=True)
    plain = sd3_call(sd35, steps=STEPS)
    spy = AttentionInputs(monkeypatch)
    capture = da.Capture(layers=[0, 2], heads=[1, 3], tokens="red, circle", steps=[1])
    with da.apply(sd35, capture) as handle:
        captured = sd3_call(sd35, steps=STEPS)
        result = handle.maps
    assert torch.equal(captured, plain)
    assert result.tokens == ("red", "circle") and result.layers == (0, 2) and result.heads == (1, 3)
    assert result.steps == (1,) and result.maps.shape == (1, 2, 2, 2, 8, 8)
    # the words' text positions from the pipeline's CLIP tokenizer (no T5 here: its 8 tokens are zeros)
    clip = sd35.tokenizer("a red circle", padding="max_length", max_length=sd35.tokenizer_max_length)["input_ids"]
    columns = [[64 + i for i, t in enumerate(clip) if t == sd35.tokenizer(word, add_special_tokens=False)["input_ids"][0]]
               for word in ("red", "circle")]
    assert [len(c) for c in columns] == [1, 1]
    joint = [c for c in spy.calls if c[0].shape[2] > 64]  # attn2 calls see the 64 image tokens only
    assert len(joint) == 3 * STEPS and len(spy.calls) == 5 * STEPS
    calls = layer_calls(joint, 3, STEPS)[1]
    for i, layer in enumerate((0, 2)):
        q, k, _ = calls[layer]
        full = dense_map(q[1:, [1, 3]], k[1:, [1, 3]])
        assert (result.maps[0, i] - cross_of(full, slice(0, 64), columns, (8, 8))[0]).abs().max() < 1e-6


def test_flux_double_and_single_blocks_with_softpag(flux, monkeypatch):
    """[text ; image] in double and single blocks; SoftPAG's blend is in the captured probabilities."""
    edit = da.SoftPAG(heads=["L1H2", "L2H0"], u=0.5)
    with da.apply(flux, edit):
        plain = flux_call(flux, steps=2)
    spy = AttentionInputs(monkeypatch)
    with da.apply(flux, edit, da.Capture(reduce=None)) as handle:
        captured = flux_call(flux, steps=2)
        result = handle.maps
    assert torch.equal(captured, plain)
    assert result.maps.shape[:4] == (2, 1, 4, 4)
    for step, calls in layer_calls(spy.calls, 4, 2).items():
        for layer, (q, k, _) in enumerate(calls):
            text_len = q.shape[2] - 64
            full = dense_map(q, k)
            for head in {1: [2], 2: [0]}.get(layer, []):
                full[:, head] = 0.5 * full[:, head] + 0.5 * torch.eye(q.shape[2], dtype=full.dtype)
            expected = cross_of(full, slice(text_len, None), list(range(text_len)), (8, 8))[0]
            assert (result.maps[step, 0, layer] - expected).abs().max() < 1e-6, (step, layer)


def test_local_attention_and_image_scope_softpag_in_cross_and_self_maps(sd3, monkeypatch):
    """With a local window the out-of-window image keys get nothing and the LSE runs over the window's keys;
    SoftPAG scope='image', identity: an image query keeps its own key and the text keys."""
    edits = (da.LocalAttention(radius=3), da.SoftPAG(heads=["L1H0"], u=1.0, scope="image"))
    locations = [(0, 0), (4, 5)]
    with da.apply(sd3, *edits):
        plain = sd3_call(sd3, steps=1)
    spy = AttentionInputs(monkeypatch)
    with da.apply(sd3, *edits, da.Capture(tokens=[0, 3, 17], steps=[0])) as handle:
        assert torch.equal(sd3_call(sd3, steps=1), plain)
        cross = handle.maps
    with da.apply(sd3, *edits, da.Capture(kind="self", tokens=locations, steps=[0])) as handle:
        assert torch.equal(sd3_call(sd3, steps=1), plain)
        self_maps = handle.maps
    assert self_maps.tokens == ("0,0", "4,5")
    for layer, (q, k, _) in enumerate(spy.calls[:3]):
        seq_len = q.shape[2]
        keep = disc_keep(seq_len, slice(0, 64), (8, 8), 3)
        full = dense_map(q[1:], k[1:], keep=keep)
        if layer == 1:  # head 0 replaced by the image-scope identity target (no window there)
            own = torch.eye(seq_len, dtype=torch.bool)
            own[:, 64:] = True
            own[64:] = True
            full[:, 0] = dense_map(q[1:, :1], k[1:, :1], keep=own)[:, 0]
        expected = cross_of(full, slice(0, 64), [64 + t for t in (0, 3, 17)], (8, 8))[0]
        assert (cross.maps[0, layer] - expected).abs().max() < 1e-6, layer
        for t, (y, x) in enumerate(locations):
            row = full[0, :, y * 8 + x, :64].unflatten(-1, (8, 8)).float()
            assert (self_maps.maps[0, layer, :, t] - row).abs().max() < 1e-6, (layer, t)
    far = self_maps.maps[0, 0, :, 0]  # (0, 0) sees nothing beyond radius 3
    assert far[:, 3:, 3:].abs().max() == 0 and far[:, :2, :2].min() > 0


def test_pooled_keys_of_local_attention_share_the_softmax(sd3, monkeypatch):
    """CLEAR's down-sampled keys: 2×2-averaged image keys every image query also sees take part in the
    normalisation (their own probabilities are not image-key probabilities and are left out of the maps)."""
    spy = AttentionInputs(monkeypatch)
    with da.apply(sd3, da.LocalAttention(radius=2, downsample=2), da.Capture(kind="self", tokens=[(3, 3)])) as handle:
        sd3_call(sd3, steps=1)
        result = handle.maps
    for layer, (q, k, _) in enumerate(spy.calls[:3]):
        q, k = q[1:].double(), k[1:].double()
        pooled = k[:, :, :64].unflatten(2, (4, 2, 4, 2)).mean(dim=(3, 5)).flatten(2, 3)  # (B, H, 16, D)
        keys = torch.cat([k, pooled], dim=2)
        logits = (q[:, :, 27:28] @ keys.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        keep = torch.cat([disc_keep(q.shape[2], slice(0, 64), (8, 8), 2)[27], torch.ones(16, dtype=torch.bool)])
        row = torch.softmax(logits.masked_fill(~keep, -math.inf), dim=-1)[0, :, 0, :64].unflatten(-1, (8, 8))
        assert (result.maps[0, layer, :, 0] - row.float()).abs().max() < 1e-6, layer
        assert result.maps[0, layer, :, 0].sum(dim=(-1, -2)).max() < 0.999  # the pooled keys took their share


def test_chroma_mask_in_the_probabilities(chroma_pipe, monkeypatch):
    spy = AttentionInputs(monkeypatch)
    args = dict(num_inference_steps=1, guidance_scale=1.0, max_sequence_length=8, output_type="latent", **SIZE)
    with da.apply(chroma_pipe, da.Capture(tokens=list(range(8)))) as handle:
        chroma_pipe("a red circle", generator=torch.Generator().manual_seed(0), **args)
        result = handle.maps
    for layer, (q, k, mask) in enumerate(spy.calls[:2]):
        assert mask is not None
        full = dense_map(q, k, mask)
        expected = cross_of(full, slice(8, None), list(range(8)), result.grid)[0]
        assert (result.maps[0, layer] - expected).abs().max() < 1e-6
    # the padding keys the mask demotes get less than the prompt's keys
    assert result.maps[0, :, :, -1].mean() < result.maps[0, :, :, 1].mean()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_concept_maps_from_the_concept_rows(family, sd3, flux, monkeypatch):
    """ConceptAttention: the image is the uncaptured one; a second call per captured step runs the
    conditional row with a concept row whose image q/k/v are the conditional row's; each map is the
    softmax over the concepts of image outputs · concept outputs, computed here from that call's q, k, v."""
    pipe, call = (sd3, sd3_call) if family == "sd3" else (flux, flux_call)
    layers = len(da.layers(pipe))
    plain = call(pipe, steps=2)
    concepts = ("circle", "square", "blue")
    spy = AttentionInputs(monkeypatch)
    with da.apply(pipe, da.Capture(kind="concept", tokens=concepts, reduce=None)) as handle:
        captured = call(pipe, steps=2)
        result = handle.maps
    assert torch.equal(captured, plain)
    assert result.tokens == concepts and result.maps.shape == (2, 1, layers, 4, 3, 8, 8) and result.grid == (8, 8)
    assert len(spy.calls) == 2 * 2 * layers  # per step: the pipeline's call, then the concept call
    if family == "sd3":  # the concept prompt's CLIP positions (each concept one token), after the 64 image tokens
        ids = pipe.tokenizer(" ".join(concepts))["input_ids"]
        columns = [64 + ids.index(pipe.tokenizer(w, add_special_tokens=False)["input_ids"][0]) for w in concepts]
    else:  # T5 positions, before the image tokens
        ids = pipe.tokenizer_2(" ".join(concepts))["input_ids"]
        columns = [ids.index(pipe.tokenizer_2(w, add_special_tokens=False)["input_ids"][0]) for w in concepts]
    for step in range(2):
        main = spy.calls[2 * step * layers:(2 * step + 1) * layers]
        extra = range((2 * step + 1) * layers, (2 * step + 2) * layers)
        for layer, index in enumerate(extra):
            q, k, _ = spy.calls[index]
            v = spy.values[index]
            assert q.shape[0] == 2
            image = slice(0, 64) if family == "sd3" else slice(q.shape[2] - 64, None)
            for x in (q, k, v):  # the concept row sees the conditional row's image
                assert torch.equal(x[1, :, image], x[0, :, image])
            # the conditional row runs again in a wider batch: the same queries up to rounding
            assert (main[layer][0][-1, :, image] - q[0, :, image]).abs().max() < 1e-4
            out = dense_map(q, k) @ v.double()
            scores = out[0, :, image] @ out[1, :, columns].transpose(-1, -2)  # (heads, 64, concepts)
            expected = torch.softmax(scores, dim=-1).transpose(1, 2).unflatten(-1, (8, 8)).float()
            assert (result.maps[step, 0, layer] - expected).abs().max() < 1e-5, (step, layer)


FAMILIES = {  # builder, call arguments, where the image tokens sit (text first or last), grid
    "qwen_image": (build_qwen_image_pipeline, dict(true_cfg_scale=1.0, max_sequence_length=16), "last", (4, 4)),
    "z_image": (build_z_image_pipeline, dict(guidance_scale=0.0, max_sequence_length=64), "first", (8, 8)),
    "hunyuan_image": (build_hunyuan_image_pipeline, dict(), "first", (4, 4)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_other_families_through_their_dispatch(name, monkeypatch):
    build, args, image_at, grid = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    spy = AttentionInputs(monkeypatch)
    call = dict(num_inference_steps=1, output_type="latent", height=32, width=32, **args)
    with da.apply(pipe, da.Capture(tokens=[0, 2])) as handle:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **call)
        result = handle.maps
    assert result.grid == grid
    n = grid[0] * grid[1]
    layers = len(da.layers(pipe))
    for layer, (q, k, mask) in enumerate(spy.calls[:layers]):
        seq_len = q.shape[2]
        image = slice(0, n) if image_at == "first" else slice(seq_len - n, seq_len)
        text = [i for i in range(seq_len) if not image.start <= i < image.stop]
        expected = cross_of(dense_map(q[:1], k[:1], None if mask is None else mask[:1]), image, [text[0], text[2]], grid)
        assert (result.maps[0, layer] - expected[0]).abs().max() < 1e-6, layer


def test_head_guidance_rows_are_not_captured(sd3):
    """The first step's maps with HeadGuidance (its perturbed copies ride in the same call) are the stock rows'."""
    capture = da.Capture(steps=[0])
    with da.apply(sd3, capture) as handle:
        sd3_call(sd3, steps=2)
        alone = handle.maps.maps
    with da.apply(sd3, da.HeadGuidance(heads=["L0"], scale=2.0, share_prefix=False), capture) as handle:
        sd3_call(sd3, steps=2)
        guided = handle.maps.maps
    assert guided.shape == alone.shape and (guided - alone).abs().max() < 1e-6


def test_settings_round_trip_and_bad_input(sd3):
    edit = da.Capture(layers=[1], tokens=["red"], kind="cross", steps=[0], reduce=None)
    assert da.edit_from_dict(json.loads(json.dumps(edit.to_dict()))) == edit
    with pytest.raises(ValueError, match=r"kind must be one of \('cross', 'self', 'concept'\)"):
        da.Capture(kind="maps")
    with pytest.raises(ValueError, match="concept words"):
        da.Capture(kind="concept")
    with pytest.raises(ValueError, match="not with TextPatch, TextGuard or NAG|without TextPatch, TextGuard or NAG"):
        da.apply(sd3, da.Capture(kind="concept", tokens=["cat"]), da.NAG(negative_prompt="blue"))
    with pytest.raises(ValueError, match="layers 0-2"):
        da.apply(sd3, da.Capture(layers=[3]))
    with pytest.raises(ValueError, match="heads 0-3"):
        da.apply(sd3, da.Capture(heads=[4]))
    with da.apply(sd3, da.Capture(tokens="red,dog")) as handle:
        with pytest.raises(ValueError, match=r"'dog' not in the prompt 'a red circle'; its words: a, red, circle"):
            sd3_call(sd3, steps=1)
        with pytest.raises(RuntimeError, match="no maps captured"):
            handle.maps
    with da.apply(sd3, da.Capture(kind="self", tokens=[(8, 0)])):
        with pytest.raises(ValueError, match=r"outside the 8×8 token grid \(rows 0-7"):
            sd3_call(sd3, steps=1)
    with da.apply(sd3, da.Capture(tokens=[24])):
        with pytest.raises(ValueError, match="text tokens 0-23"):
            sd3_call(sd3, steps=1)
    with da.apply(sd3, da.Capture(steps=[5])):
        with pytest.raises(ValueError, match="steps 0-0"):
            sd3_call(sd3, steps=1)
    with da.apply(sd3, da.SoftPAG(heads=["L0H0"])) as handle:
        with pytest.raises(ValueError, match="no Capture"):
            handle.maps


def test_overlay_shapes_and_colours():
    from PIL import Image

    image = Image.new("RGB", (32, 32), (0, 128, 0))
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    one = da.capture.overlay(image, heat, alpha=1.0)
    assert one.size == (32, 32)
    assert one.getpixel((0, 0)) == (252, 255, 164) and one.getpixel((31, 31)) == (0, 0, 4)  # the map's maximum, minimum
    many = da.capture.overlay(image, torch.rand(3, 4, 4), alpha=0.0)
    assert len(many) == 3 and all(m.getpixel((5, 5)) == (0, 128, 0) for m in many)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        da.capture.overlay(image, torch.rand(1, 2, 4, 4))


def test_cli_writes_overlays_and_index(tmp_path, capsys):
    from dit_attn.cli.main import main

    out = tmp_path / "maps"
    code = main(["maps", "a large red circle on a blue background", "--words", "red,circle", "--layers", "1,4",
                 "--num-inference-steps", "2", "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"dit-attn maps: 4 maps of 2 layers -> {out / 'maps.json'}"
    index = json.loads((out / "maps.json").read_text())
    assert index["tokens"] == ["red", "circle"] and index["layers"] == [1, 4] and index["steps"] == [0, 1]
    assert sorted(m["file"] for m in index["maps"]) == ["L1_circle.png", "L1_red.png", "L4_circle.png", "L4_red.png"]
    assert all((out / m["file"]).is_file() for m in index["maps"]) and (out / "image.png").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".partial")]
    concept = tmp_path / "concept"
    assert main(["maps", "a red circle", "--kind", "concept", "--words", "circle,sky", "--layers", "5",
                 "--num-inference-steps", "1", "--out", str(concept)]) == 0
    capsys.readouterr()
    index = json.loads((concept / "maps.json").read_text())
    assert index["kind"] == "concept" and sorted(m["file"] for m in index["maps"]) == ["L5_circle.png", "L5_sky.png"]
    assert main(["maps", "a red circle", "--words", "dog", "--num-inference-steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dit-attn maps: error: Capture: 'dog' not in the prompt 'a red circle'; its words: a, red, circle"]
    assert main(["maps", "a red circle", "--layers", "x", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dit-attn maps: error: --layers must be comma-separated indices, e.g. 0,3,5; got 'x'"]


def test_chroma_true_cfg_words_and_concepts_leave_the_image(chroma_pipe):
    """Two calls per step (conditional first): words and concepts on the conditional call, image unchanged."""
    args = dict(num_inference_steps=2, guidance_scale=3.0, negative_prompt="blue", max_sequence_length=8,
                output_type="latent", **SIZE)
    plain = chroma_pipe("a red circle", generator=torch.Generator().manual_seed(0), **args).images
    for edit in (da.Capture(tokens="red"), da.Capture(kind="concept", tokens=["circle", "square"])):
        with da.apply(chroma_pipe, edit) as handle:
            assert torch.equal(chroma_pipe("a red circle", generator=torch.Generator().manual_seed(0), **args).images, plain)
            assert handle.maps.steps == (0, 1) and handle.maps.maps.shape[:2] == (1, 2)
