"""The Triton SoftPAG kernel, run by the Triton interpreter on the CPU (a subprocess, because
TRITON_INTERPRET must be set before triton is first imported)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dit_attn.kernels import AttentionPlan, Perturbation, choose_backend

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
            for perturbations in ((), (Perturbation(u, "identity", "joint"),), (Perturbation(u, "uniform", "joint"),)):
                plan = AttentionPlan(perturbations, image, LocalWindow(r, (rows, cols), pool, weight))
                assert choose_backend(q, plan).name == "triton"
                out = attention(q, k, v, plan)
                ref = attention(q.float(), k.float(), v.float(), plan, backend="reference")
                err = (out.float() - ref).abs().max().item()
                assert err < tol, ("local", rows, cols, dtype, len(perturbations), err)
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


def test_triton_kernel_matches_reference_in_interpreter_and_in_pipelines():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_triton_dispatch_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 2, 8, 16)
    one = torch.ones(1, 2)
    joint = AttentionPlan((Perturbation(one, "identity", "joint"),))
    assert "CUDA" in choose_backend.__globals__["BACKENDS"]["triton"].why_not(q, joint)
    two = AttentionPlan((Perturbation(one, "identity", "image"), Perturbation(one, "uniform", "joint")), (0, 6))
    assert "one perturbation per call" in choose_backend.__globals__["BACKENDS"]["triton"].why_not(q, two)
    assert choose_backend(q, joint).name == "sdpa"  # auto falls back on a CPU
