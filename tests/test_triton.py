"""The Triton SoftPAG kernel, run by the Triton interpreter on the CPU (a subprocess, because
TRITON_INTERPRET must be set before triton is first imported). DIT_ATTN_TEST_DEVICE=cuda runs
the same checks compiled on the GPU, in bfloat16 too."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, choose_backend

pytest.importorskip("triton")

DEVICE = os.environ.get("DIT_ATTN_TEST_DEVICE", "cpu")
# each script starts with its device (new tensors and modules are made there) and its dtypes with tolerances
PREAMBLE = textwrap.dedent(f'''
    import torch
    torch.set_default_device({DEVICE!r})
    DTYPES = ((torch.float32, 1e-4), (torch.float16, 2e-2)) + (((torch.bfloat16, 6e-2),) if {DEVICE!r} == "cuda" else ())
    LOCAL_BASELINE = "flex" if {DEVICE!r} == "cuda" else "tiled"  # on CUDA the tiled backend yields to flex
''')

CHECK = textwrap.dedent('''
    import torch
    from dit_attn.kernels import AttentionPlan, Perturbation, attention, choose_backend
    torch.manual_seed(0)
    worst = {}
    for seq, dim in ((77, 16), (130, 64)):  # lengths that are not multiples of the block size
        for dtype, tol in DTYPES:
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
    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline
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
        for dtype, tol in DTYPES:
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
        for dtype, tol in DTYPES:
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
                for dtype, tol in DTYPES:
                    q, k, v = (torch.randn(2, 3, n + text, 16).to(dtype) for _ in range(3))
                    assert choose_backend(q, plan).name == "triton"
                    err = (attention(q, k, v, plan).float() - attention(q.float(), k.float(), v.float(), plan, backend="reference")).abs().max().item()
                    assert err < tol, ("image scope", text, image_first, window, len(perturbations), dtype, err)
                    worst[str(dtype)] = max(worst[str(dtype)], err)
    print("image scope, worst:", worst)

    pipe = build_sd3_pipeline(num_layers=2, head_dim=16)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for backend in ("triton", LOCAL_BASELINE):
        with da.apply(pipe, da.LocalAttention(1.5, backend=backend), da.SoftPAG(heads=["L1H0"], u=0.5)):
            images[backend] = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
                                   output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(images["triton"] - images[LOCAL_BASELINE]).max() < 1e-4
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
        for dtype, tol in DTYPES:
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

    # distill-clear's path: the transformer's parameter gradients through local attention equal the tiled (CPU) or flex (CUDA) backend's
    from dit_attn.toy.configs import build_sd3_pipeline
    pipe = build_sd3_pipeline(num_layers=2, head_dim=16)
    transformer = pipe.transformer
    x, text, pooled = torch.randn(2, transformer.config.in_channels, 12, 12), torch.randn(2, 24, transformer.config.joint_attention_dim), torch.randn(2, transformer.config.pooled_projection_dim)
    grads = {}
    for backend in ("triton", LOCAL_BASELINE):
        transformer.zero_grad()
        with da.apply(pipe, da.LocalAttention(1.5, backend=backend)):
            transformer(x, text, pooled, torch.tensor([500.0, 100.0])).sample.square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads[LOCAL_BASELINE].keys() and len(grads[LOCAL_BASELINE]) > 10
    worst = max((grads["triton"][n] - g).abs().max().item() / max(g.abs().max().item(), 1e-6) for n, g in grads[LOCAL_BASELINE].items())
    assert worst < 1e-4, worst
''')


BACKWARD_CONFIGS = textwrap.dedent('''
    import torch
    from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, attention
    from dit_attn.kernels.triton import tuning
    from dit_attn.kernels.triton.backward import trainable_attention
    torch.manual_seed(0)
    torch.set_num_threads(1)

    # what tuning on a GPU may pick for the backward: every candidate, dq and dk/dv at block sizes
    # below and above the forward's (64), so each kernel walks block lists rebuilt for its own size
    picked, asked = {}, set()
    fallback_choose = tuning.choose

    def choose(kernel, q, run):
        asked.add(kernel)
        return picked.get(kernel) or fallback_choose(kernel, q, run)

    tuning.choose = choose

    def grads(attend, q, k, v, grad_out):
        q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        (attend(q, k, v) * grad_out).sum().backward()
        return [q.grad, k.grad, v.grad]

    u = torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.5, 0.0]])
    plans = [
        (141, 16, AttentionPlan((Perturbation(u, "uniform", "joint"),))),
        (141, 32, AttentionPlan((Perturbation(u, "identity", "joint"),), (21, 141), LocalWindow(5, (12, 10), 2, torch.rand(2, 2)))),
        (70, 16, AttentionPlan((Perturbation(u, "identity", "image"), Perturbation(u.flip(1), "uniform", "image")), (7, 70), LocalWindow(2.5, (7, 9)))),
    ]
    dq_configs, dkdv_configs = tuning.CANDIDATES["flash_dq"], tuning.CANDIDATES["flash_dkdv"][::-1]
    for seq, dim, plan in plans:
        q, k, v, grad_out = (torch.randn(2, 3, seq, dim) for _ in range(4))
        ref = grads(lambda *x: attention(*x, plan, backend="reference"), q, k, v, grad_out)
        for picked["flash_dq"], picked["flash_dkdv"] in zip(dq_configs, dkdv_configs):
            mine = grads(lambda *x: trainable_attention(*x, plan, block=64), q, k, v, grad_out)
            for name, a, b in zip(("dq", "dk", "dv"), mine, ref):
                err = ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()
                assert err < 1e-4, (seq, dim, picked, name, err)
    assert asked == {"flash_dq", "flash_dkdv"}, asked
''')


def _interpret(script: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", PREAMBLE + script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def test_triton_backward_matches_reference_dense_and_local_and_trains_a_transformer():
    _interpret(BACKWARD)


def test_triton_backward_matches_reference_at_every_tuned_block_size():
    _interpret(BACKWARD_CONFIGS)


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


def _fake_gpu(fastest: dict, failing: dict):
    """A launcher that fails for `failing` (e.g. out of shared memory), a timer where `fastest` wins,
    and the list of configs that launched."""
    launched = []

    def run(config):
        if config == failing:
            raise RuntimeError("out of shared memory")
        launched.append(config)

    def bench(fn):
        fn()
        return 1.0 if launched[-1] == fastest else 2.0

    return run, bench, launched


def _no_bench(fn):
    raise AssertionError("timed again")


def test_tuning_times_candidates_once_then_reads_the_cache(tmp_path, monkeypatch):
    from dit_attn.kernels.triton import tuning

    monkeypatch.setattr(tuning, "_memory", {})
    path = str(tmp_path / "blocks.json")
    candidates = tuning.CANDIDATES["softpag"]
    run, bench, launched = _fake_gpu(dict(block_m=64, block_n=64, num_warps=4), dict(block_m=128, block_n=32, num_warps=4))
    best = tuning.tune("gpu|softpag|d64|float16|s1024", candidates, run, bench, path)
    assert best == dict(block_m=64, block_n=64, num_warps=4) and len(launched) == 4
    tuning._memory.clear()  # a new process: the file answers, nothing is timed again
    assert tuning.tune("gpu|softpag|d64|float16|s1024", candidates, run, _no_bench, path) == best
    (tmp_path / "blocks.json").write_text("{not json")  # a damaged file is ignored and rewritten
    tuning._memory.clear()
    assert tuning.tune("gpu|softpag|d64|float16|s1024", candidates, run, bench, path) == best
    assert tuning._read(path) == {"gpu|softpag|d64|float16|s1024": best}


def test_backward_kernels_tune_their_own_configs_then_read_the_cache(tmp_path, monkeypatch):
    from dit_attn.kernels.triton import tuning

    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(tuning, "timed", lambda q: True)  # as on a GPU
    monkeypatch.setenv("DIT_ATTN_CACHE", str(tmp_path))
    q = torch.zeros(1, 2, 300, 64, dtype=torch.float16)
    fastest = {"flash_dq": dict(block=64, num_warps=8), "flash_dkdv": dict(block=32, num_warps=4)}
    failing = dict(block=128, num_warps=8)
    for kernel, best in fastest.items():
        run, bench, launched = _fake_gpu(best, failing)
        monkeypatch.setattr(tuning, "_do_bench", bench)
        assert tuning.choose(kernel, q, run) == best
        assert launched == [c for c in tuning.CANDIDATES[kernel] if c != failing]
    tuning._memory.clear()  # a new process: the file answers, nothing is timed again
    monkeypatch.setattr(tuning, "_do_bench", _no_bench)
    for kernel, best in fastest.items():
        assert tuning.choose(kernel, q, run=None) == best
    assert tuning._read(tuning.cache_path()) == {tuning.tuning_key(k, q): c for k, c in fastest.items()}


def test_tuning_falls_back_deterministically_off_the_gpu():
    from dit_attn.kernels.triton import tuning

    q = torch.zeros(1, 2, 300, 64, dtype=torch.float16)
    assert tuning.choose("softpag", q, run=None) == tuning.fallback("softpag", q) == dict(block_m=32, block_n=32, num_warps=4)
    assert tuning.choose("local", q, run=None) == dict(block=32, num_warps=4)
    assert tuning.tuning_key("local", q) == "cpu|local|d64|float16|s512"
    for kernel in ("flash_dq", "flash_dkdv"):  # the training forward's block: the backward reuses its lists
        assert tuning.choose(kernel, q, run=None) == tuning.fallback("local", q)
    with pytest.raises(ValueError, match="valid: softpag, local"):
        tuning.fallback("dense", q)


def test_block_lists_at_another_block_size_keep_the_token_layout():
    from dit_attn.kernels.triton.sparsity import dense_sparsity, window_sparsity

    cpu = torch.device("cpu")
    layout = window_sparsity((12, 10), 3.0, 21, 30, 32, cpu)
    wide = layout.with_block(64)
    assert layout.with_block(32) is layout and wide is window_sparsity((12, 10), 3.0, 21, 30, 64, cpu)
    assert wide.block == 64 and wide.full_index.shape == wide.full_index_t.shape == (3, 3)
    assert torch.equal(wide.pos_y, layout.pos_y) and torch.equal(wide.pos_x, layout.pos_x)  # same tokens, same order
    assert (wide.seq_q, wide.seq_kv, wide.text, wide.r2) == (layout.seq_q, layout.seq_kv, layout.text, layout.r2)
    narrow = dense_sparsity(77, 32, cpu, 40).with_block(16)
    assert (narrow.block, narrow.seq_q, narrow.seq_kv, narrow.full_index.shape) == (16, 77, 40, (5, 3))
    assert narrow.full_count.tolist() == [3] * 5 and narrow.part_count.tolist() == [0] * 5
