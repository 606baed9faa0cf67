"""Batch generation: prompt files, bad lines, shards, and resume after kill -9."""
import json
import os
import select
import signal
import socket
import subprocess
import sys

import pytest

from dit_attn.cli import main
from dit_attn.edits import HeadGuidance
from dit_attn.workflows.batch import Manifest, read_prompts, shard

FAST = ["--steps", "1", "--size", "32"]


def test_prompt_files_and_bad_lines(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n# comment\na blue square\n")
    items, bad = read_prompts(str(txt))
    assert [i.prompt for i in items] == ["a red circle", "a blue square"] and not bad
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 5, "u": 0.5}\n{oops\n{"prompt": ""}\n{"prompt": "b", "colour": 1}\n{"prompt": "c", "steps": "x"}\n'
                     '{"prompt": "d", "heads": ["L1H2", "L0"], "size": [64, 32]}\n{"prompt": "e", "seed": 1.5}\n{"prompt": "f", "steps": true}\n'
                     '{"prompt": "g", "num_inference_steps": 3, "guidance_scale": 2, "height": 32, "width": 64}\n'
                     '{"prompt": "h", "steps": 3, "cfg": 2, "size": "64x32"}\n{"prompt": "i", "steps": 3, "num_inference_steps": 3}\n'
                     '{"prompt": "j", "size": 32, "height": 32}\n')
    items, bad = read_prompts(str(jsonl))
    new_names = {"num_inference_steps": 3, "guidance_scale": 2.0, "height": 32, "width": 64}
    assert [(i.index, i.prompt, i.overrides) for i in items] == [
        (0, "a", {"seed": 5, "u": 0.5}), (1, "d", {"heads": "L1H2,L0", "height": 32, "width": 64}),
        (2, "g", new_names), (3, "h", new_names)]  # the older names steps, cfg and size read as the new ones
    assert [b.line for b in bad] == [2, 3, 4, 5, 7, 8, 11, 12]
    assert "unknown settings ['colour']" in bad[2].reason and "steps must be int" in bad[3].reason
    assert "give steps or num_inference_steps, not both" in bad[6].reason and "size or height/width" in bad[7].reason
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,seed,heads\n"a red circle, large",3,L1\nno seed,,\n')
    items, bad = read_prompts(str(csv_file))
    assert [(i.prompt, i.overrides) for i in items] == [("a red circle, large", {"seed": 3, "heads": "L1"}), ("no seed", {})]
    with pytest.raises(ValueError, match=r"\.txt, \.jsonl or \.csv"):
        read_prompts(str(tmp_path / "p.yaml"))


def test_shards_partition_items(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(7)))
    items, _ = read_prompts(str(prompts))
    parts = [shard(items, 3, k) for k in range(3)]
    assert sorted(i.index for part in parts for i in part) == list(range(7))
    with pytest.raises(ValueError, match=r"shard index must be in \[0, 2\]"):
        shard(items, 3, 3)
    with pytest.raises(ValueError, match=r"--num-shards must be >= 1"):
        shard(items, 0, 0)
    out = tmp_path / "out"
    for k in range(2):
        assert main(["generate", "--prompts", str(prompts), *FAST, "--num-shards", "2", "--shard-index", str(k), "--out", str(out)]) == 0
    assert sorted(Manifest(str(out)).finished()) == sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 7


def test_per_line_settings_and_failures(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "seed": 11, "heads": "L1", "u": 0.5}\n{"prompt": "b", "heads": "L9"}\n')
    assert main(["generate", "--prompts", str(prompts), *FAST, "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "1 done, 0 already finished (skipped), 1 failed" in captured.out
    assert "failed #1 'b': ValueError: layer 9" in captured.err
    record = json.loads((tmp_path / "o" / "manifest.jsonl").read_text())
    assert record["seed"] == 11 and record["edits"] == [HeadGuidance(heads=["L1"], scale=3.0, u=0.5).to_dict()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


KILL_POINT = "KILL-POINT"
# The batch run of the CLI with one change: the PNG after the k-th manifest line is written halfway,
# then the child says so on stdout and waits to be killed (a kill -9 mid-write, at a known point).
KILLED_CHILD = """
import sys, time
import dit_attn.workflows.batch as batch
from dit_attn.io import write_atomic
from dit_attn.cli import main

k = int(sys.argv[1])
real_write, writes = batch.write_png_atomic, []

def write_png_atomic(image, path, settings=None, tmp_prefix=".partial-"):
    writes.append(path)
    if len(writes) <= k:
        return real_write(image, path, settings, tmp_prefix)

    def half_then_wait(f):
        f.write(b"\\x89PNG\\r\\n\\x1a\\n half an image")
        f.flush()
        print("%s", len(writes) - 1, flush=True)
        time.sleep(3600)

    write_atomic(path, half_then_wait, tmp_prefix)

batch.write_png_atomic = write_png_atomic
sys.exit(main(["generate", *sys.argv[2:]]))
""" % KILL_POINT


def child_run(tmp_path, items: int):
    """(generate arguments, output folder, environment) of a child run over `items` prompts."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a red circle number {i}" for i in range(items)))
    out = tmp_path / "out"
    return ["--prompts", str(prompts), *FAST, "--out", str(out)], out, dict(os.environ, OMP_NUM_THREADS="1")


def test_resume_after_kill_9(tmp_path):
    args, out, env = child_run(tmp_path, 30)
    k = 3
    with open(tmp_path / "child.err", "w") as err:
        process = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(k), *args], env=env, stdout=subprocess.PIPE,
                                   stderr=err, text=True)
        try:
            ready, _, _ = select.select([process.stdout], [], [], 300)
            line = process.stdout.readline() if ready else ""
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert line.split() == [KILL_POINT, str(k)], (line, (tmp_path / "child.err").read_text()[-2000:])
    assert process.returncode == -signal.SIGKILL
    manifest = out / "manifest.jsonl"
    first = [json.loads(line)["file"] for line in manifest.read_text().splitlines()]
    assert len(first) == k  # killed while writing item k: items 0..k-1 finished, nothing after
    partial = [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert len(partial) == 1 and partial[0].startswith(".partial-0-of-1-")  # the half-written PNG of item k
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted(first)
    result = subprocess.run([sys.executable, "-m", "dit_attn.cli", "generate", *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{30 - k} done, {k} already finished (skipped), 0 failed" in result.stdout
    files = [json.loads(line)["file"] for line in manifest.read_text().splitlines()]
    assert files[:k] == first and len(files) == len(set(files)) == 30
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted(files)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # the partial file is gone


def test_batch_size_groups_prompts_with_the_same_settings(tmp_path):
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": f"a red circle {i}"} for i in range(4)] + [{"prompt": "guided", "heads": "L1"}, {"prompt": "last"}]
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    for size in (1, 3):
        assert main(["generate", "--prompts", str(prompts), *FAST, "--batch-size", str(size), "--out", str(tmp_path / f"b{size}")]) == 0
    names = sorted(f for f in os.listdir(tmp_path / "b1") if f.endswith(".png"))
    assert names == sorted(f for f in os.listdir(tmp_path / "b3") if f.endswith(".png")) and len(names) == 6
    for name in names:  # batching changes float rounding only
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=float) for d in ("b1", "b3"))
        assert np.abs(a - b).max() <= 2


def test_accelerate_launch_splits_work(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(5)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "dit_attn.cli", "generate", "--prompts", str(prompts), *FAST, "--out", str(out)]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    manifests = sorted(f for f in os.listdir(out) if f.startswith("manifest"))
    assert manifests == ["manifest-000-of-002.jsonl", "manifest-001-of-002.jsonl"]
    files = [json.loads(line)["file"] for m in manifests for line in (out / m).read_text().splitlines()]
    assert len(files) == len(set(files)) == 5


def pngs(out) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.endswith(".png"))


def png_settings(path) -> dict:
    from dit_attn.io import read_png_settings

    return read_png_settings(path)


def test_rerun_with_other_settings_regenerates_or_refuses(tmp_path, capsys):
    out = tmp_path / "out"
    run = ["generate", "a red circle", "a blue square", *FAST, "--out", str(out)]
    assert main(run) == 0
    first = {name: (out / name).read_bytes() for name in pngs(out)}
    capsys.readouterr()
    assert main([*run, "--seed", "5"]) == 0  # another seed: every image made again, not "already finished"
    captured = capsys.readouterr()
    assert "2 done (2 of them redone), 0 already finished (skipped), 0 failed" in captured.out
    assert "redone #0 'a red circle': made with other settings (seed: 0 recorded, 5 asked)" in captured.err
    assert [png_settings(out / name)["seed"] for name in pngs(out)] == [5, 6]
    assert all((out / name).read_bytes() != data for name, data in first.items())
    assert main([*run, "--seed", "5"]) == 0
    assert "0 done, 2 already finished (skipped)" in capsys.readouterr().out
    before = {name: (out / name).read_bytes() for name in pngs(out)}
    lines = (out / "manifest.jsonl").read_text()
    assert main([*run, "--seed", "5", "--heads", "L1", "--no-overwrite"]) == 2  # refused, naming the item and the setting
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not overwriting item #0 'a red circle'" in err and "edits: [] recorded" in err
    assert "1 more items differ too" in err and "--no-overwrite" in err
    assert {name: (out / name).read_bytes() for name in pngs(out)} == before and (out / "manifest.jsonl").read_text() == lines
    assert main([*run, "--seed", "5", "--heads", "L1"]) == 0
    assert "2 done (2 of them redone)" in capsys.readouterr().out
    assert [png_settings(out / name)["edits"][0]["heads"] for name in pngs(out)] == [["L1"], ["L1"]]
    files = [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(files) == 6 and set(files) == set(pngs(out))  # a redone item adds a line; its PNG tells the current one


def test_deleted_empty_or_truncated_pngs_are_regenerated(tmp_path, capsys):
    out = tmp_path / "out"
    run = ["generate", "a", "b", "c", "d", *FAST, "--out", str(out), "--no-overwrite"]
    assert main(run) == 0
    names = pngs(out)
    good = (out / names[3]).read_bytes()
    (out / names[0]).unlink()
    (out / names[1]).write_bytes(b"")
    (out / names[2]).write_bytes((out / names[2]).read_bytes()[:-20])
    capsys.readouterr()
    assert main(run) == 0  # not images: redone even with --no-overwrite
    captured = capsys.readouterr()
    assert "3 done (3 of them redone), 1 already finished (skipped), 0 failed" in captured.out
    assert "its PNG is missing" in captured.err and "not a whole dit-attn PNG" in captured.err
    assert pngs(out) == names and (out / names[3]).read_bytes() == good
    from dit_attn.io import verified_png_settings

    assert [verified_png_settings(out / name)["prompt"] for name in names] == ["a", "b", "c", "d"]


def test_a_png_replaced_by_another_image_is_regenerated(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a", "b", *FAST, "--out", str(out)]) == 0
    names = pngs(out)
    (out / names[0]).write_bytes((out / names[1]).read_bytes())  # a whole PNG, but not the one the line records
    capsys.readouterr()
    assert main(["generate", "a", "b", *FAST, "--out", str(out), "--no-overwrite"]) == 2
    assert "its PNG, which no manifest line records, was made with other settings (prompt: " in capsys.readouterr().err
    assert main(["generate", "a", "b", *FAST, "--out", str(out)]) == 0
    assert png_settings(out / names[0])["prompt"] == "a"


def test_the_models_default_size_is_matched_only_by_asking_for_none_or_that_size(tmp_path, capsys):
    out = tmp_path / "out"
    plain = ["generate", "a", "--steps", "1", "--out", str(out)]
    assert main(plain) == 0  # the tiny model's default: 64x64
    record = json.loads((out / "manifest.jsonl").read_text())
    assert (record["height"], record["width"], record["model_defaults"]) == (64, 64, ["height", "width"])
    assert "model_defaults" not in png_settings(out / record["file"])  # a key of the manifest line only
    capsys.readouterr()
    assert main([*plain, "--size", "64"]) == 0  # asks for the size that was drawn: finished
    assert "0 done, 1 already finished" in capsys.readouterr().out
    assert main([*plain, "--size", "32"]) == 0
    assert "1 done (1 of them redone)" in capsys.readouterr().out
    assert main(plain) == 0  # 32 was asked for then; the default (64) now
    captured = capsys.readouterr()
    assert "1 done (1 of them redone)" in captured.out and "height: 32 recorded (given then), the model's default asked" in captured.err
    assert main(plain) == 0
    assert "0 done, 1 already finished" in capsys.readouterr().out


def test_image_then_line_order(tmp_path, monkeypatch):
    import dit_attn.workflows.batch as batch

    events = []
    real_write, real_append = batch.write_png_atomic, batch.Manifest.append

    def write(image, path, settings=None, tmp_prefix=".partial-"):
        real_write(image, path, settings, tmp_prefix)
        events.append(("png", os.path.basename(path)))

    def append(self, record):
        assert os.path.exists(os.path.join(self.directory, record["file"]))  # on disk before its line
        events.append(("line", record["file"]))
        real_append(self, record)

    monkeypatch.setattr(batch, "write_png_atomic", write)
    monkeypatch.setattr(batch.Manifest, "append", append)
    assert main(["generate", "a", "b", *FAST, "--out", str(tmp_path / "o")]) == 0
    assert [kind for kind, _ in events] == ["png", "line", "png", "line"]
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1]


def test_a_second_process_on_the_same_shard_stops_at_once(tmp_path):
    import time

    args, out, env = child_run(tmp_path, 10)
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, "1", *args], env=env, stdout=subprocess.PIPE,
                                 stderr=err, text=True)  # writes one image, then holds the shard (and its lock)
        try:
            ready, _, _ = select.select([first.stdout], [], [], 300)
            line = first.stdout.readline() if ready else ""
            assert line.split() == [KILL_POINT, "1"], (tmp_path / "first.err").read_text()[-2000:]
            began = time.monotonic()
            second = subprocess.run([sys.executable, "-m", "dit_attn.cli", "generate", *args], env=env,
                                    capture_output=True, text=True, timeout=120)
            seconds = time.monotonic() - began
            other_shard = subprocess.run([sys.executable, "-m", "dit_attn.cli", "generate", *args, "--num-shards", "2",
                                          "--shard-index", "1", "--steps", "1"], env=env, capture_output=True, text=True,
                                         timeout=300)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert second.returncode == 1, second.stderr
    lock = out / ".manifest.jsonl.lock"
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"process {first.pid} is already generating into" in second.stderr and repr(str(lock)) in second.stderr
    assert "Loading pipeline" not in second.stderr and seconds < 60  # before any model loads
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 1  # only the first one's image
    assert other_shard.returncode == 0, other_shard.stderr  # another shard has its own lock
    result = subprocess.run([sys.executable, "-m", "dit_attn.cli", "generate", *args], env=env, capture_output=True,
                            text=True, timeout=300)  # the killed holder's lock is gone with it
    assert result.returncode == 0, result.stderr
    assert "4 done, 6 already finished (skipped), 0 failed" in result.stdout  # 1 + the other shard's 5
