"""Gradient screening of head candidates: every head's first-order effect from one backward pass.

The strengths u of all candidate heads form one differentiable vector. The pipeline's own call
runs with gradients enabled (its `torch.no_grad()` decorator unwrapped), with the candidates at
u₀ and the current selection at the search's u, and returns float images; a differentiable
objective of those images is back-propagated through the VAE decode, every sampler step and the
guidance term to u. A head's score is its estimated change of the objective at the search's u,
(u − u₀)·∂J/∂u_h: the first-order term of what an exact evaluation of that head would measure.

Memory: with `checkpointing` every transformer block is recomputed in the backward pass
(diffusers' own gradient checkpointing, with the call state of its forward restored), so
activations are kept per block input, not per attention map.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..edits import HeadGuidance
from ..families import check_image_pipeline
from ..handle import apply
from ..heads import model_layers
from ..limits import check_image_size
from ..loading import sequence_length
from .objectives import differentiable_objective, get_objective
from .search import Head, SearchSettings, call_kwargs, candidate_heads, head_name, pairs_of, search_settings

@dataclass
class ScreenResult:
    scores: dict[str, float]  # (u − u₀)·∂J/∂u_h per candidate: the first-order change of the objective
    gradients: dict[str, float]  # ∂J/∂u_h at u₀ (or averaged along the path), mean over the pairs
    objective: float  # mean differentiable objective at u₀ (path_points > 1: at the first point of the path)
    pairs: int
    seconds: float
    settings: dict = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """Candidates by score, best first (ties: the candidate order)."""
        order = list(self.scores)
        return sorted(order, key=lambda name: (-self.scores[name], order.index(name)))


@contextlib.contextmanager
def frozen_weights(pipe):
    """No gradients for the pipeline's weights (only the strengths are differentiated); restored after."""
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


class CallStateRestorer:
    """diffusers' gradient-checkpointing function for the blocks: the recomputation in the backward pass
    runs under the call state (rows, text length, grid) its forward ran under."""

    def __init__(self, state):
        self.state = state

    def __call__(self, function, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        saved = copy.copy(self.state.call)  # the call hook resets its fields when the call ends

        def contexts():
            return contextlib.nullcontext(), self.restored(saved)

        return checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    @contextlib.contextmanager
    def restored(self, saved):
        calls = self.state._calls
        previous = getattr(calls, "state", None)
        calls.state = saved
        try:
            yield
        finally:
            calls.state = previous


@contextlib.contextmanager
def block_checkpointing(transformer, state, enabled: bool):
    if not enabled or not getattr(transformer, "_supports_gradient_checkpointing", False):
        yield
        return
    was_enabled = transformer.is_gradient_checkpointing
    transformer.enable_gradient_checkpointing(CallStateRestorer(state))
    try:
        yield
    finally:
        if was_enabled:
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()


def layer_strengths(pipe, leaf: torch.Tensor, candidates: list[Head], selected: list[Head], u: float) -> dict[int, torch.Tensor]:
    """(H,) strengths per layer: candidate i at leaf[i], selected heads at u, other heads 0."""
    layer_map = model_layers(pipe.transformer)
    position = {head: i for i, head in enumerate(candidates)}
    chosen = set(selected)
    zero, fixed = leaf.new_zeros(()), leaf.new_tensor(u)
    strengths = {}
    for layer in sorted({layer for layer, _ in [*candidates, *selected]}):
        strengths[layer] = torch.stack([
            leaf[position[(layer, h)]] if (layer, h) in position else (fixed if (layer, h) in chosen else zero)
            for h in range(layer_map[layer].heads)
        ])
    return strengths


def differentiable_images(pipe, settings: SearchSettings, pairs: list[tuple[str, int]]) -> torch.Tensor:
    """The pipeline call of `pairs` with gradients: (B, 3, H, W) float images in [0, 1]."""
    call = getattr(type(pipe).__call__, "__wrapped__", None)  # diffusers decorates __call__ with torch.no_grad()
    if call is None:
        raise TypeError(f"{type(pipe).__name__}.__call__ is not a diffusers pipeline call (no torch.no_grad wrapper)")
    generators = [torch.Generator().manual_seed(seed) for _, seed in pairs]
    with torch.enable_grad():
        images = call(pipe, prompt=[prompt for prompt, _ in pairs], generator=generators, output_type="pt",
                      **call_kwargs(settings)).images
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise TypeError(f"{type(pipe).__name__} did not return image tensors for output_type='pt'")
    return images


def screen(pipe, gradient_of, settings: SearchSettings, candidates: list[Head], selected: list[Head], pairs,
           u0: float = 0.0, checkpointing: bool = True, progress: bool = False) -> tuple[torch.Tensor, float]:
    """(∂J/∂u per candidate, mean J), J the differentiable objective averaged over `pairs`; one backward
    pass per `settings.batch_size` pairs."""
    leaf = torch.full((len(candidates),), float(u0), dtype=torch.float64, requires_grad=True)
    edit = HeadGuidance(heads=sorted(set(candidates) | set(selected)), scale=settings.scale, u=settings.u,
                        target=settings.target, scope=settings.scope)
    total = 0.0
    bar = tqdm(total=len(pairs), desc="screen", unit="pair", disable=not progress)
    with frozen_weights(pipe), apply(pipe, edit) as handle, \
            block_checkpointing(pipe.transformer, handle.state, checkpointing):
        for start in range(0, len(pairs), settings.batch_size):
            chunk = pairs[start : start + settings.batch_size]
            for layer, vec in layer_strengths(pipe, leaf, candidates, selected, settings.u).items():
                guided = handle.state.guided_edits[layer]
                handle.state.guided_edits[layer] = type(guided)(vec.float(), guided.target, guided.scope)
            images = differentiable_images(pipe, settings, chunk)
            values = gradient_of(images, [prompt for prompt, _ in chunk])
            if not isinstance(values, torch.Tensor) or values.shape != (len(chunk),):
                raise ValueError(f"the differentiable objective must return a tensor of {len(chunk)} scores, "
                                 f"got {type(values).__name__} {tuple(getattr(values, 'shape', ()))}")
            (values.sum() / len(pairs)).backward()
            total += float(values.detach().sum())
            bar.update(len(chunk))
    bar.close()
    return leaf.grad.detach().clone(), total / len(pairs)


def screen_heads(pipe, objective, prompts, seeds, candidates=None, selected=(), u: float = 1.0, u0: float = 0.0,
                 scale: float = 3.0, num_inference_steps: int = 20, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, target: str = "identity", scope: str = "joint",
                 batch_size: int = 4, max_sequence_length: int | None = None, checkpointing: bool = True,
                 path_points: int = 1, progress: bool = True) -> ScreenResult:
    """Score every candidate head by the first-order change of a differentiable objective at strength u,
    from backward passes over the (prompt, seed) pairs (the heads of `selected` guided at u throughout).

    objective: "color:<name>", "judge:soft", or a callable with a `differentiable(images, prompts)` attribute.
    u0: the candidates' strength the gradient is taken at (0: the selection alone).
    path_points: with n > 1, the gradient is averaged over n strengths at the midpoints of n equal steps
        from u0 to u (all candidates together: a path integral of the gradient), n times the backward passes.
    """
    check_image_pipeline(pipe, "screen_heads")
    gradient_of = differentiable_objective(get_objective(objective), objective if isinstance(objective, str) else
                                           getattr(objective, "__name__", "callable"))
    if isinstance(u0, bool) or not isinstance(u0, (int, float)) or not 0 <= u0 <= 1:
        raise ValueError(f"u0 must be a number in [0, 1], got {u0!r}")
    if isinstance(path_points, bool) or not isinstance(path_points, int) or path_points < 1:
        raise ValueError(f"path_points must be a whole number >= 1, got {path_points!r}")
    heads = candidate_heads(pipe, candidates)
    chosen = candidate_heads(pipe, list(selected)) if selected else []
    heads = [h for h in heads if h not in chosen]
    if not heads:
        raise ValueError("no candidate heads left to screen (every candidate is already selected)")
    check_image_size(pipe, height, width)
    settings = search_settings(objective, prompts, seeds, 1, 1, u, scale, num_inference_steps, guidance_scale, height,
                               width, heads, target, scope, batch_size, sequence_length(pipe, max_sequence_length))
    start = time.perf_counter()
    pairs = pairs_of(settings)
    if path_points == 1:
        gradients, value = screen(pipe, gradient_of, settings, heads, chosen, pairs, u0, checkpointing, progress)
    else:
        points = [u0 + (settings.u - u0) * (i + 0.5) / path_points for i in range(path_points)]
        along = [screen(pipe, gradient_of, settings, heads, chosen, pairs, point, checkpointing, progress)
                 for point in points]
        gradients, value = sum(g for g, _ in along) / path_points, along[0][1]
    names = [head_name(h) for h in heads]
    return ScreenResult(
        scores={n: float(g) * (settings.u - u0) for n, g in zip(names, gradients)},
        gradients={n: float(g) for n, g in zip(names, gradients)},
        objective=value, pairs=len(pairs), seconds=time.perf_counter() - start,
        settings={**asdict(settings), "u0": float(u0), "path_points": path_points,
                  "selected": [head_name(h) for h in chosen]},
    )
