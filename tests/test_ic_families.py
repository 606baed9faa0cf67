"""In-context sets on the families whose latents dit-attn encodes (checked against each pipeline's own latent
path), and a clear refusal elsewhere."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.ic.latents import decode, encode, image_tensor, latent_grid
from dit_attn.toy.chroma import build_chroma_pipeline
from dit_attn.toy.flux2 import build_flux2_klein_pipeline
from dit_attn.toy.qwen_image import build_qwen_image_pipeline
from dit_attn.toy.z_image import build_z_image_pipeline
from dit_attn.train.flow import latents_of

CAPTION = "[LEFT] a red circle; [RIGHT] a blue square"
SETTINGS = dict(num_inference_steps=2, max_sequence_length=8)


def test_chroma_set_keeps_its_reference_panel():
    pipe = build_chroma_pipeline()
    pipe.set_progress_bar_config(disable=True)
    reference = Image.new("RGB", (32, 32), (200, 30, 30))
    kwargs = dict(size=(32, 64), num_inference_steps=2, decode="panels", max_sequence_length=8)
    result = da.ic.generate_set(pipe, ["a red circle", "a blue square"], (1, 2), reference={0: reference}, **kwargs)
    again = da.ic.generate_set(pipe, ["a red circle", "a blue square"], (1, 2), reference={0: reference}, **kwargs)
    assert result.canvas.size == (64, 32) and result.canvas.tobytes() == again.canvas.tobytes()
    round_trip = decode(pipe, encode(pipe, image_tensor(reference, 32, 32)))[0]  # what the kept panel must show
    panel = torch.from_numpy(np.asarray(result.panels[0], dtype=np.float32) / 255).permute(2, 0, 1)
    assert (panel - round_trip.cpu().float()).abs().max() < 2 / 255


@pytest.fixture(scope="module")
def flux2():
    pipe = build_flux2_klein_pipeline()
    g = torch.Generator().manual_seed(1)
    bn = pipe.vae.bn  # statistics away from (0, 1), so that a missing or misplaced normalisation shows
    bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=g))
    bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def qwen():
    pipe = build_qwen_image_pipeline()
    z = pipe.vae.config.z_dim
    pipe.vae.register_to_config(latents_mean=[0.2 * i - 0.3 for i in range(z)], latents_std=[0.5 + 0.4 * i for i in range(z)])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def pipeline_step_latents(pipe, image: Image.Image) -> torch.Tensor:
    """An image's latents as the pipeline's denoising loop holds them, from the pipeline's own functions
    (Qwen-Image's text-to-image pipeline encodes no images: its img2img formula, with the posterior's mode)."""
    x = pixels(image)
    h, w = x.shape[-2] // pipe.vae_scale_factor, x.shape[-1] // pipe.vae_scale_factor
    with torch.no_grad():
        if type(pipe).__name__ == "Flux2KleinPipeline":
            return pipe._pack_latents(pipe._encode_vae_image(x, None))
        z = pipe.vae.encode(x[:, :, None]).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    z = (z - mean) * (1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1))
    return pipe._pack_latents(z, 1, z.shape[1], h, w)


def noise_image(height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_set_is_the_stock_call_at_the_canvas_size_and_its_panels_are_exact_crops(family, request):
    pipe = request.getfixturevalue(family)
    result = da.ic.generate_set(pipe, CAPTION, (1, 2), size=(32, 64), seed=3, **SETTINGS)
    if family == "flux2":  # the same seed draws the same noise as the stock pipeline
        stock = pipe(prompt=CAPTION, height=32, width=64, generator=torch.Generator().manual_seed(3), **SETTINGS)
    else:  # packed (1, (8/2)·(16/2), 4·4) tokens
        noise = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(3))
        stock = pipe(prompt=CAPTION, height=32, width=64, latents=noise, **SETTINGS)
    assert result.canvas.tobytes() == stock.images[0].tobytes()
    assert [p.tobytes() for p in result.panels] == [result.canvas.crop(box).tobytes() for box in ((0, 0, 32, 32), (32, 0, 64, 32))]


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_reference_panel_is_kept_at_the_pipelines_own_encoding(family, request):
    pipe = request.getfixturevalue(family)
    reference = noise_image(32, 32, 7)
    last = []

    def record(p, i, t, kwargs):
        last[:] = [kwargs["latents"].clone()]
        return {}

    result = da.ic.generate_set(pipe, ["a red circle", "a blue square"], (1, 2), size=(32, 64), reference={0: reference},
                                decode="panels", callback_on_step_end=record, **SETTINGS)
    tokens = last[0].reshape(1, 4, 8, -1)  # the canvas's 4 × 8 token grid; the left panel's 4 × 4 tokens
    expected = pipeline_step_latents(pipe, reference).reshape(1, 4, 4, -1)
    assert (tokens[:, :, :4] - expected).abs().max() <= 1e-5
    assert (tokens[:, :, 4:] - expected).abs().max() > 1e-2  # the generated panel is not the reference
    round_trip = decode(pipe, encode(pipe, image_tensor(reference, 32, 32)))[0]
    panel = torch.from_numpy(np.asarray(result.panels[0], dtype=np.float32) / 255).permute(2, 0, 1)
    assert (panel - round_trip).abs().max() < 2 / 255


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_latents_encode_and_decode_as_the_pipeline_does(family, request):
    pipe = request.getfixturevalue(family)
    image = noise_image(32, 64, 2)
    grid = latent_grid(pipe, (1, 2), 32, 64)
    ours = grid.to_steps(grid.to_pipeline(encode(pipe, pixels(image))))
    assert (ours - pipeline_step_latents(pipe, image)).abs().max() <= 1e-6
    assert (latents_of(pipe, pixels(image)) - ours).abs().max() == 0  # the trainers' latents
    run = dict(prompt=CAPTION, height=32, width=64, **SETTINGS)
    latents = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **run).images
    images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **run).images
    ours = decode(pipe, grid.from_output(pipe, latents))[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - images[0]).max() <= 1e-5


def test_other_latent_formats_are_refused_before_any_work(tmp_path):
    from dit_attn.train.lora import LoraTrainConfig, train_lora

    pipe = build_z_image_pipeline()
    with pytest.raises(TypeError, match="z_image pipelines use another latent format"):
        train_lora(pipe, LoraTrainConfig(mode="ic", steps=1), str(tmp_path), str(tmp_path / "work"), str(tmp_path / "lora"))
    assert not (tmp_path / "work").exists()
    with pytest.raises(TypeError, match="z_image pipelines use another latent format"):
        da.ic.generate_set(pipe, ["a red circle", "a blue square"], (1, 2), size=(32, 64), num_inference_steps=2)
    with pytest.raises(TypeError, match="z_image pipelines use another latent format"):
        latents_of(pipe, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_training_prediction_is_the_pipelines_own_transformer_call(family, request):
    """The trainers' text features and velocity prediction at flow time σ equal what the pipeline's transformer
    gets and returns at a step of noise level σ (recorded from a stock call)."""
    from dit_attn.train.flow import predict, text_features

    pipe = request.getfixturevalue(family)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out[0].clone())),
                                                  with_kwargs=True)
    try:
        pipe(prompt="a red circle", height=32, width=64, num_inference_steps=2, max_sequence_length=8,
             generator=torch.Generator().manual_seed(0), guidance_scale=1.0, output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2  # one call a step (no CFG)
    call, out = calls[1]
    sigma = pipe.scheduler.sigmas[1:2]
    embeds, extra = text_features(pipe, ["a red circle"], 8)
    assert torch.equal(embeds, call["encoder_hidden_states"])
    ours = predict(pipe.transformer, call["hidden_states"], embeds, extra, sigma, (8, 16))
    assert (ours - out).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["flux2", "qwen"])
def test_ic_lora_trains_on_these_latents_and_reloads(family, request, tmp_path):
    from dit_attn.train.lora import LoraTrainConfig, train_lora

    from .test_ic import fixed_loss, small_sets

    builders = {"flux2": build_flux2_klein_pipeline, "qwen": build_qwen_image_pipeline}
    cfg = LoraTrainConfig(mode="ic", rank=4, alpha=8.0, steps=25, batch=2, lr=2e-2, warmup=2, max_sequence_length=8,
                          checkpoint_every=10)
    pipe = builders[family]()
    pipe.set_progress_bar_config(disable=True)
    train_lora(pipe, cfg, small_sets(tmp_path / "data"), str(tmp_path / "work"), str(tmp_path / "lora"))
    bucket = torch.load(tmp_path / "work" / "data.pt")["buckets"][1]
    before = fixed_loss(pipe, bucket)
    fresh = builders[family]()
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert fixed_loss(fresh, bucket) < 0.9 * before


def test_cli_ic_on_saved_flux2_and_qwen_image_pipelines(tmp_path):
    from diffusers import DiffusionPipeline

    from dit_attn.cli import main

    klein, qwen = tmp_path / "klein", tmp_path / "qwen"
    build_flux2_klein_pipeline().save_pretrained(klein)
    build_qwen_image_pipeline().save_pretrained(qwen)
    args = ["--steps", "2", "--size", "64x32", "--seed", "3"]  # WIDTHxHEIGHT
    assert main(["ic", CAPTION, "--model", str(klein), *args, "--out", str(tmp_path / "a")]) == 0
    stock = DiffusionPipeline.from_pretrained(klein)
    stock.set_progress_bar_config(disable=True)
    image = stock(prompt=CAPTION, height=32, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images[0]
    assert Image.open(tmp_path / "a" / "canvas.png").convert("RGB").tobytes() == image.tobytes()
    noise_image(32, 32, 4).save(tmp_path / "left.png")
    assert main(["ic", CAPTION, "--model", str(qwen), *args, "--reference", f"0={tmp_path / 'left.png'}",
                 "--out", str(tmp_path / "b")]) == 0
    settings = json.loads(Image.open(tmp_path / "b" / "canvas.png").text["dit-attn"])
    assert settings["pipeline"] == "QwenImagePipeline" and settings["reference_panels"] == [0]


def test_flux2_dev_latents_encode_and_decode_as_the_pipeline_does():
    """Flux2Pipeline returns packed tokens for output_type="latent" (Klein returns the VAE's own latents)."""
    from dit_attn.toy.flux2 import build_flux2_pipeline, flux2_prompt_embeds

    pipe = build_flux2_pipeline()
    bn = pipe.vae.bn
    bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=torch.Generator().manual_seed(1)))
    pipe.set_progress_bar_config(disable=True)
    image = noise_image(32, 64, 2)
    grid = latent_grid(pipe, (1, 2), 32, 64)
    with torch.no_grad():
        expected = pipe._pack_latents(pipe._encode_vae_image(pixels(image), None))
    assert (grid.to_steps(grid.to_pipeline(encode(pipe, pixels(image)))) - expected).abs().max() <= 1e-6
    run = dict(prompt_embeds=flux2_prompt_embeds(), height=32, width=64, num_inference_steps=2)
    latents = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **run).images
    images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **run).images
    assert latents.ndim == 3
    ours = decode(pipe, grid.from_output(pipe, latents))[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - images[0]).max() <= 1e-5
