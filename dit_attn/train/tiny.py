"""Train the embedded "tiny" model from scratch: `dit-attn train-tiny --work DIR`.

Stages, each resumable from its last checkpoint in the work directory:
1. render the synthetic world (shapes and signs, 64×64) deterministically from the seed;
2. train the VAE as a near-deterministic autoencoder (decode the posterior mean; MSE + L1 +
   1e-5·KL keeps the latents tame), then encode every image to latents and set the
   VAE's shift/scaling factors from their statistics;
3. train the SD3 transformer with flow matching (x_t = (1−t)·x0 + t·n, target n − x0,
   logit-normal t, timestep t·1000), 10% empty captions, AdamW with warm-up and cosine
   decay, EMA, the step under torch.compile; text features from two frozen random CLIP
   encoders;
4. assemble a StableDiffusion3Pipeline (EMA weights) and save it with safetensors.

Runs are deterministic from the seed for a fixed thread count (step counts, not time
budgets, decide how long each stage trains). Every cache and checkpoint in the work
directory records the run's settings and the fingerprint of its rendered data; a rerun
with other settings or data stops, naming the difference (`train.resume`).
"""
from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import save_torch_atomic as save_atomic, write_json_atomic
from .common import cosine_lr, set_lr, start_over, step_seed
from .config import TrainConfig
from .flow import flow_loss, noised, predict, text_features
from .resume import RUN_KEY, check_resumable, fingerprint, load_checkpoint, run_record
from ..toy.data import make_example
from ..toy.tiny import PIPELINE_ZERO_TOKENS, ZeroTokenBias, assemble_pipeline, export_half, make_transformer, make_vae


def render_dataset(cfg: TrainConfig, work: str) -> tuple[torch.Tensor, list[str], str]:
    """(N, 3, 64, 64) uint8 images, their captions and the data's fingerprint, cached in the work directory."""
    path = os.path.join(work, "data.pt")
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        data = fingerprint(cached["images"], cached["captions"])
        check_resumable(cached, asdict(cfg), data, where=path)
        return cached["images"], cached["captions"], data
    images, captions = [], []
    for i in tqdm(range(cfg.images), desc="render", unit="img"):
        example = make_example(cfg.seed, i, "mix", fixed_geometry=cfg.fixed_geometry, sign_fraction=cfg.sign_fraction)
        images.append(torch.from_numpy(np.array(example.image, dtype=np.uint8)).permute(2, 0, 1))
        captions.append(example.caption)
    images = torch.stack(images)
    data = fingerprint(images, captions)
    save_atomic({"images": images, "captions": captions, RUN_KEY: run_record(asdict(cfg), data)}, path)
    return images, captions, data


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def resume(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: dict) -> dict:
    """Load a stage's last checkpoint into model and optimizer, if it belongs to this run (`run`: its
    run_record; another run's stops, see `train.resume`); {"step": 0} when there is none."""
    checkpoint = load_checkpoint(path, run["settings"], run["fingerprint"])
    if checkpoint is None:
        return {"step": 0}
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint


def autocast(cfg: TrainConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def train_vae(cfg: TrainConfig, work: str, images: torch.Tensor, run: dict):
    vae = make_vae(cfg.seed)
    layout = torch.channels_last if cfg.bf16 else torch.contiguous_format  # oneDNN's fast bfloat16 convolutions
    vae.to(memory_format=layout)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    ckpt_path = os.path.join(work, "vae_ckpt.pt")
    start = resume(ckpt_path, vae, optimizer, run)["step"]
    generator = torch.Generator()
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps)
    for step in bar:
        generator.manual_seed(step_seed(cfg.seed + 11, step))  # a resumed run draws the same batches
        batch = to_unit(images[torch.randint(len(images), (cfg.vae_batch,), generator=generator)])
        batch = batch.contiguous(memory_format=layout)
        set_lr(optimizer, cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 100))
        with autocast(cfg):
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.mode()).sample.float()  # sampled latents trained 3× slower here
        loss = F.mse_loss(recon, batch) + F.l1_loss(recon, batch) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_atomic({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1, RUN_KEY: run},
                        ckpt_path)
    return vae.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, work: str, run: dict) -> torch.Tensor:
    """Posterior means of every image, normalised; sets the VAE's shift and scaling factors."""
    path = os.path.join(work, "latents.pt")
    cached = load_checkpoint(path, run["settings"], run["fingerprint"])
    if cached is None:
        means = [vae.encode(to_unit(images[i : i + 256])).latent_dist.mean for i in tqdm(range(0, len(images), 256), desc="encode")]
        raw = torch.cat(means)
        shift, scale = raw.mean().item(), 1.0 / raw.std().item()
        cached = {"raw": raw, "shift": shift, "scale": scale, RUN_KEY: run}
        save_atomic(cached, path)
    vae.register_to_config(shift_factor=cached["shift"], scaling_factor=cached["scale"])
    return (cached["raw"] - cached["shift"]) * cached["scale"]


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP token features (N, L, 128) and pooled vectors (N, 128); "" is the empty caption."""
    unique = sorted(set(captions) | {""})
    embeds, pooled = text_features(pipe, unique, max_sequence_length=1)
    index = {c: i for i, c in enumerate(unique)}
    rows = torch.tensor([index[c] for c in captions])
    clip = embeds[:, :-1]  # drop the single zero "T5" token; training adds it back with a bias
    return clip[rows], pooled[rows], clip[index[""]], pooled[index[""]]


def compiled(model: torch.nn.Module):
    """The model with its forward under torch.compile, in place (it stays the same class, so the flow
    recipe's `predict` knows its family); unchanged, with a warning, without a C++ compiler."""
    if not any(name and shutil.which(name) for name in (os.environ.get("CXX"), "g++", "clang++", "c++")):
        warnings.warn("no C++ compiler found for torch.compile: training the transformer eagerly (slower)")
        return model
    model.compile()
    return model


def train_transformer(cfg: TrainConfig, work: str, pipe, latents: torch.Tensor, captions: list[str], run: dict):
    transformer = pipe.transformer
    # the stock pipeline appends max_sequence_length zero tokens (default 256); training over
    # log n ~ U(0, log 256) makes every length from 1 to 256 work, so fast callers can pass 1
    zero_tokens = ZeroTokenBias(PIPELINE_ZERO_TOKENS)
    transformer.set_attn_processor(zero_tokens)
    clip, pooled, empty_clip, empty_pooled = encode_captions(pipe, captions)
    zero = torch.zeros(1, 1, clip.shape[-1])
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.01, fused=True)
    ckpt_path = os.path.join(work, "transformer_ckpt.pt")
    checkpoint = resume(ckpt_path, transformer, optimizer, run)
    start = checkpoint["step"]
    ema = checkpoint.get("ema") or {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    generator = torch.Generator()
    transformer.train()
    forward = compiled(transformer) if cfg.compile else transformer
    bar = tqdm(range(start, cfg.steps), desc="transformer", initial=start, total=cfg.steps)
    for step in bar:
        generator.manual_seed(step_seed(cfg.seed + 23, step))  # a resumed run draws the same batches
        rows = torch.randint(len(latents), (cfg.batch,), generator=generator)
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(cfg.batch, generator=generator) + cfg.t_location)
        zero_tokens.log_n.fill_(float(torch.rand(1, generator=generator)) * math.log(PIPELINE_ZERO_TOKENS))
        drop = torch.rand(cfg.batch, generator=generator) < cfg.caption_dropout
        text = torch.where(drop[:, None, None], empty_clip, clip[rows])
        text = torch.cat([text, zero.expand(cfg.batch, -1, -1)], dim=1)
        pool = torch.where(drop[:, None], empty_pooled, pooled[rows])
        x_t, target = noised(x0, noise, t)
        set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        with autocast(cfg):
            prediction = predict(forward, x_t, text, pool, t, latents.shape[-2:])
        loss = flow_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for k, v in transformer.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1 - cfg.ema)
                else:
                    ema[k].copy_(v)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state = {"model": transformer.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema, "step": step + 1,
                     RUN_KEY: run}
            save_atomic(state, ckpt_path)
    transformer.load_state_dict(ema)
    return transformer.eval()


def train_tiny(cfg: TrainConfig, work: str, out: str, restart: bool = False) -> str:
    """Run every stage (resuming where a previous run stopped; restart=True: from scratch) and save the pipeline to `out`."""
    from ..limits import whole_number

    whole_number("images", cfg.images, 1)  # before anything is rendered
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out!r} is a file; the pipeline is saved as a folder")
    start_over(work, restart)
    torch.set_num_threads(cfg.threads)
    os.makedirs(work, exist_ok=True)
    started = time.time()
    images, captions, data = render_dataset(cfg, work)
    run = run_record(asdict(cfg), data)
    vae = train_vae(cfg, work, images, run)
    latents = encode_latents(vae, images, work, run)
    pipe = assemble_pipeline(make_transformer(cfg.seed, cfg.layers), vae, cfg.seed)
    train_transformer(cfg, work, pipe, latents, captions, run)
    return _export(pipe, cfg, out, time.time() - started, data)


def _export(pipe, cfg: TrainConfig, out: str, seconds: float, data: str) -> str:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
    pipe.save_pretrained(out, safe_serialization=True)
    write_json_atomic(os.path.join(out, "dit_attn_training.json"),
                      {"config": asdict(cfg), "data_fingerprint": data, "seconds_this_run": round(seconds, 1),
                       "torch": torch.__version__})
    return out
