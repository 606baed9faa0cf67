"""The CLI on a local directory of each family's pipeline: the head map and a guided generation."""
import json

import pytest
from PIL import Image

from dit_attn.cli import main

BUILDERS = {
    "chroma": ("dit_attn.toy.chroma", "build_chroma_pipeline", "single_transformer_blocks.0.attn"),
    "qwen_image": ("dit_attn.toy.qwen_image", "build_qwen_image_pipeline", "transformer_blocks.0.attn"),
    "z_image": ("dit_attn.toy.z_image", "build_z_image_pipeline", "layers.0.attention"),
    "flux2_klein": ("dit_attn.toy.flux2", "build_flux2_klein_pipeline", "single_transformer_blocks.0.attn"),
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_heads_and_guided_generate_on_a_saved_pipeline(family, tmp_path, capsys):
    import importlib

    module, builder, module_name = BUILDERS[family]
    model = tmp_path / "model"
    getattr(importlib.import_module(module), builder)().save_pretrained(model)
    assert main(["heads", "--model", str(model)]) == 0
    assert module_name in capsys.readouterr().out
    out = tmp_path / "out"
    args = ["generate", "a red circle", "--model", str(model), "--steps", "2", "--size", "32", "--seed", "3", "--out"]
    assert main([*args, str(out / "plain")]) == 0
    assert main([*args, str(out / "guided"), "--heads", "L1", "--pag-scale", "3"]) == 0
    plain, guided = (next((out / name).glob("*.png")) for name in ("plain", "guided"))
    settings = json.loads(Image.open(guided).text["dit-attn"])
    assert settings["model"] == str(model) and settings["edits"][0]["heads"] == ["L1"]
    assert Image.open(plain).tobytes() != Image.open(guided).tobytes()
