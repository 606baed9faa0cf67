"""In-context sets: captions, layouts, canvas tiling, reference-overwrite and Fill set generation,
IC-LoRA training (buckets, caption dropout, accumulation, resume, reload), kohya FLUX LoRAs, CLI."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.ic.layout import Layout
from dit_attn.toy import data
from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

torch.set_num_threads(1)


def noise_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- captions and layouts


@pytest.mark.parametrize("layout, tags", [
    ("1x1", ["IMAGE"]),
    ("1x2", ["LEFT", "RIGHT"]),
    ("2x1", ["TOP", "BOTTOM"]),
    ("2x2", ["TOP-LEFT", "TOP-RIGHT", "BOTTOM-LEFT", "BOTTOM-RIGHT"]),
    ("1x3", ["PANEL-1", "PANEL-2", "PANEL-3"]),
    ("4x1", ["PANEL-1", "PANEL-2", "PANEL-3", "PANEL-4"]),
    ("2x3", ["ROW-1-COL-1", "ROW-1-COL-2", "ROW-1-COL-3", "ROW-2-COL-1", "ROW-2-COL-2", "ROW-2-COL-3"]),
])
def test_caption_tags_for_every_layout_kind(layout, tags):
    panels = [f"panel {k}" for k in range(len(tags))]
    expected = "; ".join(f"[{t}] panel {k}" for k, t in enumerate(tags))
    assert da.ic.caption(panels, layout) == expected
    assert da.ic.caption(panels, layout, task_tag="STORY", summary="a story") == "[STORY] a story; " + expected
    assert da.ic.caption(panels, layout, task_tag="[STORY]") == "[STORY]; " + expected
    assert da.ic.caption(panels, layout, summary="just a summary") == "just a summary; " + expected


def test_caption_user_tags_and_errors():
    text = da.ic.caption(["a", "b", "c"], "1x3", task_tag="SCENES", tags=["SCENE-1", "[SCENE-2]", "SCENE-3"])
    assert text == "[SCENES]; [SCENE-1] a; [SCENE-2] b; [SCENE-3] c"
    assert da.ic.caption(["a", "b"]) == "[LEFT] a; [RIGHT] b"  # no layout: one row
    with pytest.raises(ValueError, match="one tag a panel \\(3 for a 1x3 layout\\)"):
        da.ic.caption(["a", "b", "c"], "1x3", tags=["X", "Y"])
    with pytest.raises(ValueError, match="a 2x2 layout has 4 panels, got 3"):
        da.ic.caption(["a", "b", "c"], "2x2")
    with pytest.raises(ValueError, match="without '\\['"):
        da.ic.caption(["a", "b"], "1x2", tags=["A;B", "C"])
    with pytest.raises(ValueError, match="panel 1 needs a non-empty caption"):
        da.ic.caption(["a", " "], "1x2")
    with pytest.raises(TypeError, match="list of panel captions"):
        da.ic.caption("a red circle", "1x1")


def test_caption_reproduces_the_tiny_world_set_captions():
    for i in range(20):
        ex = data.make_set_example(3, i)
        left, right = ex.attrs.panels()
        text = da.ic.caption([data.caption(left), data.caption(right)], "1x2", task_tag="SET",
                             summary=f"two panels of the same {ex.attrs.shape}")
        assert text == ex.caption == data.set_caption(ex.attrs)
        assert data.parse_set_caption(text) == ex.attrs


def test_layout_parsing_and_bad_layouts():
    assert Layout.parse("2x3") == Layout(2, 3) == Layout.parse((2, 3)) and str(Layout(2, 3)) == "2x3"
    assert Layout(3, 2).position(5) == (2, 1)
    with pytest.raises(ValueError, match="rows >= 1"):
        Layout(0, 2)
    with pytest.raises(ValueError, match="cols >= 1"):
        Layout.parse("1x0")
    with pytest.raises(ValueError, match="ROWSxCOLS"):
        Layout.parse("two by two")
    with pytest.raises(TypeError, match="'ROWSxCOLS' string"):
        Layout.parse(3)
    with pytest.raises(ValueError, match="valid 0-3"):
        Layout(2, 2).position(4)


# ---------------------------------------------------------------------------- canvas


@pytest.mark.parametrize("layout, w, h", [("1x2", 13, 7), ("2x3", 5, 11), ("3x1", 1, 1), ("2x2", 64, 64)])
def test_compose_split_round_trip_pil_and_tensor(layout, w, h):
    lay = Layout.parse(layout)
    panels = [noise_image(w, h, k) for k in range(lay.panels)]
    canvas = da.ic.compose(panels, layout)
    assert canvas.size == (w * lay.cols, h * lay.rows)
    array = np.asarray(canvas)
    for k, panel in enumerate(panels):  # independent: numpy slicing of the canvas
        r, c = lay.position(k)
        assert np.array_equal(array[r * h:(r + 1) * h, c * w:(c + 1) * w], np.asarray(panel))
    back = da.ic.split(canvas, layout)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, panels))
    tensors = [torch.from_numpy(np.asarray(p)).permute(2, 0, 1) for p in panels]
    t_canvas = da.ic.compose(tensors, layout)
    assert torch.equal(t_canvas, torch.from_numpy(array).permute(2, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(da.ic.split(t_canvas, layout), tensors))


def test_split_and_compose_errors_name_valid_sizes():
    with pytest.raises(ValueError, match=r"height must be a multiple of 3 and the width of 2; nearest valid sizes: "
                                         r"12x9, 14x9, 12x12, 14x12"):
        da.ic.split(noise_image(13, 10, 0), "3x2")
    with pytest.raises(ValueError, match="same size"):
        da.ic.compose([noise_image(4, 4, 0), noise_image(5, 4, 0)], "1x2")
    with pytest.raises(ValueError, match="takes 4 panels, got 2"):
        da.ic.compose([noise_image(4, 4, 0)] * 2, "2x2")


# ---------------------------------------------------------------------------- set generation


@pytest.fixture(scope="module")
def sd3():
    pipe = build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    pipe = build_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def independent_reference_latents(pipe, image):
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mode()
    return (z - (pipe.vae.config.shift_factor or 0)) * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_overwrite_keeps_the_reference_panel_at_its_noised_latents(family, request):
    pipe = request.getfixturevalue(family)
    height, width, steps, seed = 32, 64, 4, 5
    ref = noise_image(32, 32, 1)
    recorded, sigmas = [], []

    def record(p, i, t, kwargs):
        recorded.append(kwargs["latents"].clone())
        sigmas.append(float(p.scheduler.sigmas[i + 1]))
        return {}

    result = da.ic.generate_set(pipe, ["a red circle", "a blue circle"], "1x2", size=(height, width), reference={1: ref},
                                seed=seed, num_inference_steps=steps, max_sequence_length=8, callback_on_step_end=record,
                                decode="panels")
    assert len(recorded) == steps and sigmas[-1] == 0.0 and result.caption == "[LEFT] a red circle; [RIGHT] a blue circle"
    x0 = independent_reference_latents(pipe, ref)  # (1, C, 16, 16)
    channels, lh, lw = x0.shape[1], height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    if family == "flux":
        noise = torch.randn(1, (lh // 2) * (lw // 2), channels * 4, generator=torch.Generator().manual_seed(seed))
        noise = pipe._unpack_latents(noise, height, width, pipe.vae_scale_factor)
        grids = [pipe._unpack_latents(r, height, width, pipe.vae_scale_factor) for r in recorded]
    else:
        noise = torch.randn(1, channels, lh, lw, generator=torch.Generator().manual_seed(seed))
        grids = recorded
    for sigma, grid in zip(sigmas, grids):
        expected = (1 - sigma) * x0 + sigma * noise[..., lw // 2:]
        assert (grid[..., lw // 2:] - expected).abs().max() <= 1e-5
        assert (grid[..., :lw // 2] - ((1 - sigma) * x0 + sigma * noise[..., :lw // 2])).abs().max() > 1e-2
    with torch.no_grad():  # decode="panels": the reference panel is the VAE round trip of the reference
        z = x0 / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0)
        round_trip = ((pipe.vae.decode(z).sample.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(np.asarray(result.panels[1], dtype=np.float32) - round_trip).max() <= 1.0
    assert result.canvas.size == (64, 32) and [p.size for p in result.panels] == [(32, 32)] * 2


def test_without_reference_equals_the_stock_call(sd3):
    result = da.ic.generate_set(sd3, "[LEFT] a; [RIGHT] b", "1x2", size=(32, 64), seed=3, num_inference_steps=2,
                                max_sequence_length=8)
    noise = torch.randn(1, sd3.transformer.config.in_channels, 16, 32, generator=torch.Generator().manual_seed(3))
    stock = sd3("[LEFT] a; [RIGHT] b", height=32, width=64, latents=noise, num_inference_steps=2, max_sequence_length=8).images[0]
    assert np.array_equal(np.asarray(result.canvas), np.asarray(stock))


def test_generation_errors_name_valid_sizes(sd3, flux):
    with pytest.raises(ValueError, match=r"width of 8; nearest valid sizes: 64x32, 72x32"):
        da.ic.generate_set(sd3, "x", "1x2", size=(32, 66))  # 4 px a token (VAE 2 × patch 2), 2 panels across
    with pytest.raises(ValueError, match=r"height must be a multiple of 12"):
        da.ic.generate_set(flux, "x", "3x1", size=(32, 32))
    with pytest.raises(ValueError, match="rows >= 1"):
        da.ic.generate_set(sd3, "x", "0x2", size=(32, 64))
    with pytest.raises(ValueError, match="valid 0-1"):
        da.ic.generate_set(sd3, "x", "1x2", size=(32, 64), reference={2: noise_image(32, 32, 0)})
    with pytest.raises(ValueError, match="panel-sized \\(32x32"):
        da.ic.generate_set(sd3, "x", "1x2", size=(32, 64), reference={0: noise_image(64, 32, 0)}, num_inference_steps=1)
    with pytest.raises(TypeError, match="FluxFillPipeline"):
        da.ic.generate_set(flux, "x", "1x2", size=(32, 64), mode="fill")
    with pytest.raises(ValueError, match="mode must be one of"):
        da.ic.generate_set(sd3, "x", "1x2", mode="paste")


def test_fill_mode_on_a_flux_fill_pipeline(flux):
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    torch.manual_seed(0)  # Fill: latents (16) + masked-image latents (16) + packed mask (VAE 2×2 × 4 = 16) channels
    config = {k: v for k, v in flux.transformer.config.items() if not k.startswith("_")}
    transformer = FluxTransformer2DModel(**{**config, "in_channels": 48, "out_channels": 16}).eval()
    fill = FluxFillPipeline(transformer=transformer, scheduler=flux.scheduler, vae=flux.vae, text_encoder=flux.text_encoder,
                            tokenizer=flux.tokenizer, text_encoder_2=flux.text_encoder_2, tokenizer_2=flux.tokenizer_2)
    fill.set_progress_bar_config(disable=True)
    seen = []
    original = fill.prepare_mask_latents

    def spy(mask, *args, **kwargs):
        seen.append(mask.clone())
        return original(mask, *args, **kwargs)

    fill.prepare_mask_latents = spy
    result = da.ic.generate_set(fill, ["a", "b"], "1x2", size=(32, 64), reference={0: noise_image(32, 32, 2)}, mode="fill",
                                num_inference_steps=2, max_sequence_length=8)
    assert result.canvas.size == (64, 32) and len(result.panels) == 2
    mask = seen[0][0, 0]  # white (1) = generate: the right panel only
    assert mask[:, :32].max() == 0 and mask[:, 32:].min() == 1
    with pytest.raises(TypeError, match="mode='fill'"):
        da.ic.generate_set(fill, "x", "1x2", size=(32, 64))


# ---------------------------------------------------------------------------- data and scoring


def test_set_data_writer_and_consistency_score(tmp_path):
    assert da.ic.write_set_data(str(tmp_path), 4, seed=2) == 4
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    examples = [data.make_set_example(2, i) for i in range(4)]
    assert [r["text"] for r in rows] == [e.caption for e in examples]
    canvases = [Image.open(tmp_path / r["file_name"]) for r in rows]
    assert all(np.array_equal(np.asarray(c), np.asarray(e.image)) for c, e in zip(canvases, examples))
    scores = da.ic.set_consistency(canvases, [e.caption for e in examples])
    assert all(s["consistent"] for s in scores)  # the rendered sets themselves
    swapped = [data.set_caption(data.SetAttributes(e.attrs.shape, e.attrs.right_color, e.attrs.left_color, e.attrs.background))
               for e in examples]
    assert not any(s["colors_right"] for s in da.ic.set_consistency(canvases, swapped))
    mixed = da.ic.compose(da.ic.split(canvases[0], "1x2")[:1] + da.ic.split(canvases[1], "1x2")[1:], "1x2")
    if examples[0].attrs.shape != examples[1].attrs.shape:
        assert not da.ic.set_consistency([mixed], [examples[0].caption])[0]["same_shape"]


def test_sets_json_is_composed(tmp_path):
    from dit_attn.ic.data import read_set_data

    panels = [noise_image(8, 6, k) for k in range(4)]
    for k, p in enumerate(panels):
        p.save(tmp_path / f"p{k}.png")
    spec = {"layout": "1x2", "task_tag": "PAIR", "sets": [
        {"panels": ["p0.png", "p1.png"], "captions": ["a", "b"], "summary": "two things"},
        {"panels": ["p0.png", "p1.png", "p2.png", "p3.png"], "layout": "2x2", "caption": "joint"}]}
    (tmp_path / "sets.json").write_text(json.dumps(spec))
    items = read_set_data(str(tmp_path))
    assert items[0][1] == "[PAIR] two things; [LEFT] a; [RIGHT] b" and items[1][1] == "joint"
    assert np.array_equal(np.asarray(items[0][0]), np.asarray(da.ic.compose(panels[:2], "1x2")))
    assert items[1][0].size == (16, 12)
    (tmp_path / "sets.json").write_text(json.dumps({"sets": [{"panels": ["p0.png", "nope.png"], "captions": ["a", "b"]}]}))
    with pytest.raises(ValueError, match="set 0: panel image not found"):
        read_set_data(str(tmp_path))


# ---------------------------------------------------------------------------- training


def build(family):
    pipe = build_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8) if family == "flux" \
        else build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def small_sets(directory, n=6):
    """Tiny-world sets at 64×32 plus two 2×1 sets at 32×64 (a second bucket), for the 4 px/token test pipelines."""
    da.ic.write_set_data(str(directory), n, seed=1)
    rows = [json.loads(line) for line in (directory / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        path = directory / row["file_name"]
        Image.open(path).resize((64, 32), Image.BICUBIC).save(path)
    for i in range(2):
        name = f"tall-{i}.png"
        left, right = da.ic.split(Image.open(directory / rows[i]["file_name"]), "1x2")
        da.ic.compose([left, right], "2x1").save(directory / name)
        rows.append({"file_name": name, "text": rows[i]["text"].replace("[LEFT]", "[TOP]").replace("[RIGHT]", "[BOTTOM]")})
    (directory / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(directory)


def fixed_loss(pipe, bucket, seed=0):
    """Flow-matching loss of the pipeline on one fixed batch of a bucket (same noise and times every call)."""
    from dit_attn.train.flow import predict

    g = torch.Generator().manual_seed(seed)
    x0 = bucket["latents"]
    noise, t = torch.randn(x0.shape, generator=g), torch.full((len(x0),), 0.6)
    t_b = t.view(-1, *[1] * (x0.ndim - 1))
    with torch.no_grad():
        v = predict(pipe.transformer, (1 - t_b) * x0 + t_b * noise, bucket["embeds"], bucket["pooled"], t, bucket["latent_hw"])
    return torch.nn.functional.mse_loss(v, noise - x0).item()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_ic_training_lowers_loss_saves_and_reloads(family, tmp_path):
    from peft.utils import set_peft_model_state_dict

    from dit_attn.train.lora import LoraTrainConfig, draw_batch, train_lora

    directory = small_sets(tmp_path / "data")
    cfg = LoraTrainConfig(mode="ic", rank=4, alpha=8.0, steps=25, batch=2, lr=2e-2, warmup=2, max_sequence_length=8,
                          checkpoint_every=10, caption_dropout=0.1, accumulate=2)
    pipe = build(family)
    summary = train_lora(pipe, cfg, directory, str(tmp_path / "work"), str(tmp_path / "lora"))
    cache = torch.load(tmp_path / "work" / "data.pt")
    assert sorted(b["size"] for b in cache["buckets"]) == [(32, 64), (64, 32)]
    g = torch.Generator().manual_seed(0)
    draws = [draw_batch(cache, cfg, g) for _ in range(30)]
    by_bucket = {tuple(d[5]): {tuple(d[0].shape)} for d in draws}  # latent grid → latents shape
    assert len(by_bucket) == 2  # both buckets drawn, each batch of one size (FLUX: the same token count, other ids)
    before = fixed_loss(pipe, cache["buckets"][1])
    assert not getattr(pipe.transformer, "peft_config", None)
    fresh = build(family)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    after = fixed_loss(fresh, cache["buckets"][1])
    assert after < 0.9 * before, (before, after)
    info = da.layers(fresh)
    assert summary["layers"] == [i.index for i in info]  # every layer's attention
    first = fresh.transformer.get_submodule(info[0].name).to_q
    assert first.scaling["default_0"] == 2.0  # alpha / rank kept
    # identical outputs: the reloaded LoRA vs the trainer's final tensors set into a fresh adapter
    own = build(family)
    own.transformer.add_adapter(da.localized_lora_config(own, summary["layers"], rank=4, alpha=8.0))
    set_peft_model_state_dict(own.transformer, torch.load(tmp_path / "work" / "state.pt")["lora"])
    args = dict(num_inference_steps=2, max_sequence_length=8, height=32, width=64, output_type="latent")
    a = fresh("[LEFT] a; [RIGHT] b", generator=torch.Generator().manual_seed(0), **args).images
    b = own("[LEFT] a; [RIGHT] b", generator=torch.Generator().manual_seed(0), **args).images
    assert (a - b).abs().max() <= 1e-6


def test_ic_training_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from dit_attn.train.lora import LoraTrainConfig, train_lora

    directory = small_sets(tmp_path / "data", n=4)
    cfg = LoraTrainConfig(mode="ic", rank=2, steps=5, batch=2, lr=1e-2, warmup=1, max_sequence_length=8,
                          checkpoint_every=1, caption_dropout=0.3, accumulate=2)
    whole = train_lora(build("sd3"), cfg, directory, str(tmp_path / "w1"), str(tmp_path / "l1"))
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def crash_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_lora(build("sd3"), cfg, directory, str(tmp_path / "w2"), str(tmp_path / "l2"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert torch.load(tmp_path / "w2" / "state.pt")["step"] == 3
    resumed = train_lora(build("sd3"), cfg, directory, str(tmp_path / "w2"), str(tmp_path / "l2"))
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    a = load_file(tmp_path / "l1" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "l2" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    with pytest.raises(ValueError, match="ic sets train at their own size"):
        LoraTrainConfig(mode="ic", size=64)
    with pytest.raises(ValueError, match="caption_dropout"):
        LoraTrainConfig(mode="ic", caption_dropout=1.0)


def test_training_images_must_be_token_aligned(tmp_path):
    from dit_attn.train.lora import LoraTrainConfig, train_lora

    noise_image(30, 32, 0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("[LEFT] a; [RIGHT] b")
    with pytest.raises(ValueError, match="nearest valid sizes: 28x32, 32x32"):
        train_lora(build("sd3"), LoraTrainConfig(mode="ic", steps=1, max_sequence_length=8), str(tmp_path),
                   str(tmp_path / "w"), str(tmp_path / "o"))


def test_kohya_flux_lora_loads_through_load_lora_weights(flux, tmp_path):
    """A kohya (sd-scripts) FLUX LoRA of the tiny FLUX model: diffusers converts it; the result equals
    the weights with (alpha / rank)·up·down added by hand (fused q/k/v split in three)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    rank, alpha, inner = 4, 2.0, 16
    down_proj, up_proj = torch.randn(rank, inner, generator=g) * 0.3, torch.randn(inner, rank, generator=g) * 0.3
    down_qkv, up_qkv = torch.randn(rank, inner, generator=g) * 0.3, torch.randn(3 * inner, rank, generator=g) * 0.3
    kohya = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down_proj,
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up_proj,
        "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(alpha),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down_qkv,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up_qkv,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha),
    }
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    pipe = copy.deepcopy(flux)
    manual = copy.deepcopy(flux.transformer)
    attn = manual.transformer_blocks[0].attn
    with torch.no_grad():
        attn.to_out[0].weight += alpha / rank * up_proj @ down_proj
        for k, module in enumerate((attn.to_q, attn.to_k, attn.to_v)):
            module.weight += alpha / rank * up_qkv[k * inner:(k + 1) * inner] @ down_qkv
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        loaded, expected = pipe.transformer(**inputs).sample, manual(**inputs).sample
        stock = flux.transformer(**inputs).sample
    assert (loaded - expected).abs().max() <= 1e-5 and (loaded - stock).abs().max() > 1e-3


# ---------------------------------------------------------------------------- CLI


def test_cli_ic_writes_canvas_and_panels(tmp_path, capsys):
    from dit_attn.cli import main

    ex = data.make_set_example(0, 1)
    left = tmp_path / "left.png"
    da.ic.split(ex.image, "1x2")[0].save(left)
    out = tmp_path / "set"
    assert main(["ic", ex.caption, "--reference", f"0={left}", "--steps", "2", "--size", "128x64", "--out", str(out)]) == 0
    canvas = Image.open(out / "canvas.png")
    assert canvas.size == (128, 64) and Image.open(out / "panel-1.png").size == (64, 64)
    settings = json.loads(canvas.text["dit-attn"])
    assert settings["caption"] == ex.caption and settings["reference_panels"] == [0] and settings["model"] == "tiny"
    assert main(["ic", "--panel", "a", "--panel", "b", "--size", "100x64", "--out", str(out)]) == 2
    assert "nearest valid sizes: 96x64, 112x64" in capsys.readouterr().err


def test_app_sets_tab_action(tmp_path):
    pytest.importorskip("gradio")
    from dit_attn.app.models import ModelRegistry
    from dit_attn.app.ui import AppActions

    actions = AppActions(ModelRegistry(embedded=("demo",)), str(tmp_path))
    reference = tmp_path / "reference.png"  # the page hands over uploads as file paths
    noise_image(50, 40, 0).save(reference)
    canvas, panels, text = actions.sets("demo", 2, 4.5, 1, "64x32", "1x2", "a red circle\na blue circle\n", "SET", "",
                                        str(reference), 1, progress=lambda *a, **k: None)
    assert text == "[SET]; [LEFT] a red circle; [RIGHT] a blue circle"
    image = Image.open(canvas)
    assert image.size == (64, 32) and [Image.open(p).size for p in panels] == [(32, 32)] * 2
    assert json.loads(image.text["dit-attn"])["reference_panels"] == [1]
    with pytest.raises(ValueError, match="rows >= 1"):
        actions.sets("demo", 2, 4.5, 1, "", "0x2", "a\nb", "", "", None, 0, progress=lambda *a, **k: None)
