"""Objectives for head search: `objective(images, prompts) -> scores` (higher is better).

Built in: "judge" (the tiny model's judge: fraction of the prompt's attributes the image
shows; "judge:soft" counts the judge's probability of each attribute instead, a continuous
score), "color:<palette name>" (share of pixels near that colour — a toy style), and
"clip-score[:model]", "pickscore[:model]", "aesthetic:<dir>" loaded through transformers
from a local path or a hub id available offline (a clear error names what is missing).
Any callable with the same signature works too.

Head screening differentiates an objective through the sampler: "color:<name>" (a pixel's
share is a sigmoid of its colour distance, COLOR_SOFTNESS wide) and "judge:soft" carry a
`differentiable(images, prompts) -> (B,) tensor` attribute taking a (B, 3, H, W) float batch in
[0, 1]; so may a user's callable.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

Objective = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[float]]

COLOR_DISTANCE = 60.0  # RGB distance within which a pixel counts as the palette colour
COLOR_SOFTNESS = 8.0  # RGB distance over which the differentiable share goes from ~0.27 to ~0.73


def judge_objective(images, prompts) -> list[float]:
    from ..toy.judge import adherence

    return adherence(list(images), list(prompts)).tolist()


def soft_judge_objective(images, prompts) -> list[float]:
    from ..toy.judge import adherence

    return adherence(list(images), list(prompts), soft=True).tolist()


def _soft_judge_differentiable(images: torch.Tensor, prompts) -> torch.Tensor:
    from ..toy.judge import soft_adherence_differentiable

    return soft_adherence_differentiable(images, list(prompts))


soft_judge_objective.differentiable = _soft_judge_differentiable


def color_objective(name: str) -> Objective:
    from ..toy.data import PALETTE

    if name not in PALETTE:
        raise ValueError(f"unknown palette colour {name!r}; valid: {', '.join(PALETTE)}")
    rgb = np.array(PALETTE[name], dtype=np.float32)

    def share_of_color(images, prompts) -> list[float]:
        scores = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
            scores.append(float((np.linalg.norm(pixels - rgb, axis=-1) < COLOR_DISTANCE).mean()))
        return scores

    def soft_share_of_color(images: torch.Tensor, prompts) -> torch.Tensor:
        distance = torch.linalg.vector_norm(images.permute(0, 2, 3, 1) * 255 - torch.from_numpy(rgb).to(images), dim=-1)
        return torch.sigmoid((COLOR_DISTANCE - distance) / COLOR_SOFTNESS).flatten(1).mean(dim=1)

    share_of_color.__name__ = f"color:{name}"
    share_of_color.differentiable = soft_share_of_color
    return share_of_color


def _load_or_explain(loader, source: str, what: str):
    try:
        return loader(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"the {what} objective needs its model weights: {source!r} is neither a local directory nor a hub id "
            f"available offline ({type(err).__name__}). Download it once (e.g. `huggingface-cli download {source}`) "
            f"or pass a local path as '{what}:/path/to/model'"
        ) from err


def clip_objective(source: str, what: str = "clip-score") -> Objective:
    """Cosine similarity of CLIP image and text embeddings (×100, as CLIP score and PickScore report)."""
    from transformers import AutoModel, AutoProcessor

    model = _load_or_explain(lambda s: AutoModel.from_pretrained(s).eval(), source, what)
    processor = _load_or_explain(AutoProcessor.from_pretrained, source, what)

    @torch.no_grad()
    def score(images, prompts) -> list[float]:
        inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True)
        image_emb = torch.nn.functional.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        text_emb = torch.nn.functional.normalize(
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")), dim=-1)
        return (100 * (image_emb * text_emb).sum(-1)).tolist()

    score.__name__ = what
    return score


def aesthetic_objective(source: str) -> Objective:
    """LAION aesthetic predictor: a CLIP vision model plus a linear/MLP head in `<dir>/aesthetic_head.safetensors`."""
    import os

    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    head_path = os.path.join(source, "aesthetic_head.safetensors")
    if not os.path.isfile(head_path):
        raise ValueError(f"the aesthetic objective needs a directory with a CLIP vision model and aesthetic_head.safetensors; "
                         f"{head_path!r} does not exist")
    vision = _load_or_explain(lambda s: CLIPVisionModelWithProjection.from_pretrained(s).eval(), source, "aesthetic")
    processor = _load_or_explain(CLIPImageProcessor.from_pretrained, source, "aesthetic")
    layers = load_file(head_path)  # weight_0, bias_0, weight_1, ... applied as linear layers with ReLU between

    @torch.no_grad()
    def score(images, prompts) -> list[float]:
        x = vision(**processor(images=list(images), return_tensors="pt")).image_embeds
        x = torch.nn.functional.normalize(x, dim=-1)
        n = len([k for k in layers if k.startswith("weight_")])
        for i in range(n):
            x = x @ layers[f"weight_{i}"].T + layers[f"bias_{i}"]
            if i < n - 1:
                x = torch.relu(x)
        return x.squeeze(-1).tolist()

    return score


DEFAULT_SOURCES = {"clip-score": "openai/clip-vit-large-patch14", "pickscore": "yuvalkirstain/PickScore_v1"}
BUILT_IN = ("judge", "judge:soft", "color:<palette name>", "clip-score[:model]", "pickscore[:model]", "aesthetic:<dir>")


DIFFERENTIABLE = ("color:<palette name>", "judge:soft")


def differentiable_objective(objective: Objective, name: str):
    """The objective's `differentiable(images, prompts) -> (B,) tensor`, or a ValueError naming those that have one."""
    function = getattr(objective, "differentiable", None)
    if not callable(function):
        raise ValueError(f"the objective {name!r} is not differentiable, so heads cannot be screened by gradients; "
                         f"differentiable: {', '.join(DIFFERENTIABLE)}, or a callable with a "
                         "`differentiable(images, prompts)` attribute (use strategy 'race' or 'exhaustive' otherwise)")
    return function


def get_objective(spec: Union[str, Objective]) -> Objective:
    """A callable objective from a name in the registry, or the callable itself."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"objective must be a name or a callable(images, prompts) -> scores, got {type(spec).__name__}")
    name, _, argument = spec.partition(":")
    if name == "judge" and argument in ("", "soft"):
        return soft_judge_objective if argument else judge_objective
    if name == "color":
        return color_objective(argument)
    if name in DEFAULT_SOURCES:
        return clip_objective(argument or DEFAULT_SOURCES[name], name)
    if name == "aesthetic" and argument:
        return aesthetic_objective(argument)
    raise ValueError(f"unknown objective {spec!r}; built in: {', '.join(BUILT_IN)}, or pass a callable")
