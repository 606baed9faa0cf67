"""The settings of each trainer, as frozen dataclasses (no torch import: the command line builds its
options from these fields). A checkpoint records them; see `train.resume`."""
from __future__ import annotations

from dataclasses import dataclass

from ..edits import LocalAttention

LORA_MODES = ("localized", "all", "ic")
# attention projections a LoRA trains by default (looked up in each layer's attention, then its block)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    images: int = 24_000
    vae_steps: int = 600  # ~0.6 s a step at batch 32 with 2 threads and bf16 here: ~6 min
    vae_batch: int = 32
    vae_lr: float = 1e-3
    # batch 32 and 64 give the same samples/s here (~56), so take the smaller batch and twice the updates
    steps: int = 13_000  # ~0.33 s a step at batch 32 with 2 threads, bf16 and compile here: ~72 min
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 500
    ema: float = 0.999
    caption_dropout: float = 0.1
    layers: int = 6  # transformer blocks
    # shapes drawn without jitter at one extent per size (50 placements, like the glyphs' one)
    fixed_geometry: bool = True
    # share of signs among the rendered images, the rest are shapes; glyphs are learnt from fewer
    # examples than shapes but are easier (one centred glyph), so the shipped recipe gives shapes 80% of the data
    sign_fraction: float = 0.2
    # logit-normal location of the training flow times; > 0 trains more at high noise, where the
    # shape and its colour are decided (the shipped recipe: 0.3)
    t_location: float = 0.3
    checkpoint_every: int = 200
    threads: int = 2
    # bfloat16 autocast for convolutions and linear layers (attention stays float32): VAE steps
    # ~2.1× and transformer steps ~1.5× faster on CPUs with AVX-512 BF16 (the shipped recipe uses it)
    bf16: bool = True
    # torch.compile the transformer's training step: ~1.2× faster steps here after ~20 s of
    # compiling; needs a C++ compiler (without one the trainer warns and runs eagerly)
    compile: bool = True


@dataclass(frozen=True)
class DistillConfig:
    radius: float
    downsample: int | None = None
    lora_rank: int | None = None  # None: train the projections themselves
    lora_alpha: float | None = None  # default: the rank
    samples: int = 64
    sample_steps: int = 20
    size: int | None = None  # square images, pixels (pipeline default if None)
    cfg: float | None = None
    steps: int = 400
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 20
    flow_weight: float = 1.0
    teacher_weight: float = 0.5
    attention_weight: float = 0.5
    attention_every: int = 2
    max_sequence_length: int = 1
    seed: int = 0
    checkpoint_every: int = 50
    backend: str = "auto"  # local-window kernel with a backward: triton on CUDA, tiled on the CPU

    def __post_init__(self) -> None:
        LocalAttention(self.radius, downsample=self.downsample, backend=self.backend)  # validates all three
        positive = {"samples": self.samples, "sample_steps": self.sample_steps, "steps": self.steps, "batch": self.batch,
                    "attention_every": self.attention_every, "checkpoint_every": self.checkpoint_every,
                    "max_sequence_length": self.max_sequence_length}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise ValueError(f"lora_rank must be None (full fine-tuning) or an integer >= 1, got {self.lora_rank!r}")
        for name in ("flow_weight", "teacher_weight", "attention_weight", "lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class LoraTrainConfig:
    mode: str = "localized"
    layers: tuple[int, ...] = ()
    targets: tuple[str, ...] = LORA_TARGETS
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
    caption_dropout: float = 0.0  # probability that a caption is replaced by the empty one
    accumulate: int = 1  # batches per optimizer update (gradient accumulation)
    guidance: float = 1.0  # FLUX guidance-embedding value while training (guidance-distilled models)

    def __post_init__(self) -> None:
        if self.mode not in LORA_MODES:
            raise ValueError(f"mode must be one of {LORA_MODES}, got {self.mode!r}")
        if self.mode == "localized" and not self.layers:
            raise ValueError("--mode localized needs --layers (the text layers from dit-attn localize)")
        if self.mode == "ic" and self.size is not None:
            raise ValueError("--size resizes to squares and applies to --mode localized/all; ic sets train at their own size")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        for name in ("rank", "steps", "batch", "checkpoint_every", "accumulate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
