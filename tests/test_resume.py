"""The one resume rule of the trainers (train-tiny, train-lora in every mode, distill-clear): a
checkpoint records its run's settings and data fingerprint; resuming with other settings or data
stops with a message naming the difference; restart=True starts over; the LoRA's initial weights
come from the seed, so identical runs, and killed-and-resumed ones, give identical weights."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit_attn.toy.configs import build_sd3_pipeline
from dit_attn.train import distill_clear
from dit_attn.train import tiny as train_tiny
from dit_attn.train.common import seeded
from dit_attn.train.distill_clear import DistillConfig, distill
from dit_attn.train.lora import LoraTrainConfig, train_lora, write_sign_data
from dit_attn.train.resume import RUN_KEY, check_resumable, fingerprint, model_fingerprint, run_record

from .test_distill_clear import PROMPTS, SMALL
from .test_distill_clear import pipe as distill_pipe  # noqa: F401  (a fixture)

AGAIN = "use --restart \\(restart=True\\) to start over, or a new --work directory"


# ---------------------------------------------------------------------------- the rule itself


def test_check_names_each_changed_setting_and_the_data():
    checkpoint = {RUN_KEY: run_record({"rank": 4, "lr": 1e-3, "layers": (1, 2), "checkpoint_every": 5}, "aa")}
    check_resumable(checkpoint, {"rank": 4, "lr": 1e-3, "layers": [1, 2], "checkpoint_every": 9}, "aa")  # when to save: free
    with pytest.raises(ValueError, match=r"cannot resume from w/state.pt: its run had other settings: "
                                         r"layers \[1, 2\] → \[3\], rank 4 → 8; " + AGAIN) as err:
        check_resumable(checkpoint, {"rank": 8, "lr": 1e-3, "layers": (3,), "checkpoint_every": 5}, "aa", where="w/state.pt")
    assert "data differ" not in str(err.value)
    with pytest.raises(ValueError, match=r"the data differ .*; " + AGAIN) as err:
        check_resumable(checkpoint, {"rank": 4, "lr": 1e-3, "layers": (1, 2), "checkpoint_every": 5}, "bb")
    assert "other settings" not in str(err.value)
    with pytest.raises(ValueError, match=r"other settings: lr 0.001 → \(unset\), seed \(unset\) → 0; and the data differ"):
        check_resumable(checkpoint, {"rank": 4, "layers": (1, 2), "checkpoint_every": 5, "seed": 0}, "bb")
    with pytest.raises(ValueError, match=r"without the settings and data fingerprint of its run \(an older dit-attn\).*" + AGAIN):
        check_resumable({"config": {"rank": 4}, "step": 3}, {"rank": 4}, "aa")


def test_fingerprints_tell_data_apart():
    image = Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))
    other = Image.fromarray(np.ones((4, 4, 3), dtype=np.uint8))
    assert fingerprint([image, "a"]) == fingerprint([image.copy(), "a"]) != fingerprint([other, "a"])
    assert fingerprint(torch.zeros(2, 3)) != fingerprint(torch.zeros(3, 2)) != fingerprint(torch.zeros(3, 2, dtype=torch.int32))
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"]) != fingerprint("abc")
    a, b = build_sd3_pipeline(num_layers=1, num_heads=2, head_dim=8), build_sd3_pipeline(num_layers=1, num_heads=2, head_dim=8)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.transformer.transformer_blocks[0].attn.to_q.weight[0, 0] += 1
    assert model_fingerprint(a) != model_fingerprint(b)


def test_seeded_draws_from_the_seed_and_restores_the_generator():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with seeded(7):
        first = torch.randn(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.randn(10)
    with seeded(7):
        assert torch.equal(torch.randn(3), first)


# ---------------------------------------------------------------------------- train-tiny

TINY = dict(images=12, vae_steps=2, vae_batch=2, steps=4, batch=2, checkpoint_every=2, threads=1, compile=False,
            bf16=False, layers=2)


def test_train_tiny_stops_on_other_settings_or_data_and_restarts(tmp_path):
    cfg = train_tiny.TrainConfig(**TINY)
    work, out = str(tmp_path / "w"), str(tmp_path / "o")
    train_tiny.train_tiny(cfg, work, out)
    # when checkpoints are written may change: a finished run resumes to the same result
    train_tiny.train_tiny(train_tiny.TrainConfig(**{**TINY, "checkpoint_every": 1}), work, out)

    other = train_tiny.TrainConfig(**{**TINY, "lr": 1e-3, "sign_fraction": 0.5})
    with pytest.raises(ValueError, match=r"data.pt: its run had other settings: lr 0.0005 → 0.001, "
                                         r"sign_fraction 0.2 → 0.5; " + AGAIN):
        train_tiny.train_tiny(other, work, out)

    # the same settings, other data (as another renderer would draw them): the checkpoints refuse it
    cached = torch.load(tmp_path / "w" / "data.pt")
    cached["images"][0] = 255 - cached["images"][0]
    cached[RUN_KEY] = run_record(cached[RUN_KEY]["settings"], fingerprint(cached["images"], cached["captions"]))
    torch.save(cached, tmp_path / "w" / "data.pt")
    with pytest.raises(ValueError, match=r"vae_ckpt.pt: the data differ .*" + AGAIN):
        train_tiny.train_tiny(cfg, work, out)

    # a checkpoint from before the records: refused, not guessed at
    train_tiny.train_tiny(cfg, work, out, restart=True)
    state = torch.load(tmp_path / "w" / "transformer_ckpt.pt")
    del state[RUN_KEY]
    torch.save(state, tmp_path / "w" / "transformer_ckpt.pt")
    with pytest.raises(ValueError, match=r"transformer_ckpt.pt: it was written without the settings"):
        train_tiny.train_tiny(cfg, work, out)

    train_tiny.train_tiny(other, work, out, restart=True)
    manifest = json.loads((tmp_path / "o" / "dit_attn_training.json").read_text())
    assert manifest["config"]["lr"] == 1e-3 and manifest["data_fingerprint"] == torch.load(tmp_path / "w" / "data.pt")[RUN_KEY]["fingerprint"]
    assert torch.load(tmp_path / "w" / "transformer_ckpt.pt")["step"] == TINY["steps"]


# ---------------------------------------------------------------------------- train-lora


def build():
    pipe = build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def pipe():
    return build()


@pytest.fixture()
def signs(tmp_path):
    directory = tmp_path / "data"
    write_sign_data(str(directory), 4)
    for path in directory.glob("*.png"):  # the test pipelines draw 32×32 images
        Image.open(path).resize((32, 32)).save(path)
    return directory


LORA = dict(layers=(1,), targets=("to_q", "add_k_proj"), rank=2, steps=4, batch=2, lr=1e-2, warmup=1,
            max_sequence_length=8, checkpoint_every=2)


def lora_weights(out) -> dict:
    return load_file(f"{out}/pytorch_lora_weights.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_lora_identical_runs_give_identical_weights(pipe, signs, tmp_path):
    cfg = LoraTrainConfig(**LORA)
    runs = []
    for i in range(2):
        torch.manual_seed(100 + i)  # another process: the global generator elsewhere
        runs.append(train_lora(pipe, cfg, str(signs), str(tmp_path / f"w{i}"), str(tmp_path / f"l{i}")))
    assert runs[0]["losses"] == runs[1]["losses"]
    assert same(lora_weights(tmp_path / "l0"), lora_weights(tmp_path / "l1"))
    third = train_lora(pipe, LoraTrainConfig(**{**LORA, "seed": 1}), str(signs), str(tmp_path / "w2"), str(tmp_path / "l2"))
    assert third["losses"] != runs[0]["losses"]  # the seed decides


@pytest.mark.parametrize("killed_in_step", [1, 3], ids=["before-the-first-checkpoint", "after-a-checkpoint"])
def test_train_lora_killed_and_resumed_equals_uninterrupted(pipe, signs, tmp_path, monkeypatch, killed_in_step):
    cfg = LoraTrainConfig(**LORA)
    torch.manual_seed(1)
    whole = train_lora(pipe, cfg, str(signs), str(tmp_path / "w1"), str(tmp_path / "l1"))
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == killed_in_step:
            raise KeyboardInterrupt("killed")
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", killed)
    torch.manual_seed(2)
    with pytest.raises(KeyboardInterrupt):
        train_lora(pipe, cfg, str(signs), str(tmp_path / "w2"), str(tmp_path / "l2"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert (tmp_path / "w2" / "state.pt").exists() == (killed_in_step > cfg.checkpoint_every)
    torch.manual_seed(3)
    resumed = train_lora(pipe, cfg, str(signs), str(tmp_path / "w2"), str(tmp_path / "l2"))
    assert resumed["losses"] == whole["losses"]
    assert same(lora_weights(tmp_path / "l1"), lora_weights(tmp_path / "l2"))


def test_train_lora_stops_on_other_settings_model_or_data_and_restarts(pipe, signs, tmp_path):
    cfg = LoraTrainConfig(**{**LORA, "steps": 2})
    work, out = str(tmp_path / "w"), str(tmp_path / "o")
    train_lora(pipe, cfg, str(signs), work, out)
    train_lora(pipe, LoraTrainConfig(**{**LORA, "steps": 2, "checkpoint_every": 1}), str(signs), work, out)  # free
    with pytest.raises(ValueError, match=r"state.pt: its run had other settings: rank 2 → 3; " + AGAIN):
        train_lora(pipe, LoraTrainConfig(**{**LORA, "steps": 2, "rank": 3}), str(signs), work, out)
    with pytest.raises(ValueError, match=r"other settings: mode \"localized\" → \"all\"; "):
        train_lora(pipe, LoraTrainConfig(**{**LORA, "steps": 2, "mode": "all"}), str(signs), work, out)
    other_model = build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8, seed=1)
    with pytest.raises(ValueError, match=r"other settings: model \"StableDiffusion3Pipeline, weights \w+\" → "):
        train_lora(other_model, cfg, str(signs), work, out)

    metadata = signs / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[0]["text"] += " again"
    metadata.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"state.pt: the data differ .*" + AGAIN):
        train_lora(pipe, cfg, str(signs), work, out)
    (tmp_path / "w" / "state.pt").unlink()  # killed before its first checkpoint: the encoded data refuse too
    with pytest.raises(ValueError, match=r"data.pt: the data differ"):
        train_lora(pipe, cfg, str(signs), work, out)

    summary = train_lora(pipe, cfg, str(signs), work, out, restart=True)
    assert len(summary["losses"]) == 2 and torch.load(tmp_path / "w" / "state.pt")["step"] == 2


def test_train_lora_ic_panels_stop_when_a_panel_changes(pipe, tmp_path):
    """ic mode composes panels + sets.json into canvases: their pixels are the data."""
    directory = tmp_path / "sets"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(directory / f"p{i}.png")
    spec = {"layout": "1x2", "sets": [{"panels": ["p0.png", "p1.png"], "captions": ["a", "b"]},
                                      {"panels": ["p2.png", "p3.png"], "captions": ["c", "d"]}]}
    (directory / "sets.json").write_text(json.dumps(spec))
    cfg = LoraTrainConfig(mode="ic", rank=2, steps=2, batch=2, max_sequence_length=8, checkpoint_every=1)
    work, out = str(tmp_path / "w"), str(tmp_path / "o")
    train_lora(pipe, cfg, str(directory), work, out)
    train_lora(pipe, cfg, str(directory), work, out)  # the same sets: resumes (here: already done)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(directory / "p3.png")
    with pytest.raises(ValueError, match=r"the data differ"):
        train_lora(pipe, cfg, str(directory), work, out)
    train_lora(pipe, cfg, str(directory), work, out, restart=True)


# ---------------------------------------------------------------------------- distill-clear

DISTILL = {**SMALL, "steps": 6}
small_pipe = distill_pipe  # the fixture of test_distill_clear, under this module's name


def test_distill_lora_identical_runs_give_identical_weights(small_pipe, tmp_path):
    cfg = DistillConfig(**DISTILL, lora_rank=2)
    for i in range(2):
        torch.manual_seed(100 + i)
        distill(small_pipe, cfg, str(tmp_path / f"w{i}"), str(tmp_path / f"{i}.safetensors"), PROMPTS)
    a, b = load_file(tmp_path / "0.safetensors"), load_file(tmp_path / "1.safetensors")
    assert any("lora_A" in k for k in a) and same(a, b)


@pytest.mark.parametrize("killed", ["before-the-first-checkpoint", "after-a-checkpoint"])
def test_distill_lora_killed_and_resumed_equals_uninterrupted(small_pipe, tmp_path, monkeypatch, killed):
    cfg = DistillConfig(**DISTILL, lora_rank=2, lora_alpha=4.0)
    torch.manual_seed(1)
    distill(small_pipe, cfg, str(tmp_path / "a"), str(tmp_path / "a.safetensors"), PROMPTS)
    real_save, real_step, steps = distill_clear.save_atomic, distill_clear.optimizer_step, []

    def save_then_kill(obj, path):
        real_save(obj, path)
        if path.endswith("state.pt"):
            raise KeyboardInterrupt("killed")

    def kill_in_step_2(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    if killed == "after-a-checkpoint":
        monkeypatch.setattr(distill_clear, "save_atomic", save_then_kill)
    else:
        monkeypatch.setattr(distill_clear, "optimizer_step", kill_in_step_2)
    torch.manual_seed(2)
    with pytest.raises(KeyboardInterrupt):
        distill(small_pipe, cfg, str(tmp_path / "b"), str(tmp_path / "b.safetensors"), PROMPTS)
    monkeypatch.undo()
    assert (tmp_path / "b" / "state.pt").exists() == (killed == "after-a-checkpoint")
    torch.manual_seed(3)
    distill(small_pipe, cfg, str(tmp_path / "b"), str(tmp_path / "b.safetensors"), PROMPTS)
    assert same(load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors"))


def test_distill_stops_on_other_settings_or_prompts_and_restarts(small_pipe, tmp_path):
    cfg = DistillConfig(**DISTILL)
    work, out = str(tmp_path / "w"), str(tmp_path / "clear.safetensors")
    distill(small_pipe, cfg, work, out, PROMPTS)
    distill(small_pipe, DistillConfig(**{**DISTILL, "checkpoint_every": 2}), work, out, PROMPTS)  # free
    with pytest.raises(ValueError, match=r"state.pt: its run had other settings: lora_rank null → 2, radius 1.5 → 2.0; " + AGAIN):
        distill(small_pipe, DistillConfig(**{**DISTILL, "radius": 2.0}, lora_rank=2), work, out, PROMPTS)
    with pytest.raises(ValueError, match=r"state.pt: the data differ .*" + AGAIN):
        distill(small_pipe, cfg, work, out, PROMPTS[::-1])
    with pytest.raises(ValueError, match=r"other settings: model "):
        distill(build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8, seed=4), cfg, work, out, PROMPTS)
    (tmp_path / "w" / "state.pt").unlink()  # the cached teacher samples refuse other prompts too
    with pytest.raises(ValueError, match=r"teacher.pt: the data differ"):
        distill(small_pipe, cfg, work, out, PROMPTS[::-1])
    summary = distill(small_pipe, DistillConfig(**{**DISTILL, "radius": 2.0}), work, out, PROMPTS[::-1], restart=True)
    assert len(summary["losses"]) == DISTILL["steps"]
    assert torch.load(tmp_path / "w" / "teacher.pt")["prompts"] == PROMPTS[::-1]


def test_cli_rerun_with_other_settings_stops_and_restart_starts_over(tmp_path, capsys):
    from dit_attn.cli import main

    args = ["distill-clear", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "c.safetensors"), "--samples", "2",
            "--sample-steps", "1", "--size", "32", "--steps", "2", "--batch", "1"]
    assert main(args + ["--radius", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--radius", "3"]) == 2
    err = capsys.readouterr().err
    assert "its run had other settings: radius 2.0 → 3.0" in err and "--restart" in err
    assert main(args + ["--radius", "3", "--restart"]) == 0


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint holding anything but tensors and plain data is refused, not executed (issue 25)."""
    import pickle

    from dit_attn.train.resume import load_checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    path = tmp_path / "state.pt"
    torch.save({"step": 1, "payload": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(str(path), {}, "")
