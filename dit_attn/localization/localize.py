"""`localize`: patch each layer (or group) alone and rank the layers by how much the
image (or video) shows the source prompt's text while staying close to the original."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .. import limits
from ..handle import apply, layers as layer_map
from ..edits import TextPatch
from ..families import family_of
from ..io import write_json_atomic, write_png_atomic
from .output import bar_chart
from .score import TextPair, as_pairs, judge_score, score_outputs, ssim_score

RESULT_JSON = "localization.json"
RESULT_PNG = "localization.png"


# older names of the pipeline-call settings, refused with the name to use (they would reach the pipeline)
RENAMED_ARGUMENTS = {"steps": "num_inference_steps", "cfg": "guidance_scale", "size": "height and width",
                     "seed": "generator (e.g. torch.Generator().manual_seed(seed))"}


def check_argument_names(function: str, pipe_kwargs: dict) -> None:
    """TypeError for a keyword argument under an older name (steps, cfg, size, seed), naming today's."""
    for old, new in RENAMED_ARGUMENTS.items():
        if old in pipe_kwargs:
            raise TypeError(f"{function}() takes {new}, not {old!r} (the diffusers name)")


def call_options(guidance_scale: float | None, height: int | None, width: int | None) -> dict:
    """The given pipeline-call settings (None: left to the pipeline's default)."""
    options = {"guidance_scale": guidance_scale, "height": height, "width": width}
    return {name: value for name, value in options.items() if value is not None}


def check_steps(num_inference_steps) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    limits.check_steps(num_inference_steps)


def makes_videos(pipe) -> bool:
    return family_of(pipe.transformer).makes_videos


def check_output_size(pipe, height: int | None, width: int | None, pipe_kwargs: dict) -> None:
    """The image size, or for a video pipeline the video (frames and budget) and the input image an
    image-to-video pipeline needs, before any allocation."""
    import inspect

    num_frames = pipe_kwargs.get("num_frames")
    if makes_videos(pipe):
        limits.check_video_size(pipe, num_frames, height, width)
        image = inspect.signature(pipe.__call__).parameters.get("image")
        if image is not None and image.default is inspect.Parameter.empty and pipe_kwargs.get("image") is None:
            raise ValueError(f"{type(pipe).__name__} makes a video from an input image: pass image= (the Python API; "
                             "the command line makes videos from text only)")
    elif num_frames is not None:
        raise ValueError(f"num_frames is for video pipelines; {type(pipe).__name__} makes images")


def generate(pipe, prompt: str, seeds: list[int], num_inference_steps: int, **pipe_kwargs) -> torch.Tensor:
    """One pipeline call for `prompt` at each seed: images (len(seeds), 3, H, W) or, from a video
    pipeline, videos (len(seeds), F, 3, H, W), in [0, 1]. Videos are made one call per seed: HunyuanVideo
    1.5's VAE decodes one video at a time (its attention mask does not broadcast over a batch)."""
    if makes_videos(pipe):
        return torch.cat([pipe(prompt=prompt, generator=torch.Generator(device="cpu").manual_seed(s),
                               num_inference_steps=num_inference_steps, output_type="pt", **pipe_kwargs).frames.float().cpu()
                          for s in seeds])
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    out = pipe(prompt=[prompt] * len(seeds), generator=generators, num_inference_steps=num_inference_steps, output_type="pt",
               **pipe_kwargs)
    return out.images.float().cpu()


def layer_groups(layers, n_layers: int) -> list[tuple[int, ...]]:
    """None → every layer alone; entries are layer indices or lists of them (patched together)."""
    if layers is None:
        return [(i,) for i in range(n_layers)]
    groups = []
    for entry in ([layers] if isinstance(layers, int) else list(layers)):
        group = TextPatch(layers=entry, source_prompt="-").layers  # type and emptiness checks
        bad = [i for i in group if i >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: this model has layers 0-{n_layers - 1}")
        groups.append(group)
    if not groups:
        raise ValueError(f"give at least one layer to patch (this model has layers 0-{n_layers - 1}), or layers=None for all")
    return groups


def text_kv_parameters(transformer, layer: int) -> int:
    """Parameters of the projections a TextPatch replaces: add_k/add_v (joint and double
    blocks), to_k/to_v (FLUX single blocks, shared by text and image tokens) or, where the
    layer is a self-attention (Wan's attn1), to_k/to_v of its block's cross-attention attn2."""
    info = layer_map(transformer)[layer]
    if info.kind == "self":
        attn = transformer.get_submodule(info.name.rsplit(".", 1)[0] + ".attn2")
    else:
        attn = transformer.get_submodule(info.name)
    modules = (attn.to_k, attn.to_v) if info.kind in ("single", "self") else (attn.add_k_proj, attn.add_v_proj)
    return sum(p.numel() for m in modules for p in m.parameters())


def block_parameters(transformer, layer: int) -> int:
    block = transformer.get_submodule(layer_map(transformer)[layer].name.rsplit(".", 1)[0])
    return sum(p.numel() for p in block.parameters())


@dataclass
class LayerScore:
    layers: tuple[int, ...]
    score: float  # mean over pairs and seeds
    components: dict[str, float]  # mean of each component the score reported (the score included)
    samples: list[float]  # the score of each (pair, seed)
    text_kv_share: float  # share of the transformer's parameters in the patched projections
    block_share: float  # share in the patched blocks

    @property
    def label(self) -> str:
        return "+".join(f"L{i}" for i in self.layers)


@dataclass
class LocalizationResult:
    """Scores of each patched layer group; `ranking` best first."""

    scores: list[LayerScore]
    baseline: dict[str, float]  # the score's components on the unpatched images
    settings: dict = field(default_factory=dict)

    @property
    def ranking(self) -> list[LayerScore]:
        return sorted(self.scores, key=lambda s: s.score, reverse=True)

    @property
    def top(self) -> LayerScore:
        return self.ranking[0]

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "baseline": self.baseline,
            "ranking": [s.label for s in self.ranking],
            "top": {"layers": list(self.top.layers), "score": self.top.score, "text_kv_share": self.top.text_kv_share,
                    "block_share": self.top.block_share},
            "scores": [{**asdict(s), "layers": list(s.layers), "label": s.label} for s in self.scores],
        }

    def chart(self):
        name = self.settings.get("score", "score")
        title = f"text-layer localization: mean {name} per patched layer (top {self.top.label})"
        top_index = self.scores.index(self.top)
        return bar_chart([s.label for s in self.scores], [s.score for s in self.scores], title, top_index)

    def save(self, directory: str) -> tuple[str, str]:
        """Write localization.json and localization.png (each atomically); returns their paths."""
        json_path, png_path = os.path.join(directory, RESULT_JSON), os.path.join(directory, RESULT_PNG)
        write_json_atomic(json_path, self.to_dict())
        write_png_atomic(self.chart(), png_path)
        return json_path, png_path


def localize(pipe, pairs, score=None, layers=None, seeds=(0,), num_inference_steps: int = 20,
             guidance_scale: float | None = None, height: int | None = None, width: int | None = None, start: float = 0.0,
             out: str | None = None, progress: bool = True, **pipe_kwargs) -> LocalizationResult:
    """Patch each layer group alone with the source prompt of each pair and score the images
    (a video pipeline: the videos, each frame against the unpatched video's frame, averaged).

    pairs: (prompt, source_prompt) tuples or TextPairs. score: `score(images, originals,
    pairs)` (see `dit_attn.localization.score`); default: judge glyph probability of the
    source text × SSIM to the unpatched image, on a video pipeline SSIM alone (the judge
    reads the embedded image model's signs). layers: None (every layer alone) or a list
    of layer indices / lists of indices. Each pair makes one unpatched and one patched
    pipeline call per group, each with one row per seed (videos: one call per seed). num_inference_steps, guidance_scale,
    height, width: the pipeline call's (None: the pipeline's default); other pipe_kwargs go to
    the pipeline too (e.g. max_sequence_length, a video's num_frames). The settings record the
    images' height and width (and a video's num_frames). With `out`, the result is saved there.
    """
    from ..loading import call_defaults

    check_argument_names("localize", pipe_kwargs)
    limits.check_call(pipe, height=height, width=width, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale)
    check_output_size(pipe, height, width, pipe_kwargs)
    pairs = as_pairs(pairs)
    pipe_kwargs = {**call_defaults(pipe), **pipe_kwargs, **call_options(guidance_scale, height, width)}
    transformer = pipe.transformer
    n_layers = len(layer_map(transformer))
    groups = layer_groups(layers, n_layers)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    check_steps(num_inference_steps)
    score = score or (ssim_score if makes_videos(pipe) else judge_score)
    collected: list[list[dict[str, torch.Tensor]]] = [[] for _ in groups]
    baseline: list[dict[str, torch.Tensor]] = []
    drawn: torch.Size | None = None  # the shape of the images (or videos) generated
    bar = tqdm(total=len(pairs) * (1 + len(groups)), desc="localize", unit="gen", disable=not progress)
    try:
        for pair in pairs:
            row_pairs = [pair] * len(seeds)
            originals = generate(pipe, pair.prompt, seeds, num_inference_steps, **pipe_kwargs)
            drawn = originals.shape
            baseline.append(score_outputs(score, originals, originals, row_pairs))
            bar.update(1)
            for g, group in enumerate(groups):
                with apply(pipe, TextPatch(layers=group, source_prompt=pair.source_prompt, start=start)):
                    images = generate(pipe, pair.prompt, seeds, num_inference_steps, **pipe_kwargs)
                collected[g].append(score_outputs(score, images, originals, row_pairs))
                bar.update(1)
    finally:
        bar.close()
    total_params = sum(p.numel() for p in transformer.parameters())
    scores = []
    for group, parts in zip(groups, collected):
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        scores.append(LayerScore(
            layers=group, score=float(merged["score"].mean()), components={k: float(v.mean()) for k, v in merged.items()},
            samples=[float(x) for x in merged["score"]],
            text_kv_share=sum(text_kv_parameters(transformer, i) for i in group) / total_params,
            block_share=sum(block_parameters(transformer, i) for i in group) / total_params,
        ))
    result = LocalizationResult(
        scores=scores,
        baseline={k: float(torch.cat([b[k] for b in baseline]).mean()) for k in baseline[0]},
        settings={
            "pairs": [asdict(p) for p in pairs], "seeds": seeds, "num_inference_steps": num_inference_steps,
            "guidance_scale": pipe_kwargs.get("guidance_scale"), "height": drawn[-2], "width": drawn[-1],
            **({"num_frames": drawn[1]} if len(drawn) == 5 else {}),
            "start": start, "score": getattr(score, "__name__", type(score).__name__), "model": type(transformer).__name__,
            "layers": n_layers,
            "pipeline_kwargs": {k: v for k, v in pipe_kwargs.items()
                                if isinstance(v, (int, float, str))
                                and k not in ("guidance_scale", "height", "width", "num_frames")},
        },
    )
    if out is not None:
        result.save(out)
    return result


def sign_pairs(n: int, seed: int = 0) -> list[TextPair]:
    """n sign-prompt pairs of the embedded tiny model's world: the same sign (colours) with
    two different characters."""
    import numpy as np

    from ..toy import data

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        color, background = rng.choice(data.COLORS, size=2, replace=False)
        a, b = rng.choice(data.GLYPHS, size=2, replace=False)
        make = lambda g: data.caption(data.Attributes("sign", color=str(color), background=str(background), glyph=str(g)))
        pairs.append(TextPair(make(a), make(b)))
    return pairs
