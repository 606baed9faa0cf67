"""The head atlas with maps_word: each head's map is the cross-attention map a `da.Capture(layers=[l], heads=[h])`
run of the first prompt and seed records; the page, the PNG, resume and the CLI carry it."""
import json

import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.guidance.atlas import atlas, render_html, render_png
from dit_attn.toy.configs import build_sd3_pipeline

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square"]
RUN = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=8, guidance_scale=3.0)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def mapped(pipe, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("atlas") / "a.checkpoint.json")
    return atlas(pipe, "color:red", PROMPTS, [1], batch_size=2, checkpoint=ckpt, progress=False, maps_word="circle",
                 **RUN), ckpt


def test_each_heads_map_is_a_capture_run_of_that_head(pipe, mapped):
    result, _ = mapped
    assert sorted(result.maps) == sorted(result.scores) == ["L0H0", "L0H1", "L1H0", "L1H1"]
    for layer, head in [(0, 1), (1, 0)]:
        with da.apply(pipe, da.Capture(layers=[layer], heads=[head], tokens=["circle"])) as handle:
            pipe(PROMPTS[0], generator=torch.Generator().manual_seed(1), **RUN)
            expected = handle.maps.maps[0, 0, 0, 0]  # (H, W)
        got = torch.tensor(result.maps[f"L{layer}H{head}"])
        assert got.shape == expected.shape == (8, 8)
        assert (got - expected).abs().max() < 1e-6
    assert not torch.allclose(torch.tensor(result.maps["L0H1"]), torch.tensor(result.maps["L1H0"]))


def test_page_png_and_resume_carry_the_maps(pipe, mapped, tmp_path):
    result, ckpt = mapped
    render_html(result, str(tmp_path / "a.html"))
    page = (tmp_path / "a.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * 4 + 1 and page.count('class="map"') == 4
    assert "map of “circle”" in page
    render_png(result, str(tmp_path / "a.png"))
    plain = atlas(pipe, "color:red", PROMPTS, [1], batch_size=2, progress=False, **RUN)
    render_png(plain, str(tmp_path / "plain.png"))
    assert Image.open(tmp_path / "a.png").width > Image.open(tmp_path / "plain.png").width  # maps beside thumbnails
    assert plain.scores == result.scores and not plain.maps  # the extra call changes no score
    again = atlas(pipe, "color:red", PROMPTS, [1], batch_size=2, checkpoint=ckpt, progress=False, maps_word="circle",
                  **RUN)
    assert again.maps == result.maps
    with pytest.raises(ValueError, match="written with maps_word='circle', not 'red': use another path"):
        atlas(pipe, "color:red", PROMPTS, [1], batch_size=2, checkpoint=ckpt, progress=False, maps_word="red", **RUN)


def test_a_word_not_in_the_first_prompt_is_refused_before_generating(pipe, monkeypatch):
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(ValueError, match=r"'square' not in the prompt 'a red circle'"):
        atlas(pipe, "color:red", PROMPTS, [1], progress=False, maps_word="square", **RUN)
    with pytest.raises(ValueError, match="maps_word must be one word of the first prompt"):
        atlas(pipe, "color:red", PROMPTS, [1], progress=False, maps_word="red circle", **RUN)


def test_cli_atlas_maps_word(tmp_path):
    from dit_attn.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["atlas", "--objective", "color:red", "--prompts", str(prompts), "--num-inference-steps", "1",
                 "--size", "32", "--model", "demo", "--maps-word", "red", "--out", str(tmp_path / "atlas")]) == 0
    saved = json.loads((tmp_path / "atlas.json").read_text())
    assert saved["maps_word"] == "red" and sorted(saved["maps"]) == sorted(saved["scores"])
    assert 'class="map"' in (tmp_path / "atlas.html").read_text()
