"""Racing the candidates of a hunt round: exact evaluations go where the ranking is uncertain.

A round's pairs are taken seed by seed (every prompt of the first seed, then of the next), so
each stage covers the prompts evenly. Stage j scores every surviving candidate on the pairs
up to race_start·2^j (the last stage: all pairs); after each stage, a candidate whose paired
difference to the leader (same prompt, same seed) is more than `race_z` standard errors
below zero is dropped, and with `race_eta` > 1 at most 1/race_eta of the survivors (by mean,
never fewer than `keep`) go on (successive halving). Survivors of the last stage have every
pair and are chosen from as in the exhaustive hunt.

Checkpointed per stage and candidate; several processes split each stage's batches and
exchange the stage's scores, so the survivors are the same in every process and the result
equals one process's.
"""
from __future__ import annotations

import math

from .search import Head, SearchSettings, gather_scores, head_name, mean, paired_gain, race_pairs, score_pairs


def stage_ends(n_pairs: int, start: int) -> list[int]:
    """Cumulative pair counts of the stages: start, 2·start, 4·start, ..., n_pairs."""
    ends, end = [], start
    while end < n_pairs:
        ends.append(end)
        end *= 2
    return ends + [n_pairs]


def check_race(race_start: int, race_z: float, race_eta: float, n_pairs: int) -> None:
    if isinstance(race_start, bool) or not isinstance(race_start, int) or not 2 <= race_start <= n_pairs:
        raise ValueError(f"race_start must be a whole number of pairs in [2, {n_pairs}] (the search has {n_pairs} "
                         f"(prompt, seed) pairs; a standard error needs 2), got {race_start!r}")
    if isinstance(race_z, bool) or not isinstance(race_z, (int, float)) or not math.isfinite(race_z) or race_z < 0:
        raise ValueError(f"race_z must be a number >= 0 (standard errors), got {race_z!r}")
    if isinstance(race_eta, bool) or not isinstance(race_eta, (int, float)) or not math.isfinite(race_eta) or race_eta < 1:
        raise ValueError(f"race_eta must be a number >= 1 (1: no halving), got {race_eta!r}")


def cumulative(stages: list[dict[str, list[float]]], name: str, upto: int) -> list[float]:
    return [score for stage in stages[: upto + 1] for score in stage[name]]


def survivors_after(stages: list[dict[str, list[float]]], stage: int, racing: list[str], keep: int, race_z: float,
                    race_eta: float) -> list[str]:
    """The candidates of `racing` that go on after `stage` (in candidate order)."""
    scores = {name: cumulative(stages, name, stage) for name in racing}
    means = {name: mean(values) for name, values in scores.items()}
    by_mean = sorted(racing, key=lambda name: (-means[name], racing.index(name)))
    leader = scores[by_mean[0]]
    kept = [name for name in by_mean
            if name == by_mean[0] or not below(paired_gain(scores[name], leader), race_z)]
    limit = max(keep, math.ceil(len(racing) / race_eta))
    kept = kept[:limit]
    if len(kept) < keep:  # never fewer than `keep`: the best of the dropped ones come back
        kept += [name for name in by_mean if name not in kept][: keep - len(kept)]
    chosen = set(kept)
    return [name for name in racing if name in chosen]


def below(gain: list[float], race_z: float) -> bool:
    m, se = gain
    return m < 0 and -m > race_z * se


def race_round(pipe, score_fn, settings: SearchSettings, race: dict, selected: list[Head], racing: list[Head],
               process: tuple[int, int], save, on_scored) -> tuple[list[str], dict[str, list[float]]]:
    """Run (or resume) one round's race. race: the round's checkpointed state, {"stages": [{name: scores}]}.

    Returns the survivors of the last stage and every raced candidate's scores (on the pairs it got, in
    race order). save(): checkpoint now; on_scored(generations, survivors): progress."""
    rank, world = process
    pairs = race_pairs(settings)
    ends = stage_ends(len(pairs), settings.race_start)
    stages = race.setdefault("stages", [])
    by_name = {head_name(h): h for h in racing}
    alive = list(by_name)
    keep = max(settings.k, settings.confirm_top)
    for index, end in enumerate(ends):
        if index == len(stages):
            stages.append({})
        stage = stages[index]
        begin = ends[index - 1] if index else 0
        batches = [alive[i : i + settings.batch_size] for i in range(0, len(alive), settings.batch_size)]
        for number, batch in enumerate(batches):
            if number % world != rank or all(name in stage for name in batch):
                continue
            per_pair, _ = score_pairs(pipe, score_fn, settings, [set(selected) | {by_name[n]} for n in batch],
                                      pairs[begin:end])
            stage.update(dict(zip(batch, per_pair)))
            save()
            on_scored(len(batch) * (end - begin), len(alive))
        stage.update(gather_scores(stage, world))
        if index < len(ends) - 1:
            alive = survivors_after(stages, index, alive, keep, settings.race_z, settings.race_eta)
    raced = {name: [s for st in stages for s in st.get(name, [])] for name in by_name}
    return alive, raced
