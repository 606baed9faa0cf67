"""Videos from `dit-attn generate` on a saved Wan pipeline: the written file decodes back to the frames of a
stock diffusers run with the same seed (lossless WebP exactly, GIF and MP4 within a codec tolerance that a
video of another seed fails), the sidecar's settings rebuild the video, writes never leave a partial file,
a killed batch resumes, and bad input is one line."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import dit_attn.video as video
from dit_attn.cli import main
from dit_attn.toy.wan import build_wan_pipeline
from dit_attn.workflows.batch import regenerate

RUN = ["--steps", "2", "--size", "48x32", "--frames", "5", "--max-sequence-length", "16", "--seed", "3"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "model"
    build_wan_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def stock(wan_dir):
    """The frames (uint8 arrays) stock diffusers makes from the saved pipeline, by seed."""
    pipe = DiffusionPipeline.from_pretrained(wan_dir)
    pipe.set_progress_bar_config(disable=True)

    def frames(seed, prompt="a red circle", num_frames=5):
        result = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=2, height=32, width=48,
                      num_frames=num_frames, max_sequence_length=16, output_type="pil").frames[0]
        return [np.asarray(frame.convert("RGB")) for frame in result]

    return frames


def psnr(a, b, luma=False) -> float:
    a, b = np.stack(a).astype(np.float64), np.stack(b).astype(np.float64)
    if luma:  # BT.601 luma: yuv420p keeps it at full resolution (the colour is subsampled 2x2)
        weights = np.array([0.299, 0.587, 0.114])
        a, b = a @ weights, b @ weights
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def only_file(folder, suffix):
    files = sorted(p for p in os.listdir(folder) if p.endswith(suffix))
    assert len(files) == 1, files
    return os.path.join(folder, files[0])


def test_webp_is_the_stock_frames_and_its_sidecar_rebuilds_it(wan_dir, stock, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--model", wan_dir, *RUN, "--fps", "8", "--video-format", "webp",
                 "--out", str(out)]) == 0
    path = only_file(out, ".webp")
    frames = video.read_video_frames(path)
    reference = stock(3)
    assert len(frames) == 5 and all(np.array_equal(a, b) for a, b in zip(frames, reference))
    assert not np.array_equal(np.stack(reference), np.stack(stock(4)))  # the seed matters: the check can fail
    sidecar = json.loads(open(path + ".json").read())
    line = json.loads((out / "manifest.jsonl").read_text())
    assert sidecar["settings"] == {k: v for k, v in line.items() if k not in ("file", "model_defaults")}
    assert sidecar["settings"]["num_frames"] == 5 and sidecar["settings"]["fps"] == 8.0
    assert sidecar["video"]["format"] == "webp" and sidecar["video"]["frames"] == 5
    assert line["file"] == os.path.basename(path) and "model_defaults" not in line
    again = regenerate(path)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(again, reference))


def test_guidance_nag_and_3d_local_attention_flags_reach_the_video(wan_dir, stock, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--model", wan_dir, *RUN, "--video-format", "webp", "--heads", "L1",
                 "--nag-negative", "blurry", "--local-radius", "1,2,2", "--out", str(out)]) == 0
    path = only_file(out, ".webp")
    edits = json.loads(open(path + ".json").read())["settings"]["edits"]
    assert [e["edit"] for e in edits] == ["HeadGuidance", "LocalAttention", "NAG"] and edits[1]["radius"] == [1, 2, 2]
    assert not np.array_equal(np.stack(video.read_video_frames(path)), np.stack(stock(3)))


def test_gif_and_mp4_decode_to_the_stock_frames_within_codec_tolerance(wan_dir, stock, tmp_path, monkeypatch):
    reference, other = stock(3), stock(4)
    assert main(["generate", "a red circle", "--model", wan_dir, *RUN, "--video-format", "gif", "--out",
                 str(tmp_path / "gif")]) == 0
    gif = video.read_video_frames(only_file(tmp_path / "gif", ".gif"))
    assert len(gif) == 5 and psnr(gif, reference) > 30 > psnr(gif, other)  # measured 34.5 dB and 22 dB
    from PIL import Image

    with Image.open(only_file(tmp_path / "gif", ".gif")) as image:
        assert image.info["duration"] == 60  # 16 fps in GIF's centiseconds: 6.25 → 6
    if not video.mp4_available():
        pytest.skip("imageio-ffmpeg is not installed (the 'video' extra)")
    assert main(["generate", "a red circle", "--model", wan_dir, *RUN, "--out", str(tmp_path / "mp4")]) == 0  # the default
    mp4 = video.read_video_frames(only_file(tmp_path / "mp4", ".mp4"))
    assert len(mp4) == 5 and psnr(mp4, reference, luma=True) > 33 > psnr(mp4, other, luma=True)  # measured 37.8 / 25.2
    monkeypatch.setattr(video, "mp4_available", lambda: False)
    assert video.default_video_format() == "gif"


def test_mp4_without_imageio_ffmpeg_is_one_line(wan_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(video, "mp4_available", lambda: False)
    assert main(["generate", "a", "--model", wan_dir, *RUN, "--video-format", "mp4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mp4 needs imageio-ffmpeg" in err and "dit-attn[video]" in err, err
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


@pytest.mark.parametrize("video_format", ["webp", "mp4"])
def test_a_crash_mid_write_leaves_no_partial_file(video_format, tmp_path, monkeypatch):
    if video_format == "mp4" and not video.mp4_available():
        pytest.skip("imageio-ffmpeg is not installed")
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / f"v.{video_format}"
    video.write_video_atomic(frames, path, {"seed": 1})
    before = path.read_bytes(), (tmp_path / f"v.{video_format}.json").read_text()
    writer = "_write_mp4" if video_format == "mp4" else "_write_animation"
    real = getattr(video, writer)

    def half_written_then_killed(frames, tmp, *args):
        real(frames, tmp, *args)
        with open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(video, writer, half_written_then_killed)
    with pytest.raises(KeyboardInterrupt):
        video.write_video_atomic(frames[::-1].copy(), path, {"seed": 2})
    assert sorted(os.listdir(tmp_path)) == [f"v.{video_format}", f"v.{video_format}.json"]  # no temporary file left
    assert (path.read_bytes(), (tmp_path / f"v.{video_format}.json").read_text()) == before
    assert video.verified_video_settings(path) == {"seed": 1}


def test_verified_settings_trust_only_the_video_the_sidecar_names(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "v.webp"
    video.write_video_atomic(frames, path, {"seed": 1}, fps=4)
    assert video.verified_video_settings(path) == {"seed": 1}
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="not the video its sidecar describes"):
        video.verified_video_settings(path)
    path.write_bytes(data)
    os.unlink(str(path) + ".json")
    with pytest.raises(ValueError, match="has no sidecar"):
        video.verified_video_settings(path)


def test_a_killed_video_batch_resumes_only_what_provably_matches(wan_dir, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square", "num_frames": 9}\n'
                       '{"prompt": "a green dot", "fps": 24}\n')
    out = tmp_path / "out"
    args = ["generate", "--prompts", str(prompts), "--model", wan_dir, *RUN, "--video-format", "webp", "--out", str(out)]
    real_write, writes = video.write_video_atomic, []

    def killed_after_the_second_video(frames, path, settings, fps, video_format, tmp_prefix):
        writes.append(os.path.basename(path))
        if len(writes) == 2:  # the video is on disk, the process dies before its sidecar and manifest line
            video.write_path_atomic(path, lambda tmp: video._write_animation(video.as_frames(frames), tmp, fps, "webp"))
            raise KeyboardInterrupt
        return real_write(frames, path, settings, fps, video_format, tmp_prefix)

    monkeypatch.setattr(video, "write_video_atomic", killed_after_the_second_video)
    assert main(args) == 130
    monkeypatch.setattr(video, "write_video_atomic", real_write)
    names = sorted(p for p in os.listdir(out) if p.endswith(".webp"))
    assert names == ["00000-a-red-circle.webp", "00001-a-blue-square.webp"]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 1
    first = (out / names[0]).read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "2 done (1 of them redone), 1 already finished" in captured.out
    assert "redone #1 'a blue square': its file is not a whole dit-attn video with its sidecar" in captured.err
    assert (out / names[0]).read_bytes() == first  # the finished one was not written again
    assert len(video.read_video_frames(out / names[1])) == 9
    assert json.loads(open(out / "00002-a-green-dot.webp.json").read())["video"]["fps"] == 24
    assert main(args) == 0 and "0 done, 3 already finished" in capsys.readouterr().out
    assert main([*args, "--fps", "12"]) == 0  # fps is a setting: the two that used the default are redone
    assert "2 done (2 of them redone), 1 already finished" in capsys.readouterr().out


@pytest.mark.parametrize("flags, fragment", [
    (["--local-radius", "2"], "makes videos: its local radius is FRAMES,HEIGHT,WIDTH token radii"),
    (["--local-radius", "1,2,2", "--local-downsample", "2"], "not implemented for 3-D (video) radii"),
    (["--frames", "6"], "num_frames must be 4k + 1 on this model"),
    (["--size", "40x32"], "width must be a multiple of 16"),
])
def test_bad_video_input_is_one_line_before_generating(flags, fragment, wan_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "a", "--model", wan_dir, *RUN, "--video-format", "webp", *flags, "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("dit-attn generate: error: ") and fragment in lines[0], lines
    assert not [p for p in os.listdir(out) if not p.startswith(".")]


def test_the_video_budget_is_checked_before_generating(wan_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_ATTN_MAX_VIDEO_PIXELS", str(9 * 48 * 32 - 1))
    args = ["generate", "a", "--model", wan_dir, *RUN, "--video-format", "webp", "--out", str(tmp_path / "o")]
    assert main([*args, "--frames", "9"]) == 2
    assert "9 frames of 48x32 are 13,824 pixels, more than this machine's video budget" in capsys.readouterr().err
    assert main(args) == 0  # 5 frames fit


def test_video_settings_on_an_image_model_are_bad_lines_of_a_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "b", "num_frames": 5}\n{"prompt": "c", "fps": 0}\n')
    assert main(["generate", "--prompts", str(prompts), "--steps", "1", "--size", "32", "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "p.jsonl:3: skipped: fps must be > 0" in captured.err and "1 done" in captured.out and "1 failed" in captured.out
    assert "failed #1 'b': num_frames is for video models; 'tiny' makes images" in captured.err


def test_an_image_to_video_pipeline_is_refused_in_one_line(tmp_path, capsys):
    from dit_attn.toy.wan import build_wan_i2v_pipeline

    build_wan_i2v_pipeline().save_pretrained(tmp_path / "i2v")
    assert main(["generate", "a", "--model", str(tmp_path / "i2v"), *RUN, "--video-format", "gif",
                 "--out", str(tmp_path / "o")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "WanImageToVideoPipeline makes a video from an input image" in lines[0], lines


def test_the_app_generate_tab_shows_a_video_model_s_frames(wan_dir, tmp_path):
    pytest.importorskip("gradio")
    from dit_attn.app.models import ModelRegistry
    from dit_attn.app.ui import AppActions

    actions = AppActions(ModelRegistry([wan_dir], embedded=()), str(tmp_path))
    path, settings = actions.generate(wan_dir, "a red circle", 2, 5.0, 3, "16", "", [], [], 1.0, "joint", "identity",
                                      3.0, None, progress=lambda *a, **k: None)
    assert path.endswith(".webp") and settings["num_frames"] == 81 and settings["fps"] == video.DEFAULT_FPS
    pipe = DiffusionPipeline.from_pretrained(wan_dir)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe("a red circle", generator=torch.Generator().manual_seed(3), num_inference_steps=2, height=16, width=16,
                 guidance_scale=5.0, output_type="pil").frames[0]
    frames = video.read_video_frames(path)
    assert len(frames) == 81 and all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, stock))
    assert video.verified_video_settings(path) == settings


def test_a_hunyuan_video_1_5_pipeline_writes_the_stock_frames(tmp_path):
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

    build_hunyuan_video15_pipeline().save_pretrained(tmp_path / "model")
    model, out = str(tmp_path / "model"), tmp_path / "out"
    assert main(["generate", "a red circle", "--model", model, "--steps", "2", "--size", "16", "--frames", "5",
                 "--seed", "3", "--video-format", "webp", "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe("a red circle", generator=torch.Generator().manual_seed(3), num_inference_steps=2, height=16, width=16,
                 num_frames=5, output_type="pil").frames[0]
    frames = video.read_video_frames(only_file(out, ".webp"))
    assert len(frames) == 5 and all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, stock))


def test_a_guidance_scale_reaches_a_pipeline_whose_guider_holds_it(tmp_path):
    """HunyuanVideo 1.5's call takes no guidance_scale: --guidance-scale runs the call with a guider at that scale."""
    from diffusers.guiders import ClassifierFreeGuidance

    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

    build_hunyuan_video15_pipeline().save_pretrained(tmp_path / "model")
    model, out = str(tmp_path / "model"), tmp_path / "out"
    assert main(["generate", "a red circle", "--model", model, "--steps", "2", "--size", "16", "--frames", "5",
                 "--seed", "3", "--guidance-scale", "2.5", "--video-format", "webp", "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    run = dict(generator=torch.Generator().manual_seed(3), num_inference_steps=2, height=16, width=16, num_frames=5,
               output_type="pil")
    default = pipe("a red circle", **run).frames[0]
    pipe.guider = ClassifierFreeGuidance(guidance_scale=2.5)
    run["generator"] = torch.Generator().manual_seed(3)
    scaled = pipe("a red circle", **run).frames[0]
    frames = video.read_video_frames(only_file(out, ".webp"))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, scaled))
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, default))
    assert video.verified_video_settings(only_file(out, ".webp"))["guidance_scale"] == 2.5
