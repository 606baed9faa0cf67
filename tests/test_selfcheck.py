"""The Triton self-check on first use: a wrong or failing kernel is caught once, warned about,
replaced by the next backend and remembered in the cache file; a correct one runs.

The kernel scenarios run under the Triton interpreter in subprocesses (TRITON_INTERPRET must be
set before triton is first imported); the torch.compile and switch checks run in this process
with a stand-in Triton backend."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dit_attn.kernels as kernels
from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, choose_backend, selfcheck
from dit_attn.kernels.reference import reference_attention

torch.set_num_threads(1)

COMMON = textwrap.dedent('''
    import json, os, warnings
    import torch
    torch.set_num_threads(1)
    import dit_attn.kernels.triton.local as local
    import dit_attn.kernels.triton.softpag as softpag
    from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, attention, choose_backend, selfcheck
    from dit_attn.kernels.triton import tuning

    torch.manual_seed(0)
    u = torch.tensor([[0.0, 0.5, 1.0]])
    dense = AttentionPlan((Perturbation(u, "identity", "image"),), (5, 69))  # 5 text tokens, 8x8 image
    local_plan = AttentionPlan((Perturbation(u, "uniform", "joint"),), (0, 64), LocalWindow(2, (8, 8)))
    q, k, v = (torch.randn(1, 3, 69, 16) for _ in range(3))
    ql, kl, vl = (x[:, :, :64] for x in (q, k, v))
    correct_softpag = softpag.softpag_attention

    def selfcheck_warnings(run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run()
        return result, [str(w.message) for w in caught if "self-check" in str(w.message)]
''')

FIRST_PROCESS = COMMON + textwrap.dedent('''
    # a wrong dense kernel: caught, warned once, sdpa's result instead
    softpag.softpag_attention = lambda *a, **kw: correct_softpag(*a, **kw) + 0.1
    (first, second), messages = selfcheck_warnings(lambda: (attention(q, k, v, dense), attention(q, k, v, dense)))
    assert len(messages) == 1, messages
    assert "softpag kernel, head dim 16, float32, image/identity, dense, text first" in messages[0], messages
    assert "output differs from the reference" in messages[0] and "triton " in messages[0] and "torch " in messages[0]
    assert torch.equal(first, attention(q, k, v, dense, backend="sdpa")) and torch.equal(first, second)
    assert choose_backend(q, dense).name == "sdpa"

    # a local kernel that does not compile: caught, the next backend (tiled on a CPU) runs
    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    local.local_window_attention = broken
    out, messages = selfcheck_warnings(lambda: attention(ql, kl, vl, local_plan))
    assert len(messages) == 1 and "RuntimeError: PassManager::run failed" in messages[0], messages
    assert "local kernel" in messages[0] and "pooled" not in messages[0]
    assert torch.equal(out, attention(ql, kl, vl, local_plan, backend="tiled"))

    # a correct kernel passes its check and is used; other dtypes and blends are configurations of their own
    softpag.softpag_attention = correct_softpag
    calls = []
    softpag.softpag_attention = lambda *a, **kw: (calls.append(1), correct_softpag(*a, **kw))[1]
    joint = AttentionPlan((Perturbation(u, "uniform", "joint"),), (5, 69))
    for x, y, z in ((q, k, v), (q.half(), k.half(), v.half())):
        out, messages = selfcheck_warnings(lambda: attention(x, y, z, joint))
        assert not messages and choose_backend(x, joint).name == "triton", messages
        assert len(calls) == 2, calls  # the check's call, then the real one
        calls.clear()
        ref = attention(x.float(), y.float(), z.float(), joint, backend="reference")
        assert (out.float() - ref).abs().max() < 2e-2
    verdicts = selfcheck.verdicts()
    assert sum(v is None for v in verdicts.values()) == 2 and len(verdicts) == 4, verdicts

    # the failures are stored with the device and versions, the passes are not
    stored = {key: value for key, value in json.load(open(tuning.cache_path())).items() if key.startswith("selfcheck|")}
    assert len(stored) == 2 and all(value["passed"] is False for value in stored.values()), stored
    assert all("|cpu (Triton interpreter)|triton " in key and ", torch " in key for key in stored), stored

    # DIT_ATTN_TRITON_SELFCHECK=0: no check, the (wrong) kernel runs
    selfcheck.forget()
    os.environ["DIT_ATTN_TRITON_SELFCHECK"] = "0"
    softpag.softpag_attention = lambda *a, **kw: correct_softpag(*a, **kw) + 0.1
    out, messages = selfcheck_warnings(lambda: attention(q, k, v, dense))
    assert not messages and choose_backend(q, dense).name == "triton"
    assert (out - attention(q, k, v, dense, backend="sdpa")).abs().max() > 0.05
    print("ok")
''')

LATER_PROCESS = COMMON + textwrap.dedent('''
    # a new process with the correct kernels: the stored failures skip Triton without checking again
    calls = []
    softpag.softpag_attention = lambda *a, **kw: (calls.append(1), correct_softpag(*a, **kw))[1]
    (out, name), messages = selfcheck_warnings(lambda: (attention(q, k, v, dense), choose_backend(q, dense).name))
    assert name == "sdpa" and not calls and not messages, (name, calls, messages)
    assert torch.equal(out, attention(q, k, v, dense, backend="sdpa"))
    assert choose_backend(ql, local_plan).name == "tiled"
    assert "earlier process" in next(iter(selfcheck.verdicts().values()))
    # a configuration with no stored failure is checked and runs on Triton
    assert choose_backend(q, AttentionPlan((Perturbation(u, "identity", "joint"),), (5, 69))).name == "triton"
    assert calls == [1]
    print("ok")
''')


def _interpret(script: str, cache: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", DIT_ATTN_CACHE=cache)
    env.pop("DIT_ATTN_TRITON_SELFCHECK", None)
    env.pop("DIT_ATTN_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_wrong_and_failing_kernels_fall_back_once_and_are_remembered_by_later_processes(tmp_path):
    pytest.importorskip("triton")
    _interpret(FIRST_PROCESS, str(tmp_path))
    _interpret(LATER_PROCESS, str(tmp_path))


@pytest.fixture
def stand_in_triton(monkeypatch, tmp_path):
    """A Triton backend that can run on this CPU, computing the reference plus `error`; fresh verdicts."""
    monkeypatch.setenv("DIT_ATTN_CACHE", str(tmp_path))
    monkeypatch.delenv("DIT_ATTN_TRITON_SELFCHECK", raising=False)
    monkeypatch.delenv("DIT_ATTN_BACKEND", raising=False)
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(selfcheck, "versions", lambda: "triton x, torch y, dit-attn z")  # triton need not be installed
    state = {"error": 0.0, "calls": 0}

    def run(q, k, v, plan, scale=None):
        state["calls"] += 1
        return reference_attention(q, k, v, plan, scale) + state["error"]

    monkeypatch.setitem(kernels.BACKENDS, "triton", kernels.Backend("triton", run, lambda *a: None))
    return state


def _plan_and_q():
    u = torch.tensor([[0.0, 1.0]], requires_grad=False)
    return AttentionPlan((Perturbation(u, "identity", "image", same_rows=(True, False)),), (4, 68)), torch.randn(1, 2, 68, 16)


def test_switch_turns_the_check_off(stand_in_triton, monkeypatch):
    plan, q = _plan_and_q()
    stand_in_triton["error"] = 1.0
    monkeypatch.setenv("DIT_ATTN_TRITON_SELFCHECK", "0")
    assert choose_backend(q, plan).name == "triton" and stand_in_triton["calls"] == 0
    monkeypatch.setenv("DIT_ATTN_TRITON_SELFCHECK", "1")
    with pytest.warns(RuntimeWarning, match="failed its self-check for softpag kernel, head dim 16"):
        assert choose_backend(q, plan).name == "sdpa"
    assert stand_in_triton["calls"] == 1


def test_configuration_names_what_decides_the_kernel():
    u = torch.zeros(2, 2)
    q = torch.zeros(2, 2, 20, 32, dtype=torch.bfloat16)
    blends = (Perturbation(u, "uniform", "image"), Perturbation(u, "identity", "joint"), Perturbation(u, "uniform", "image"))
    plan = AttentionPlan(blends, (0, 16), LocalWindow(2, (4, 4), 2, torch.ones(2, 2) / 4))
    config = selfcheck.Configuration(*selfcheck.configuration(q, plan))
    assert config == ("local", 32, "bfloat16", ("image/uniform", "joint/identity"), "local", True, "image first", "cpu")
    assert selfcheck.configuration(q.requires_grad_(True), AttentionPlan(blends[:1], (4, 20)))[::6] == ("backward", "text first")
    with torch.no_grad():
        assert selfcheck.configuration(q, AttentionPlan(blends[:1]))[0] == "softpag"
    # the check's input has the configuration's blends, window and layout
    q, k, v, sample = selfcheck.sample(config, torch.float32)
    assert q.shape == (2, 2, 77, 32) and sample.window.pool == 2 and sample.image_tokens == (0, 64)
    assert [(p.scope, p.target) for p in sample.perturbations] == [("image", "uniform"), ("joint", "identity")]


def test_compiled_call_checks_while_tracing_without_graph_breaks(stand_in_triton):
    plan, q = _plan_and_q()

    def pick(x):
        return x * (2.0 if choose_backend(x, plan).name == "triton" else 3.0)

    explained = torch._dynamo.explain(pick)(q)
    assert explained.graph_break_count == 0 and stand_in_triton["calls"] == 1
    torch._dynamo.reset()
    selfcheck.forget()
    stand_in_triton["error"] = 1.0
    with pytest.warns(RuntimeWarning, match="self-check"):
        compiled = torch.compile(pick, fullgraph=True, backend="eager")(q)
    assert torch.equal(compiled, q * 3.0)  # the failed check sent the traced call to the next backend
    torch._dynamo.reset()
    stored = json.load(open(os.path.join(os.environ["DIT_ATTN_CACHE"], "triton-blocks.json")))
    assert [value["passed"] for value in stored.values()] == [False]


def test_a_check_that_cannot_run_leaves_triton_unchecked(stand_in_triton, monkeypatch, caplog):
    def broken_reference(*args, **kwargs):
        raise MemoryError("no room for the reference")

    monkeypatch.setitem(kernels.BACKENDS, "reference", kernels.Backend("reference", broken_reference, lambda *a: None))
    plan, q = _plan_and_q()
    assert choose_backend(q, plan).name == "triton"
    assert "could not run (MemoryError: no room for the reference); Triton is used unchecked" in caplog.text
