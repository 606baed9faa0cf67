import json

import pytest
from PIL import Image

from dit_attn.cli import main
from dit_attn.io import parse_size


def test_generate_writes_pngs_with_settings_and_manifest(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "a red circle", "a blue square", "--steps", "2", "--size", "32", "--heads", "L1,L2H0",
                 "--pag-scale", "2", "--u", "0.5", "--scope", "image", "--seed", "7", "--out", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["a red circle", "a blue square"]
    assert [r["seed"] for r in lines] == [7, 8]
    image = Image.open(out / lines[0]["file"])
    assert image.size == (32, 32)
    settings = json.loads(image.text["dit-attn"])
    assert settings["heads"] == ["L1", "L2H0"] and settings["u"] == 0.5 and settings["scope"] == "image"
    assert (settings["width"], settings["height"]) == (32, 32)
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
    assert settings["local_radius"] == 1.5 and settings["local_downsample"] == 2
    assert main(["generate", "x", "--local-radius", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "radius must be a finite number > 0" in capsys.readouterr().err
    assert main(["generate", "x", "--local-downsample", "4", "--out", str(tmp_path / "bad")]) == 2
    assert "need a local attention radius (--local-radius)" in capsys.readouterr().err
