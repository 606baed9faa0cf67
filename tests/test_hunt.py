"""Head search: planted heads are found, batched scoring equals one pipeline call per
candidate, resume and two processes give the same result, bad input is refused."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import dit_attn as da
from dit_attn.guidance import search
from dit_attn.guidance.objectives import get_objective
from dit_attn.guidance.search import SearchSettings, hunt, score_batch
from dit_attn.toy.configs import build_sd3_pipeline

PLANTED = {(0, 3): 4.0, (1, 1): 2.0}  # (layer, head) -> gain of its output columns; every other head is silent
PLANTED_NAMES = {f"L{layer}H{head}" for layer, head in PLANTED}
PROMPTS = ["a red circle", "a blue square"]
RUN = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=8, guidance_scale=3.0)


def planted_pipeline():
    """Heads outside PLANTED write nothing to the output, so perturbing them cannot change an image."""
    pipe = build_sd3_pipeline(num_layers=2, num_heads=4, head_dim=8, seed=5)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for layer, block in enumerate(pipe.transformer.transformer_blocks):
            for proj in (block.attn.to_out[0], getattr(block.attn, "to_add_out", None)):
                if proj is None:
                    continue
                columns = proj.weight.view(proj.weight.shape[0], 4, 8)
                for head in range(4):
                    columns[:, head] *= PLANTED.get((layer, head), 0.0)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return planted_pipeline()


def stock_images(pipe, prompts, seed=0):
    return {p: np.asarray(pipe(p, generator=torch.Generator().manual_seed(seed), num_inference_steps=2, height=32, width=32,
                               max_sequence_length=8, guidance_scale=3.0).images[0], dtype=np.float64) for p in prompts}


def change_objective(reference):
    def change(images, prompts):
        return [float(np.abs(np.asarray(im, dtype=np.float64) - reference[p]).mean()) for im, p in zip(images, prompts)]
    return change


def test_planted_heads_are_found(pipe, tmp_path):
    objective = change_objective(stock_images(pipe, PROMPTS))
    result = hunt(pipe, objective, PROMPTS, [0], k=1, rounds=2, batch_size=3, checkpoint=str(tmp_path / "c.json"), **RUN)
    assert set(result.selected) == {"L0H3", "L1H1"}
    first = result.rounds[0]
    silent = [score for name, score in first.items() if name not in ("L0H3", "L1H1")]
    assert max(silent) < 0.01 < min(first["L0H3"], first["L1H1"])
    assert len(first) == 8 and len(result.rounds[1]) == 7


def test_min_z_keeps_noise_out_and_stops(pipe, tmp_path):
    """With min_z, a head joins only if it changes the objective on every pair (with two pairs,
    z > 1 means both paired gains are positive); silent heads never do, so the hunt stops at
    the first round without a qualifying head instead of adding one of them."""
    objective = change_objective(stock_images(pipe, PROMPTS))
    ckpt = str(tmp_path / "z.json")
    result = hunt(pipe, objective, PROMPTS, [0], k=1, rounds=4, batch_size=3, min_z=1.0, checkpoint=ckpt, **RUN)
    assert result.selected[0] == "L0H3" and set(result.selected) <= {"L0H3", "L1H1"}
    assert len(result.rounds) == len(result.baselines) == len(result.gains) == len(result.selected) + 1 < 4
    assert result.baselines[0] < 1e-6  # round 1's baseline is plain generation: the reference images
    last = result.gains[-1]
    assert all(abs(gain) < 1e-3 for gain, _ in last.values())  # only silent heads were left
    for name, (gain, se) in result.gains[0].items():
        assert (gain > 0.01) == (name in PLANTED_NAMES)
    again = hunt(pipe, objective, PROMPTS, [0], k=1, rounds=4, batch_size=3, min_z=1.0, checkpoint=ckpt, **RUN)
    assert (again.selected, again.rounds, again.gains) == (result.selected, result.rounds, result.gains)
    with pytest.raises(ValueError, match="min_z must be a number"):
        hunt(pipe, objective, PROMPTS, [0], k=1, rounds=1, min_z=-1, **RUN)
    with pytest.raises(ValueError, match="at least 2"):
        hunt(pipe, objective, PROMPTS[:1], [0], k=1, rounds=1, min_z=2.0, **RUN)


def recording(calls):
    """search.score_pairs that also records (pairs, head sets) of every call."""
    real_score_pairs = search.score_pairs

    def spy(pipe_, score_fn, settings, head_sets, pairs=None):
        calls.append((pairs, [sorted(h) for h in head_sets]))
        return real_score_pairs(pipe_, score_fn, settings, head_sets, pairs)
    return spy


def against_on_fresh_seeds(real_score_pairs):
    """search.score_pairs where every head set scores below the selection alone on the confirmation pairs."""
    def scores(pipe_, score_fn, settings, head_sets, pairs=None):
        per_pair, images = real_score_pairs(pipe_, score_fn, settings, head_sets, pairs)
        if pairs is not None:
            per_pair = [[-1.0] * len(values) if heads else values for heads, values in zip(head_sets, per_pair)]
        return per_pair, images
    return scores


def test_confirmation_seeds_decide_who_joins(pipe, tmp_path, monkeypatch):
    """With confirm_seeds, the round's best candidates by z are scored again, with the selection
    alone, on fresh seeds only, and those scores alone decide; the stage resumes after a crash."""
    objective = change_objective(stock_images(pipe, PROMPTS))
    calls = []
    real_score_pairs = search.score_pairs
    monkeypatch.setattr(search, "score_pairs", recording(calls))
    run = dict(k=1, rounds=3, batch_size=3, min_z=1.0, confirm_seeds=[7], confirm_top=2, **RUN)
    result = hunt(pipe, objective, PROMPTS, [0], **run)
    assert result.selected[0] == "L0H3" and set(result.selected) <= PLANTED_NAMES
    assert len(result.confirmations) == len(result.rounds) == len(result.selected) + 1
    first_confirm = [c for c in calls if c[0] is not None][:2]
    assert first_confirm[0] == ([(p, 7) for p in PROMPTS], [[]])  # the selection alone: plain generation
    assert sorted(map(tuple, first_confirm[1][1])) == [((0, 3),), ((1, 1),)]  # the two planted heads, shortlisted
    assert set(result.confirmations[0]) == PLANTED_NAMES

    monkeypatch.setattr(search, "score_pairs", against_on_fresh_seeds(real_score_pairs))
    fooled = hunt(pipe, objective, PROMPTS, [0], **run)
    assert fooled.selected == [] and len(fooled.rounds) == 1 and fooled.gains[0]["L0H3"][0] > 0.01

    crashes = {"left": 1}

    def crash_in_confirmation(pipe_, score_fn, settings, head_sets, pairs=None):
        if pairs is not None and head_sets[0] and crashes["left"]:
            crashes["left"] -= 1
            raise KeyboardInterrupt
        return real_score_pairs(pipe_, score_fn, settings, head_sets, pairs)

    monkeypatch.setattr(search, "score_pairs", crash_in_confirmation)
    ckpt = str(tmp_path / "confirm.json")
    with pytest.raises(KeyboardInterrupt):
        hunt(pipe, objective, PROMPTS, [0], checkpoint=ckpt, **run)
    resumed = hunt(pipe, objective, PROMPTS, [0], checkpoint=ckpt, **run)
    assert (resumed.selected, resumed.confirmations) == (result.selected, result.confirmations)
    with pytest.raises(ValueError, match="fresh"):
        hunt(pipe, objective, PROMPTS, [0], **{**run, "confirm_seeds": [0, 7]})
    with pytest.raises(ValueError, match="needs min_z"):
        hunt(pipe, objective, PROMPTS, [0], **{**run, "min_z": None})
    with pytest.raises(ValueError, match="confirm_top must be"):
        hunt(pipe, objective, PROMPTS, [0], **{**run, "confirm_top": 0})


def test_confirm_together_scores_the_top_k_as_one_set(pipe, tmp_path, monkeypatch):
    """With confirm_together the round's top k by z are generated together with the selection
    on the fresh seeds, once, and that set's paired gain alone decides: all join or none."""
    objective = change_objective(stock_images(pipe, PROMPTS))
    calls = []
    real_score_pairs = search.score_pairs
    monkeypatch.setattr(search, "score_pairs", recording(calls))
    run = dict(k=2, rounds=2, batch_size=3, min_z=1.0, confirm_seeds=[7], confirm_together=True, **RUN)
    result = hunt(pipe, objective, PROMPTS, [0], checkpoint=str(tmp_path / "t.json"), **run)
    assert set(result.selected) == PLANTED_NAMES
    confirming = [heads for pairs, heads in calls if pairs is not None]
    assert confirming[:2] == [[[]], [[(0, 3), (1, 1)]]]  # the selection alone, then both planted heads in one image
    assert list(result.confirmations[0]) == ["+".join(result.selected)]
    gain, se = result.confirmations[0]["+".join(result.selected)]
    assert gain > 0.01 and gain > se
    again = hunt(pipe, objective, PROMPTS, [0], checkpoint=str(tmp_path / "t.json"), **run)  # resumes the finished hunt
    assert (again.selected, again.confirmations) == (result.selected, result.confirmations)

    monkeypatch.setattr(search, "score_pairs", against_on_fresh_seeds(real_score_pairs))
    assert hunt(pipe, objective, PROMPTS, [0], **run).selected == []
    with pytest.raises(ValueError, match="needs confirm_seeds"):
        hunt(pipe, objective, PROMPTS, [0], **{**run, "confirm_seeds": None})
    with pytest.raises(ValueError, match="confirm_top does not apply"):
        hunt(pipe, objective, PROMPTS, [0], **{**run, "confirm_top": 2})
    with pytest.raises(TypeError, match="confirm_together must be"):
        hunt(pipe, objective, PROMPTS, [0], **{**run, "confirm_together": "yes"})


def test_checkpoint_from_before_a_setting_existed_resumes(pipe, tmp_path, monkeypatch):
    """A checkpoint written before `confirm_together` existed lacks that setting: it takes its
    default, so the hunt resumes (here: reads the finished hunt back, generating nothing)."""
    objective = change_objective(stock_images(pipe, PROMPTS))
    run = dict(k=1, rounds=1, batch_size=3, checkpoint=str(tmp_path / "c.json"), **RUN)
    result = hunt(pipe, objective, PROMPTS, [0], **run)
    saved = json.loads((tmp_path / "c.json").read_text())
    del saved["settings"]["confirm_together"]
    (tmp_path / "c.json").write_text(json.dumps(saved))
    calls = []
    monkeypatch.setattr(search, "score_pairs", recording(calls))
    assert hunt(pipe, objective, PROMPTS, [0], **run).selected == result.selected and not calls
    with pytest.raises(ValueError, match="other settings"):  # a default is not a wildcard
        hunt(pipe, objective, PROMPTS, [0], **{**run, "min_z": 1.0, "confirm_seeds": [7], "confirm_together": True})


def test_hunt_takes_the_pipelines_call_defaults(pipe, monkeypatch):
    """Without max_sequence_length, a hunt runs at the pipeline's call default (the tiny model's
    one zero T5 token), as every dit-attn command does, and records it in its settings."""
    seen = []
    monkeypatch.setattr(pipe, "dit_attn_call_defaults", {"max_sequence_length": 5}, raising=False)
    original = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **kw: seen.append(kw.get("max_sequence_length"))
                        or original(self, *a, **kw))
    run = {**RUN, "max_sequence_length": None}
    result = hunt(pipe, lambda images, prompts: [0.0] * len(images), PROMPTS[:1], [0], k=1, rounds=1,
                  candidates=["L0H0", "L0H1"], progress=False, **run)
    assert result.settings["max_sequence_length"] == 5 and set(seen) == {5}
    assert hunt(pipe, lambda images, prompts: [0.0] * len(images), PROMPTS[:1], [0], k=1, rounds=1,
                candidates=["L0H0"], progress=False, **RUN).settings["max_sequence_length"] == 8


def test_batched_scores_equal_one_pipeline_call_per_candidate(pipe):
    objective = get_objective("color:red")
    settings = SearchSettings("color:red", tuple(PROMPTS), (0, 1), k=1, rounds=1, u=0.8, scale=4.0, num_inference_steps=2,
                              guidance_scale=3.0, height=32, width=32, candidates=(), target="identity", scope="joint",
                              batch_size=3, max_sequence_length=8)
    selected, batch = [(1, 1)], [(0, 1), (0, 3), (1, 2)]
    batched = score_batch(pipe, objective, settings, selected, batch)
    for cand in batch:
        scores = []
        with da.apply(pipe, da.HeadGuidance(heads=[cand] + selected, scale=4.0, u=0.8)):
            for prompt in PROMPTS:
                for seed in (0, 1):
                    image = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=2, height=32,
                                 width=32, max_sequence_length=8, guidance_scale=3.0).images[0]
                    scores += objective([image], [prompt])
        assert abs(batched[f"L{cand[0]}H{cand[1]}"] - sum(scores) / len(scores)) < 2e-3


def killed_at(call_number: int, real, calls: dict):
    """`real`, counting its calls in calls["n"], raising KeyboardInterrupt (a kill) at the call_number-th."""
    def counted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == call_number:
            raise KeyboardInterrupt
        return real(*a, **kw)
    return counted


def test_resume_after_interruption(pipe, tmp_path, monkeypatch):
    objective = change_objective(stock_images(pipe, PROMPTS))
    args = dict(k=2, rounds=2, batch_size=2, **RUN)
    reference = hunt(pipe, objective, PROMPTS, [0], **args)
    calls = {"n": 0}
    monkeypatch.setattr(search, "score_pairs", killed_at(3, search.score_pairs, calls))
    with pytest.raises(KeyboardInterrupt):
        hunt(pipe, objective, PROMPTS, [0], checkpoint=str(tmp_path / "c.json"), **args)
    calls["n"] = 100
    resumed = hunt(pipe, objective, PROMPTS, [0], checkpoint=str(tmp_path / "c.json"), **args)
    assert resumed.selected == reference.selected and resumed.rounds == reference.rounds
    assert calls["n"] == 100 + 2 + 3  # round 1: 2 batches left of 4; round 2: 3 batches (6 candidates)
    with pytest.raises(ValueError, match="other settings: k 2 → 1; use another checkpoint path"):
        hunt(pipe, objective, PROMPTS, [0], checkpoint=str(tmp_path / "c.json"), **{**args, "k": 1})


# a checkpoint as versions before the diffusers names wrote it: steps, cfg, size = [height, width], and
# none of the settings added since (min_z, confirm_seeds, confirm_top, confirm_together)
OLD_SETTINGS = {"objective": "color:red", "prompts": PROMPTS, "seeds": [0], "k": 1, "rounds": 1, "u": 1.0, "scale": 3.0,
                "steps": 2, "cfg": 3.0, "size": [32, 32], "candidates": ["L0H3", "L1H1"], "target": "identity",
                "scope": "joint", "batch_size": 4, "max_sequence_length": 8}


def test_checkpoint_with_the_older_setting_names_resumes(pipe, tmp_path, monkeypatch):
    """steps, cfg and size of an older checkpoint are read as num_inference_steps, guidance_scale,
    height and width: with the same values it resumes (here the finished hunt, generating nothing);
    with another value it stops, naming the setting."""
    ckpt = tmp_path / "old.json"
    ckpt.write_text(json.dumps({"settings": OLD_SETTINGS, "selected": ["L1H1"], "rounds": [{"L0H3": 0.25, "L1H1": 0.5}],
                                "done": 1}))
    calls = []
    monkeypatch.setattr(search, "score_pairs", recording(calls))
    run = dict(k=1, rounds=1, candidates=["L0H3", "L1H1"], checkpoint=str(ckpt), progress=False, **RUN)
    result = hunt(pipe, "color:red", PROMPTS, [0], **run)
    assert result.selected == ["L1H1"] and result.rounds == [{"L0H3": 0.25, "L1H1": 0.5}] and not calls
    assert {k: result.settings[k] for k in ("num_inference_steps", "guidance_scale", "height", "width")} == \
        {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}
    assert not {"steps", "cfg", "size"} & set(result.settings)
    for change, named in [(dict(num_inference_steps=3), "num_inference_steps 2 → 3"),
                          (dict(guidance_scale=None), "guidance_scale 3.0 → null"),
                          (dict(height=64), "height 32 → 64"), (dict(width=16), "width 32 → 16")]:
        with pytest.raises(ValueError, match=f"other settings: {named}; use another checkpoint path"):
            hunt(pipe, "color:red", PROMPTS, [0], **{**run, **change})
    for old, named in [(dict(steps=20), "num_inference_steps 20 → 2"),
                       (dict(size=None), "height null → 32, width null → 32")]:
        ckpt.write_text(json.dumps({"settings": {**OLD_SETTINGS, **old}, "selected": [], "rounds": [], "done": 0}))
        with pytest.raises(ValueError, match=f"other settings: {named}; use another"):
            hunt(pipe, "color:red", PROMPTS, [0], **run)
    assert not calls
    saved = tmp_path / "hunt.json"  # a result saved by an older version reads back under today's names
    saved.write_text(json.dumps({"selected": ["L1H1"], "rounds": [{"L1H1": 0.5}], "settings": OLD_SETTINGS}))
    assert search.HuntResult.load(str(saved)).settings == {**{k: v for k, v in OLD_SETTINGS.items() if k not in
                                                              ("steps", "cfg", "size")},
                                                           "num_inference_steps": 2, "guidance_scale": 3.0, "height": 32,
                                                           "width": 32}


def test_atlas_checkpoint_with_the_older_setting_names_resumes(pipe, tmp_path):
    from PIL import Image

    from dit_attn.guidance.atlas import atlas, png_base64

    heads = [f"L{layer}H{head}" for layer in range(2) for head in range(4)]
    thumb = png_base64(Image.new("RGB", (32, 32)))
    settings = {**OLD_SETTINGS, "candidates": heads, "batch_size": 3, "min_z": None, "confirm_seeds": [], "confirm_top": 0,
                "confirm_together": False}
    state = {"baseline": 0.0, "scores": {h: 0.5 for h in heads}, "thumbnails": {h: thumb for h in ["baseline", *heads]}}
    ckpt = tmp_path / "atlas.json"
    ckpt.write_text(json.dumps({"settings": settings, "state": state}))
    result = atlas(pipe, "color:red", PROMPTS, [0], batch_size=3, checkpoint=str(ckpt), progress=False, **RUN)
    assert result.scores == state["scores"] and result.settings["num_inference_steps"] == 2  # all read back
    with pytest.raises(ValueError, match="other settings: guidance_scale 3.0 → 4.5; use another path"):
        atlas(pipe, "color:red", PROMPTS, [0], batch_size=3, checkpoint=str(ckpt), **{**RUN, "guidance_scale": 4.5})


def free_port() -> int:
    """A port no one listens on now (the OS picks it), instead of a fixed one another run may hold."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TWO_PROCESS_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_hunt import planted_pipeline, PROMPTS, RUN, CONFIRMED_TOGETHER
from dit_attn.guidance.search import hunt
pipe = planted_pipeline()
result = hunt(pipe, "color:green", PROMPTS, [0, 1], k=1, rounds=2, batch_size=2, checkpoint={ckpt!r}, progress=False, **RUN)
together = hunt(pipe, "color:green", PROMPTS, [0, 1], progress=False, **CONFIRMED_TOGETHER, **RUN)
print("RESULT", json.dumps([result.selected, result.rounds, together.selected, together.confirmations]))
"""
# the confirmation stage split across processes: the selection alone on one, the set on the other
CONFIRMED_TOGETHER = dict(k=2, rounds=1, batch_size=2, min_z=0.0, confirm_seeds=[5], confirm_together=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def two_processes(script: str, timeout: float = 400) -> list[str]:
    """Run `script` as ranks 0 and 1 of a gloo process group on this machine; their standard outputs."""
    procs, port = [], free_port()
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    return [out for out, _ in outputs]


def test_two_processes_equal_one(pipe, tmp_path):
    single = hunt(pipe, "color:green", PROMPTS, [0, 1], k=1, rounds=2, batch_size=2, **RUN)
    together = hunt(pipe, "color:green", PROMPTS, [0, 1], **CONFIRMED_TOGETHER, **RUN)
    assert len(together.confirmations[0]) == 1  # a set was confirmed (so the stage ran)
    for out in two_processes(TWO_PROCESS_SCRIPT.format(root=ROOT, ckpt=str(tmp_path / "h.json"))):
        selected, rounds, together_selected, confirmations = json.loads(out.split("RESULT", 1)[1])
        assert selected == single.selected and rounds == single.rounds
        assert together_selected == together.selected and confirmations == together.confirmations
    assert json.loads((tmp_path / "h.json").read_text())["selected"] == single.selected
    assert (tmp_path / "h.json.rank1-of-2").exists()


def test_bad_input(pipe):
    with pytest.raises(ValueError, match="unknown objective"):
        hunt(pipe, "beauty", PROMPTS, [0])
    with pytest.raises(ValueError, match="unknown palette colour"):
        hunt(pipe, "color:teal", PROMPTS, [0])
    with pytest.raises(ValueError, match=r"unknown objective 'judge:hard'; built in: judge, judge:soft"):
        get_objective("judge:hard")
    with pytest.raises(ValueError, match="prompts must be a non-empty"):
        hunt(pipe, "color:red", [], [0])
    with pytest.raises(ValueError, match="seeds"):
        hunt(pipe, "color:red", PROMPTS, [])
    with pytest.raises(ValueError, match="only 8 candidates"):
        hunt(pipe, "color:red", PROMPTS, [0], k=3, rounds=3)
    with pytest.raises(ValueError, match="only 2 candidates"):
        hunt(pipe, "color:red", PROMPTS, [0], k=3, rounds=1, candidates=["L0H1", "L1H2"])
    with pytest.raises(TypeError, match="objective must be"):
        hunt(pipe, 42, PROMPTS, [0])
    with pytest.raises(ValueError, match="needs its model weights"):
        get_objective("pickscore:/nonexistent/pickscore")


def test_cli_hunt(tmp_path, capsys):
    from dit_attn.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "hunt.json"
    assert main(["hunt", "--objective", "color:blue", "--prompts", str(prompts), "--k", "1", "--rounds", "1",
                 "--steps", "1", "--size", "32", "--candidates", "L0H0,L1", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["rounds"][0]) == {"L0H0"} | {f"L1H{h}" for h in range(6)}  # the tiny model has 6 heads a layer
    assert saved["selected"] == [max(saved["rounds"][0], key=saved["rounds"][0].get)]
    assert saved["settings"]["objective"] == "color:blue" and "selected" in capsys.readouterr().out
    assert (saved["settings"]["num_inference_steps"], saved["settings"]["height"]) == (1, 32)  # --steps: the older flag
    assert main(["hunt", "--objective", "color:blue", "--prompts", str(prompts), "--k", "1", "--rounds", "1",
                 "--steps", "1", "--size", "32", "--candidates", "L0H0,L0H1", "--min-z", "0", "--out", str(tmp_path / "z.json")]) == 0
    saved = json.loads((tmp_path / "z.json").read_text())
    assert saved["settings"]["min_z"] == 0.0 and len(saved["gains"]) == 1 and set(saved["gains"][0]) == {"L0H0", "L0H1"}
    assert main(["hunt", "--objective", "color:blue", "--prompts", str(prompts), "--k", "1", "--rounds", "1",
                 "--steps", "1", "--size", "32", "--candidates", "L0H0,L0H1", "--min-z", "0", "--confirm-seeds", "5",
                 "--confirm-top", "1", "--out", str(tmp_path / "c.json")]) == 0
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["settings"]["confirm_seeds"] == [5] and len(saved["confirmations"]) == 1
    # the shortlist, recomputed from the round's paired gains [mean, se]: heads with a positive gain,
    # by z = mean / se (ties: candidate order), the first --confirm-top of them
    gains = saved["gains"][0]
    positive = [name for name in ("L0H0", "L0H1") if gains[name][0] > 0]
    expected = sorted(positive, key=lambda name: -gains[name][0] / gains[name][1])[:1]
    assert len(positive) == 2 and len(expected) == 1  # both qualify: --confirm-top 1 is what keeps one out
    assert list(saved["confirmations"][0]) == expected
    mean, se = saved["confirmations"][0][expected[0]]  # the fresh seeds alone decide, by the same z test (min_z 0)
    assert saved["selected"] == (expected if mean > 0 else [])
    assert main(["hunt", "--objective", "nope", "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "unknown objective" in capsys.readouterr().err


def test_accelerate_launch_hunt_equals_one_process(tmp_path):
    """`accelerate launch --num_processes 2 -m dit_attn.cli hunt` (here with the confirmation stage
    split across the processes) selects and scores as one process does, and both exit cleanly."""
    from dit_attn.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    hunt_args = ["hunt", "--objective", "color:blue", "--prompts", str(prompts), "--seeds", "0", "1", "--k", "2",
                 "--rounds", "1", "--steps", "1", "--size", "32", "--candidates", "L0,L1H2", "--min-z", "0",
                 "--confirm-seeds", "5", "--confirm-together"]
    assert main([*hunt_args, "--out", str(tmp_path / "one.json")]) == 0
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
               "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "dit_attn.cli", *hunt_args, "--out", str(tmp_path / "two.json")]
    launched = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-2000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["selected"] == one["selected"] and two["rounds"] == one["rounds"]
    assert two["confirmations"] == one["confirmations"] and len(one["confirmations"][0]) == 1


def test_atlas_marks_the_planted_heads(pipe, tmp_path):
    from PIL import Image

    from dit_attn.guidance.atlas import atlas, render_html, render_png

    objective = change_objective(stock_images(pipe, PROMPTS))
    ckpt = str(tmp_path / "a.json")
    result = atlas(pipe, objective, PROMPTS, [0], batch_size=3, checkpoint=ckpt, **RUN)
    assert result.baseline < 1e-6  # unguided images are the reference images
    assert {h for h in result.scores if result.delta(h) > 0.01} == {"L0H3", "L1H1"}
    again = atlas(pipe, objective, PROMPTS, [0], batch_size=3, checkpoint=ckpt, **RUN)  # all resumed
    assert again.scores == result.scores
    render_png(result, str(tmp_path / "a.png"))
    render_html(result, str(tmp_path / "a.html"))
    picture = Image.open(tmp_path / "a.png")
    assert picture.width > 4 * 48 and picture.height > 2 * 48
    page = (tmp_path / "a.html").read_text()
    assert page.count("data:image/png;base64,") == 8 + 1 and "L0H3" in page  # every head + the baseline


def test_cli_atlas(tmp_path):
    from dit_attn.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["atlas", "--objective", "color:red", "--prompts", str(prompts), "--num-inference-steps", "1",
                 "--guidance-scale", "2.5", "--size", "64x32", "--out", str(tmp_path / "atlas")]) == 0
    assert all((tmp_path / f"atlas.{ext}").exists() for ext in ("png", "html", "json"))
    saved = json.loads((tmp_path / "atlas.json").read_text())
    assert len(saved["scores"]) == 36  # tiny: 6 layers x 6 heads
    assert {k: saved["settings"][k] for k in ("num_inference_steps", "guidance_scale", "height", "width")} == \
        {"num_inference_steps": 1, "guidance_scale": 2.5, "height": 32, "width": 64}  # --size is WIDTHxHEIGHT
