"""Train a LoRA on the text layers only (or on every layer, to compare): `dit-attn train-lora`.

Data: a directory of images with captions, either a `metadata.jsonl` (objects with
`file_name` and `text`, the Hugging Face image-folder layout) or `NAME.png` + `NAME.txt`
pairs. The images are encoded once with the pipeline's VAE and text encoders and cached in
the work directory. Loss: flow matching (x_t = (1 − t)·x0 + t·n, target n − x0,
logit-normal t, timestep 1000·t). Resumable: every `checkpoint_every` steps the LoRA
tensors and the optimizer state are written atomically; rerunning continues, and each
step draws its batch and noise from its own seed, so the result equals an uninterrupted
run. The LoRA is saved with its config as metadata (`pipe.load_lora_weights(out)` keeps
lora_alpha). SD3 / SD3.5 pipelines (FLUX: not yet).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..heads import model_family, model_layers
from ..pipelines.training import cosine_lr, optimizer_step, save_atomic, step_seed
from .lora import DEFAULT_TARGETS, localized_lora_config, lora_parameter_count, save_lora

MODES = ("localized", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class LoraTrainConfig:
    mode: str = "localized"
    layers: tuple[int, ...] = ()
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank: int = 4
    alpha: float | None = None
    steps: int = 200
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 10
    size: int | None = None  # train resolution in pixels (default: the images' own)
    max_sequence_length: int | None = None  # default: the pipeline's call defaults, else 256
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "localized" and not self.layers:
            raise ValueError("--mode localized needs --layers (the text layers from dit-attn localize)")
        for name in ("rank", "steps", "batch", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


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
    from ..models import data

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


def encode_dataset(pipe, items: list[tuple[str, str]], cfg: LoraTrainConfig, max_sequence_length: int, work: str) -> dict:
    """Latents (N, C, h, w), text states (N, S, D) and pooled embeddings (N, P), cached in `work`."""
    path = os.path.join(work, "data.pt")
    if os.path.exists(path):
        return torch.load(path)
    vae = pipe.vae
    latents, embeds, pooled = [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(items), 16), desc="encode", unit="batch"):
            chunk = items[start:start + 16]
            images = []
            for image_path, _ in chunk:
                image = Image.open(image_path).convert("RGB")
                if cfg.size is not None:
                    image = image.resize((cfg.size, cfg.size), Image.BICUBIC)
                images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
            x = torch.stack(images).to(device=vae.device, dtype=vae.dtype)
            z = vae.encode(x).latent_dist.mode()
            latents.append(((z - vae.config.shift_factor) * vae.config.scaling_factor).float().cpu())
            e, _, p, _ = pipe.encode_prompt([c for _, c in chunk], None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length)
            embeds.append(e.float().cpu())
            pooled.append(p.float().cpu())
    data = {"latents": torch.cat(latents), "embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}
    save_atomic(data, path)
    return data


def train_lora(pipe, cfg: LoraTrainConfig, data_dir: str, work: str, out: str) -> dict:
    """Train (resuming from `work`) and save the LoRA to `out`; the pipeline is left without it.
    Returns a summary with the losses and parameter counts."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..loading import call_defaults

    transformer = pipe.transformer
    if model_family(transformer) != "sd3":
        raise NotImplementedError("train-lora supports SD3 / SD3.5 pipelines for now (FLUX: not yet)")
    if getattr(transformer, "peft_config", None):
        raise ValueError("the transformer already has LoRA adapters: unload them before train-lora")
    layers = cfg.layers if cfg.mode == "localized" else tuple(info.index for info in model_layers(transformer))
    lora_config = localized_lora_config(pipe, layers, cfg.rank, cfg.alpha, cfg.targets)  # checks layers, targets
    os.makedirs(work, exist_ok=True)
    max_sequence_length = cfg.max_sequence_length or call_defaults(pipe).get("max_sequence_length", 256)
    data = encode_dataset(pipe, read_captioned_images(data_dir), cfg, max_sequence_length, work)
    grad_flags = {n: p.requires_grad for n, p in transformer.named_parameters()}
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config)
    try:
        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        state_path = os.path.join(work, "state.pt")
        start, losses = 0, []
        if os.path.exists(state_path):
            state = torch.load(state_path)
            if state["config"] != asdict(cfg):
                raise ValueError(f"{work} holds a run with other settings ({state['config']}); use a new --work directory")
            set_peft_model_state_dict(transformer, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            start, losses = state["step"], state["losses"]
        generator = torch.Generator()
        transformer.train()
        device, dtype = transformer.device, transformer.dtype
        bar = tqdm(range(start, cfg.steps), desc=f"train-lora ({cfg.mode})", initial=start, total=cfg.steps)
        for step in bar:
            generator.manual_seed(step_seed(cfg.seed, step))
            rows = torch.randint(len(data["latents"]), (cfg.batch,), generator=generator)
            x0 = data["latents"][rows]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.sigmoid(torch.randn(cfg.batch, generator=generator))
            x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            prediction = transformer(
                hidden_states=x_t.to(device, dtype), encoder_hidden_states=data["embeds"][rows].to(device, dtype),
                pooled_projections=data["pooled"][rows].to(device, dtype), timestep=(t * 1000).to(device, dtype),
            ).sample
            loss = F.mse_loss(prediction.float(), (noise - x0).to(device))
            optimizer_step(optimizer, loss, params, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                lora = {n: t.detach().cpu().clone() for n, t in get_peft_model_state_dict(transformer).items()}
                save_atomic({"config": asdict(cfg), "lora": lora, "optimizer": optimizer.state_dict(), "step": step + 1,
                             "losses": losses}, state_path)
        transformer.eval()
        save_lora(pipe, out)
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..loading import DEMO, load_pipeline
    from .cli import parse_layer_groups

    parser = argparse.ArgumentParser(prog="dit-attn train-lora", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEMO, help="pipeline directory, hub id or an embedded model name")
    parser.add_argument("--mode", default="localized", choices=MODES, help="LoRA on --layers only, or on every layer")
    parser.add_argument("--layers", default="", help="the text layers, e.g. '3' or '3,4' (from dit-attn localize)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="module names inside each layer's attention or block")
    parser.add_argument("--data", required=True, help="images + captions: metadata.jsonl (file_name, text) or NAME.png + NAME.txt")
    parser.add_argument("--make-signs", type=int, default=0, help="first render N sign images of the tiny model's world into --data")
    parser.add_argument("--work", required=True, help="directory for the encoded data and checkpoints (rerun to resume)")
    parser.add_argument("--out", required=True, help="directory for the LoRA (pytorch_lora_weights.safetensors)")
    defaults = LoraTrainConfig(mode="all")
    for name, kind in (("rank", int), ("alpha", float), ("steps", int), ("batch", int), ("lr", float), ("warmup", int),
                       ("size", int), ("max_sequence_length", int), ("seed", int), ("checkpoint_every", int)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    try:
        layers = tuple(i for group in parse_layer_groups(args.layers) for i in group) if args.layers else ()
        cfg = LoraTrainConfig(
            mode=args.mode, layers=layers, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            rank=args.rank, alpha=args.alpha, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
            size=args.size, max_sequence_length=args.max_sequence_length, seed=args.seed,
            checkpoint_every=args.checkpoint_every,
        )
        if args.make_signs:
            write_sign_data(args.data, args.make_signs, args.seed)
        pipe = load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        summary = train_lora(pipe, cfg, args.data, args.work, args.out)
    except (ValueError, TypeError, NotImplementedError) as err:
        parser.exit(2, f"dit-attn train-lora: error: {err}\n")
    share = summary["lora_parameters"] / summary["transformer_parameters"]
    print(f"dit-attn train-lora: {summary['mode']} LoRA on layers {summary['layers']}, {summary['lora_parameters']} "
          f"parameters ({share:.3%} of the transformer), last loss {summary['losses'][-1]:.4f} -> {summary['out']}")
    return 0
