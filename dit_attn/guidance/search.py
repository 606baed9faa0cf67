"""HeadHunter's search (Algorithm 1): each round, score every remaining head h by the mean
objective over (prompt, seed) pairs of images generated with head guidance on S ∪ {h},
then add the top k heads to S.

Many candidates are scored per pipeline call: every (candidate, pair) is one item of the
batch, each item's perturbed row gets its own heads (per-row strengths in one guided
call), prompts are encoded once per call, and blocks before the first perturbed layer of
the batch run once for the conditional and perturbed rows. Candidates are sorted by
layer, so a batch's shared prefix is as long as it can be. An item's noise comes from
its pair's seed alone: the images are the ones one pipeline call per candidate gives.

Resumable: after every batch the scores so far are written (atomically) to the
checkpoint; rerunning with the same settings continues there. Several processes
(`accelerate launch`/`torchrun`: RANK, WORLD_SIZE) split each round's batches and
exchange scores over torch.distributed (gloo); the batches are the same whatever the
number of processes, so the result is too.

Noise: a candidate's mean over a few pairs moves by more than most heads change it, so the
plain top-k can pick noise. With `min_z`, each round also scores the current selection
alone on the same pairs, and a candidate may join only if its paired gain (same prompt,
same seed) is more than `min_z` standard errors above zero; a round where none qualifies
ends the hunt. Picking the best of many noisy candidates still favours lucky ones, so with
`confirm_seeds` the round's `confirm_top` candidates (by z) are scored again, with the
selection alone, on fresh seeds, and the test is made on those scores only. When one
head's effect is below the noise of the pairs while several heads' sum is not,
`confirm_together` confirms the round's top k (by z) as one set: all join or none.
"""
from __future__ import annotations

import atexit
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

from ..handle import apply
from ..io import as_stored, write_json_atomic
from ..edits import HeadGuidance
from ..families import check_image_pipeline
from ..heads import model_family, model_layers, resolve_heads
from ..limits import check_image_size, check_pixels, check_steps
from ..loading import sequence_length
from .objectives import differentiable_objective, get_objective

Head = tuple[int, int]


def head_name(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


@dataclass
class HuntResult:
    selected: list[str]  # heads in the order they were added
    rounds: list[dict[str, float]]  # per round: every candidate's mean objective
    settings: dict = field(default_factory=dict)
    # with min_z, per round: the current selection's mean objective, and every candidate's
    # paired gain over it as [mean, standard error]
    baselines: list[float] = field(default_factory=list)
    gains: list[dict[str, list[float]]] = field(default_factory=list)
    # with confirm_seeds, per round: the shortlisted candidates' [mean, standard error] of the
    # paired gain on the confirmation pairs, which alone decide who joins
    confirmations: list[dict[str, list[float]]] = field(default_factory=list)
    # per round: the generations (images) each candidate was scored with, and (screen+race) each
    # candidate's screening score and the backward passes (one per batch of pairs) spent on them
    spent: list[dict[str, int]] = field(default_factory=list)
    screening: list[dict[str, float]] = field(default_factory=list)
    backward_passes: list[int] = field(default_factory=list)

    def save(self, path: str) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str) -> "HuntResult":
        with open(path) as f:
            data = json.load(f)
        return cls(**{**data, "settings": renamed_settings(data.get("settings", {}))})


def candidate_heads(pipe, candidates=None) -> list[Head]:
    """Every (layer, head) of the model, or the given heads; sorted by layer, then head."""
    transformer = pipe.transformer
    layer_map, family = model_layers(transformer), model_family(transformer)
    if candidates is None:
        return [(info.index, h) for info in layer_map for h in range(info.heads)]
    heads = resolve_heads(candidates, layer_map, family)
    return sorted((layer, h) for layer, ids in heads.items() for h in ids)


def guided_strengths(pipe, handle, head_sets: list[set[Head]], u: float) -> None:
    """Give each item (conditional row) of the next calls its own heads: (items, H) strengths per layer."""
    layer_map = model_layers(pipe.transformer)
    for layer, edit in handle.state.guided_edits.items():
        strengths = torch.zeros(len(head_sets), layer_map[layer].heads)
        for row, heads in enumerate(head_sets):
            for head_layer, head in heads:
                if head_layer == layer:
                    strengths[row, head] = u
        handle.state.guided_edits[layer] = type(edit)(strengths, edit.target, edit.scope)


@dataclass(frozen=True)
class SearchSettings:
    objective: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    k: int
    rounds: int
    u: float
    scale: float
    num_inference_steps: int
    guidance_scale: float | None  # None: the pipeline's default
    height: int | None  # None: the pipeline's default
    width: int | None
    candidates: tuple[str, ...]
    target: str
    scope: str
    batch_size: int
    max_sequence_length: int | None
    min_z: float | None = None
    confirm_seeds: tuple[int, ...] = ()
    confirm_top: int = 0
    confirm_together: bool = False
    strategy: str = "exhaustive"
    race_start: int = 0  # race: pairs per candidate in the first stage
    race_z: float = 0.0  # race: drop a candidate this many standard errors below the leader
    race_eta: float = 1.0  # race: at most 1/race_eta of the survivors go on from a stage
    screen_top: int = 0  # screen+race: candidates (by screening score) that race
    screen_pairs: int = 0  # screen+race: pairs the screening runs on (the first of the race's order; 0: all)
    u0: float = 0.0  # screen+race: the strength the gradients are taken at


STRATEGIES = ("exhaustive", "race", "screen+race")


def call_kwargs(settings: SearchSettings) -> dict:
    """The pipeline-call keyword arguments of the search's settings (a None one: the pipeline's default)."""
    kwargs = {"num_inference_steps": settings.num_inference_steps}
    for name in ("guidance_scale", "height", "width", "max_sequence_length"):
        if getattr(settings, name) is not None:
            kwargs[name] = getattr(settings, name)
    return kwargs


def generate(pipe, settings: SearchSettings, pairs: list[tuple[str, int]]):
    """The pipeline call of `pairs` with the search's settings (each item seeded by its pair)."""
    kwargs = call_kwargs(settings)
    generators = [torch.Generator().manual_seed(seed) for _, seed in pairs]
    return pipe(prompt=[prompt for prompt, _ in pairs], generator=generators, **kwargs).images


def images_for(pipe, settings: SearchSettings, head_sets: list[set[Head]], pairs: list[tuple[str, int]]):
    """One pipeline call: item i = pairs[i] guided away from head_sets[i]."""
    union = sorted(set().union(*head_sets))
    edit = HeadGuidance(heads=union, scale=settings.scale, u=settings.u, target=settings.target, scope=settings.scope)
    with apply(pipe, edit) as handle:
        guided_strengths(pipe, handle, head_sets, settings.u)
        return generate(pipe, settings, pairs)


def pairs_of(settings: SearchSettings, seeds=None) -> list[tuple[str, int]]:
    """Every (prompt, seed) pair of the search, or of its prompts with other `seeds`."""
    return [(p, s) for p in settings.prompts for s in (settings.seeds if seeds is None else seeds)]


def race_pairs(settings: SearchSettings) -> list[tuple[str, int]]:
    """The pairs seed by seed (every prompt of the first seed, then of the next): a race's stages cover the
    prompts evenly."""
    return [(p, s) for s in settings.seeds for p in settings.prompts]


def checked_scores(objective, images, prompts) -> list[float]:
    scores = [float(s) for s in objective(images, prompts)]
    if len(scores) != len(images):
        raise ValueError(f"the objective returned {len(scores)} scores for {len(images)} images")
    return scores


def score_batch(pipe, objective, settings: SearchSettings, selected: list[Head], batch: list[Head],
                keep_images: bool = False):
    """Mean objective per candidate of `batch` (each with the already selected heads);
    with keep_images, also each candidate's image of the first (prompt, seed) pair."""
    per_pair, images = score_pairs(pipe, objective, settings, [set(selected) | {cand} for cand in batch])
    means = {head_name(cand): mean(scores) for cand, scores in zip(batch, per_pair)}
    if keep_images:
        return means, {head_name(cand): image for cand, image in zip(batch, images)}
    return means


def score_pairs(pipe, objective, settings: SearchSettings, head_sets: list[set[Head]], pairs=None):
    """For each head set, its objective on every (prompt, seed) pair (default: the search's) and
    its image of the first pair; all sets in one pipeline call (an empty set is plain generation)."""
    pairs = pairs or pairs_of(settings)
    items = [(heads, pair) for heads in head_sets for pair in pairs]
    if any(head_sets):
        images = images_for(pipe, settings, [heads for heads, _ in items], [pair for _, pair in items])
    else:
        images = generate(pipe, settings, [pair for _, pair in items])
    scores = checked_scores(objective, images, [pair[0] for _, pair in items])
    n = len(pairs)
    return [scores[i * n : (i + 1) * n] for i in range(len(head_sets))], images[::n]


def mean(values) -> float:
    return sum(values) / len(values)


def paired_gain(scores: list[float], baseline: list[float]) -> list[float]:
    """[mean, standard error] of the per-pair differences scores − baseline."""
    diffs = [a - b for a, b in zip(scores, baseline)]
    m = mean(diffs)
    if len(diffs) < 2:
        return [m, math.inf]
    var = sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1)
    return [m, math.sqrt(var / len(diffs))]


def significant(gain: list[float], min_z: float) -> bool:
    m, se = gain
    return m > 0 and m > min_z * se


def z_score(gain: list[float]) -> float:
    m, se = gain
    if se > 0:
        return m / se
    return math.inf if m > 0 else (-math.inf if m < 0 else 0.0)


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the launcher's process group (gloo) when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        # gloo's threads must be joined before the interpreter tears down, or a process that
        # finished its hunt can abort at exit ("terminate called without an active exception")
        atexit.register(leave_process_group)
    return dist.get_rank(), dist.get_world_size()


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather_scores(scores: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return scores
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, scores)
    merged: dict[str, float] = {}
    for part in parts:
        merged.update(part)
    return merged


def top_k(scores: dict[str, float], order: list[str], k: int) -> list[str]:
    """The k best candidates; ties go to the earlier candidate in `order`."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(scores, key=lambda name: (-scores[name], rank[name]))[:k]


def check_search(prompts, seeds, k: int, rounds: int, n_candidates: int) -> None:
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError("seeds must be a non-empty list of integers")
    for name, value in (("k", k), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if k * rounds > n_candidates:
        raise ValueError(f"k × rounds = {k * rounds} heads to select, but there are only {n_candidates} candidates")


def check_call_settings(num_inference_steps, guidance_scale, height, width) -> None:
    """The pipeline-call settings of a search: whole steps in [1, 1000], a number or None, sides > 0 or None,
    within the machine's pixel budget (`dit_attn.limits`)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    check_steps(num_inference_steps)
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or not math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a number or None (the pipeline's default), got {guidance_scale!r}")
    for name, side in (("height", height), ("width", width)):
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
            raise ValueError(f"{name} must be a whole number of pixels >= 1 or None (the pipeline's default), got {side!r}")
    check_pixels(height, width)


def search_settings(objective, prompts, seeds, k, rounds, u, scale, num_inference_steps, guidance_scale, height, width,
                    heads: list[Head], target, scope, batch_size, max_sequence_length, min_z: float | None = None,
                    confirm_seeds=None, confirm_top: int | None = None, confirm_together: bool = False,
                    strategy: str = "exhaustive", race_start: int | None = None, race_z: float = 2.0,
                    race_eta: float = 2.0, screen_top: int | None = None, u0: float = 0.0,
                    screen_pairs: int | None = None) -> SearchSettings:
    """Validated settings (clear errors before any generation)."""
    check_call_settings(num_inference_steps, guidance_scale, height, width)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not isinstance(confirm_together, bool):
        raise TypeError(f"confirm_together must be True or False, got {confirm_together!r}")
    if confirm_together and not confirm_seeds:
        raise ValueError("confirm_together needs confirm_seeds: the set is confirmed on those fresh seeds")
    if confirm_together and confirm_top is not None:
        raise ValueError("confirm_top does not apply with confirm_together: the round's top k are confirmed as one set")
    check_search(list(prompts), list(seeds), k, rounds, len(heads))
    if min_z is not None:
        if isinstance(min_z, bool) or not isinstance(min_z, (int, float)) or not math.isfinite(min_z) or min_z < 0:
            raise ValueError(f"min_z must be a number >= 0 (standard errors) or None, got {min_z!r}")
        if len(prompts) * len(seeds) < 2:
            raise ValueError("min_z needs at least 2 (prompt, seed) pairs to estimate a standard error")
        min_z = float(min_z)
    confirm_seeds = list(confirm_seeds or ())
    if confirm_seeds:
        if min_z is None:
            raise ValueError("confirm_seeds needs min_z: the confirmation pairs decide by the same z test")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in confirm_seeds):
            raise ValueError(f"confirm_seeds must be integers, got {confirm_seeds!r}")
        if set(confirm_seeds) & set(seeds):
            raise ValueError(f"confirm_seeds must be fresh: {sorted(set(confirm_seeds) & set(seeds))} also in seeds")
        if len(prompts) * len(confirm_seeds) < 2:
            raise ValueError("confirm_seeds needs at least 2 (prompt, confirmation seed) pairs")
        if confirm_top is None:  # confirm_together confirms exactly the round's top k, as one set
            confirm_top = k if confirm_together else 3 * k
        if isinstance(confirm_top, bool) or not isinstance(confirm_top, int) or confirm_top < k:
            raise ValueError(f"confirm_top must be an integer >= k ({k}), got {confirm_top!r}")
    elif confirm_top is not None:
        raise ValueError("confirm_top is only used with confirm_seeds")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    HeadGuidance(heads=[heads[0]], scale=scale, u=u, target=target, scope=scope)  # validates the guidance settings
    race = strategy_settings(strategy, race_start, race_z, race_eta, screen_top, u0, screen_pairs,
                             len(prompts) * len(seeds), len(heads), max(k, confirm_top or 0))
    return SearchSettings(
        objective=objective if isinstance(objective, str) else getattr(objective, "__name__", "callable"),
        prompts=tuple(prompts), seeds=tuple(seeds), k=k, rounds=rounds, u=float(u), scale=float(scale),
        num_inference_steps=num_inference_steps, guidance_scale=None if guidance_scale is None else float(guidance_scale),
        height=height, width=width, candidates=tuple(head_name(h) for h in heads), target=target,
        scope=scope, batch_size=batch_size, max_sequence_length=max_sequence_length, min_z=min_z,
        confirm_seeds=tuple(confirm_seeds), confirm_top=confirm_top or 0,
        confirm_together=confirm_together, strategy=strategy, **race,
    )


def strategy_settings(strategy: str, race_start, race_z, race_eta, screen_top, u0, screen_pairs, n_pairs: int,
                      n_heads: int, keep: int) -> dict:
    """The race and screening settings of a strategy (zeros for those it does not use), validated."""
    from .race import check_race  # builds on this module

    if strategy == "exhaustive":
        if race_start is not None or screen_top is not None or screen_pairs is not None:
            raise ValueError("race_start, screen_top and screen_pairs are only used with strategy 'race' or "
                             "'screen+race'")
        return {}
    if n_pairs < 2:
        raise ValueError(f"strategy {strategy!r} needs at least 2 (prompt, seed) pairs to compare candidates, "
                         f"got {n_pairs}")
    race_start = 2 if race_start is None else race_start
    check_race(race_start, race_z, race_eta, n_pairs)
    settings = {"race_start": race_start, "race_z": float(race_z), "race_eta": float(race_eta)}
    if strategy == "race":
        if screen_top is not None or screen_pairs is not None:
            raise ValueError("screen_top and screen_pairs are only used with strategy 'screen+race'")
        return settings
    if screen_top is None:
        screen_top = min(n_heads, max(4 * keep, math.ceil(n_heads / 4)))
    if isinstance(screen_top, bool) or not isinstance(screen_top, int) or not keep <= screen_top <= n_heads:
        raise ValueError(f"screen_top must be a whole number of candidates in [{keep}, {n_heads}] "
                         f"(at least k and confirm_top), got {screen_top!r}")
    if isinstance(u0, bool) or not isinstance(u0, (int, float)) or not 0 <= u0 <= 1:
        raise ValueError(f"u0 must be a number in [0, 1], got {u0!r}")
    if screen_pairs is not None and (isinstance(screen_pairs, bool) or not isinstance(screen_pairs, int)
                                     or not 1 <= screen_pairs <= n_pairs):
        raise ValueError(f"screen_pairs must be a whole number of pairs in [1, {n_pairs}] or None (all), "
                         f"got {screen_pairs!r}")
    return {**settings, "screen_top": screen_top, "u0": float(u0), "screen_pairs": screen_pairs or 0}


def hunt(pipe, objective, prompts, seeds, k: int = 3, rounds: int = 5, u: float = 1.0, scale: float = 3.0,
         num_inference_steps: int = 20, guidance_scale: float | None = None, height: int | None = None,
         width: int | None = None, candidates=None, checkpoint: str | None = None, batch_size: int = 4,
         target: str = "identity", scope: str = "joint", max_sequence_length: int | None = None,
         min_z: float | None = None, confirm_seeds=None, confirm_top: int | None = None, confirm_together: bool = False,
         strategy: str = "exhaustive", race_start: int | None = None, race_z: float = 2.0, race_eta: float = 2.0,
         screen_top: int | None = None, u0: float = 0.0, screen_pairs: int | None = None,
         progress: bool = True) -> HuntResult:
    """Select k heads per round for `rounds` rounds (HeadHunter, Algorithm 1).

    objective: a registry name (see `dit_attn.guidance.objectives`) or callable(images, prompts) -> scores.
    num_inference_steps, guidance_scale, height, width: the pipeline call's (None: the pipeline's default).
    candidates: head specs to search over (default: every head).
    checkpoint: JSON path written after every batch; an existing one with the same settings is resumed.
    max_sequence_length: None takes the pipeline's call default (the tiny model's one zero T5 token).
    min_z: only heads whose paired gain over the current selection exceeds min_z standard errors
        may join (fewer than k if fewer qualify); the hunt stops at a round where none does.
    confirm_seeds: fresh seeds (with min_z); each round's confirm_top (default 3k) candidates by z
        are scored again on (prompts × confirm_seeds), and only those scores decide who joins.
    confirm_together: confirm the round's top k candidates by z as one set (scored once, with
        the selection, on the confirmation pairs): all k join if the set passes the z test, else
        none and the hunt stops. For heads whose effects are too small to confirm one by one.
    strategy: "exhaustive" scores every candidate on every pair; "race" races them over the pairs
        (`dit_attn.guidance.race`: race_start pairs first, drop at race_z standard errors below the
        leader, keep at most 1/race_eta per stage); "screen+race" first ranks every candidate by the
        gradient of the objective (`dit_attn.guidance.screening`, taken at strength u0) and races the
        screen_top best (default: a quarter of the candidates, at least 4·max(k, confirm_top)); the
        screening runs on the first screen_pairs pairs of the race's order (default: all).
    """
    check_image_pipeline(pipe, "hunt")
    score_fn = get_objective(objective)
    if strategy == "screen+race":
        gradient_of = differentiable_objective(score_fn, objective if isinstance(objective, str) else
                                               getattr(objective, "__name__", "callable"))
    heads = candidate_heads(pipe, candidates)
    check_image_size(pipe, height, width)  # the model's sides; search_settings checks the rest before any call
    settings = search_settings(objective, prompts, seeds, k, rounds, u, scale, num_inference_steps, guidance_scale, height,
                               width, heads, target, scope, batch_size, sequence_length(pipe, max_sequence_length), min_z,
                               confirm_seeds, confirm_top, confirm_together, strategy, race_start, race_z, race_eta,
                               screen_top, u0, screen_pairs)
    rank, world = distributed()
    path = checkpoint if checkpoint is None or world == 1 else f"{checkpoint}.rank{rank}-of-{world}"
    state = resume(path, settings)
    by_name = {head_name(h): h for h in heads}
    order = [head_name(h) for h in heads]
    exhaustive = settings.strategy == "exhaustive"
    total = sum(len(heads) - r * k for r in range(rounds)) if exhaustive else None
    bar = tqdm(total=total, desc="hunt", unit="head" if exhaustive else "image", disable=not progress or rank != 0)
    for round_index in range(rounds):
        if state["stopped"]:
            break
        if round_index == len(state["rounds"]):
            for key in ROUND_STATE:
                state[key].append({})
        scores, pair_scores = state["rounds"][round_index], state["pairs"][round_index]
        selected = [by_name[name] for name in state["selected"]]
        remaining = [h for h in heads if h not in selected]
        bar.set_description(f"hunt round {round_index + 1}/{rounds}")
        if min_z is not None and rank == 0 and BASELINE not in pair_scores:
            pairs = None if exhaustive else race_pairs(settings)  # None: the search's own pairs
            pair_scores[BASELINE] = score_pairs(pipe, score_fn, settings, [set(selected)], pairs)[0][0]
            save_state(path, settings, state)
        if exhaustive:
            finished = exhaustive_round(pipe, score_fn, settings, state, round_index, selected, remaining,
                                        (rank, world), path, bar)
        else:
            finished = raced_round(pipe, score_fn, gradient_of if settings.strategy == "screen+race" else None,
                                   settings, state, round_index, selected, remaining, (rank, world), path, bar)
        if state["done"] == round_index:
            scores.update(gather_scores(scores, world))
            pair_scores.update(gather_scores(pair_scores, world))
            candidates_scores = {n: v for n, v in pair_scores.items() if n == BASELINE or n in finished}
            if settings.confirm_seeds:
                shortlist = shortlisted(candidates_scores, order, settings.confirm_top)
                if settings.confirm_together and shortlist:  # the top k, confirmed as one set
                    shortlist = [GROUP.join(shortlist)]
                picks = []
                if shortlist:
                    confirmed = confirm(pipe, score_fn, settings, state, round_index, selected, shortlist, by_name,
                                        (rank, world), path)
                    chosen = choose({n: mean(confirmed[n]) for n in shortlist}, confirmed, shortlist, k, min_z)
                    picks = [head for name in chosen for head in name.split(GROUP)]
            else:
                picks = choose({n: scores[n] for n in finished}, candidates_scores, [n for n in order if n in finished],
                               k, min_z)
            state["selected"].extend(picks)
            state["done"] += 1
            state["stopped"] = min_z is not None and not picks
            save_state(path, settings, state)
    bar.close()
    result = hunt_result(settings, state)
    if checkpoint is not None and world > 1 and rank == 0:
        result.save(checkpoint)
    return result


ROUND_STATE = ("rounds", "pairs", "confirm", "race", "screen")  # the checkpoint's per-round entries


def exhaustive_round(pipe, score_fn, settings: SearchSettings, state: dict, round_index: int, selected: list[Head],
                     remaining: list[Head], process: tuple[int, int], path: str | None, bar) -> list[str]:
    """Score every remaining candidate on every pair (checkpointed per batch); returns their names."""
    rank, world = process
    scores, pair_scores = state["rounds"][round_index], state["pairs"][round_index]
    batches = [remaining[i : i + settings.batch_size] for i in range(0, len(remaining), settings.batch_size)]
    for index, batch in enumerate(batches):
        if index % world != rank or all(head_name(h) in scores for h in batch):
            bar.update(len(batch))  # another process's, or scored before a restart
            continue
        per_pair, _ = score_pairs(pipe, score_fn, settings, [set(selected) | {cand} for cand in batch])
        scores.update({head_name(cand): mean(values) for cand, values in zip(batch, per_pair)})
        if settings.min_z is not None:
            pair_scores.update({head_name(cand): values for cand, values in zip(batch, per_pair)})
        save_state(path, settings, state)
        bar.update(len(batch))
    return [head_name(h) for h in remaining]


def raced_round(pipe, score_fn, gradient_of, settings: SearchSettings, state: dict, round_index: int,
                selected: list[Head], remaining: list[Head], process: tuple[int, int], path: str | None,
                bar) -> list[str]:
    """Race the remaining candidates (with gradient_of: the screen_top best by screening); fills the round's
    scores (each candidate's mean over the pairs it got) and per-pair scores; returns the finalists."""
    from .race import race_round  # builds on this module

    racing = remaining
    if gradient_of is not None:
        screened = screening_scores(pipe, gradient_of, settings, state, round_index, selected, remaining, process, path)
        names = [head_name(h) for h in remaining]
        best = set(sorted(names, key=lambda n: (-screened[n], names.index(n)))[: settings.screen_top])
        racing = [h for h in remaining if head_name(h) in best]

    def progress(generations: int, alive: int) -> None:
        bar.update(generations)
        bar.set_postfix(survivors=alive)

    finalists, raced = race_round(pipe, score_fn, settings, state["race"][round_index], selected, racing, process,
                                  lambda: save_state(path, settings, state), progress)
    state["rounds"][round_index].update({n: mean(v) for n, v in raced.items()})
    state["pairs"][round_index].update(raced)
    return finalists


def screening_scores(pipe, gradient_of, settings: SearchSettings, state: dict, round_index: int, selected: list[Head],
                     remaining: list[Head], process: tuple[int, int], path: str | None) -> dict[str, float]:
    """The round's screening scores (u − u₀)·∂J/∂u_h, computed once (by the first process) and checkpointed."""
    from .screening import screen  # builds on this module

    screened = state["screen"][round_index]
    if not screened:
        rank, world = process
        if rank == 0:
            pairs = race_pairs(settings)[: settings.screen_pairs or None]
            gradients, _ = screen(pipe, gradient_of, settings, remaining, selected, pairs, settings.u0)
            screened.update({head_name(h): float(g) * (settings.u - settings.u0) for h, g in zip(remaining, gradients)})
        screened.update(gather_scores(screened, world))
        save_state(path, settings, state)
    return screened


def hunt_result(settings: SearchSettings, state: dict) -> HuntResult:
    done = state["done"]
    result = HuntResult(state["selected"], state["rounds"][:done], asdict(settings))
    n_pairs = len(settings.prompts) * len(settings.seeds)
    for round_index in range(done):
        if settings.strategy == "exhaustive":
            spent = {name: n_pairs for name in state["rounds"][round_index]}
        else:
            spent = {name: len(values) for name, values in state["pairs"][round_index].items() if name != BASELINE}
        result.spent.append(spent)
        if settings.strategy == "screen+race":
            result.screening.append(state["screen"][round_index])
            result.backward_passes.append(math.ceil((settings.screen_pairs or n_pairs) / settings.batch_size))
    if settings.min_z is not None:
        for pair_scores in state["pairs"][:done]:
            base = pair_scores[BASELINE]
            result.baselines.append(mean(base))
            result.gains.append({n: paired_gain(v, base) for n, v in pair_scores.items()
                                 if n != BASELINE and len(v) == len(base)})
        for confirmed in state["confirm"][:done] if settings.confirm_seeds else ():
            base = confirmed.get(BASELINE)  # none when no candidate had a positive gain
            result.confirmations.append({n: paired_gain(v, base) for n, v in confirmed.items() if n != BASELINE})
    return result


BASELINE = "(selected)"  # the current selection alone, scored each round when min_z is set
GROUP = "+"  # joins the names of heads confirmed together: "L2H4+L1H1"


def choose(scores: dict[str, float], pair_scores: dict[str, list[float]], order: list[str], k: int,
           min_z: float | None) -> list[str]:
    """The round's picks: the top k, or with min_z the top k of those significantly above the baseline."""
    if min_z is not None:
        base = pair_scores[BASELINE]
        scores = {n: s for n, s in scores.items() if significant(paired_gain(pair_scores[n], base), min_z)}
    return top_k(scores, [n for n in order if n in scores], k)


def shortlisted(pair_scores: dict[str, list[float]], order: list[str], top: int) -> list[str]:
    """The `top` candidates with a positive paired gain, by z (ties: earlier in `order`)."""
    base = pair_scores[BASELINE]
    z = {n: z_score(paired_gain(pair_scores[n], base)) for n in order if n in pair_scores}
    positive = [n for n in order if n in z and z[n] > 0]
    return sorted(positive, key=lambda n: -z[n])[:top]


def confirm(pipe, score_fn, settings: SearchSettings, state: dict, round_index: int, selected: list[Head],
            shortlist: list[str], by_name: dict[str, Head], process: tuple[int, int], path: str | None):
    """Per-pair scores of the selection alone and of each shortlisted candidate (a head, or
    heads joined by GROUP) on the confirmation pairs (prompts × confirm_seeds); checkpointed
    after every batch."""
    rank, world = process
    pairs = pairs_of(settings, settings.confirm_seeds)
    confirmed = state["confirm"][round_index]
    batches = [[BASELINE]] + [shortlist[i : i + settings.batch_size] for i in range(0, len(shortlist), settings.batch_size)]
    for index, batch in enumerate(batches):
        if index % world != rank or all(name in confirmed for name in batch):
            continue
        head_sets = [set(selected) | ({by_name[head] for head in name.split(GROUP)} if name != BASELINE else set())
                     for name in batch]
        per_pair, _ = score_pairs(pipe, score_fn, settings, head_sets, pairs)
        confirmed.update(dict(zip(batch, per_pair)))
        save_state(path, settings, state)
    confirmed.update(gather_scores(confirmed, world))
    return confirmed


# settings stored under older names: steps, cfg, size ([height, width] or null)
RENAMED = {"steps": "num_inference_steps", "cfg": "guidance_scale"}


def renamed_settings(saved: dict) -> dict:
    """Stored settings with the older names (steps, cfg, size) under today's (num_inference_steps,
    guidance_scale, height and width); settings already under today's names are kept."""
    settings = {name: value for name, value in saved.items() if name != "size" and name not in RENAMED}
    for old, new in RENAMED.items():
        if old in saved:
            settings.setdefault(new, saved[old])
    if "size" in saved:
        height, width = saved["size"] if saved["size"] else (None, None)
        settings.setdefault("height", height)
        settings.setdefault("width", width)
    return settings


def check_checkpoint_settings(path: str, saved: dict, settings: SearchSettings, how: str) -> None:
    """Stop (ValueError naming each differing setting, stored → now) unless the checkpoint's stored
    settings are these. Older names are read as today's (`renamed_settings`), and settings added in
    later versions take their defaults, so older checkpoints still resume."""
    defaults = {f.name: f.default for f in fields(SearchSettings) if f.default is not MISSING}
    old = {**as_stored(defaults), **renamed_settings(saved)}
    new = as_stored(asdict(settings))
    missing = object()
    show = lambda value: "(unset)" if value is missing else json.dumps(value)  # noqa: E731
    changed = [f"{name} {show(old.get(name, missing))} → {show(new.get(name, missing))}"
               for name in [*new, *(n for n in old if n not in new)] if old.get(name, missing) != new.get(name, missing)]
    if changed:
        raise ValueError(f"the checkpoint {path!r} was made with other settings: {', '.join(changed)}; {how}")


def resume(path: str | None, settings: SearchSettings) -> dict:
    fresh = {"selected": [], "rounds": [], "pairs": [], "confirm": [], "race": [], "screen": [], "done": 0,
             "stopped": False}
    if path is None or not os.path.exists(path):
        return fresh
    with open(path) as f:
        saved = json.load(f)
    check_checkpoint_settings(path, saved.get("settings", {}), settings, "use another checkpoint path")
    state = {key: saved.get(key, value) for key, value in fresh.items()}
    for key in ROUND_STATE[1:]:  # per-round entries added in later versions: older checkpoints lack them
        state[key] += [{} for _ in range(len(state["rounds"]) - len(state[key]))]
    return state


def save_state(path: str | None, settings: SearchSettings, state: dict) -> None:
    if path is not None:
        write_json_atomic(path, {"settings": asdict(settings), **state})
