"""The judge: a small CNN that reads the attributes of synthetic-world images.

It predicts six attributes of a 64×64 image of the synthetic world
(:mod:`dit_attn.toy.data`), each with a ``none`` class where the attribute does not
apply (glyph of a shape; shape, size and position of a sign):

=========== ================================================ =======
head        classes                                          ``none``
=========== ================================================ =======
shape       circle square triangle diamond cross             signs
color       the 8 palette colours (of the shape / glyph)     —
background  the 8 palette colours                            —
size        small large                                      signs
position    left right top bottom center                     signs
glyph       A–Z 0–9                                          shapes
=========== ================================================ =======

The size and position of a shape are always read from the image, even if its caption
did not specify them. Weights ship as package data (``weights/judge.safetensors``, about
1.3 MB) and are produced by :func:`train_judge` (``python -m dit_attn.toy.judge --out
PATH``). Inputs are PIL images or float tensors (B, 3, H, W) with values in ``[0, 1]``
(pass ``value_range=(-1, 1)`` for VAE-range tensors); square inputs of another size are
resized to 64×64 with anti-aliasing.

Typical use::

    from dit_attn.toy.judge import judge, adherence
    judge([image])[0]["shape"]            # ('circle', 0.998)
    adherence(images, prompts)            # tensor (B,), fraction of the prompt's attributes seen
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import data

__all__ = [
    "HEADS", "CLASSES", "WEIGHTS_PATH", "JudgeNet", "load_judge", "probabilities", "judge",
    "adherence", "train_judge", "evaluate_judge",
]

WEIGHTS_PATH = Path(__file__).parent / "weights" / "judge.safetensors"

#: Class labels of each head, in output order; ``None`` is the "does not apply" class.
CLASSES: dict[str, tuple[Optional[str], ...]] = {
    "shape": data.SHAPES + (None,),
    "color": data.COLORS,
    "background": data.COLORS,
    "size": data.SIZES + (None,),
    "position": data.POSITIONS + (None,),
    "glyph": data.GLYPHS + (None,),
}
HEADS: tuple[str, ...] = tuple(CLASSES)

ImagesLike = Union[Image.Image, Sequence[Image.Image], torch.Tensor]
_FORMAT = "dit_attn.judge/1"


class JudgeNet(nn.Module):
    """Conv net: 64×64 RGB in [0, 1] → one logit vector per head.

    Seven 3×3 conv–BN–ReLU layers (four of stride 2: 64→32→16→8→4), a 4×4 feature map
    flattened (so position is kept), one hidden linear layer and a linear layer split
    into the heads.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96), hidden: int = 128):
        super().__init__()
        a, b, c, d = widths
        layers: list[nn.Module] = []
        for cin, cout, stride in [(3, a, 1), (a, a, 2), (a, b, 1), (b, b, 2), (b, c, 1), (c, c, 2), (c, d, 2)]:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Linear(d * 16, hidden)
        self.out = nn.Linear(hidden, sum(len(c) for c in CLASSES.values()))
        self.config = {"widths": list(widths), "hidden": hidden}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) in [0, 1] → {head: logits (B, n_classes)}."""
        h = self.features(x * 2 - 1).flatten(1)
        logits = self.out(F.relu(self.hidden(h)))
        return dict(zip(HEADS, logits.split([len(c) for c in CLASSES.values()], dim=1)))


# --------------------------------------------------------------------------- loading


def _save(model: JudgeNet, path: Union[str, os.PathLike], info: dict) -> None:
    from safetensors.torch import save_file

    # One metadata key: safetensors does not keep the order of several, and the file
    # should be byte-identical for the same seed.
    meta = {"dit_attn.judge": json.dumps({"format": _FORMAT, "config": model.config, "info": info,
                                          "classes": {k: list(v) for k, v in CLASSES.items()}})}
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def _load(path: Union[str, os.PathLike]) -> JudgeNet:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("dit_attn.judge", "{}"))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a judge checkpoint (format {meta.get('format')!r}, expected {_FORMAT!r})")
        if {k: tuple(v) for k, v in meta["classes"].items()} != CLASSES:
            raise ValueError(f"{path} was trained for other classes than this version of dit_attn.toy.data")
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = JudgeNet(**meta["config"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if bad:
        raise ValueError(f"{path} does not match the judge architecture: {bad}")
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=4)
def _load_cached(path: str) -> JudgeNet:
    return _load(path)


def load_judge(path: Union[str, os.PathLike, None] = None) -> JudgeNet:
    """The judge network in eval mode, loaded once per path (default: the shipped weights)."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.exists():
        raise FileNotFoundError(f"judge weights not found at {path}; train them with "
                                "`python -m dit_attn.toy.judge --out PATH`")
    return _load_cached(str(path.resolve()))


# --------------------------------------------------------------------------- inputs


def _as_list(images: ImagesLike, value_range: tuple[float, float]) -> list[torch.Tensor]:
    """Images → list of (3, H, W) float tensors in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensors must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255
        else:
            lo, hi = value_range
            x = (x.float().cpu() - lo) / (hi - lo)
        return list(x.clamp(0, 1).cpu())
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out += _as_list(im, value_range)
        elif isinstance(im, Image.Image):
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
            out.append(torch.from_numpy(arr).permute(2, 0, 1))
        else:
            raise TypeError(f"images must be PIL images or a (B, 3, H, W) tensor, got {type(im).__name__}")
    return out


def _to_batch(crops: list[torch.Tensor]) -> torch.Tensor:
    size = data.IMAGE_SIZE
    out = []
    for x in crops:
        h, w = x.shape[-2:]
        if h != w:
            raise ValueError(f"the judge reads square images (64×64, or any square size resized to it), got {h}×{w}; "
                             "split a 2-panel set into its panels (adherence() does this for set captions)")
        if h != size:
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(x)
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def _probabilities(batch: torch.Tensor, model: Optional[JudgeNet], chunk: int = 256) -> dict[str, torch.Tensor]:
    model = model if model is not None else load_judge()
    was_training = model.training
    model.eval()
    outs = [model(batch[i:i + chunk]) for i in range(0, len(batch), chunk)] or [model(batch)]
    model.train(was_training)
    return {h: torch.cat([o[h] for o in outs]).softmax(-1) for h in HEADS}


def probabilities(images: ImagesLike, model: Optional[JudgeNet] = None,
                  value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, torch.Tensor]:
    """Class probabilities per head: {head: (B, len(CLASSES[head]))}."""
    return _probabilities(_to_batch(_as_list(images, value_range)), model)


def judge(images: ImagesLike, model: Optional[JudgeNet] = None,
          value_range: tuple[float, float] = (0.0, 1.0)) -> list[dict[str, tuple[Optional[str], float]]]:
    """Read each image: one dict per image, ``{head: (label, probability)}``.

    ``label`` is the most probable class, ``None`` where the attribute does not apply
    (e.g. ``glyph`` of a shape). ``images``: a PIL image, a list of them, or a float
    tensor (B, 3, H, W) with values in ``value_range`` (default [0, 1]; uint8 tensors are
    read as 0–255). Square images of any size are resized to 64×64.
    """
    probs = probabilities(images, model, value_range)
    n = next(iter(probs.values())).shape[0]
    best = {h: p.max(-1) for h, p in probs.items()}
    return [{h: (CLASSES[h][int(best[h].indices[i])], float(best[h].values[i])) for h in HEADS} for i in range(n)]


def _judged_crops(images: Sequence[torch.Tensor], prompts: Union[str, Sequence[str]]):
    """(crops, wanted attributes per crop, owning image per crop): one crop per image, two per set caption."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    crops, wanted, owner = [], [], []
    for i, (x, prompt) in enumerate(zip(images, prompts)):
        if data.is_set_caption(prompt):
            s = data.parse_set_caption(prompt)
            h, w = x.shape[-2:]
            if w != 2 * h:
                raise ValueError(f"a set caption needs a 2-panel image (W = 2H, e.g. 128×64), got {w}×{h}")
            for panel, attrs in zip((x[..., :h], x[..., h:]), s.panels()):
                crops.append(panel)
                wanted.append(attrs.specified())
                owner.append(i)
        else:
            crops.append(x)
            wanted.append(data.parse_caption(prompt).specified())
            owner.append(i)
    return crops, wanted, owner


def soft_adherence_differentiable(images: torch.Tensor, prompts: Union[str, Sequence[str]],
                                  model: Optional[JudgeNet] = None) -> torch.Tensor:
    """`adherence(..., soft=True)` of a (B, 3, H, W) float batch in [0, 1], differentiable with respect to it
    (the judge's weights are not trained)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("images must be a (B, 3, H, W) float tensor in [0, 1]")
    model = model if model is not None else load_judge()
    crops, wanted, owner = _judged_crops(list(images.float().clamp(0, 1)), prompts)
    was_training, trainable = model.training, [p for p in model.parameters() if p.requires_grad]
    model.eval().requires_grad_(False)
    try:
        logits = model(_to_batch(crops))
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    probs = {h: logits[h].softmax(-1) for h in HEADS}
    per_crop = [torch.stack([probs[head][j, CLASSES[head].index(value)] for head, value in want.items()])
                for j, want in enumerate(wanted)]
    owners = torch.tensor(owner)
    hits = torch.zeros(len(images), dtype=probs[HEADS[0]].dtype).index_add(0, owners, torch.stack([p.sum() for p in per_crop]))
    total = torch.zeros(len(images)).index_add(0, owners, torch.tensor([float(len(w)) for w in wanted]))
    return hits / total


def adherence(images: ImagesLike, prompts: Union[str, Sequence[str]], model: Optional[JudgeNet] = None,
              value_range: tuple[float, float] = (0.0, 1.0), soft: bool = False) -> torch.Tensor:
    """Per-image score in [0, 1]: the fraction of the prompt's specified attributes
    (:func:`data.parse_caption`, e.g. shape, colour, background, and size / position if
    the prompt names them; glyph, colour, background for signs) that the judge reads in
    the image. Returns a float tensor (B,).

    With ``soft=True`` each attribute counts the judge's probability of the wanted class
    instead of a 0/1 verdict: a continuous score that moves with small changes of the
    image (what a search over weak edits needs), and equals the verdict score where the
    judge is certain.

    ``prompts``: one caption for all images or one per image. Set captions (``[SET] …``)
    expect 128×64 images: each panel is judged against its own half of the caption and
    the score pools the attributes of both panels. Raises ``ValueError`` for a prompt
    outside the grammar.
    """
    crops_in = _as_list(images, value_range)
    crops, wanted, owner = _judged_crops(crops_in, prompts)
    probs = _probabilities(_to_batch(crops), model)
    hits, total = torch.zeros(len(crops_in)), torch.zeros(len(crops_in))
    for j, (want, i) in enumerate(zip(wanted, owner)):
        for head, value in want.items():
            p = probs[head][j]
            wanted_class = CLASSES[head].index(value)
            hits[i] += float(p[wanted_class]) if soft else float(int(p.argmax()) == wanted_class)
        total[i] += len(want)
    return hits / total


# --------------------------------------------------------------------------- training


def _labels(scene: data.Attributes) -> list[int]:
    return [CLASSES[h].index(getattr(scene, h)) for h in HEADS]


def _batch(seed: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples start..start+n-1 of stream ``seed`` (kind "mix") → images (n,3,64,64), labels (n, heads)."""
    exs = [data.make_example(seed, i, "mix") for i in range(start, start + n)]
    x = torch.from_numpy(np.stack([np.asarray(e.image) for e in exs])).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([_labels(e.scene) for e in exs])
    return x, y


def augment(x: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.2, max_noise: float = 0.05,
            color_jitter: float = 0.04) -> torch.Tensor:
    """Light degradations like a generator's samples: per image, Gaussian blur with
    sigma ~ U(0, max_sigma), per-channel gain/offset jitter, Gaussian noise with std ~
    U(0, max_noise). x: (B, 3, H, W) in [0, 1]."""
    b, c, h, w = x.shape
    g = dict(generator=generator)
    sigma = torch.rand(b, **g) * max_sigma
    t = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, 5)
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c).reshape(b, c, h, w)
    gain = 1 + (torch.rand(b, c, 1, 1, **g) * 2 - 1) * color_jitter
    offset = (torch.rand(b, c, 1, 1, **g) * 2 - 1) * color_jitter
    noise = torch.randn(b, c, h, w, **g) * torch.rand(b, 1, 1, 1, **g) * max_noise
    return (y * gain + offset + noise).clamp(0, 1)


def train_judge(seed: int = 0, steps: int = 2000, out_path: Union[str, os.PathLike, None] = None,
                batch_size: int = 64, lr: float = 3e-3, progress: bool = True) -> JudgeNet:
    """Train the judge from scratch on freshly rendered "mix" examples (stream ``seed``),
    lightly augmented (:func:`augment`; half of each batch is left clean). AdamW with
    linear warm-up and cosine decay. Deterministic from ``seed`` (on one thread). Saves
    to ``out_path`` (safetensors) if given and returns the model in eval mode."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = JudgeNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for step in bar:
        x, y = _batch(seed, step * batch_size, batch_size)
        half = batch_size // 2
        x = torch.cat([x[:half], augment(x[half:], gen)])
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], y[:, j]) for j, h in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    if progress:
        print(f"judge: trained {steps} steps in {(time.time() - start) / 60:.1f} min")
    if out_path is not None:  # no timings in the file: same seed → byte-identical file
        _save(model, out_path, {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr})
    return model


@torch.no_grad()
def evaluate_judge(model: Optional[JudgeNet] = None, seed: int = 1_000_003, n: int = 2000,
                   augmented: bool = False, batch_size: int = 250) -> dict[str, float]:
    """Accuracy of each head on ``n`` fresh "mix" examples of stream ``seed``.

    Keys: each head over all images (``none`` counts as a class), plus ``shape|shapes``,
    ``size|shapes``, ``position|shapes`` (shape images only) and ``glyph|signs`` (sign
    images only). With ``augmented=True`` the images are degraded by :func:`augment`.
    """
    model = model if model is not None else load_judge()
    gen = torch.Generator().manual_seed(seed)
    correct = {h: 0 for h in HEADS}
    sub = {"shape|shapes": [0, 0], "size|shapes": [0, 0], "position|shapes": [0, 0], "glyph|signs": [0, 0]}
    for start in range(0, n, batch_size):
        x, y = _batch(seed, start, min(batch_size, n - start))
        if augmented:
            x = augment(x, gen)
        probs = _probabilities(x, model)
        is_sign = y[:, HEADS.index("glyph")] != len(CLASSES["glyph"]) - 1
        for j, h in enumerate(HEADS):
            ok = probs[h].argmax(-1) == y[:, j]
            correct[h] += int(ok.sum())
            key = f"{h}|signs" if h == "glyph" else f"{h}|shapes"
            if key in sub:
                mask = is_sign if h == "glyph" else ~is_sign
                sub[key][0] += int(ok[mask].sum())
                sub[key][1] += int(mask.sum())
    out = {h: correct[h] / n for h in HEADS}
    out.update({k: c / max(t, 1) for k, (c, t) in sub.items()})
    return out


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit_attn.toy.judge",
                                description="Train (--out) and/or evaluate (--eval) the synthetic-world judge.")
    p.add_argument("--out", help="train and save weights here (the shipped file is dit_attn/toy/weights/judge.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval", action="store_true", help="evaluate (the freshly trained model, or --weights)")
    p.add_argument("--weights", help="weights to evaluate (default: shipped)")
    p.add_argument("--eval-seed", type=int, default=1_000_003)
    p.add_argument("--n", type=int, default=2000, help="number of fresh evaluation images")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None and not args.eval:
        p.error("nothing to do: pass --out PATH to train and/or --eval to evaluate")
    model = None
    if args.out is not None:
        t0 = time.time()
        model = train_judge(args.seed, args.steps, args.out, args.batch_size)
        print(f"trained in {(time.time() - t0) / 60:.1f} min → {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    if args.eval:
        model = model if model is not None else load_judge(args.weights)
        for augmented in (False, True):
            t0 = time.time()
            acc = evaluate_judge(model, args.eval_seed, args.n, augmented=augmented)
            label = "augmented (blur/noise/jitter)" if augmented else "clean renders"
            print(f"accuracy on {args.n} fresh images (seed {args.eval_seed}), {label}, {time.time() - t0:.0f} s:")
            for k, v in acc.items():
                print(f"  {k:16s} {100 * v:6.2f}%")


if __name__ == "__main__":
    _main()
