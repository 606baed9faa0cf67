"""Scores of a patched image: does it show the source text, and does it stay close to the
original? A score is a callable `score(images, originals, pairs)` with images and
originals as (B, 3, H, W) float tensors in [0, 1] and one TextPair per image; it returns
a (B,) tensor, or a dict of named (B,) components: the "score" entry is the score (without
one, the components add up to it), the others are reported beside it. Videos (B, F, 3, H, W)
are scored frame by frame against the same frame of the original, each component averaged
over the frames (`score_outputs`).

The built-in text scores multiply text evidence by SSIM: a layer must bring in the source
text *and* keep the image. (On the tiny model a sum ranked the layers that change nothing
first: their SSIM of ~1 outweighed the text layer's glyph gain.)"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .prompts import quoted_text


@dataclass(frozen=True)
class TextPair:
    """A prompt and the source prompt whose text a patch should bring into its image."""

    prompt: str
    source_prompt: str

    def __post_init__(self) -> None:
        for name in ("prompt", "source_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")

    @property
    def source_text(self) -> str | None:
        return quoted_text(self.source_prompt)


def as_pairs(pairs) -> list[TextPair]:
    """TextPairs from TextPair objects, (prompt, source_prompt) tuples or dicts."""
    if isinstance(pairs, (str, TextPair)) or (isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs)):
        raise TypeError("pairs must be a list of (prompt, source_prompt) pairs")
    out = []
    for pair in pairs:
        if isinstance(pair, TextPair):
            out.append(pair)
        elif isinstance(pair, dict):
            out.append(TextPair(pair["prompt"], pair["source_prompt"]))
        elif isinstance(pair, (tuple, list)) and len(pair) == 2:
            out.append(TextPair(*pair))
        else:
            raise TypeError(f"a pair is (prompt, source_prompt), got {pair!r}")
    if not out:
        raise ValueError("give at least one (prompt, source_prompt) pair")
    return out


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(images: torch.Tensor, references: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image: (B, C, H, W) in [0, 1] → (B,).

    Gaussian window (11, σ 1.5), K1 = 0.01, K2 = 0.03, computed per channel over the
    valid region and averaged; images smaller than the window use a window of their size.
    """
    if images.shape != references.shape or images.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(images.shape)} and {tuple(references.shape)}")
    x, y = images.double(), references.double()
    size = min(window, x.shape[-1], x.shape[-2])
    channels = x.shape[1]
    kernel = _gaussian_window(size, sigma).double().expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean(dim=(1, 2, 3)).float()


def ssim_score(images: torch.Tensor, originals: torch.Tensor, pairs: Sequence[TextPair]) -> dict[str, torch.Tensor]:
    """Closeness to the original image only (for models without a text reader)."""
    return {"ssim": ssim(images, originals)}


def judge_glyph_probability(images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """The embedded judge's probability that each image shows its text (one of A–Z, 0–9)."""
    from ..toy.data import GLYPHS
    from ..toy.judge import CLASSES, probabilities

    glyphs = CLASSES["glyph"]
    bad = [t for t in texts if t not in GLYPHS]
    if bad:
        raise ValueError(f"the judge reads one character A-Z or 0-9, got {bad[:3]}; pass an OCR score for other text")
    probs = probabilities(images)["glyph"]
    return probs[torch.arange(len(texts)), torch.tensor([glyphs.index(t) for t in texts])]


def judge_score(images: torch.Tensor, originals: torch.Tensor, pairs: Sequence[TextPair]) -> dict[str, torch.Tensor]:
    """The default: judge glyph probability of the source text × SSIM to the unpatched image."""
    glyph, similarity = judge_glyph_probability(images, [p.source_text for p in pairs]), ssim(images, originals)
    return {"score": glyph * similarity, "glyph": glyph, "ssim": similarity}


def character_f1(read: str, expected: str) -> float:
    """F1 of the characters read against the expected ones (case and spaces ignored)."""
    a = [c for c in read.upper() if not c.isspace()]
    b = [c for c in expected.upper() if not c.isspace()]
    if not a or not b:
        return float(a == b)
    common = sum(min(a.count(c), b.count(c)) for c in set(b))
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


class OCRScore:
    """OCR character F1 of the source text × SSIM, from a reader `read(images) -> list[str]`
    (images: PIL list). `OCRScore.easyocr(dir)` and `OCRScore.trocr(dir)` build readers from
    locally stored weights only (nothing is downloaded)."""

    def __init__(self, read: Callable[[list], list[str]]):
        self.read = read

    def __call__(self, images: torch.Tensor, originals: torch.Tensor, pairs: Sequence[TextPair]) -> dict[str, torch.Tensor]:
        texts = self.read(to_pil(images))
        f1 = torch.tensor([character_f1(t, p.source_text or "") for t, p in zip(texts, pairs)])
        similarity = ssim(images, originals)
        return {"score": f1 * similarity, "ocr_f1": f1, "ssim": similarity}

    @classmethod
    def easyocr(cls, model_dir: str) -> "OCRScore":
        _check_weights_dir("EasyOCR", model_dir)
        try:
            import easyocr
        except ImportError as err:
            raise ValueError(f"EasyOCR is not installed (pip install easyocr): {err}") from err
        reader = easyocr.Reader(["en"], gpu=torch.cuda.is_available(), model_storage_directory=model_dir,
                                download_enabled=False)
        return cls(lambda images: [" ".join(reader.readtext(np.asarray(im), detail=0)) for im in images])

    @classmethod
    def trocr(cls, model_dir: str) -> "OCRScore":
        from transformers import TrOCRProcessor, VisionEncoderDecoderModel

        _check_weights_dir("TrOCR", model_dir)
        try:
            processor = TrOCRProcessor.from_pretrained(model_dir, local_files_only=True)
            model = VisionEncoderDecoderModel.from_pretrained(model_dir, local_files_only=True).eval()
        except OSError as err:
            raise ValueError(f"no TrOCR weights in {model_dir!r} (local files only): {err}") from err

        def read(images):
            with torch.no_grad():
                ids = model.generate(processor(images=images, return_tensors="pt").pixel_values)
            return processor.batch_decode(ids, skip_special_tokens=True)

        return cls(read)


def _check_weights_dir(name: str, model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise ValueError(f"{name} weights directory not found: {model_dir!r} (OCR scores use local weights only)")


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] → PIL images."""
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def components(result) -> dict[str, torch.Tensor]:
    """A score's result as named (B,) components, "score" among them (the sum of the
    others when the score did not give one; a plain tensor is the score alone)."""
    if not isinstance(result, dict):
        return {"score": torch.as_tensor(result, dtype=torch.float32).flatten()}
    parts = {k: torch.as_tensor(v, dtype=torch.float32).flatten() for k, v in result.items()}
    if "score" not in parts:
        parts["score"] = sum(parts.values())
    return parts


def score_outputs(score, outputs: torch.Tensor, originals: torch.Tensor, pairs: Sequence[TextPair]) -> dict[str, torch.Tensor]:
    """`score` on images (B, 3, H, W), or on videos (B, F, 3, H, W) frame by frame (frame f against the
    original's frame f, with the video's pair) and each component averaged over the frames: (B,) components."""
    if outputs.ndim != 5:
        return components(score(outputs, originals, pairs))
    if outputs.shape != originals.shape:
        raise ValueError(f"videos of shapes {tuple(outputs.shape)} and {tuple(originals.shape)} cannot be compared")
    batch, frames = outputs.shape[:2]
    frame_pairs = [pair for pair in pairs for _ in range(frames)]
    per_frame = components(score(outputs.flatten(0, 1), originals.flatten(0, 1), frame_pairs))
    return {name: value.view(batch, frames).mean(dim=1) for name, value in per_frame.items()}
