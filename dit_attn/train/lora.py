"""Train a LoRA: on the text layers only (`--mode localized`), on every layer (`all`), or an
In-Context LoRA on panel sets (`ic`, every layer's attention): `dit-attn train-lora`.

Data: a directory of images with captions, either a `metadata.jsonl` (objects with
`file_name` and `text`, the Hugging Face image-folder layout) or `NAME.png` + `NAME.txt`
pairs; in `ic` mode the images are whole set canvases, or the directory holds panels and a
`sets.json` that the trainer composes into canvases (`dit_attn.ic.data`). The images are
encoded once with the pipeline's VAE and text encoders and cached in the work directory,
grouped in buckets of one image size: a batch only mixes latents of one size (the bucket of
each step is drawn in proportion to its size). Loss: flow matching (x_t = (1 − t)·x0 + t·n,
target n − x0, logit-normal t; SD3 timestep 1000·t, FLUX t on packed latents with position
ids and a guidance value). Caption dropout replaces a caption by the empty one; gradient
accumulation sums `accumulate` batches per update. The LoRA's initial weights are drawn
from the config's seed, so two runs with one seed train the same LoRA. Resumable: every
`checkpoint_every` steps the LoRA tensors and the optimizer state are written atomically;
rerunning continues, and each step draws its batches and noise from its own seed, so the
result equals an uninterrupted run. The encoded data and the checkpoint record the run's
settings (with the model's fingerprint) and the fingerprint of its images and captions; a
rerun with other ones stops, naming the difference (`train.resume`). The LoRA is saved
with its config as metadata (`pipe.load_lora_weights(out)` keeps lora_alpha). SD3 / SD3.5
and FLUX pipelines.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..heads import model_layers
from .flow import flow_loss, latents_of, noised, predict, text_features
from ..io import save_torch_atomic as save_atomic
from .common import cosine_lr, seeded, set_lr, start_over, step_seed
from .config import LORA_MODES as MODES, LoraTrainConfig
from .resume import RUN_KEY, file_digest, fingerprint, load_checkpoint, model_fingerprint, run_record
from ..localization.lora import DEFAULT_TARGETS, localized_lora_config, lora_parameter_count, save_lora

CACHE_FORMAT = "dit-attn-lora-data/3"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_captioned_images(directory: str) -> list[tuple[str, str]]:
    """(image path, caption) pairs of a data directory (metadata.jsonl or NAME.txt beside NAME.png)."""
    if not os.path.isdir(directory):
        raise ValueError(f"data directory not found: {directory!r}")
    metadata = os.path.join(directory, "metadata.jsonl")
    items = []
    if os.path.isfile(metadata):
        with open(metadata) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    items.append((os.path.join(directory, row["file_name"]), row["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{metadata}:{number}: expected an object with file_name and text ({err})") from None
    else:
        for name in sorted(os.listdir(directory)):
            stem, suffix = os.path.splitext(name)
            caption = os.path.join(directory, stem + ".txt")
            if suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(caption):
                with open(caption) as f:
                    items.append((os.path.join(directory, name), f.read().strip()))
    if not items:
        raise ValueError(f"no captioned images in {directory!r}: give metadata.jsonl (file_name, text) or NAME.png + NAME.txt")
    return items


def write_sign_data(directory: str, n: int, seed: int = 0) -> int:
    """Render n sign images of the tiny model's world with captions into `directory` (metadata.jsonl)."""
    from ..toy import data

    os.makedirs(directory, exist_ok=True)
    rows = []
    for i in range(n):
        example = data.make_example(seed, i, "sign")
        name = f"sign-{i:05d}.png"
        example.image.save(os.path.join(directory, name))
        rows.append(json.dumps({"file_name": name, "text": example.caption}))
    with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return n


def _load_image(source, size: int | None) -> Image.Image:
    image = source.convert("RGB") if isinstance(source, Image.Image) else Image.open(source).convert("RGB")
    return image.resize((size, size), Image.BICUBIC) if size is not None else image


def _check_sizes(pipe, sizes) -> None:
    from ..ic.latents import alignment
    from ..ic.layout import nearest_sizes

    _, align = alignment(pipe)
    for height, width in sizes:
        if height % align or width % align:
            near = ", ".join(f"{w}x{h}" for h, w in nearest_sizes(height, width, align, align))
            raise ValueError(f"training images of {width}x{height} (WxH) are not whole {align}-pixel tokens of "
                             f"{type(pipe).__name__}; nearest valid sizes: {near}")


def data_fingerprint(items: list[tuple]) -> str:
    """sha256 of the training data: each item's image (a file's bytes, or a PIL image's pixels) and caption, in order."""
    return fingerprint([(file_digest(source) if isinstance(source, (str, os.PathLike)) else source, text)
                        for source, text in items])


def encode_dataset(pipe, items: list[tuple], cfg: LoraTrainConfig, max_sequence_length: int, work: str,
                   run: dict | None = None) -> dict:
    """The data, encoded once and cached in `work`: {"buckets": [one dict per image size with
    "size" (H, W), "latent_hw" (h, w), "latents" (N, ...) in the pipeline's layout, "embeds"
    (N, S, D), "pooled" (N, P)], "empty": (embeds (1, S, D), pooled (1, P)) of the empty caption}.
    `items`: (image path or PIL image, caption). `run`: the run_record the cache carries and a
    cached one must match (default: the config and the items' fingerprint)."""
    path = os.path.join(work, "data.pt")
    run = run or run_record(asdict(cfg), data_fingerprint(items))
    cached = load_checkpoint(path, run["settings"], run["fingerprint"])
    if cached is not None:
        return cached
    groups: dict[tuple[int, int], list[tuple[Image.Image, str]]] = {}
    for source, text in items:
        image = _load_image(source, cfg.size)
        groups.setdefault((image.height, image.width), []).append((image, text))
    _check_sizes(pipe, groups)
    buckets = []
    vae_scale = int(pipe.vae_scale_factor)
    with torch.no_grad():
        bar = tqdm(total=len(items), desc="encode", unit="image")
        for (height, width), group in sorted(groups.items()):
            latents, embeds, pooled = [], [], []
            for start in range(0, len(group), 16):
                chunk = group[start:start + 16]
                x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                                 for im, _ in chunk])
                latents.append(latents_of(pipe, x).cpu())
                e, p = text_features(pipe, [c for _, c in chunk], max_sequence_length)
                embeds.append(e.cpu())
                pooled.append(p.cpu())
                bar.update(len(chunk))
            buckets.append({"size": (height, width), "latent_hw": (height // vae_scale, width // vae_scale),
                            "latents": torch.cat(latents), "embeds": torch.cat(embeds), "pooled": torch.cat(pooled)})
        bar.close()
        empty = tuple(t.cpu() for t in text_features(pipe, [""], max_sequence_length))
    data = {"format": CACHE_FORMAT, "buckets": buckets, "empty": empty, RUN_KEY: run}
    save_atomic(data, path)
    return data


def draw_batch(data: dict, cfg: LoraTrainConfig, generator: torch.Generator) -> tuple:
    """One batch of one bucket: (x0, noise, t, embeds, pooled, latent_hw), all drawn from `generator`."""
    buckets = data["buckets"]
    bucket = buckets[0]
    if len(buckets) > 1:  # a bucket in proportion to its number of images
        weights = torch.tensor([float(len(b["latents"])) for b in buckets])
        bucket = buckets[int(torch.multinomial(weights, 1, generator=generator))]
    rows = torch.randint(len(bucket["latents"]), (cfg.batch,), generator=generator)
    x0 = bucket["latents"][rows]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.sigmoid(torch.randn(cfg.batch, generator=generator))
    embeds, pooled = bucket["embeds"][rows], bucket["pooled"][rows]
    if cfg.caption_dropout > 0:
        drop = torch.rand(cfg.batch, generator=generator) < cfg.caption_dropout
        if drop.any():
            embeds, pooled = embeds.clone(), pooled.clone()
            embeds[drop], pooled[drop] = data["empty"][0][0], data["empty"][1][0]
    return x0, noise, t, embeds, pooled, bucket["latent_hw"]


def training_items(cfg: LoraTrainConfig, data_dir: str) -> list[tuple]:
    """(image path or PIL image, caption) of the data directory; ic mode also reads panels + sets.json."""
    if cfg.mode == "ic":
        from ..ic.data import read_set_data

        if not os.path.isdir(data_dir):
            raise ValueError(f"data directory not found: {data_dir!r}")
        return read_set_data(data_dir)
    return read_captioned_images(data_dir)


def save_lora_atomic(pipe, out: str) -> None:
    """save_lora into a fresh directory beside `out`, then move each file into `out` (never a partial file)."""
    import shutil
    import tempfile

    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-lora-", dir=out)
    try:
        save_lora(pipe, tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_lora(pipe, cfg: LoraTrainConfig, data_dir: str, work: str, out: str, restart: bool = False) -> dict:
    """Train (resuming from `work`; restart=True: from scratch) and save the LoRA to `out`; the pipeline is
    left without it. Returns a summary with the losses and parameter counts."""
    from ..ic.latents import check_image_latents

    check_image_latents(pipe)  # a family whose latents dit-attn cannot encode, before `work` is touched
    start_over(work, restart)
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..loading import call_defaults

    transformer = pipe.transformer
    if getattr(transformer, "peft_config", None):
        raise ValueError("the transformer already has LoRA adapters: unload them before train-lora")
    layers = cfg.layers if cfg.mode == "localized" else tuple(info.index for info in model_layers(transformer))
    lora_config = localized_lora_config(pipe, layers, cfg.rank, cfg.alpha, cfg.targets)  # checks layers, targets
    os.makedirs(work, exist_ok=True)
    max_sequence_length = cfg.max_sequence_length or call_defaults(pipe).get("max_sequence_length", 256)
    items = training_items(cfg, data_dir)
    settings = {**asdict(cfg), "model": model_fingerprint(pipe)}
    run = run_record(settings, data_fingerprint(items))
    state_path = os.path.join(work, "state.pt")
    state = load_checkpoint(state_path, run["settings"], run["fingerprint"])  # stops before encoding if another run's
    data = encode_dataset(pipe, items, cfg, max_sequence_length, work, run)
    grad_flags = {n: p.requires_grad for n, p in transformer.named_parameters()}
    transformer.requires_grad_(False)
    with seeded(step_seed(cfg.seed + 41, 0)):  # peft draws the initial LoRA weights from torch's global generator
        transformer.add_adapter(lora_config)
    try:
        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        start, losses = 0, []
        if state is not None:
            set_peft_model_state_dict(transformer, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            start, losses = state["step"], state["losses"]
        generator = torch.Generator()
        transformer.train()
        bar = tqdm(range(start, cfg.steps), desc=f"train-lora ({cfg.mode})", initial=start, total=cfg.steps)
        for step in bar:
            generator.manual_seed(step_seed(cfg.seed, step))
            set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for _ in range(cfg.accumulate):
                x0, noise, t, embeds, pooled, latent_hw = draw_batch(data, cfg, generator)
                x_t, target = noised(x0, noise, t)
                prediction = predict(transformer, x_t, embeds, pooled, t, latent_hw, cfg.guidance)
                part = flow_loss(prediction, target) / cfg.accumulate
                part.backward()
                loss += part.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                lora = {n: t.detach().cpu().clone() for n, t in get_peft_model_state_dict(transformer).items()}
                save_atomic({"config": asdict(cfg), "lora": lora, "optimizer": optimizer.state_dict(), "step": step + 1,
                             "losses": losses, RUN_KEY: run}, state_path)
        transformer.eval()
        save_lora_atomic(pipe, out)
        summary = {
            "out": out, "mode": cfg.mode, "layers": list(layers), "steps": cfg.steps, "losses": losses,
            "lora_parameters": lora_parameter_count(transformer),
            "transformer_parameters": sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n),
        }
    finally:
        transformer.unload_lora()
        for name, param in transformer.named_parameters():
            param.requires_grad_(grad_flags.get(name, False))
        transformer.eval()
    return summary
