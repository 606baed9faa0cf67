"""The Triton SoftPAG kernel, run by the Triton interpreter on the CPU (a subprocess, because
TRITON_INTERPRET must be set before triton is first imported)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, choose_backend

pytest.importorskip("triton")

CHECK = textwrap.dedent('''
    import torch
    from dit_attn.kernels import AttentionPlan, Perturbation, attention, choose_backend
    torch.manual_seed(0)
    worst = {}
    for seq, dim in ((77, 16), (130, 64)):  # lengths that are not multiples of the block size
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            q, k, v = (torch.randn(2, 3, seq, dim).to(dtype) for _ in range(3))
            u = torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.5, 0.0]])
            for target, scope, image in (("identity", "joint", None), ("uniform", "joint", None),
                                         ("identity", "image", (0, seq - 7)), ("uniform", "image", (7, seq)),
                                         ("identity", "image", None)):
                plan = AttentionPlan((Perturbation(u, target, scope),), image)
                assert choose_backend(q, plan).name == "triton"
                out = attention(q, k, v, plan)
                ref = attention(q.float(), k.float(), v.float(), plan, backend="reference")
                err = (out.float() - ref).abs().max().item()
                assert err < tol, (seq, dim, dtype, target, scope, image, err)
                worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
    print(worst)

    import os
    import dit_attn as da
    import dit_attn.kernels as kernels
    triton_calls = []
    original = kernels.BACKENDS["triton"]
    kernels.BACKENDS["triton"] = kernels.Backend(
        "triton", lambda *a, **kw: (triton_calls.append(1), original.run(*a, **kw))[1], original.why_not)
    from dit_attn.models.configs import build_flux_pipeline, build_sd3_pipeline
    for pipe in (build_sd3_pipeline(num_layers=2, head_dim=16), build_flux_pipeline(head_dim=16)):
        pipe.set_progress_bar_config(disable=True)
        images = {}
        with da.apply(pipe, da.SoftPAG(heads=["L1", "L0H0"], u=0.5, scope="image")):
            for backend in ("auto", "sdpa"):
                os.environ["DIT_ATTN_BACKEND"] = backend
                images[backend] = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
                                       output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert abs(images["auto"] - images["sdpa"]).max() < 1e-4, type(pipe).__name__
        assert triton_calls, "the Triton kernel did not run"
        triton_calls.clear()
    os.environ.pop("DIT_ATTN_BACKEND")

    # local windows (block-sparse), alone and with a joint-scope SoftPAG blend in the same launch
    from dit_attn.kernels import LocalWindow
    for rows, cols, r, text, image_first, pool, dim in ((7, 9, 2.5, 13, True, None, 16), (12, 10, 3, 21, False, 2, 32),
                                                        (16, 16, 5, 7, True, 4, 64)):
        n = rows * cols
        image = (0, n) if image_first else (text, n + text)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            q, k, v = (torch.randn(2, 3, n + text, dim).to(dtype) for _ in range(3))
            weight = torch.rand(pool, pool) if pool else None
            u = torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.5, 0.0]])
            image_and_joint = (Perturbation(u, "uniform", "image"), Perturbation(u.flip(0), "identity", "joint"))
            for perturbations in ((), (Perturbation(u, "identity", "joint"),), (Perturbation(u, "uniform", "joint"),), image_and_joint):
                plan = AttentionPlan(perturbations, image, LocalWindow(r, (rows, cols), pool, weight))
                assert choose_backend(q, plan).name == "triton"
                out = attention(q, k, v, plan)
                ref = attention(q.float(), k.float(), v.float(), plan, backend="reference")
                err = (out.float() - ref).abs().max().item()
                assert err < tol, ("local", rows, cols, dtype, len(perturbations), err)
    # several joint-scope perturbations (mixed targets) folded into one launch, dense and local
    u2 = torch.tensor([[0.5, 0.0, 0.2], [0.0, 1.0, 0.7]])
    two = (Perturbation(u, "identity", "joint"), Perturbation(u2, "uniform", "joint"))
    for plan, seq in ((AttentionPlan(two, (7, 77)), 77), (AttentionPlan(two[::-1], (0, 120), LocalWindow(3, (12, 10))), 141)):
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            q, k, v = (torch.randn(2, 3, seq, 32).to(dtype) for _ in range(3))
            assert choose_backend(q, plan).name == "triton"
            err = (attention(q, k, v, plan).float() - attention(q.float(), k.float(), v.float(), plan, backend="reference")).abs().max().item()
            assert err < tol, ("two perturbations", plan.window is not None, dtype, err)
    # image scope in every kernel: alone (both targets, u in {0, 0.3, 1}) and mixed with joint scope in one
    # launch, dense and local (odd grid, text before or after the image, or none)
    mixed = (Perturbation(u, "identity", "image"), Perturbation(u2, "uniform", "joint"), Perturbation(u2.flip(1), "uniform", "image"))
    for text, image_first in ((7, False), (7, True), (0, True)):
        n = 7 * 9
        image = (0, n) if image_first else (text, n + text)
        for window in (None, LocalWindow(2.5, (7, 9))):
            for perturbations in ((Perturbation(u, "identity", "image"),), (Perturbation(u, "uniform", "image"),), mixed):
                plan = AttentionPlan(perturbations, image, window)
                for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
                    q, k, v = (torch.randn(2, 3, n + text, 16).to(dtype) for _ in range(3))
                    assert choose_backend(q, plan).name == "triton"
                    err = (attention(q, k, v, plan).float() - attention(q.float(), k.float(), v.float(), plan, backend="reference")).abs().max().item()
                    assert err < tol, ("image scope", text, image_first, window, len(perturbations), dtype, err)
                    worst[str(dtype)] = max(worst[str(dtype)], err)
    print("image scope, worst:", worst)

    pipe = build_sd3_pipeline(num_layers=2, head_dim=16)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for backend in ("triton", "tiled"):
        with da.apply(pipe, da.LocalAttention(1.5, backend=backend), da.SoftPAG(heads=["L1H0"], u=0.5)):
            images[backend] = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
                                   output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(images["triton"] - images["tiled"]).max() < 1e-4
    assert triton_calls, "the Triton local kernel did not run"
''')


BACKWARD = textwrap.dedent('''
    import torch
    import dit_attn as da
    from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, attention, choose_backend
    torch.manual_seed(0)

    def run(q, k, v, plan, backend, grad_out):
        q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        out = attention(q, k, v, plan, backend=backend)
        (out.float() * grad_out).sum().backward()
        return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]

    u = torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.5, 0.0]])
    plans = [
        (77, 16, AttentionPlan((Perturbation(u, "identity", "joint"), Perturbation(u.flip(0), "uniform", "joint")))),
        (130, 64, AttentionPlan((Perturbation(u, "uniform", "joint"),))),
        (76, 16, AttentionPlan((), (0, 63), LocalWindow(2.5, (7, 9)))),  # border windows, odd grid, text after
        (141, 32, AttentionPlan((Perturbation(u, "identity", "joint"),), (21, 141), LocalWindow(3, (12, 10), 2, torch.rand(2, 2)))),
        (49, 16, AttentionPlan((), (7, 49), LocalWindow(1, (6, 7)))),  # r = 1: only the own cell
        (49, 16, AttentionPlan((), (7, 49), LocalWindow(20, (6, 7)))),  # r covers the grid
        (49, 16, AttentionPlan((Perturbation(u, "uniform", "joint"),), (0, 49), LocalWindow(2, (7, 7)))),  # no text
        (141, 16, AttentionPlan((), (77, 141), LocalWindow(2, (8, 8)))),  # 77 text tokens
        # image scope: text keys' attention (with its lse gradient) mixed with the image key, dense and local
        (77, 16, AttentionPlan((Perturbation(u, "identity", "image"), Perturbation(u.flip(0), "uniform", "joint")), (0, 70))),
        (70, 16, AttentionPlan((Perturbation(u, "uniform", "image"),), (7, 70))),
        (70, 16, AttentionPlan((Perturbation(u, "identity", "image"), Perturbation(u.flip(1), "uniform", "image")), (7, 70), LocalWindow(2.5, (7, 9)))),
        (63, 16, AttentionPlan((Perturbation(u, "uniform", "image"), Perturbation(u, "identity", "image")), (0, 63), LocalWindow(2.5, (7, 9)))),  # no text
    ]
    worst = {}
    for seq, dim, plan in plans:
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            q, k, v = (torch.randn(2, 3, seq, dim).to(dtype) for _ in range(3))
            grad_out = torch.randn(2, 3, seq, dim)
            assert choose_backend(q.clone().requires_grad_(True), plan).name == "triton"
            mine = run(q, k, v, plan, "triton", grad_out)
            ref = run(q.float(), k.float(), v.float(), plan, "reference", grad_out)
            for name, a, b in zip(("out", "dq", "dk", "dv"), mine, ref):
                err = ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()
                assert err < tol, (seq, dim, dtype, name, err)
                worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
    print("backward, worst relative error:", worst)

    # distill-clear's path: the transformer's parameter gradients through local attention equal the tiled backend's
    from dit_attn.models.configs import build_sd3_pipeline
    pipe = build_sd3_pipeline(num_layers=2, head_dim=16)
    transformer = pipe.transformer
    x, text, pooled = torch.randn(2, transformer.config.in_channels, 12, 12), torch.randn(2, 24, transformer.config.joint_attention_dim), torch.randn(2, transformer.config.pooled_projection_dim)
    grads = {}
    for backend in ("triton", "tiled"):
        transformer.zero_grad()
        with da.apply(pipe, da.LocalAttention(1.5, backend=backend)):
            transformer(x, text, pooled, torch.tensor([500.0, 100.0])).sample.square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["tiled"].keys() and len(grads["tiled"]) > 10
    worst = max((grads["triton"][n] - g).abs().max().item() / max(g.abs().max().item(), 1e-6) for n, g in grads["tiled"].items())
    assert worst < 1e-4, worst
''')


def _interpret(script: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def test_triton_backward_matches_reference_dense_and_local_and_trains_a_transformer():
    _interpret(BACKWARD)


def test_triton_kernel_matches_reference_in_interpreter_and_in_pipelines():
    _interpret(CHECK)


def test_triton_dispatch_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 2, 8, 16)
    one = torch.ones(1, 2)
    joint = AttentionPlan((Perturbation(one, "identity", "joint"),))
    assert "CUDA" in choose_backend.__globals__["BACKENDS"]["triton"].why_not(q, joint)
    # image scope runs on Triton with other perturbations, a local window and autograd: only the device is missing
    mixed = (Perturbation(one, "identity", "image"), Perturbation(one, "uniform", "joint"))
    for plan in (AttentionPlan(mixed, (0, 6)), AttentionPlan(mixed[:1], (2, 8), LocalWindow(2, (2, 3)))):
        for x in (q, q.clone().requires_grad_(True)):
            assert "CUDA" in choose_backend.__globals__["BACKENDS"]["triton"].why_not(x, plan)
    assert choose_backend(q, joint).name == "sdpa"  # auto falls back on a CPU


def test_tuning_times_candidates_once_then_reads_the_cache(tmp_path, monkeypatch):
    from dit_attn.kernels.triton import tuning

    monkeypatch.setattr(tuning, "_memory", {})
    path = str(tmp_path / "blocks.json")
    candidates = tuning.CANDIDATES["softpag"]
    times = {c["block_m"] * 1000 + c["block_n"] + c["num_warps"]: t for c, t in zip(candidates, (5.0, 2.0, 1.0, 3.0, 4.0))}
    launched = []

    def run(config):
        if config["block_m"] == 128 and config["block_n"] == 32:
            raise RuntimeError("out of shared memory")  # a config the GPU cannot launch is skipped
        launched.append(config)

    def bench(fn):
        fn()
        return times[launched[-1]["block_m"] * 1000 + launched[-1]["block_n"] + launched[-1]["num_warps"]]

    best = tuning.tune("gpu|softpag|d64|float16|s1024", candidates, run, bench, path)
    assert best == dict(block_m=64, block_n=64, num_warps=4) and len(launched) == 4
    tuning._memory.clear()  # a new process: the file answers, nothing is timed again

    def no_bench(fn):
        raise AssertionError("timed again")

    assert tuning.tune("gpu|softpag|d64|float16|s1024", candidates, run, no_bench, path) == best
    (tmp_path / "blocks.json").write_text("{not json")  # a damaged file is ignored and rewritten
    tuning._memory.clear()
    assert tuning.tune("gpu|softpag|d64|float16|s1024", candidates, run, bench, path) == best
    assert tuning._read(path) == {"gpu|softpag|d64|float16|s1024": best}


def test_tuning_falls_back_deterministically_off_the_gpu():
    from dit_attn.kernels.triton import tuning

    q = torch.zeros(1, 2, 300, 64, dtype=torch.float16)
    assert tuning.choose("softpag", q, run=None) == tuning.fallback("softpag", q) == dict(block_m=32, block_n=32, num_warps=4)
    assert tuning.choose("local", q, run=None) == dict(block=32, num_warps=4)
    assert tuning.tuning_key("local", q) == "cpu|local|d64|float16|s512"
    with pytest.raises(ValueError, match="valid: softpag, local"):
        tuning.fallback("dense", q)
