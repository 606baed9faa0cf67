"""`localize` and `edit_text` on video pipelines (Wan 2.1 / 2.2, HunyuanVideo 1.5): each video scored frame by
frame against the unpatched video's frame, SSIM averaged over the frames; checked against stock runs with
one TextPatch and an SSIM computed here frame by frame."""
import json

import numpy as np
import pytest
import torch

import dit_attn as da
from dit_attn.localization import ssim
from dit_attn.toy.hunyuan_video15 import HUNYUAN_VIDEO15_RUN, build_hunyuan_video15_pipeline
from dit_attn.toy.wan import WAN_RUN, build_wan22_pipeline, build_wan_pipeline
from dit_attn.video import read_video_frames, read_video_settings

torch.set_num_threads(1)
PROMPT, OTHER = 'a sign that says "A"', "a blue square cat"
STEPS = 2


@pytest.fixture(scope="module")
def wan():
    pipe = build_wan_pipeline(num_layers=2, num_heads=2, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(guidance_scale=3.0, **WAN_RUN)


@pytest.fixture(scope="module")
def wan22():
    """Wan 2.2's two experts: a TextPatch patches the layer in both."""
    pipe = build_wan22_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(guidance_scale=3.0, **WAN_RUN)


@pytest.fixture(scope="module")
def hunyuan():
    pipe = build_hunyuan_video15_pipeline(num_layers=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(HUNYUAN_VIDEO15_RUN)


def stock_video(pipe, run, prompt=PROMPT, seed=0, edits=()):
    """(F, 3, H, W) in [0, 1] from the pipeline's own call, with `edits` applied."""
    generator = torch.Generator().manual_seed(seed)
    with da.apply(pipe, *edits) if edits else torch.no_grad():
        return pipe(prompt=prompt, generator=generator, num_inference_steps=STEPS, output_type="pt", **run).frames[0].float()


def frame_mean_ssim(video, reference) -> float:
    return sum(ssim(video[f:f + 1], reference[f:f + 1]).item() for f in range(len(video))) / len(video)


@pytest.mark.parametrize("family", ["wan", "wan22", "hunyuan"])
def test_localize_scores_each_layer_by_the_frame_mean_ssim_of_its_patched_video(family, request):
    pipe, run = request.getfixturevalue(family)
    result = da.localize(pipe, [(PROMPT, PROMPT), (PROMPT, OTHER)], layers=[0, 1], seeds=[0, 1],
                         num_inference_steps=STEPS, progress=False, **run)
    assert result.settings["score"] == "ssim_score" and result.settings["num_frames"] == run["num_frames"]
    originals = {seed: stock_video(pipe, run, seed=seed) for seed in (0, 1)}
    for entry in result.scores:
        same, other = entry.samples[:2], entry.samples[2:]  # samples: pair by pair, seed by seed
        assert same == pytest.approx([1.0, 1.0], abs=1e-6)
        expected = [frame_mean_ssim(stock_video(pipe, run, seed=seed, edits=[da.TextPatch(layers=entry.layers,
                                                                                          source_prompt=OTHER)]),
                                    originals[seed]) for seed in (0, 1)]
        assert other == pytest.approx(expected, abs=1e-5)
        assert max(other) < 1 - 1e-4
        assert entry.score == pytest.approx(np.mean(same + other), abs=1e-6)
    assert result.baseline["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < result.top.text_kv_share < result.top.block_share < 1


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_edit_text_video_is_the_textpatch_run_of_the_prompt_with_its_new_text(family, request):
    pipe, run = request.getfixturevalue(family)
    edit = da.edit_text(pipe, PROMPT, "B", layers=[1], generator=torch.Generator().manual_seed(3),
                        num_inference_steps=STEPS, **run)
    assert edit.is_video and edit.source_prompt == 'a sign that says "B"'
    original = stock_video(pipe, run, seed=3)
    edited = stock_video(pipe, run, seed=3, edits=[da.TextPatch(layers=[1], source_prompt='a sign that says "B"')])
    as_uint8 = lambda video: (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack([np.asarray(f) for f in edit.original]), as_uint8(original))
    assert np.array_equal(np.stack([np.asarray(f) for f in edit.edited]), as_uint8(edited))
    assert not np.array_equal(as_uint8(original), as_uint8(edited))
    side = edit.side_by_side
    width = edit.original[0].width
    assert len(side) == run["num_frames"] and side[0].size == (2 * width, edit.original[0].height)
    assert np.array_equal(np.asarray(side[2])[:, width:], np.asarray(edit.edited[2]))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory, wan):
    path = tmp_path_factory.mktemp("wan") / "model"
    wan[0].save_pretrained(path)
    return str(path)


CLI_RUN = ["--steps", "2", "--guidance-scale", "3", "--size", "32", "--num-frames", "5", "--max-sequence-length", "16"]


def test_cli_writes_the_edited_videos_with_sidecars_and_the_ranking(wan_dir, wan, tmp_path):
    from dit_attn.cli import main

    out = tmp_path / "edit"
    assert main(["edit-text", PROMPT, "--text", "B", "--layers", "1", "--model", wan_dir, *CLI_RUN, "--seed", "3",
                 "--video-format", "webp", "--fps", "8", "--out", str(out)]) == 0
    pipe, run = wan
    api = da.edit_text(pipe, PROMPT, "B", layers=[1], generator=torch.Generator().manual_seed(3),
                       num_inference_steps=STEPS, **run)
    for name, frames in (("original", api.original), ("edited", api.edited), ("side_by_side", api.side_by_side)):
        written = read_video_frames(out / f"{name}.webp")  # lossless
        assert np.array_equal(np.stack(written), np.stack([np.asarray(f) for f in frames]))
        sidecar = read_video_settings(out / f"{name}.webp")
        assert sidecar["video"]["fps"] == 8 and sidecar["video"]["frames"] == 5
        assert {k: sidecar["settings"][k] for k in ("source_prompt", "seed", "num_frames", "video")} == \
            {"source_prompt": 'a sign that says "B"', "seed": 3, "num_frames": 5, "video": name}
    loc = tmp_path / "loc"
    assert main(["localize", "--pair", PROMPT, OTHER, "--model", wan_dir, *CLI_RUN, "--out", str(loc)]) == 0
    data = json.loads((loc / "localization.json").read_text())
    expected = da.localize(pipe, [(PROMPT, OTHER)], num_inference_steps=STEPS, progress=False, **run)
    assert data["settings"]["score"] == "ssim_score" and data["settings"]["num_frames"] == 5
    assert data["ranking"] == [s.label for s in expected.ranking]
    assert [s["score"] for s in data["scores"]] == pytest.approx([s.score for s in expected.scores], abs=1e-6)
    assert (loc / "localization.png").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--num-frames", "4"], "num_frames must be 4k + 1"),
    (["--num-frames", "0"], "--num-frames"),
    (["--fps", "0"], "--fps must be > 0"),
])
def test_bad_video_flags_are_one_line(flags, fragment, wan_dir, tmp_path, capsys):
    from dit_attn.cli import main

    run = [a for a in CLI_RUN if a not in ("--num-frames", "5")]
    out = tmp_path / "o"
    assert main(["edit-text", PROMPT, "--text", "B", "--layers", "1", "--model", wan_dir, *run, *flags,
                 "--video-format", "gif", "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # past the loading bars
    assert len(lines) == 1 and lines[0].startswith("dit-attn edit-text: error: ") and fragment in lines[0], lines
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_video_flags_on_an_image_model_and_bad_api_input(wan, tmp_path, capsys):
    from dit_attn.cli import main

    assert main(["edit-text", PROMPT, "--text", "B", "--layers", "1", "--steps", "1", "--size", "32",
                 "--num-frames", "5", "--out", str(tmp_path / "o")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "--num-frames: for video models; " in lines[0], lines
    pipe, run = wan
    with pytest.raises(ValueError, match="num_frames must be 4k \\+ 1"):
        da.localize(pipe, [(PROMPT, OTHER)], num_inference_steps=1, **{**run, "num_frames": 6})
    with pytest.raises(ValueError, match="num_frames must be 4k \\+ 1"):
        da.edit_text(pipe, PROMPT, "B", layers=[0], num_inference_steps=1, **{**run, "num_frames": 6})
    with pytest.raises(ValueError, match=r"layers \[2\] do not exist: this model has layers 0-1"):
        da.localize(pipe, [(PROMPT, OTHER)], layers=[2], num_inference_steps=1, **run)


def test_image_to_video_needs_its_image_and_then_scores_like_text_to_video():
    from PIL import Image

    from dit_attn.toy.wan import WAN_I2V_RUN, build_wan_i2v_pipeline

    pipe = build_wan_i2v_pipeline(num_layers=2, num_heads=2, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    run = dict(guidance_scale=3.0, **WAN_I2V_RUN)
    with pytest.raises(ValueError, match="WanImageToVideoPipeline makes a video from an input image: pass image="):
        da.localize(pipe, [(PROMPT, OTHER)], num_inference_steps=1, **run)
    with pytest.raises(ValueError, match="makes a video from an input image"):
        da.edit_text(pipe, PROMPT, "B", layers=[0], num_inference_steps=1, **run)
    run["image"] = Image.new("RGB", (32, 32), (200, 30, 30))
    result = da.localize(pipe, [(PROMPT, OTHER)], layers=[1], num_inference_steps=STEPS, progress=False, **run)
    patched = stock_video(pipe, run, edits=[da.TextPatch(layers=[1], source_prompt=OTHER)])
    assert result.scores[0].samples == pytest.approx([frame_mean_ssim(patched, stock_video(pipe, run))], abs=1e-5)
