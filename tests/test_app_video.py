"""Video models in the app (Generate/Compare/Maps on Wan, both experts' heads on Wan 2.2, the other tabs refused in one
line) and in `dit-attn maps`: frames and maps against stock diffusers runs and independent `da.Capture` runs."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import dit_attn as da
from dit_attn.app import ModelRegistry, serve
from dit_attn.app.ui import AppActions
from dit_attn.cli import main
from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline
from dit_attn.toy.wan import build_wan22_pipeline, build_wan_pipeline
from dit_attn.video import read_video_frames

from .test_app import free_port, page  # noqa: F401  (page: headless chromium on this module's server)

PROMPT = "a red circle"
SEED = 3


def form(model, **changes) -> list:
    """The generate/compare inputs in the page's order: 2 steps, 32 px frames."""
    values = dict(model=model, prompt=PROMPT, steps=2, cfg=4.5, seed=SEED, size="32", heads="", picked=[], presets=[],
                  u=1.0, scope="joint", target="identity", pag_scale=3.0, local_radius=None, start=0.0, end=1.0,
                  local_downsample=None, nag_negative="", nag_scale=5.0, frames=5, fps=8)
    return list({**values, **changes}.values())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-models")
    build_wan_pipeline().save_pretrained(root / "wan")
    build_wan22_pipeline(num_layers_2=3).save_pretrained(root / "wan22")  # the experts' layer maps differ
    build_hunyuan_video15_pipeline().save_pretrained(root / "hv15")
    return {"wan": str(root / "wan"), "wan22": str(root / "wan22"), "hv15": str(root / "hv15")}


@pytest.fixture(scope="module")
def registry(dirs):
    return ModelRegistry([dirs["wan"], dirs["wan22"], dirs["hv15"]], embedded=("demo",))


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    # the Wan model first: the page opens on it
    app = serve(ModelRegistry([dirs["wan"], dirs["wan22"]], embedded=()), port=free_port(),
                output_dir=str(tmp_path_factory.mktemp("video-out")), block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server.local_url, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("video-dl")))


def loaded(path: str):
    """An independent copy of a saved model, loaded and run by stock diffusers (as loaded: safetensors may map the
    weights unaligned, which moves the CPU matmuls' rounding, so an in-memory build is not the same model to the bit)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock(dirs):
    """The Wan 2.1 model the app serves, run by stock diffusers."""
    return loaded(dirs["wan"])


def stock_frames(pipe, num_frames=5, size=32, **call) -> np.ndarray:
    call = {"guidance_scale": 4.5, **call}
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), num_inference_steps=2, height=size, width=size,
               num_frames=num_frames, output_type="pil", **{k: v for k, v in call.items() if v is not None}).frames[0]
    return np.stack([np.asarray(frame.convert("RGB")) for frame in out])


def frames_of(path) -> np.ndarray:
    return np.stack(read_video_frames(path))


def test_frames_field_reaches_the_pipeline_and_the_video_is_the_stock_one(client, dirs, stock):
    path, settings = client.predict(*form(dirs["wan"], frames=9, fps=8), api_name="/generate")
    assert path.endswith(".webp") and Image.open(path).n_frames == 9
    assert np.array_equal(frames_of(path), stock_frames(stock, num_frames=9))
    assert (settings["num_frames"], settings["fps"], settings["height"]) == (9, 8, 32)
    shown = Image.open(path)
    shown.load()
    assert shown.info["duration"] == 125  # ms a frame at 8 fps


@pytest.mark.parametrize("frames, fps, message", [
    (6, 8, r"num_frames must be 4k \+ 1 on this model .*e\.g\. 5 or 9; got 6"),
    (4001, 8, r"frames must be in \[1, "),
    (801, 8, r"frames of 32x32 are .* more than this machine's video budget"),
    (5, -1, "FPS: Value -1 is less than minimum value 0"),
    (5, 10**6, r"fps must be (<=|&lt;=) 240.0, got 1000000"),
])
def test_bad_frames_or_fps_are_one_readable_line(client, dirs, frames, fps, message, monkeypatch):
    monkeypatch.setenv("DIT_ATTN_MAX_VIDEO_PIXELS", str(800 * 32 * 32))  # read by the server in this process
    with pytest.raises(AppError, match=message) as err:
        client.predict(*form(dirs["wan"], frames=frames, fps=fps), api_name="/generate")
    assert "\n" not in str(err.value).strip() and "Traceback" not in str(err.value)


def test_compare_on_video_gives_both_videos_and_their_difference(client, dirs, stock):
    without, with_edit, difference, summary = client.predict(*form(dirs["wan"], heads="L1", pag_scale=5.0),
                                                             api_name="/compare")
    plain = stock_frames(stock)
    assert np.array_equal(frames_of(without), plain)
    with da.apply(stock, da.HeadGuidance(heads=["L1"], scale=5.0, u=1.0)):
        guided = stock_frames(stock)
    assert np.array_equal(frames_of(with_edit), guided) and not np.array_equal(guided, plain)
    diff = np.abs(plain.astype(np.int16) - guided.astype(np.int16))
    peak = int(diff.max())
    assert np.array_equal(frames_of(difference), np.clip(np.rint(diff * (255.0 / peak)), 0, 255).astype(np.uint8))
    assert f"Largest pixel difference: {peak}/255" in summary


@pytest.mark.parametrize("tab", ["sets", "atlas", "text_edit"])
def test_image_only_tabs_refuse_a_video_model_in_one_line(registry, dirs, tab, tmp_path):
    actions = AppActions(registry, str(tmp_path))
    calls = {"sets": lambda m: actions.sets(m, 2, 4.5, 0, "", "1x2", "a\nb", "SET", "", None, 0),
             "atlas": lambda m: actions.atlas(m, "judge", "a red circle on a white background", "0", 1, 1.0, 3.0, 4.5,
                                              "32", "joint", "identity"),
             "text_edit": lambda m: actions.text_edit(m, 2, 4.5, 0, "32", 'a sign that says "A"', "B", "", 0.0, "")}
    name = {"sets": "Sets", "atlas": "Head atlas", "text_edit": "Text edit"}[tab]
    with pytest.raises(ValueError, match=f"^the {name} tab makes images; WanPipeline makes videos: use the Generate"):
        calls[tab](dirs["wan"])
    assert not os.listdir(tmp_path)


def test_hunyuan_video15_generates_without_step_callbacks(registry, dirs, tmp_path):
    path, settings = AppActions(registry, str(tmp_path)).generate(*form(dirs["hv15"]), progress=lambda *a, **k: None)
    stock = loaded(dirs["hv15"])  # takes no callback_on_step_end; CFG lives in its guider
    stock.guider = stock.guider.new(guidance_scale=4.5)
    assert np.array_equal(frames_of(path), stock_frames(stock, guidance_scale=None)) and settings["num_frames"] == 5


def test_two_expert_pickers_list_both_experts_and_address_one(client, registry, dirs):
    model = registry.get(dirs["wan22"])
    pipe = model.pipe
    expected = [f"{expert}:L{info.index}H{head}" for expert in ("E1", "E2")
                for info in da.layers(pipe, expert=expert) for head in range(info.heads)]
    assert model.head_choices() == expected and sum(c.startswith("E2:L2") for c in expected) == 2  # E2's third layer
    assert "E1 2 layers" in model.summary() and "E2 3 layers" in model.summary()
    picked, _, _, _ = AppActions(registry, "/unused").model_changed(dirs["wan22"])
    assert [c if isinstance(c, str) else c[0] for c in picked["choices"]] == expected

    stock = loaded(dirs["wan22"])
    path, settings = client.predict(*form(dirs["wan22"], heads="E2:L2H1"), api_name="/generate")
    assert settings["edits"][0]["heads"] == ["E2:L2H1"]
    with da.apply(stock, da.HeadGuidance(heads=["E2:L2H1"], scale=3.0, u=1.0)):
        guided = stock_frames(stock)
    assert np.array_equal(frames_of(path), guided) and not np.array_equal(guided, stock_frames(stock))
    with pytest.raises(AppError, match="layer 2 .* out of range: this model has layers 0-1"):
        client.predict(*form(dirs["wan22"], heads="E1:L2H0"), api_name="/generate")


def capture_run(pipe, capture, num_frames=5):
    with da.apply(pipe, capture) as handle:
        frames = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), num_inference_steps=2, guidance_scale=4.5,
                      height=32, width=32, num_frames=num_frames, output_type="pil").frames[0]
    return frames, handle.maps


def test_app_maps_on_wan_are_animated_overlays_of_a_capture_run(client, dirs, stock):
    image, gallery, index = client.predict(*form(dirs["wan"]), "cross", "red, circle", "1", "", None, None, True,
                                           api_name="/maps")
    data = json.load(open(index))
    assert data["axes"] == ["frame", "row", "col"] and [m["token"] for m in data["maps"]] == ["red", "circle"]
    frames, result = capture_run(stock, da.Capture(layers=[1], tokens=["red", "circle"]))
    assert np.array_equal(frames_of(image), np.stack([np.asarray(f) for f in frames]))
    expected = result.maps[0, 0].mean(dim=0)  # (words, F, H, W), heads averaged
    for word, (entry, shown) in enumerate(zip(data["maps"], gallery)):
        assert entry["shape"] == [2, 2, 2] == list(expected[word].shape)
        assert np.allclose(entry["values"], expected[word].numpy(), atol=1e-6)
        drawn = da.capture.overlay_frames(frames, expected[word])
        assert np.array_equal(frames_of(shown["image"]), np.stack([np.asarray(f) for f in drawn]))


def test_maps_tab_gives_concept_maps_on_hunyuan_video15(registry, dirs, tmp_path):
    _, gallery, index = AppActions(registry, str(tmp_path)).maps(*form(dirs["hv15"]), "concept", "cat,sky", "1", "",
                                                                 None, None, True)
    data = json.load(open(index))
    assert data["kind"] == "concept" and [m["token"] for m in data["maps"]] == ["cat", "sky"] and len(gallery) == 2
    assert all(len(m["shape"]) == 3 for m in data["maps"])  # (frames, rows, cols)


def test_maps_cli_on_wan_writes_animated_overlays_and_frame_row_col_shapes(dirs, stock, tmp_path):
    out = tmp_path / "maps"
    assert main(["maps", PROMPT, "--model", dirs["wan"], "--steps", "2", "--cfg", "4.5", "--size", "32", "--seed",
                 str(SEED), "--frames", "5", "--words", "circle", "--layers", "0,1", "--per-head", "--out", str(out)]) == 0
    data = json.load(open(out / "maps.json"))
    frames, result = capture_run(stock, da.Capture(layers=[0, 1], tokens=["circle"]))
    assert np.array_equal(frames_of(out / data["image"]), np.stack([np.asarray(f) for f in frames]))
    assert data["axes"] == ["frame", "row", "col"] and len(data["maps"]) == 2 * 2  # layers × heads
    for entry in data["maps"]:
        values = result.maps[0, entry["layer"], entry["head"], 0]
        assert entry["file"] == f"L{entry['layer']}H{entry['head']}_circle.webp" and entry["shape"] == [2, 2, 2]
        assert entry["mean_probability"] == pytest.approx(float(values.mean()), abs=1e-7)
        drawn = da.capture.overlay_frames(frames, values)
        assert np.array_equal(frames_of(out / entry["file"]), np.stack([np.asarray(f) for f in drawn]))


def test_maps_cli_self_kind_takes_frame_row_col_cells(dirs, stock, tmp_path):
    out = tmp_path / "self"
    assert main(["maps", PROMPT, "--model", dirs["wan"], "--steps", "2", "--cfg", "4.5", "--size", "32", "--seed",
                 str(SEED), "--frames", "5", "--kind", "self", "--locations", "1,0,1", "--layers", "0",
                 "--out", str(out)]) == 0
    entry = json.load(open(out / "maps.json"))["maps"][0]
    _, result = capture_run(stock, da.Capture(kind="self", layers=[0], tokens=[(1, 0, 1)]))
    assert entry["token"] == "1,0,1" and entry["mean_probability"] == pytest.approx(
        float(result.maps[0, 0, :, 0].mean(dim=0).mean()), abs=1e-7)


@pytest.mark.parametrize("flags, message", [
    (["--frames", "6"], r"num_frames must be 4k \+ 1 on this model"),
    (["--kind", "self", "--locations", "9,0,0"], r"outside the 2×2×2 video-token grid \(frames 0-1"),
])
def test_maps_cli_bad_video_input_is_one_line(dirs, tmp_path, capsys, flags, message):
    args = ["maps", PROMPT, "--model", dirs["wan"], "--steps", "1", "--size", "32", "--frames", "5", *flags]
    assert main([*args, "--out", str(tmp_path / "o")]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dit-attn")]
    assert len(err) == 1 and err[0].startswith("dit-attn maps: error: ") and re.search(message, err[0]), err


def test_maps_cli_frames_on_an_image_model_is_refused(tmp_path, capsys):
    assert main(["maps", PROMPT, "--model", "demo", "--frames", "5", "--out", str(tmp_path / "o")]) != 0
    assert "--num-frames and --fps are for video models; StableDiffusion3Pipeline makes images" in capsys.readouterr().err


def fill_video_form(page) -> None:
    """A 5-frame 32 px video in 2 steps."""
    page.locator("#prompt").get_by_role("textbox").fill(PROMPT)
    page.locator("#size").get_by_role("textbox").fill("32")
    steps = page.locator("#steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.locator("#frames input").fill("5")


def test_browser_video_generate_shows_an_animated_image(page):
    fill_video_form(page)
    page.locator("#generate-button").click()
    image = page.locator("#generate-image img")
    image.wait_for(state="visible")
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    src = image.get_attribute("src")
    assert src.endswith(".webp")
    served = page.request.get(src).body()
    assert Image.open(io.BytesIO(served)).n_frames == 5


def test_browser_video_maps_tab_shows_animated_overlays(page):
    fill_video_form(page)
    page.get_by_role("tab", name="Maps").click()
    page.locator("#maps-words").get_by_role("textbox").fill("red, circle")
    page.locator("#maps-layers").get_by_role("textbox").fill("1")
    page.locator("#maps-button").click()
    images = page.locator("#maps-gallery img")
    images.nth(1).wait_for(state="visible")
    assert images.count() == 2
    for k in range(2):
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=images.nth(k).element_handle())
        assert Image.open(io.BytesIO(page.request.get(images.nth(k).get_attribute("src")).body())).n_frames == 5
    assert "Traceback" not in page.content()
