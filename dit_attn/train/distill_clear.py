"""Distil a pipeline's transformer into CLEAR local attention: `dit-attn distill-clear`.

Teacher: the same transformer with full attention (a frozen copy; with LoRA, the base
model with its adapters disabled). Student: the transformer with `LocalAttention`, whose
attention q/k/v/out projections of the local layers (+ `spatial_weight` with
down-sampling) train, fully or through a peft LoRA. Data: latents the teacher samples
from prompts, cached in the work directory. Loss (CLEAR): flow matching
+ teacher_weight · MSE(student ε, teacher ε) + attention_weight · MSE of the attention
outputs of every `attention_every`-th local layer.

With `lora_rank` the adapters' initial weights are drawn from the config's seed, so two
runs with one seed train the same weights. Resumable: the teacher samples are cached as
they are made, and every `checkpoint_every` steps the trained tensors (diffusers module
names) and the optimizer state are written atomically, in one file; rerunning the command
continues, and the result is the same as an uninterrupted run (each step draws from its
own seed). The cache and the checkpoint record the run's settings (with the model's
fingerprint) and the fingerprint of its prompts; a rerun with other ones stops, naming the
difference (`train.resume`). SD3 / SD3.5 and FLUX pipelines.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..edits import LocalAttention
from ..families import family_of
from ..handle import apply
from ..heads import model_layers
from ..io import save_safetensors_atomic, save_torch_atomic as save_atomic
from ..local_attention import local_attention_modules
from .flow import flow_loss, noised, predict, text_features
from .common import cosine_lr, optimizer_step, seeded, start_over, step_seed
from .config import DistillConfig
from .resume import RUN_KEY, fingerprint, load_checkpoint, model_fingerprint, run_record

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def default_prompts(n: int, seed: int) -> list[str]:
    from ..toy.data import make_example

    return [make_example(seed, i, "mix").caption for i in range(n)]


def wanted_prompts(cfg: DistillConfig, prompts: list[str]) -> list[str]:
    """The prompt of each of the `cfg.samples` teacher samples (the prompts repeated in order)."""
    return [prompts[i % len(prompts)] for i in range(cfg.samples)]


def teacher_samples(pipe, cfg: DistillConfig, prompts: list[str], work: str, run: dict | None = None) -> dict:
    """Teacher latents and prompt embeddings (on the CPU) for `cfg.samples` prompts, cached (resumable) in `work`.
    `run`: the run_record the cache carries and a cached one must match (default: the config and the prompts)."""
    path = os.path.join(work, "teacher.pt")
    wanted = wanted_prompts(cfg, prompts)
    run = run or run_record(asdict(cfg), fingerprint(wanted))
    cache = load_checkpoint(path, run["settings"], run["fingerprint"]) or \
        {"latents": [], "embeds": [], "pooled": [], "prompts": [], RUN_KEY: run}
    done = len(cache["prompts"])
    size = {"height": cfg.size, "width": cfg.size} if cfg.size else {}
    extra = {"guidance_scale": cfg.cfg} if cfg.cfg is not None else {}
    bar = tqdm(total=cfg.samples, initial=done, desc="teacher samples", unit="image")
    for start in range(done, cfg.samples, cfg.batch):
        chunk = wanted[start : start + cfg.batch]
        generators = [torch.Generator().manual_seed(step_seed(cfg.seed + 7, start + i)) for i in range(len(chunk))]
        with torch.no_grad():
            latents = pipe(prompt=chunk, generator=generators, num_inference_steps=cfg.sample_steps, output_type="latent",
                           max_sequence_length=cfg.max_sequence_length, **size, **extra).images
            embeds, pooled = text_features(pipe, chunk, cfg.max_sequence_length)
        cache["latents"].append(latents.cpu())
        cache["embeds"].append(embeds.cpu())
        cache["pooled"].append(pooled.cpu())
        cache["prompts"].extend(chunk)
        save_atomic(cache, path)
        bar.update(len(chunk))
    bar.close()
    return {key: value if key == "prompts" else torch.cat(value) for key, value in cache.items() if key != RUN_KEY}


class Denoiser:
    """ε of a transformer for noisy latents x_t at flow time t ∈ (0, 1), in the layout the pipeline's latents have."""

    def __init__(self, pipe, cfg: DistillConfig, latents: torch.Tensor):
        self.latent_hw, self.guidance = None, 1.0  # SD3 needs neither
        if family_of(pipe.transformer).packs_latents:  # packed latents (B, S, C) of a square side × side token grid
            size = cfg.size or pipe.default_sample_size * pipe.vae_scale_factor
            side = size // (pipe.vae_scale_factor * 2)
            if side * side != latents.shape[1]:
                raise ValueError(f"{latents.shape[1]} latent tokens, but the ids of a {side}x{side} grid")
            self.latent_hw = (2 * side, 2 * side)
            self.guidance = cfg.cfg if cfg.cfg is not None else 3.5  # FluxPipeline's default

    def __call__(self, transformer, x_t, embeds, pooled, t) -> torch.Tensor:
        return predict(transformer, x_t, embeds, pooled, t, self.latent_hw, self.guidance)


def trainable_modules(transformer, layers) -> list[str]:
    """Module names of the projections that train: q/k/v/out of each local attention module
    (FLUX single blocks have no attention output projection)."""
    names = [f"{attn}.{proj}" for attn in local_attention_modules(model_layers(transformer), layers) for proj in PROJECTIONS]
    existing = {name for name, _ in transformer.named_modules()}
    return [name for name in names if name in existing]


@contextmanager
def full_attention(handle, lora: bool):
    """The teacher: local attention off (and LoRA adapters disabled) for one forward pass."""
    local, handle.state.local = handle.state.local, None
    if lora:
        handle.transformer.disable_adapters()
    try:
        yield
    finally:
        handle.state.local = local
        if lora:
            handle.transformer.enable_adapters()


class AttentionRecorder:
    """Forward hooks keeping the image-stream output of chosen attention modules."""

    def __init__(self, transformer, names: list[str]):
        self.outputs: list[torch.Tensor] = []
        self.hooks = [transformer.get_submodule(n).register_forward_hook(self._keep) for n in names]

    def _keep(self, module, args, output):
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        taken, self.outputs = self.outputs, []
        return taken

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def trained_tensors(transformer, lora: bool) -> dict[str, torch.Tensor]:
    """The tensors that train, by name (LoRA: peft's adapter names, without the adapter name)."""
    if lora:
        from peft.utils import get_peft_model_state_dict

        tensors = dict(get_peft_model_state_dict(transformer))
        tensors.update({n: p for n, p in transformer.named_parameters() if n.endswith("spatial_weight")})
    else:
        tensors = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    return {n: t.detach().contiguous().clone() for n, t in tensors.items()}


def load_trained(transformer, tensors: dict[str, torch.Tensor], lora: bool) -> None:
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        if lora:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(transformer, {n: t for n, t in tensors.items() if "lora_" in n})
        for name, tensor in tensors.items():
            if not lora or "lora_" not in name:
                params[name].copy_(tensor)


def save_weights(path: str, tensors: dict[str, torch.Tensor], cfg: DistillConfig) -> None:
    metadata = {"format": "dit-attn-clear", "config": json.dumps(asdict(cfg))}
    if cfg.lora_rank is not None:
        metadata.update(lora_rank=str(cfg.lora_rank), lora_alpha=str(cfg.lora_alpha or cfg.lora_rank))
    save_safetensors_atomic(tensors, path, metadata)


def distill(pipe, cfg: DistillConfig, work: str, out: str, prompts: list[str] | None = None, restart: bool = False) -> dict:
    """Train, resuming from `work` (restart=True: from scratch); writes the trained tensors to `out` (.safetensors). Returns a summary."""
    if os.path.isdir(out):  # found before training, not when the weights are written
        raise ValueError(f"out {os.fspath(out)!r} is a folder; give the .safetensors file to write, "
                         f"e.g. {os.path.join(out, 'clear.safetensors')}")
    start_over(work, restart)
    transformer = pipe.transformer
    if getattr(transformer, "peft_config", None):
        raise ValueError("the transformer already has LoRA adapters: fuse or unload them before distill-clear")
    os.makedirs(work, exist_ok=True)
    wanted = wanted_prompts(cfg, prompts or default_prompts(max(cfg.samples, 1), cfg.seed))
    run = run_record({**asdict(cfg), "model": model_fingerprint(pipe)}, fingerprint(wanted))
    state_path = os.path.join(work, "state.pt")
    state = load_checkpoint(state_path, run["settings"], run["fingerprint"])  # stops before sampling if another run's
    data = teacher_samples(pipe, cfg, wanted, work, run)
    denoise = Denoiser(pipe, cfg, data["latents"])
    lora = cfg.lora_rank is not None
    all_layers = frozenset(info.index for info in model_layers(transformer))
    modules = trainable_modules(transformer, all_layers)
    grad_flags = {n: p.requires_grad for n, p in transformer.named_parameters()}
    transformer.requires_grad_(False)
    teacher = None if lora else copy.deepcopy(transformer).eval()
    if lora:
        from peft import LoraConfig

        targets = "|".join(name.replace(".", r"\.") for name in modules)
        with seeded(step_seed(cfg.seed + 41, 0)):  # peft draws the initial LoRA weights from torch's global generator
            transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                               target_modules=f"^({targets})$", init_lora_weights=True))
    handle = apply(pipe, LocalAttention(cfg.radius, downsample=cfg.downsample, backend=cfg.backend))
    recorded_attention = sorted(local_attention_modules(model_layers(transformer), all_layers))[:: cfg.attention_every]
    student_rec = AttentionRecorder(transformer, recorded_attention)
    teacher_rec = AttentionRecorder(teacher, recorded_attention) if teacher is not None else student_rec
    try:
        if not lora:
            for name in modules:
                transformer.get_submodule(name).requires_grad_(True)
        for name, param in transformer.named_parameters():
            if name.endswith("spatial_weight"):
                param.requires_grad_(True)
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        start, losses = 0, []
        if state is not None:
            load_trained(transformer, state["trained"], lora)
            optimizer.load_state_dict(state["optimizer"])
            start, losses = state["step"], state["losses"]
        generator = torch.Generator()
        transformer.train()
        bar = tqdm(range(start, cfg.steps), desc="distill-clear", initial=start, total=cfg.steps)
        for step in bar:
            generator.manual_seed(step_seed(cfg.seed + 31, step))
            rows = torch.randint(len(data["latents"]), (cfg.batch,), generator=generator)
            x0, embeds, pooled = data["latents"][rows], data["embeds"][rows], data["pooled"][rows]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.sigmoid(torch.randn(cfg.batch, generator=generator))
            x_t, target = noised(x0, noise, t)
            with torch.no_grad():
                teacher_rec.take()
                with full_attention(handle, lora):
                    teacher_eps = denoise(teacher or transformer, x_t, embeds, pooled, t)
                teacher_attention = teacher_rec.take()
            student_eps = denoise(transformer, x_t, embeds, pooled, t)
            student_attention = student_rec.take()
            flow = flow_loss(student_eps, target)
            match = F.mse_loss(student_eps, teacher_eps)
            attention_loss = sum(F.mse_loss(s, t_) for s, t_ in zip(student_attention, teacher_attention)) / max(1, len(student_attention))
            loss = cfg.flow_weight * flow + cfg.teacher_weight * match + cfg.attention_weight * attention_loss
            optimizer_step(optimizer, loss, params, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", teacher=f"{match.item():.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save_atomic({"trained": trained_tensors(transformer, lora), "optimizer": optimizer.state_dict(),
                             "step": step + 1, "losses": losses, RUN_KEY: run}, state_path)
        save_weights(out, trained_tensors(transformer, lora), cfg)
    finally:
        student_rec.close()
        if teacher is not None:
            teacher_rec.close()
        handle.remove()
        if lora:
            transformer.unload_lora()  # back to plain Linear modules
        else:  # the pipeline keeps its own weights; the trained ones are in `out`
            transformer.load_state_dict(teacher.state_dict())
        for name, param in transformer.named_parameters():
            param.requires_grad_(grad_flags.get(name, False))
        transformer.eval()
    return {"out": out, "steps": cfg.steps, "losses": losses}
