"""The web app: form checking, models, the API through gradio_client, and the page in headless chromium."""
import base64
import html
import json
import os
import re
import socket

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
import gradio as gr
from PIL import Image

import dit_attn as da
from dit_attn.app import ModelRegistry, serve
from dit_attn.app.atlas import MAX_ATLAS_WORK, objective_choices, parse_seeds
from dit_attn.app.generation import difference_image, run_pipeline
from dit_attn.app.models import LoadedModel, check_model_dir
from dit_attn.app.settings import build_settings, collect_heads
from dit_attn.app.text_edit import DEFAULT_SIGN_PROMPT, text_layers
from dit_attn.app.ui import AppActions, readable_errors
from dit_attn.localization.score import to_pil
from dit_attn.cli import build_parser, main
from dit_attn.heads import PRESETS, LayerInfo
from dit_attn.toy.configs import build_demo_pipeline, save_demo_pipeline

CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red circle"
FORM = dict(model="demo", prompt=PROMPT, steps=2, cfg=4.5, seed=3, size="32", heads="L1H0, L2", picked=[], presets=[],
            u=0.5, scope="image", target="identity", pag_scale=2.0, local_radius=None, start=0.0, end=1.0,
            local_downsample=None, nag_negative="", nag_scale=5.0, frames=None, fps=None)


def form(**changes) -> list:
    """The inputs of the generate/compare endpoints, in the page's order."""
    return list({**FORM, **changes}.values())


def png_settings(path: str) -> dict:
    return json.loads(Image.open(path).text["dit-attn"])


def pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, str) else path_or_image
    return np.asarray(image.convert("RGB"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry(embedded=("demo",))  # the smallest model keeps each generation short


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    app = serve(registry, port=free_port(), output_dir=str(tmp_path_factory.mktemp("app-out")), block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server.local_url, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("dl")))


@pytest.fixture(scope="module")
def stock_demo():
    """An independent copy of the demo model (same seed, so same weights) for expected images."""
    pipe = build_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_image(pipe, **call):
    call = {"guidance_scale": FORM["cfg"], **call}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(FORM["seed"]), num_inference_steps=FORM["steps"],
                height=32, width=32, **call).images[0]


# form values and models


def test_collect_heads_merges_text_picker_and_presets_in_order():
    assert collect_heads("L1H0, L2,,", ["L0H1", "L2"], ["sd3:dark"]) == ["L1H0", "L2", "L0H1", "sd3:dark"]
    assert collect_heads("", None, None) == []
    with pytest.raises(ValueError, match=r"L<layer>H<head>"):
        collect_heads("head7")


def test_build_settings_checks_every_field(registry):
    demo = registry.get("demo")
    good = dict(prompt=" a cat ", num_inference_steps=2, guidance_scale=4.5, seed=1, size="64x32", heads=["L3H3"], pag_scale=3.0,
                u=1.0, scope="joint")
    settings = build_settings(demo, **good)
    assert settings["prompt"] == "a cat" and (settings["width"], settings["height"]) == (64, 32)
    assert settings["model"] == "demo" and settings["edits"][0]["heads"] == ["L3H3"] and settings["dtype"] == "float32"
    for change, message in [
        (dict(prompt="  "), "prompt is empty"),
        (dict(size="30"), "must be a multiple of 4 px"),
        (dict(size="big"), "N or WIDTHxHEIGHT"),
        (dict(size="4096"), "more than this model's largest side, 256 px"),
        (dict(size="0"), "height must be >= 1"),
        (dict(heads=["L99H0"]), r"layers 0-3"),
        (dict(heads=["L0H4"]), r"valid heads are 0-3"),
        (dict(num_inference_steps=0), r"steps must be in \[1, 1000\]"),
        (dict(num_inference_steps=2.5), "steps must be a whole number"),
        (dict(seed=-1), "seed must be in"),
        (dict(u=1.5), r"u must be in \[0.0, 1.0\]"),
        (dict(guidance_scale=float("nan")), "CFG scale must be a finite number"),
        (dict(guidance_scale=1e9), r"CFG scale must be in \[0.0, 100.0\]"),
        (dict(scope="everything"), "scope must be one of"),
        (dict(local_radius=-1), "radius must be a finite number > 0"),
        (dict(start=1.5), r"guidance start must be in \[0.0, 1.0\]"),
        (dict(start=0.5, end=0.5), "start must be < end"),
        (dict(local_downsample=4), "need a local attention radius"),
        (dict(local_radius=2, local_downsample=1), r"local downsample must be in \[2, 64\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_settings(demo, **{**good, **change})


def test_registry_offers_the_embedded_models_by_default():
    registry = ModelRegistry()
    assert registry.choices == ["tiny", "demo"] and registry.default == "tiny"
    assert not registry._loaded  # nothing is loaded until asked for


def test_registry_offers_only_its_choices_and_caches(registry, tmp_path):
    assert registry.choices == ["demo"] and registry.default == "demo"
    assert registry.get("demo") is registry.get("demo")
    for path in ("/etc", str(tmp_path), "../demo"):
        with pytest.raises(ValueError, match="unknown model"):
            registry.get(path)
    with pytest.raises(ValueError, match="not a directory"):
        check_model_dir(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no model_index.json"):
        check_model_dir(str(tmp_path))


def test_model_dir_is_offered_and_loaded(tmp_path):
    path = save_demo_pipeline(tmp_path / "flux", family="flux")
    registry = ModelRegistry([path, path], embedded=("demo",), max_loaded=1)
    assert registry.choices == ["demo", os.path.abspath(path)]
    flux = registry.get(os.path.abspath(path))
    assert flux.family == "flux" and len(flux.head_choices()) == 4 * 4 and flux.head_choices()[-1] == "L3H3"
    assert registry.get("demo") is not None and list(registry._loaded) == ["demo"]  # least recently used dropped


def test_presets_offered_are_the_family_presets_that_fit():
    sd3_medium = [LayerInfo(i, f"transformer_blocks.{i}.attn", "joint", 24, 64) for i in range(24)]
    model = LoadedModel("sd3-medium", None, "sd3", sd3_medium)
    assert model.presets() == [name for name in PRESETS if name.startswith("sd3:")]
    assert model.summary().endswith("24 layers × 24 heads, 576 heads")
    assert LoadedModel("small", None, "sd3", sd3_medium[:2]).presets() == ["sd3:dark", "sd3:white", "sd3:blue", "sd3:red"]
    assert LoadedModel("flux", None, "flux", sd3_medium).presets() == []  # FLUX presets address layers past 24


def test_run_pipeline_reports_each_step_and_is_seeded(registry):
    demo = registry.get("demo")
    settings = build_settings(demo, prompt=PROMPT, num_inference_steps=2, guidance_scale=4.5, seed=3, size="32", heads=["L1H0"],
                              pag_scale=2.0, u=1.0, scope="joint")
    done = []
    first = run_pipeline(demo, settings, on_step=done.append)
    assert done == [1, 2]
    np.testing.assert_array_equal(pixels(run_pipeline(demo, settings)), pixels(first))
    assert not demo.lock.locked() and not hasattr(demo.pipe.transformer, "_dit_attn_handle")  # edit removed


def test_difference_image_is_scaled_absolute_difference():
    a = Image.fromarray(np.array([[[10, 20, 30], [0, 0, 0]]], dtype=np.uint8))
    b = Image.fromarray(np.array([[[20, 20, 0], [0, 5, 0]]], dtype=np.uint8))
    image, peak, gain = difference_image(a, b)
    assert peak == 30 and gain == pytest.approx(8.5)
    assert pixels(image).tolist() == [[[85, 0, 255], [0, 42, 0]]]
    assert pixels(difference_image(a, a)[0]).max() == 0


def test_cli_app_options_and_bad_dir(tmp_path, capsys):
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.model_dirs, args.concurrency, args.max_queue) == ("127.0.0.1", 7860, [], 1, 16)
    args = build_parser().parse_args(["app", "--model-dir", "a", "--model-dir", "b", "--concurrency", "2"])
    assert args.model_dirs == ["a", "b"] and args.concurrency == 2
    assert main(["app", "--model-dir", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# the running app through its API


def test_server_is_local_and_queued(server):
    assert server.server_name == "127.0.0.1"
    assert server._queue.max_size == 16 and server._queue.default_concurrency_limit == 1


def test_api_generate_returns_png_with_settings_and_the_guided_image(client, stock_demo):
    path, shown = client.predict(*form(), api_name="/generate")
    assert path.endswith(".png")
    settings = png_settings(path)
    assert settings == shown
    edit = da.HeadGuidance(heads=["L1H0", "L2"], scale=2.0, u=0.5, scope="image")
    assert settings == {"prompt": PROMPT, "model": "demo", "seed": 3, "num_inference_steps": 2, "guidance_scale": 4.5,
                        "height": 32, "width": 32, "dtype": "float32", "edits": [edit.to_dict()]}
    with da.apply(stock_demo, edit):
        guided = stock_image(stock_demo)
    np.testing.assert_array_equal(pixels(path), pixels(guided))


def test_api_generate_without_heads_is_the_stock_image(client, stock_demo):
    path, settings = client.predict(*form(heads="", size=""), api_name="/generate")
    assert settings["edits"] == [] and (settings["height"], settings["width"]) == (32, 32)  # the model's default size
    np.testing.assert_array_equal(pixels(path), pixels(stock_image(stock_demo)))


def test_api_png_regenerates_bit_identical(client):
    from dit_attn.workflows.batch import regenerate

    path, _ = client.predict(*form(heads="L1H0", local_radius=1.5, local_downsample=2), api_name="/generate")
    assert [e["edit"] for e in png_settings(path)["edits"]] == ["HeadGuidance", "LocalAttention"]
    assert np.array_equal(pixels(regenerate(path)), pixels(path))  # the settings' model ("demo") loaded afresh


@pytest.mark.parametrize("change, message", [
    (dict(heads="L99H0"), "layer 99 (from 'L99H0') out of range: this model has layers 0-3"),
    (dict(heads="head7"), "use 'L<layer>H<head>', 'L<layer>'"),
    (dict(prompt=" "), "the prompt is empty"),
    (dict(size="30"), "must be a multiple of 4 px"),
    (dict(local_radius=-2), "radius must be a finite number > 0"),
])
def test_api_bad_input_is_a_readable_error(client, change, message):
    with pytest.raises(AppError) as caught:
        client.predict(*form(**change), api_name="/generate")
    text = html.unescape(str(caught.value))
    assert message in text and "Traceback" not in text


def test_api_compare_matches_stock_and_guided_calls(client, stock_demo):
    without, with_edit, difference, summary = client.predict(*form(heads="L0, L1H2", u=1.0, pag_scale=5.0), api_name="/compare")
    plain = pixels(stock_image(stock_demo))
    np.testing.assert_array_equal(pixels(without), plain)
    with da.apply(stock_demo, da.HeadGuidance(heads=["L0", "L1H2"], scale=5.0, u=1.0, scope="image")):
        guided = pixels(stock_image(stock_demo))
    np.testing.assert_array_equal(pixels(with_edit), guided)
    assert not np.array_equal(plain, guided)
    diff = np.abs(plain.astype(int) - guided.astype(int))
    np.testing.assert_array_equal(pixels(difference), np.rint(diff * (255 / diff.max())).astype(np.uint8))
    assert f"{diff.max()}/255" in summary
    assert png_settings(without)["edits"] == [] and png_settings(with_edit)["edits"][0]["heads"] == ["L0", "L1H2"]
    assert png_settings(difference)["largest_difference"] == diff.max()
    with pytest.raises(AppError, match="Compare needs an edit"):
        client.predict(*form(heads=""), api_name="/compare")


def test_api_local_attention_is_the_clear_edit(client, stock_demo):
    without, with_edit, _, _ = client.predict(*form(heads="", local_radius=1.5), api_name="/compare")
    assert png_settings(with_edit)["edits"] == [da.LocalAttention(radius=1.5).to_dict()] and png_settings(without)["edits"] == []
    with da.apply(stock_demo, da.LocalAttention(radius=1.5)):
        local = pixels(stock_image(stock_demo))
    np.testing.assert_array_equal(pixels(with_edit), local)
    assert not np.array_equal(pixels(without), local)


def test_api_nag_negative_prompt_is_the_nag_edit(client, stock_demo):
    without, with_edit, _, _ = client.predict(*form(heads="", nag_negative="red", nag_scale=3.0, cfg=1.0), api_name="/compare")
    assert png_settings(with_edit)["edits"] == [da.NAG("red", scale=3.0).to_dict()] and png_settings(without)["edits"] == []
    with da.apply(stock_demo, da.NAG("red", scale=3.0)):
        guided = pixels(stock_image(stock_demo, guidance_scale=1.0))
    np.testing.assert_array_equal(pixels(with_edit), guided)
    assert not np.array_equal(pixels(without), guided)


def test_api_guidance_interval_and_local_downsample_are_the_edits(client, stock_demo):
    path, settings = client.predict(*form(heads="L0", u=1.0, pag_scale=5.0, start=0.5, end=1.0), api_name="/generate")
    assert (settings["edits"][0]["start"], settings["edits"][0]["end"]) == (0.5, 1.0)
    with da.apply(stock_demo, da.HeadGuidance(heads=["L0"], scale=5.0, u=1.0, scope="image", start=0.5)):
        late = pixels(stock_image(stock_demo))
    with da.apply(stock_demo, da.HeadGuidance(heads=["L0"], scale=5.0, u=1.0, scope="image")):
        whole = pixels(stock_image(stock_demo))
    np.testing.assert_array_equal(pixels(path), late)
    assert not np.array_equal(late, whole)  # the interval changed what was guided
    _, with_edit, _, _ = client.predict(*form(heads="", local_radius=1.5, local_downsample=2), api_name="/compare")
    assert png_settings(with_edit)["edits"][0]["downsample"] == 2
    with da.apply(stock_demo, da.LocalAttention(radius=1.5, downsample=2)):
        pooled = pixels(stock_image(stock_demo))
    np.testing.assert_array_equal(pixels(with_edit), pooled)


# the Head atlas and Text edit tabs, called as the page calls them

ATLAS = dict(model="demo", objective="color:purple", prompts="a red circle\na blue square", seeds="0", steps=2, u=1.0,
             scale=3.0, cfg=4.5, size="32", scope="joint", target="identity")
TEXT = dict(model="demo", steps=2, cfg=4.5, seed=3, size="32", prompt=DEFAULT_SIGN_PROMPT, new_text="B", layers="1",
            start=0.0, blocklist="")


def atlas_form(**changes) -> list:
    return list({**ATLAS, **changes}.values())


def text_form(**changes) -> list:
    return list({**TEXT, **changes}.values())


@pytest.fixture(scope="module")
def actions(registry, tmp_path_factory):
    return AppActions(registry, str(tmp_path_factory.mktemp("actions-out")))


@pytest.fixture(scope="module")
def direct_atlas(stock_demo):
    """`da.atlas` on the independent demo copy with the settings of ATLAS (the demo's noise-like images are purplish)."""
    return da.atlas(stock_demo, "color:purple", ["a red circle", "a blue square"], [0], u=1.0, scale=3.0,
                    num_inference_steps=2, guidance_scale=4.5, height=32, width=32, progress=False)


def test_atlas_tab_offers_only_objectives_without_paths():
    choices = objective_choices()
    assert choices[0] == "judge" and "color:red" in choices and "clip-score" in choices
    assert not any(name.startswith("aesthetic") or name.count(":") > 1 for name in choices)
    assert parse_seeds("0, 1 1") == (0, 1) and parse_seeds(3) == (3,)


def test_atlas_action_equals_da_atlas(actions, direct_atlas):
    png, (page, data), summary = actions.atlas(*atlas_form())
    with open(data) as f:
        saved = json.load(f)
    assert saved["scores"] == direct_atlas.scores and saved["baseline"] == direct_atlas.baseline
    assert len(saved["scores"]) == 16 and len(set(saved["scores"].values())) > 1  # the heads differ
    assert saved["settings"]["objective"] == "color:purple" and saved["settings"]["model"] == "demo"
    assert {k: saved["settings"][k] for k in ("num_inference_steps", "guidance_scale", "height", "width")} == \
        {"num_inference_steps": 2, "guidance_scale": 4.5, "height": 32, "width": 32}
    assert Image.open(png).size[0] > 4 * 48 and page.endswith(".html")
    with open(page) as f:
        assert f.read().count("data:image/png;base64,") == 16 + 1
    best = max(direct_atlas.scores, key=direct_atlas.delta)
    assert f"Largest rises: {best} " in summary


@pytest.mark.parametrize("change, message", [
    (dict(objective="aesthetic:/etc"), "unknown objective 'aesthetic:/etc'; choose one of judge, judge:soft, color:"),
    (dict(prompts=" \n "), "no prompts"),
    (dict(prompts="\n".join(["a red circle"] * 9)), "at most 8 prompts"),
    (dict(seeds="0 x"), "seeds must be whole numbers"),
    (dict(seeds="0 1 2 3 4"), "at most 4 seeds"),
    (dict(steps=51), "steps must be in [1, 50]"),
    (dict(prompts="\n".join(["a red circle"] * 8), seeds="0 1 2 3", steps=50),
     f"needs 27200 image-steps ((heads + 1) × prompts × seeds × steps = 17 × 8 × 4 × 50); the page allows at most {MAX_ATLAS_WORK}"),
    (dict(objective="judge", prompts="a cat on the moon"), "the judge objective scores captions of the tiny model's world"),
    (dict(size="30"), "must be a multiple of 4 px"),
])
def test_atlas_action_bad_input_is_a_readable_error(actions, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        actions.atlas(*atlas_form(**change))
    with pytest.raises(gr.Error):
        readable_errors(actions.atlas)(*atlas_form(**change))


def test_load_atlas_draws_an_uploaded_atlas_json(actions, direct_atlas, tmp_path):
    path = tmp_path / "atlas.json"
    direct_atlas.save(str(path))
    png, (page, data), summary = actions.load_atlas(str(path))
    with open(data) as f:
        assert json.load(f)["scores"] == direct_atlas.scores
    assert Image.open(png).format == "PNG" and "color:purple" in summary
    bad = {"baseline": 1.0, "scores": {"L9H0": 1.0}, "thumbnails": {}, "layers": [2], "settings": {}}
    not_png = {**bad, "scores": {"L0H1": 0.5}, "thumbnails": {"L0H1": base64.b64encode(b"text").decode(), "baseline": ""}}
    for content, message in [("{", "not an atlas JSON"), (json.dumps([1]), "expected an object"),
                             (json.dumps({**bad, "baseline": "x"}), "'baseline' must be a number"),
                             (json.dumps(bad), "head 'L9H0' is not in its 1 layers"),
                             (json.dumps(not_png), "the thumbnail of L0H1 is not a base64 PNG")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=re.escape(message)):
            actions.load_atlas(str(path))
    with pytest.raises(ValueError, match="choose an atlas JSON file"):
        actions.load_atlas(None)


def test_text_layers_default_to_the_models_known_ones():
    tiny = LoadedModel("tiny", None, "sd3", [])
    assert tiny.text_layers() == (0, 3) and text_layers("", tiny) == (0, 3) and text_layers("3+1, 3", tiny) == (1, 3)
    with pytest.raises(ValueError, match="none are on record for this model; find them with `dit-attn localize"):
        text_layers(" ", LoadedModel("other", None, "sd3", []))
    with pytest.raises(ValueError, match="cannot read layers"):
        text_layers("two", tiny)


def direct_edit(stock_demo, layers=(1,), new_text="B"):
    return da.edit_text(stock_demo, DEFAULT_SIGN_PROMPT, new_text, layers=list(layers), start=0.0,
                        generator=torch.Generator().manual_seed(3), num_inference_steps=2, guidance_scale=4.5, height=32,
                        width=32)


def guarded_image(pipe, blocklist, layers=(1,)):
    with da.apply(pipe, da.TextGuard(blocklist, layers=layers)):
        out = pipe(DEFAULT_SIGN_PROMPT, generator=torch.Generator().manual_seed(3), num_inference_steps=2, guidance_scale=4.5,
                   height=32, width=32, output_type="pt")
    return pixels(to_pil(out.images)[0])


def test_text_edit_action_equals_da_edit_text(actions, stock_demo):
    original, edited, guarded, note = actions.text_edit(*text_form())
    expected = direct_edit(stock_demo)
    np.testing.assert_array_equal(pixels(original), pixels(expected.original))
    np.testing.assert_array_equal(pixels(edited), pixels(expected.edited))
    assert not np.array_equal(pixels(original), pixels(edited)) and guarded is None
    settings = png_settings(edited)
    patch = da.TextPatch(layers=[1], source_prompt='a sign that says "B" in red on a white background')
    assert settings["edits"] == [patch.to_dict()] and png_settings(original)["edits"] == []
    assert (settings["image"], settings["model"], settings["num_inference_steps"]) == ("edited", "demo", 2)
    assert "into layers 1 from 0% of the steps" in note


def test_text_edit_blocklist_guards_only_blocked_words(actions, stock_demo):
    original, _, guarded, note = actions.text_edit(*text_form(blocklist="a, X"))  # case-insensitive: "A" is blocked
    np.testing.assert_array_equal(pixels(guarded), guarded_image(stock_demo, ["a", "X"]))
    assert not np.array_equal(pixels(guarded), pixels(original)) and "has a blocked word" in note
    assert png_settings(guarded)["edits"][0]["blocklist"] == ["a", "X"]
    original, _, guarded, note = actions.text_edit(*text_form(blocklist="Z"))
    stock = stock_demo(DEFAULT_SIGN_PROMPT, generator=torch.Generator().manual_seed(3), num_inference_steps=2, guidance_scale=4.5,
                       height=32, width=32, **da.loading.call_defaults(stock_demo)).images[0]  # no dit-attn edit at all
    np.testing.assert_array_equal(pixels(guarded), pixels(stock))
    np.testing.assert_array_equal(pixels(original), pixels(stock))
    assert "the guarded image is the original" in note


@pytest.mark.parametrize("change, message", [
    (dict(layers=""), "none are on record for this model"),
    (dict(layers="9"), "layers [9] do not exist: this model has layers 0-3"),
    (dict(prompt="a sign"), "the prompt has no quoted text to replace"),
    (dict(prompt=" "), "the sign prompt is empty"),
    (dict(new_text=" "), "new_text must be a non-empty string"),
    (dict(start=1.0), "start must be < 1"),
    (dict(blocklist='"A"'), "blocklist must be a non-empty list of non-empty words without quotes"),
    (dict(steps=0), "steps must be in [1, 1000]"),
])
def test_text_edit_bad_input_is_a_readable_error(actions, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        actions.text_edit(*text_form(**change))
    with pytest.raises(gr.Error):
        readable_errors(actions.text_edit)(*text_form(**change))


def test_api_text_edit_and_atlas(client, stock_demo, direct_atlas):
    original, edited, guarded, _ = client.predict(*text_form(), api_name="/text_edit")
    expected = direct_edit(stock_demo)
    np.testing.assert_array_equal(pixels(original), pixels(expected.original))
    np.testing.assert_array_equal(pixels(edited), pixels(expected.edited))
    assert guarded is None
    png, files, summary = client.predict(*atlas_form(), api_name="/atlas")
    data = next(path for path in files if path.endswith(".json"))
    with open(data) as f:
        assert json.load(f)["scores"] == direct_atlas.scores
    assert png.endswith(".png") and "Largest rises" in summary
    with pytest.raises(AppError, match="at most 8 prompts"):
        client.predict(*atlas_form(prompts="\n".join(["a red circle"] * 9)), api_name="/atlas")


def test_api_load_atlas_takes_uploads_never_server_paths(server, client, direct_atlas, tmp_path):
    path = tmp_path / "atlas.json"
    direct_atlas.save(str(path))
    png, files, summary = client.predict(handle_file(str(path)), api_name="/load_atlas")
    data = next(p for p in files if p.endswith(".json"))
    with open(data) as f:
        assert json.load(f)["scores"] == direct_atlas.scores
    # A request naming a file on the server (gradio_client would upload it; raw HTTP does not) is refused.
    url = server.local_url.rstrip("/") + "/gradio_api/call/load_atlas"
    event = httpx.post(url, json={"data": [{"path": str(path), "meta": {"_type": "gradio.FileData"}}]}).json()["event_id"]
    stream = httpx.get(f"{url}/{event}", timeout=30).text
    assert "event: error" in stream and "event: complete" not in stream and "Largest rises" not in stream


# hardening: every endpoint applies the shared limits before it allocates; uploads, exposure and failures

SETS = dict(model="demo", steps=2, cfg=4.5, seed=3, size="", layout="1x2", panels="a red circle\na blue circle",
            task="SET", summary="", reference=None, reference_panel=0)


def sets_form(**changes) -> list:
    return list({**SETS, **changes}.values())


def png_file(path, width: int, height: int) -> str:
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return str(path)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width × height pixels (decoding it would allocate them all)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def no_set_generation(monkeypatch):
    """generate_set fails the test if reached: the Sets tab must refuse before it allocates anything."""
    import dit_attn.ic

    def refuse(*args, **kwargs):
        raise AssertionError("generate_set was called: the request was not checked first")

    monkeypatch.setattr(dit_attn.ic, "generate_set", refuse)


def test_sets_action_makes_a_set_from_a_reference_file(actions, tmp_path):
    reference = png_file(tmp_path / "left.png", 40, 24)
    canvas, panels, text = actions.sets(*sets_form(reference=reference))
    assert Image.open(canvas).size == (64, 32) and len(panels) == 2
    assert text == "[SET] ; [LEFT] a red circle; [RIGHT] a blue circle" or text.startswith("[SET]")
    settings = png_settings(canvas)
    assert (settings["seed"], settings["num_inference_steps"], settings["guidance_scale"]) == (3, 2, 4.5)


@pytest.mark.parametrize("change, message", [
    (dict(size="16000x8000", reference="REF"), "16000x8000 is 128,000,000 pixels, more than this machine's budget of 16,777,216"),
    (dict(size="512x256", reference="REF"), "width 512 px is more than this model's largest side, 256 px"),
    (dict(size="0"), "height must be >= 1"),
    (dict(seed=-1), "seed must be in [0, 9223372036854775807], got -1"),
    (dict(seed=2**63), "seed must be in [0, 9223372036854775807]"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(cfg=float("nan")), "CFG scale must be a finite number"),
    (dict(cfg=-1), "CFG scale must be in [0.0, 100.0], got -1"),
    (dict(cfg=1e9), "CFG scale must be in [0.0, 100.0]"),
    (dict(steps=1001), "steps must be in [1, 1000], got 1001"),
    (dict(steps=0), "steps must be in [1, 1000], got 0"),
    (dict(layout="100000x100000"), "the page makes sets of at most 16"),
    (dict(reference="REF", reference_panel=2), "reference panel index must be in [0, 1], got 2"),
    (dict(reference="BOMB"), "the reference image is 5000x5000 px, 25,000,000 pixels, more than this machine's budget"),
    (dict(reference="TEXT"), "the reference is not an image file this server can read"),
])
def test_sets_checks_every_value_before_generating(actions, no_set_generation, tmp_path, change, message):
    files = {"REF": png_file(tmp_path / "ref.png", 16, 16), "BOMB": str(tmp_path / "bomb.png"),
             "TEXT": str(tmp_path / "text.png")}
    (tmp_path / "bomb.png").write_bytes(png_claiming(5000, 5000))
    (tmp_path / "text.png").write_text("not an image")
    change = {k: files.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        actions.sets(*sets_form(**change))
    with pytest.raises(gr.Error):
        readable_errors(actions.sets)(*sets_form(**change))


def test_sets_canvas_is_held_to_the_machines_pixel_budget(actions, no_set_generation, monkeypatch):
    monkeypatch.setenv("DIT_ATTN_MAX_PIXELS", "2048")
    with pytest.raises(ValueError, match=re.escape("64x32 is 2,048 pixels") + "|" + re.escape("more than this machine's budget of 2,048")):
        actions.sets(*sets_form(size="64x64"))


ENDPOINT_FORMS = {"/generate": form, "/compare": lambda **c: form(**{"heads": "L0", **c}), "/sets": sets_form,
                  "/atlas": atlas_form, "/text_edit": text_form}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_FORMS))
@pytest.mark.parametrize("change, message", [
    (dict(size="16000x8000"), "16000x8000 is 128,000,000 pixels, more than this machine's budget of 16,777,216"),
    (dict(size="512x256"), "width 512 px is more than this model's largest side, 256 px"),
    (dict(size="30"), "height must be a multiple of 4 px on this model"),
    (dict(cfg=1e9), "CFG scale must be in [0.0, 100.0]"),
])
def test_every_endpoint_applies_the_same_limits(client, no_set_generation, endpoint, change, message):
    with pytest.raises(AppError) as caught:
        client.predict(*ENDPOINT_FORMS[endpoint](**change), api_name=endpoint)
    assert message in html.unescape(str(caught.value))


@pytest.mark.parametrize("endpoint", ["/generate", "/compare", "/sets", "/text_edit"])
def test_every_generating_endpoint_checks_steps_and_seed_alike(client, no_set_generation, endpoint):
    for change, message in [(dict(steps=1001), r"Steps: Value 1001 is greater than maximum value 1000"),
                            (dict(seed=-1), r"[Ss]eed.* -1 .*0|seed must be in \[0, 9223372036854775807\]"),
                            (dict(seed=2**63), r"seed must be in \[0, 9223372036854775807\], got 9223372036854775808")]:
        with pytest.raises(AppError) as caught:
            client.predict(*ENDPOINT_FORMS[endpoint](**change), api_name=endpoint)
        assert re.search(message, html.unescape(str(caught.value))), str(caught.value)


def test_api_refuses_oversized_text_and_wrong_types_readably(client):
    for args, message in [(form(prompt="a" * 20_000), "more than the limit of 10,000"),
                          (form(heads="L0H0," * 3000), "more than the limit of 10,000"),
                          (form(steps="many"), "Steps: 'many' is not a value this field takes"),
                          (form(picked=7), "is not a value this field takes"),
                          (form(local_radius=1e308), "local attention radius must be at most 4096 tokens")]:
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name="/generate")
        text = html.unescape(str(caught.value))
        assert message in text and "verbose error reporting" not in text
    with pytest.raises(AppError, match="expected an uploaded file"):
        client.predict("/etc/passwd", api_name="/load_atlas")


def atlas_data(layers=(4, 4, 4, 4), thumbnail: bytes | None = None, **changes) -> dict:
    if thumbnail is None:
        buffer = __import__("io").BytesIO()
        Image.new("RGB", (48, 48), "white").save(buffer, format="PNG")
        thumbnail = buffer.getvalue()
    thumb = base64.b64encode(thumbnail).decode()
    scores = {"L0H0": 0.5, "L1H2": 0.25}
    data = {"baseline": 0.3, "scores": scores, "thumbnails": {**{h: thumb for h in scores}, "baseline": thumb},
            "layers": list(layers), "settings": {"objective": "color:red", "u": 1.0, "scale": 3.0}}
    return {**data, **changes}


def big_png(side: int) -> bytes:
    buffer = __import__("io").BytesIO()
    Image.new("RGB", (side, side), "white").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("content, message", [
    (atlas_data(layers=[1] * 101), "'layers' has 101 layers, more than the limit of 100"),
    (atlas_data(layers=[2] * 10**5), "'layers' has 100000 layers, more than the limit of 100"),
    (atlas_data(layers=[65]), "layer 0 must have 1-64 heads (an integer), got 65"),
    (atlas_data(layers=[10**9]), "layer 0 must have 1-64 heads"),
    (atlas_data(thumbnail=big_png(257)), "the thumbnail of L0H0 is 257x257 px; its sides may be at most 256 px"),
    (atlas_data(thumbnail=png_claiming(60000, 60000)), "the thumbnail of L0H0 is not a base64 PNG"),
    (atlas_data(thumbnail=png_claiming(5000, 5000)), "the thumbnail of L0H0 is 5000x5000 px; its sides may be at most 256 px"),
    (atlas_data(baseline=float("nan")), "'baseline' must be a finite number"),
    (atlas_data(settings={"objective": "x" * 300}), "its setting 'objective' has 300 characters"),
    ({"scores": {f"k{i}": 0 for i in range(250_000)}}, "more than an atlas of the largest layout"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_uploaded_atlas_is_checked_against_a_real_layout_before_drawing(actions, tmp_path, content, message):
    path = tmp_path / "atlas.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=re.escape(message)):
        actions.load_atlas(str(path))


def test_uploaded_atlas_of_the_largest_layout_is_drawn(actions, tmp_path):
    heads = [f"L{layer}H{head}" for layer in range(100) for head in range(64)]
    data = atlas_data(layers=[64] * 100)
    data["scores"] = {h: (i % 7) / 7 for i, h in enumerate(heads)}
    data["thumbnails"] = {h: data["thumbnails"]["baseline"] for h in [*heads, "baseline"]}
    path = tmp_path / "atlas.json"
    path.write_text(json.dumps(data))
    png, (page, _), summary = actions.load_atlas(str(path))
    assert Image.open(png).size == (40 + 64 * 56 + 4, 48 + 100 * 56) and "6400 heads" in summary


def test_atlas_strings_are_escaped_in_the_page_and_the_summary(actions, tmp_path):
    settings = {"objective": "<script>alert(1)</script>", "u": "<img src=x onerror=alert(1)>", "scale": '"><svg onload=x>',
                "prompts": ["</pre><script>alert(2)</script>"]}
    path = tmp_path / "atlas.json"
    path.write_text(json.dumps(atlas_data(settings=settings)))
    png, (page, data), summary = actions.load_atlas(str(path))
    with open(page) as f:
        text = f.read()
    assert "<script" not in text and "<img src=x" not in text and "<svg" not in text and "</pre><script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<script>" not in summary and r"\<script\>" in summary
    # render_html escapes what it is given directly too (a thumbnail is attribute text)
    from dit_attn.guidance.atlas import Atlas, render_html, render_png

    hostile = Atlas(0.0, {"L0H0": 1.0}, {"L0H0": '"><script>alert(3)</script>', "baseline": "x"}, [1],
                    {"objective": "o", "u": 1, "scale": 2})
    render_html(hostile, str(tmp_path / "page.html"))
    assert "<script" not in (tmp_path / "page.html").read_text()
    with pytest.raises(ValueError, match="more than the limit of 100"):
        render_png(Atlas(0.0, {"L0H0": 1.0}, {}, [1] * 1000, {"objective": "o"}), str(tmp_path / "big.png"))


def test_uploads_are_capped(server):
    from dit_attn.limits import MAX_UPLOAD_BYTES

    assert server.max_file_size == MAX_UPLOAD_BYTES == 64 * 2**20
    url = server.local_url.rstrip("/") + "/gradio_api/upload"
    response = httpx.post(url, files={"files": ("atlas.json", b" " * (MAX_UPLOAD_BYTES + 1))}, timeout=60)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert httpx.post(url, files={"files": ("atlas.json", b"{}")}, timeout=60).status_code == 200


def test_exposure_warning_names_what_a_non_loopback_host_exposes(registry):
    from dit_attn.app.server import exposure_warning, is_loopback

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host) and exposure_warning(host, 7860, registry, None) is None
    warning = exposure_warning("0.0.0.0", 7860, registry, None)
    assert "0.0.0.0:7860" in warning and "every network interface" in warning and "no login" in warning
    assert "demo" in warning and "64 MB" in warning and "--auth USER:PASSWORD" in warning and "--host 127.0.0.1" in warning
    assert "knows the --auth password" in exposure_warning("192.168.1.5", 80, registry, ("u", "p"))
    assert not is_loopback("example.org") and not is_loopback("::")


def test_serve_warns_on_a_public_host_and_passes_the_upload_cap_and_auth(registry, monkeypatch, capsys, tmp_path):
    from dit_attn.app import server as app_server

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    monkeypatch.setenv("DIT_ATTN_APP_AUTH", "alice:s3cret:with:colons")
    app_server.serve(registry, host="0.0.0.0", port=9, output_dir=str(tmp_path), block=False)
    err = capsys.readouterr().err
    assert err.startswith("warning: dit-attn app listens on 0.0.0.0:9, every network interface of this machine")
    assert launched["server_name"] == "0.0.0.0" and launched["max_file_size"] == 64 * 2**20
    assert launched["auth"] == ("alice", "s3cret:with:colons")
    monkeypatch.delenv("DIT_ATTN_APP_AUTH")
    app_server.serve(registry, port=9, output_dir=str(tmp_path), block=False)
    assert capsys.readouterr().err == "" and launched["auth"] is None and launched["server_name"] == "127.0.0.1"
    with pytest.raises(ValueError, match="auth must be USER:PASSWORD"):
        app_server.serve(registry, port=9, output_dir=str(tmp_path), block=False, auth="nopassword")


def test_cli_app_auth_flag(capsys):
    assert build_parser().parse_args(["app", "--auth", "u:p"]).auth == "u:p"
    assert build_parser().parse_args(["app"]).auth is None
    assert main(["app", "--auth", "no-colon"]) == 2
    assert "auth must be USER:PASSWORD" in capsys.readouterr().err


def test_auth_makes_the_api_ask_for_the_login(registry, tmp_path):
    app = serve(registry, port=free_port(), output_dir=str(tmp_path), block=False, auth=("alice", "s3cret"))
    try:
        assert httpx.get(app.local_url.rstrip("/") + "/config").status_code == 401
        with pytest.raises(Exception):
            Client(app.local_url, verbose=False, analytics_enabled=False, auth=("alice", "wrong"))
        logged_in = Client(app.local_url, verbose=False, analytics_enabled=False, auth=("alice", "s3cret"),
                           download_files=False)
        assert logged_in.predict(*form(heads=""), api_name="/generate")[1]["seed"] == 3
    finally:
        app.close()


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_is_a_message_and_the_server_keeps_serving(client, monkeypatch, error):
    import dit_attn.app.generation
    import dit_attn.ic

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(dit_attn.app.generation, "render", exhausted)
    monkeypatch.setattr(dit_attn.ic, "generate_set", exhausted)
    for endpoint, args in [("/generate", form()), ("/sets", sets_form())]:
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name=endpoint)
        assert "out of memory: this request needs more memory than the server has free" in str(caught.value)
    monkeypatch.undo()
    path, settings = client.predict(*form(), api_name="/generate")  # the model's lock was released
    assert settings["seed"] == 3 and Image.open(path).size == (32, 32)


def test_an_unexpected_error_is_a_short_message_not_a_traceback(client, monkeypatch):
    import dit_attn.app.generation

    def broken(*args, **kwargs):
        raise KeyError("secret internal detail")

    monkeypatch.setattr(dit_attn.app.generation, "render", broken)
    with pytest.raises(AppError) as caught:
        client.predict(*form(), api_name="/generate")
    assert "internal error (KeyError)" in str(caught.value) and "secret internal detail" not in str(caught.value)


# the page in a real browser


@pytest.fixture(scope="module")
def page(server):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium")
        pytest.skip(f"browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(server.local_url)
        yield page
        browser.close()


def _fill_form(page, heads: str) -> None:
    page.locator("#prompt").get_by_role("textbox").fill(PROMPT)
    page.locator("#size").get_by_role("textbox").fill("32")
    steps = page.locator("#steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.locator("#heads").get_by_role("textbox").fill(heads)


def _wait_for_images(page, *elem_ids: str) -> None:
    for elem_id in elem_ids:
        image = page.locator(f"#{elem_id} img")
        image.wait_for(state="visible")
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())


def test_browser_generate_shows_an_image(page):
    _fill_form(page, "L1H0, L2")
    page.locator("#generate-button").click()
    _wait_for_images(page, "generate-image")
    assert page.locator("#generate-image img").get_attribute("src").endswith(".png")


def test_browser_invalid_head_shows_a_readable_error(page):
    _fill_form(page, "L99H0")
    page.locator("#generate-button").click()
    page.get_by_text(re.compile(r"out of range: this model has layers 0-3")).first.wait_for(state="visible")
    assert "Traceback" not in page.content()


def test_browser_compare_shows_both_images_and_their_difference(page):
    _fill_form(page, "L0")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-button").click()
    _wait_for_images(page, "compare-without", "compare-with", "compare-difference")
    page.get_by_text(re.compile(r"Largest pixel difference: \d+/255")).wait_for(state="visible")


def test_browser_head_atlas_tab_computes_an_atlas(page):
    _fill_form(page, "")
    page.get_by_role("tab", name="Head atlas").click()
    page.locator("#atlas-prompts").get_by_role("textbox").fill("a red circle on a white background")
    steps = page.locator("#atlas-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.locator("#atlas-button").click()
    _wait_for_images(page, "atlas-image")
    page.get_by_text(re.compile(r"Largest rises: L\dH\d")).wait_for(state="visible")
    assert page.locator("#atlas-files").get_by_text(re.compile(r"atlas-judge-.*\.html")).count() == 1


def test_browser_text_edit_tab_shows_original_and_edited(page):
    _fill_form(page, "")
    page.get_by_role("tab", name="Text edit").click()
    page.locator("#text-layers").get_by_role("textbox").fill("1")
    page.locator("#text-button").click()
    _wait_for_images(page, "text-original", "text-edited")
    page.get_by_text(re.compile(r"into layers 1 from 0% of the steps")).wait_for(state="visible")
