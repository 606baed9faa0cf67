"""The app's Maps tab: through gradio_client (maps.json against a Capture run of an independent copy of the model, the
image against a stock run) and in headless chromium (type words, click, the gallery's images load)."""
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
from dit_attn.toy.configs import build_demo_pipeline

from .test_app import free_port, page  # noqa: F401  (page: headless chromium on this module's server)

PROMPT = "a red circle"
FORM = ["demo", PROMPT, 2, 4.5, 3, "32", "", [], [], 0.5, "joint", "identity", 2.0, None, 0.0, 1.0, None, "", 5.0, None, None]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = serve(ModelRegistry(embedded=("demo",)), port=free_port(), output_dir=str(tmp_path_factory.mktemp("maps-out")),
                block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server.local_url, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("maps-dl")))


def maps_call(client, kind="cross", words="red, circle", layers="0,2", heads="", first=None, last=None, per_layer=True,
              form=FORM):
    return client.predict(*form, kind, words, layers, heads, first, last, per_layer, api_name="/maps")


def test_maps_json_and_image_match_an_independent_capture_run(client):
    image_path, gallery, index = maps_call(client, heads="1,3", first=1, last=1)
    data = json.load(open(index))
    assert [(m["token"], m["layer"]) for m in data["maps"]] == [("red", "0"), ("circle", "0"), ("red", "2"), ("circle", "2")]
    assert [g["caption"] for g in gallery] == ["red · layer 0", "circle · layer 0", "red · layer 2", "circle · layer 2"]
    assert all(os.path.exists(g["image"]) for g in gallery)

    pipe = build_demo_pipeline()  # same seed, same weights; the edits on the left are none here
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, guidance_scale=4.5, height=32, width=32)
    stock = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **call).images[0]
    assert np.array_equal(np.asarray(Image.open(image_path).convert("RGB")), np.asarray(stock))
    with da.apply(pipe, da.Capture(layers=[0, 2], heads=[1, 3], tokens=["red", "circle"], steps=[1])) as handle:
        pipe(PROMPT, generator=torch.Generator().manual_seed(3), **call)
        expected = handle.maps.maps[0].mean(dim=1)  # (layers, words, H, W), heads averaged
    for entry in data["maps"]:
        layer = [0, 2].index(int(entry["layer"]))
        word = ["red", "circle"].index(entry["token"])
        got = torch.tensor(entry["values"])
        assert got.shape == (8, 8) and (got - expected[layer, word]).abs().max() < 2e-6
    assert data["capture"]["steps"] == [1] and data["seed"] == 3 and data["prompt"] == PROMPT


def test_mean_of_layers_and_self_kind(client):
    _, gallery, index = maps_call(client, words="", layers="", per_layer=False)
    assert [g["caption"] for g in gallery] == ["a · mean of layers", "red · mean of layers", "circle · mean of layers"]
    _, gallery, index = maps_call(client, kind="self", words="0,0; 7,7", layers="1")
    values = [np.array(m["values"]) for m in json.load(open(index))["maps"]]
    assert [g["caption"] for g in gallery] == ["0,0 · layer 1", "7,7 · layer 1"]
    assert all(v.shape == (8, 8) and v.min() >= 0 and 0 < v.sum() <= 1 + 1e-6 for v in values)  # its mass on image keys


@pytest.mark.parametrize("changes, message", [
    (dict(words="dog"), r"'dog' not in the prompt 'a red circle'"),
    (dict(form=[FORM[0], "  ", *FORM[2:]]), "the prompt is empty"),
    (dict(layers="9"), r"layers \[9\] do not exist: this model has layers 0-3"),
    (dict(heads="7"), r"heads \[7\] do not exist"),
    (dict(layers="two"), "layers must be comma-separated indices"),
    (dict(first=1, last=0), r"first capture step \(1\) is after the last \(0\)"),
    (dict(last=5), r"last capture step must be in \[0, 1\]"),
    (dict(kind="self", words="red"), "takes row,col cells \\(a video: frame,row,col\\) separated by ';'"),
    (dict(kind="self", words="9,9"), "outside the 8×8 token grid"),
    (dict(kind="concept", words=""), "concept needs words"),
    (dict(words=",".join(["red"] * 40), layers=""), r"160 overlays \(40 words × 4 layers\) is more than the page shows"),
])
def test_bad_fields_are_one_readable_error(client, changes, message):
    with pytest.raises(AppError, match=message) as err:
        maps_call(client, **changes)
    assert "Traceback" not in str(err.value)


ATLAS = ["demo", "color:purple", "a red circle\na blue square", "0", 2, 1.0, 3.0, 4.5, "32", "joint", "identity"]


def test_atlas_tab_maps_word_gives_each_heads_capture_map(client):
    png, files, summary = client.predict(*ATLAS, "circle", api_name="/atlas")
    data = json.load(open(next(p for p in files if p.endswith(".json"))))
    assert data["maps_word"] == "circle" and sorted(data["maps"]) == sorted(data["scores"]) and len(data["maps"]) == 16
    assert open(next(p for p in files if p.endswith(".html"))).read().count('class="map"') == 16
    pipe = build_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with da.apply(pipe, da.Capture(layers=[2], heads=[1], tokens=["circle"])) as handle:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=2, guidance_scale=4.5,
             height=32, width=32)
        expected = handle.maps.maps[0, 0, 0, 0]
    assert (torch.tensor(data["maps"]["L2H1"]) - expected).abs().max() < 1e-6
    plain_png, _, _ = client.predict(*ATLAS, api_name="/atlas")  # the maps word is optional (old clients)
    assert Image.open(png).width > Image.open(plain_png).width  # each head's map beside its thumbnail


def test_atlas_maps_word_and_uploaded_maps_are_checked(client, tmp_path):
    with pytest.raises(AppError, match=r"'dog' not in the prompt 'a red circle'"):
        client.predict(*ATLAS, "dog", api_name="/atlas")
    from dit_attn.app.atlas import read_atlas
    from dit_attn.guidance.atlas import Atlas, png_base64

    thumb = png_base64(Image.new("RGB", (8, 8)))
    good = Atlas(0.1, {"L0H0": 0.2}, {"L0H0": thumb, "baseline": thumb}, [1], {"objective": "x"}, {"L0H0": [[0.5, 1.0]]},
                 "red")
    good.save(str(tmp_path / "good.json"))
    assert read_atlas(str(tmp_path / "good.json")).maps == {"L0H0": [[0.5, 1.0]]}
    for maps, word, message in [({"L0H1": [[0.5]]}, "red", "a map for 'L0H1', a head it does not score"),
                                ({"L0H0": [[0.5], [1, 2]]}, "red", "rows of equal length, at most 32 × 32"),
                                ({"L0H0": [[0.0] * 33]}, "red", "rows of equal length"),
                                ({"L0H0": [["x"]]}, "red", "not a finite number"),
                                ({"L0H0": [[0.5]]}, None, "need 'maps_word'")]:
        bad = Atlas(0.1, {"L0H0": 0.2}, {"L0H0": thumb, "baseline": thumb}, [1], {}, maps, word)
        bad.save(str(tmp_path / "bad.json"))
        with pytest.raises(ValueError, match=re.escape(message)):
            read_atlas(str(tmp_path / "bad.json"))


def test_browser_maps_tab_shows_the_gallery(page):
    page.locator("#prompt").get_by_role("textbox").fill(PROMPT)
    page.locator("#size").get_by_role("textbox").fill("32")
    steps = page.locator("#steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.get_by_role("tab", name="Maps").click()
    page.locator("#maps-words").get_by_role("textbox").fill("red, circle")
    page.locator("#maps-layers").get_by_role("textbox").fill("1")
    page.locator("#maps-button").click()
    images = page.locator("#maps-gallery img")
    images.nth(1).wait_for(state="visible")
    assert images.count() == 2
    for k in range(2):
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=images.nth(k).element_handle())
    page.locator("#maps-image img").wait_for(state="visible")
    assert page.get_by_text(re.compile(r"circle · layer 1")).count() >= 1
    page.locator("#maps-words").get_by_role("textbox").fill("dog")
    page.locator("#maps-button").click()
    page.get_by_text(re.compile(r"'dog' not in the prompt")).first.wait_for(state="visible")
    assert "Traceback" not in page.content()


def test_every_kind_passes_the_overlay_check_on_a_video_model():
    from dit_attn.app.maps import check_overlays
    from dit_attn.app.models import load_model
    from dit_attn.toy.wan import build_wan_pipeline

    model = load_model("wan", build_wan_pipeline())
    check_overlays(da.Capture(tokens=["red"]), model, per_layer=True)  # cross maps draw over the video
    check_overlays(da.Capture(kind="concept", tokens=["red"]), model, per_layer=True)  # concept maps too
