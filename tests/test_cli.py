import json

import pytest
from PIL import Image

from dit_attn.cli import build_parser, main
from dit_attn.edits import HeadGuidance, LocalAttention
from dit_attn.io import parse_size


def test_generate_writes_pngs_with_settings_and_manifest(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "a red circle", "a blue square", "--num-inference-steps", "2", "--guidance-scale", "3",
                 "--size", "32", "--heads", "L1,L2H0", "--pag-scale", "2", "--u", "0.5", "--scope", "image", "--seed", "7",
                 "--out", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["a red circle", "a blue square"]
    assert [r["seed"] for r in lines] == [7, 8]
    image = Image.open(out / lines[0]["file"])
    assert image.size == (32, 32)
    settings = json.loads(image.text["dit-attn"])
    assert settings == {"prompt": "a red circle", "model": "tiny", "seed": 7, "num_inference_steps": 2, "guidance_scale": 3.0,
                        "height": 32, "width": 32, "dtype": "float32",
                        "edits": [HeadGuidance(heads=["L1", "L2H0"], scale=2.0, u=0.5, scope="image").to_dict()]}
    assert {k: v for k, v in lines[0].items() if k != "file"} == settings  # the manifest line holds the same settings
    assert not list(out.glob("*.tmp"))


def test_generate_is_reproducible_and_guidance_changes_the_image(tmp_path):
    def run(name, *extra):
        assert main(["generate", "a red circle", "--steps", "2", "--size", "32", "--out", str(tmp_path / name), *extra]) == 0
        return Image.open(next((tmp_path / name).glob("*.png"))).tobytes()

    plain = run("a")
    assert run("b") == plain
    assert run("c", "--heads", "L0", "--pag-scale", "5") != plain


def test_bad_input_exits_with_message(tmp_path, capsys):
    assert main(["generate", "x", "--heads", "L9H0", "--out", str(tmp_path)]) == 2
    assert "layers 0-5" in capsys.readouterr().err  # the default model: tiny, 6 layers
    assert main(["generate", "x", "--heads", "L0", "--u", "2", "--out", str(tmp_path)]) == 2
    assert "u must be a number in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "x", "--size", "big"])


def test_heads_command(capsys):
    assert main(["heads", "--presets"]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.5.attn" in out and "6 layers, 36 heads" in out and "sd3:dark" in out


def test_parse_size():
    assert parse_size("64") == (64, 64)
    assert parse_size("96x64") == (64, 96)


def test_generate_with_local_attention(tmp_path, capsys):
    import numpy as np

    def run(name, *extra):
        assert main(["generate", "a red circle", "--steps", "2", "--size", "32x48", "--out", str(tmp_path / name), *extra]) == 0
        return np.asarray(Image.open(next((tmp_path / name).glob("*.png"))), dtype=np.int16)

    plain = run("plain")
    assert np.abs(run("whole", "--local-radius", "100") - plain).max() <= 1  # a circle over the whole grid is stock
    local = run("local", "--local-radius", "1.5", "--local-downsample", "2")
    assert np.abs(local - plain).max() > 10
    settings = json.loads(Image.open(next((tmp_path / "local").glob("*.png"))).text["dit-attn"])
    assert settings["edits"] == [LocalAttention(1.5, downsample=2).to_dict()]
    assert (settings["height"], settings["width"]) == (48, 32)
    assert main(["generate", "x", "--local-radius", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "radius must be a finite number > 0" in capsys.readouterr().err
    assert main(["generate", "x", "--local-downsample", "4", "--out", str(tmp_path / "bad")]) == 2
    assert "need a local attention radius (--local-radius)" in capsys.readouterr().err


def test_older_flag_names_are_the_same_options():
    parse = build_parser().parse_args
    old = parse(["generate", "x", "--steps", "3", "--cfg", "2.5"])
    new = parse(["generate", "x", "--num-inference-steps", "3", "--guidance-scale", "2.5"])
    assert (old.num_inference_steps, old.guidance_scale) == (new.num_inference_steps, new.guidance_scale) == (3, 2.5)


def test_regenerate_from_the_png_is_bit_identical(tmp_path):
    import numpy as np

    from dit_attn.io import read_png_settings
    from dit_attn.loading import load_pipeline
    from dit_attn.workflows.batch import regenerate

    out = tmp_path / "out"
    assert main(["generate", "a red circle", "a blue square", "--steps", "2", "--size", "32x48", "--heads", "L1,L2H0",
                 "--pag-scale", "4", "--u", "0.5", "--local-radius", "1.5", "--max-sequence-length", "2",
                 "--out", str(out)]) == 0
    paths = sorted(out.glob("*.png"))
    settings = read_png_settings(paths[1])
    assert settings["max_sequence_length"] == 2 and [e["edit"] for e in settings["edits"]] == ["HeadGuidance", "LocalAttention"]
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    for path, given in zip(paths, (None, pipe)):  # the model of the settings loaded, or the pipeline given
        again = regenerate(path, given)
        assert np.array_equal(np.asarray(again), np.asarray(Image.open(path)))
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no 'dit-attn' settings chunk"):
        regenerate(tmp_path / "plain.png", pipe)


def test_sizes_the_model_cannot_draw_fail_once_after_it_loads(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a", "b", "--steps", "1", "--size", "36", "--out", str(out)]) == 2  # not whole 8 px tokens
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == (
        "dit-attn generate: error: height must be a multiple of 8 px on this model (whole tokens), got 36")
    assert not list(out.glob("*.png"))
    assert main(["generate", "a", "--steps", "1", "--size", "1024", "--out", str(out)]) == 2  # the tiny model: 256 px
    assert "height 1024 px is more than this model's largest side, 256 px" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "size": 36}\n')
    assert main(["generate", "--prompts", str(prompts), "--steps", "1", "--size", "32", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "1 done" in captured.out and "failed #1 'b': height must be a multiple of 8 px" in captured.err


def test_debug_is_a_top_level_flag_and_no_overwrite_a_generate_flag():
    args = build_parser().parse_args(["--debug", "generate", "x", "--no-overwrite"])
    assert args.debug and args.no_overwrite
    assert not build_parser().parse_args(["generate", "x"]).debug
