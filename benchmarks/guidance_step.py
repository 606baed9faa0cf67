"""Per-step cost of head-level perturbation guidance vs diffusers PAG, and attention memory.

Model: a random-weight SD3-architecture transformer built from a config (no downloads):
12 layers x 6 heads x 64 (hidden 384), no q/k norm (so diffusers' SD3 PAG, which skips
q/k norms, computes the same math as ours), patch 2 on a 32x32x16 latent -> 256 image
tokens per image, and 16 CLIP + ``--t5-tokens`` zero "T5" text tokens per image (there
is no T5 encoder in the tiny pipeline; the pipeline pads with zeros as SD3 does).
One prompt, so CFG runs 2 rows per transformer call and CFG + PAG runs 3.

Time per denoising step. Every configuration is a stock pipeline call with
``output_type="latent"``. ``callback_on_step_end`` stamps ``time.perf_counter()`` at
the end of every step; the difference between consecutive stamps is exactly one
denoising step (transformer call, guidance arithmetic, scheduler step) and nothing
else: text encoding, latent preparation, processor installation and the first step
(which pays one-off warm-up costs) fall outside every interval. Configurations are
interleaved in rounds, the order rotated every round, so slow drift of the machine
hits all of them alike. Reported: the median interval over all rounds, and the ratio
to diffusers PAG as the median over rounds of (this config / diffusers PAG in the same
round). Each step is stamped with wall time and with process CPU time
(``time.process_time``): with ``--threads 1`` the two agree on an idle machine; when
another process time-slices our core the CPU column leaves out the time we were off
the CPU (contention for caches and memory bandwidth slows both columns alike), so the
load average and how busy all CPUs were during the timing are printed too. With more
threads the CPU column sums the threads. "ideal" is the ratio of transformer work
counted as rows x blocks (it ignores per-step costs outside the blocks).

Memory. Each case runs in a fresh subprocess: allocate q, k, v (B=1, H=6, S=4096 image +
77 text tokens, D=64, fp32), warm up the same call on a small sequence (so code pages and
thread pools are resident), reset the kernel's peak-RSS counter (``/proc/self/clear_refs``
"5"), run the call once at full size and read the peak (VmHWM). "extra" = peak - RSS
just before the call (output + temporaries); "total" = extra + the q, k, v inputs;
median of 3 fresh processes per case (1 with --quick). Ratios are against plain torch
SDPA with the same batch. The B=3 cases are the call HeadGuidance makes at a perturbed
layer: rows [uncond, cond, perturbed cond].

Qwen-Image (``--family qwen_image``): a config-built QwenImageTransformer2DModel, 12 dual-stream
layers x 4 heads x 64 (hidden 256), 256 image + ``--t5-tokens`` random text tokens per row, true
CFG as two 1-row calls a step; diffusers' PerturbedAttentionGuidance guider (its own layer-skip
hooks on a third call a step, as its modular loop runs it) against ours at the same layer (2/3
depth, all heads, u=1, joint scope), with and without the shared prefix. Timing only.

Run:  python benchmarks/guidance_step.py [--threads 1] [--quick] [--family qwen_image]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

PROMPT = "a photo of a red cat on a blue square"
NEGATIVE = "blurry dark"
CFG_SCALE = 4.5
PAG_SCALE = 3.0
NUM_LAYERS, NUM_HEADS, HEAD_DIM = 12, 6, 64
LATENT = 32  # 32x32 latent, patch 2 -> 256 image tokens
PAG_LAYER = 2 * NUM_LAYERS // 3  # 2/3 depth: layer 8 of 12; "blocks.8" matches only block 8


# --------------------------------------------------------------------------- pipelines


def build_pipelines(seed: int = 0):
    """(stock SD3 pipeline, {name: StableDiffusion3PAGPipeline}) sharing one transformer."""
    from diffusers import StableDiffusion3PAGPipeline

    from dit_attn.toy.configs import build_sd3_pipeline, pipeline_components

    # sample_size is the transformer's latent size; the tiny VAE has scale factor 2, so
    # the default output is 64x64 px -> 32x32 latent -> 16x16 patches = 256 tokens.
    pipe = build_sd3_pipeline(
        num_layers=NUM_LAYERS, num_heads=NUM_HEADS, head_dim=HEAD_DIM, qk_norm=None, sample_size=LATENT, seed=seed
    )
    pipe.set_progress_bar_config(disable=True)
    pag = {}
    for layer in (PAG_LAYER, 0):
        p = StableDiffusion3PAGPipeline(**pipeline_components(pipe), pag_applied_layers=[f"blocks.{layer}"])
        p.set_progress_bar_config(disable=True)
        pag[layer] = p
    return pipe, pag


@dataclass
class Config:
    name: str
    pipe: object
    edit: object = None  # a dit_attn edit applied around the call, or None
    kwargs: dict = field(default_factory=dict)
    row_blocks: int = 0  # transformer work: sum over blocks of the rows in the call


def make_configs(pipe, pag) -> list[Config]:
    import dit_attn as da

    n, k = NUM_LAYERS, PAG_LAYER

    def ours(layer, scope, share):
        edit = da.HeadGuidance(heads=[f"L{layer}"], scale=PAG_SCALE, u=1.0, scope=scope, share_prefix=share)
        fork = layer if share else 0
        name = f"ours L{layer} scope={scope} share_prefix={share}"
        return Config(name, pipe, edit, row_blocks=2 * fork + 3 * (n - fork))

    return [
        Config(f"stock CFG (g={CFG_SCALE})", pipe, row_blocks=2 * n),
        Config(f"diffusers PAG blocks.{k}", pag[k], kwargs={"pag_scale": PAG_SCALE}, row_blocks=3 * n),
        ours(k, "image", False),
        ours(k, "image", True),
        ours(k, "joint", False),
        ours(k, "joint", True),
        Config("diffusers PAG blocks.0", pag[0], kwargs={"pag_scale": PAG_SCALE}, row_blocks=3 * n),
        ours(0, "image", True),
        ours(0, "joint", True),
    ]


# --------------------------------------------------------------------------- timing


def run_config(cfg: Config, steps: int, t5_tokens: int, seed: int = 0) -> tuple[list[tuple], torch.Tensor, dict]:
    """One pipeline call; returns ((wall s, CPU s) of steps 1..N-1, final latents, PAG processors seen)."""
    import dit_attn as da

    stamps: list[tuple[float, float]] = []
    seen: dict = {}

    def on_step_end(p, i, t, kw):
        stamps.append((time.perf_counter(), time.process_time()))
        if i == 0:
            seen.update(
                {name: type(proc).__name__ for name, proc in p.transformer.attn_processors.items() if "PAG" in type(proc).__name__}
            )
        return {}

    handle = da.apply(cfg.pipe, cfg.edit) if cfg.edit is not None else contextlib.nullcontext()
    with handle, torch.inference_mode():
        out = cfg.pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            guidance_scale=CFG_SCALE,
            num_inference_steps=steps,
            max_sequence_length=t5_tokens,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
            callback_on_step_end=on_step_end,
            **cfg.kwargs,
        )
    intervals = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]
    return intervals, out.images, seen


def time_configs(configs: list[Config], rounds: int, steps: int, t5_tokens: int, warmup: bool):
    """Interleave configs in rounds (rotating the order).

    Per config: all (wall, CPU) step intervals, and per round the (wall, CPU) medians.
    """
    if warmup:
        for cfg in configs:
            run_config(cfg, 2, t5_tokens)
    intervals = {c.name: [] for c in configs}
    per_round = {c.name: [] for c in configs}
    latents, seen = {}, {}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for cfg in order:
            dt, lat, pag_procs = run_config(cfg, steps, t5_tokens)
            intervals[cfg.name] += dt
            per_round[cfg.name].append(tuple(statistics.median(x) for x in zip(*dt)))
            latents.setdefault(cfg.name, lat)
            seen.setdefault(cfg.name, pag_procs)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return intervals, per_round, latents, seen


def timing_table(configs, intervals, per_round, baseline: str) -> tuple[str, dict[str, tuple[float, float]]]:
    """The markdown table and {config: (wall ratio, CPU ratio) vs baseline}."""
    lines = [
        "| config | ms/step | ratio vs diffusers PAG | CPU ms/step | CPU ratio vs diffusers PAG | ideal (rows x blocks) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = next(c for c in configs if c.name == baseline)
    ratios = {}
    for cfg in configs:
        wall, cpu = (1e3 * statistics.median(x) for x in zip(*intervals[cfg.name]))
        ratios[cfg.name] = tuple(
            statistics.median(a[j] / b[j] for a, b in zip(per_round[cfg.name], per_round[baseline])) for j in (0, 1)
        )
        lines.append(
            f"| {cfg.name} | {wall:.1f} | {ratios[cfg.name][0]:.3f} | {cpu:.1f} | {ratios[cfg.name][1]:.3f} "
            f"| {cfg.row_blocks / base.row_blocks:.3f} |"
        )
    return "\n".join(lines), ratios


# --------------------------------------------------------------------------- Qwen-Image

QWEN_LAYERS, QWEN_HEADS, QWEN_HEAD_DIM = 12, 4, 64
QWEN_PX = 128  # tiny VAE factor 4, 2x2 packing -> 16x16 = 256 image tokens
QWEN_TRUE_CFG = 4.0  # QwenImagePipeline's default true_cfg_scale


class DiffusersPAG:
    """diffusers' PerturbedAttentionGuidance on the classic QwenImagePipeline, as its modular loop runs it:
    the guider's own hooks (attention scores skipped in one block) on a third, separate call of the
    conditional batch per step; its term s·(ε_c − ε_skip) is added after the pipeline's CFG and norm rescale."""

    def __init__(self, pipe, layer: int, scale: float):
        from diffusers.guiders import PerturbedAttentionGuidance

        self.pipe, self.scale = pipe, scale
        # the guider's window is exclusive at its start: start -1 perturbs step 0 too
        self.guider = PerturbedAttentionGuidance(guidance_scale=QWEN_TRUE_CFG, perturbed_guidance_scale=scale,
                                                 perturbed_guidance_layers=[layer], perturbed_guidance_start=-1.0,
                                                 perturbed_guidance_stop=1.0)
        self.calls, self.inside, self.pending = 0, False, None

    def _after_call(self, module, args, kwargs, output):
        if self.inside:
            return output
        self.calls += 1
        if self.calls % 2 == 0:  # the negative call
            return output
        step = self.calls // 2
        self.guider.set_state(step, self.pipe._num_timesteps, kwargs["timestep"])
        for _ in range(2):  # conditions 1 and 2 (cond, uncond) are the pipeline's own calls
            self.guider.prepare_models(module)
            self.guider.cleanup_models(module)
        self.guider.prepare_models(module)
        self.inside = True
        try:
            skip = module(**{**kwargs, "return_dict": False})[0]
        finally:
            self.inside = False
            self.guider.cleanup_models(module)
        self.pending = (output[0], skip)
        return output

    def __enter__(self):
        self.hook = self.pipe.transformer.register_forward_hook(self._after_call, with_kwargs=True)
        original = self.pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            (eps_c, skip), self.pending = self.pending, None
            return original(model_output + self.scale * (eps_c - skip), *args, **kwargs)

        self.pipe.scheduler.step = step
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        del self.pipe.scheduler.step


def qwen_run(cfg: Config, steps: int, texts, seed: int = 0):
    import dit_attn as da

    stamps = []

    def on_step_end(p, i, t, kw):
        stamps.append((time.perf_counter(), time.process_time()))
        return {}

    if cfg.kwargs.get("diffusers_pag") is not None:
        handle = DiffusersPAG(cfg.pipe, cfg.kwargs["diffusers_pag"], PAG_SCALE)
    else:
        handle = da.apply(cfg.pipe, cfg.edit) if cfg.edit is not None else contextlib.nullcontext()
    with handle, torch.inference_mode():
        out = cfg.pipe(prompt_embeds=texts[0], negative_prompt_embeds=texts[1], prompt_embeds_mask=texts[2],
                       negative_prompt_embeds_mask=texts[3], true_cfg_scale=QWEN_TRUE_CFG,
                       height=QWEN_PX, width=QWEN_PX, num_inference_steps=steps, output_type="latent",
                       generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_end)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])], out.images


def qwen_section(args) -> None:
    """Qwen-Image-shaped step costs: stock true CFG, diffusers' PAG guider, ours with and without prefix sharing."""
    import diffusers

    import dit_attn as da
    from dit_attn.toy.qwen_image import build_qwen_image_pipeline

    pipe = build_qwen_image_pipeline(num_layers=QWEN_LAYERS, num_heads=QWEN_HEADS, head_dim=QWEN_HEAD_DIM,
                                     text_encoder=False)
    # the tiny builder's 16-wide text states; real Qwen-Image takes 3584-wide Qwen2.5-VL states
    text_dim = pipe.transformer.config.joint_attention_dim
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    texts = [torch.randn(1, args.t5_tokens, text_dim, generator=g) for _ in range(2)]
    texts += [torch.ones(1, args.t5_tokens, dtype=torch.long)] * 2  # unpadded: the pipeline passes no mask
    n, k = QWEN_LAYERS, 2 * QWEN_LAYERS // 3
    image_tokens = (QWEN_PX // 8) ** 2
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
    print(f"QwenImageTransformer2DModel: {n} dual-stream layers x {QWEN_HEADS} heads x {QWEN_HEAD_DIM} "
          f"(hidden {QWEN_HEADS * QWEN_HEAD_DIM}), {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.1f}M params")
    print(f"tokens per row: {args.t5_tokens} text + {image_tokens} image = {args.t5_tokens + image_tokens}; "
          f"true CFG {QWEN_TRUE_CFG} = 2 calls of 1 row a step (cond, uncond), rescaled to the conditional norm")
    print(f"PAG/HeadGuidance s={PAG_SCALE}, u=1, all heads of layer {k} (2/3 depth), joint scope")
    print(f"{args.rounds} rounds x {args.steps} steps per call ({args.steps - 1} timed steps per call)")
    print(f"load average before timing: {open('/proc/loadavg').read().split()[0]} ({os.cpu_count()} CPUs)\n")

    def ours(share):
        edit = da.HeadGuidance(heads=[f"L{k}"], scale=PAG_SCALE, u=1.0, share_prefix=share)
        fork = k if share else 0
        return Config(f"ours L{k} share_prefix={share}", pipe, edit, row_blocks=n + fork + 2 * (n - fork))

    baseline = f"diffusers PAG guider blocks.{k}"
    configs = [
        Config(f"stock true CFG ({QWEN_TRUE_CFG})", pipe, row_blocks=2 * n),
        Config(baseline, pipe, kwargs={"diffusers_pag": k}, row_blocks=3 * n),
        ours(False),
        ours(True),
    ]
    if not args.quick:
        for cfg in configs:
            qwen_run(cfg, 2, texts)
    intervals = {c.name: [] for c in configs}
    per_round = {c.name: [] for c in configs}
    latents = {}
    cpu_before = _cpu_ticks()
    for r in range(args.rounds):
        for cfg in configs[r % len(configs):] + configs[: r % len(configs)]:
            dt, lat = qwen_run(cfg, args.steps, texts)
            intervals[cfg.name] += dt
            per_round[cfg.name].append(tuple(statistics.median(x) for x in zip(*dt)))
            latents.setdefault(cfg.name, lat)
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    busy, steal = _busy_and_steal(cpu_before, _cpu_ticks())
    print(f"load average after timing: {open('/proc/loadavg').read().split()[0]}; during timing all CPUs were "
          f"{busy:.0%} busy (this benchmark uses {args.threads} of {os.cpu_count()}), steal {steal:.0%}\n")
    print(timing_table(configs, intervals, per_round, baseline)[0])
    print()
    print(check_equivalence(latents, [(f"ours L{k} share_prefix=True", baseline), (f"ours L{k} share_prefix=False", baseline)]))


# --------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class MemoryCase:
    backend: str  # "plain" (torch SDPA itself), "sdpa" or "reference"
    batch: int = 1
    scope: str = "joint"
    heads: int = 0  # perturbed heads (the first ones) of each perturbed row
    u: float = 0.0
    rows: tuple = (0,)  # perturbed rows

    @property
    def plain_name(self) -> str:
        return f"plain SDPA, B={self.batch}"


MEMORY_CASES = {
    "plain SDPA, B=1": MemoryCase("plain"),
    "sdpa SoftPAG joint, 2/6 heads u=0.5": MemoryCase("sdpa", heads=2, u=0.5),
    "sdpa SoftPAG joint, 3/6 heads u=0.5": MemoryCase("sdpa", heads=3, u=0.5),
    "sdpa SoftPAG image, 3/6 heads u=0.5": MemoryCase("sdpa", scope="image", heads=3, u=0.5),
    "sdpa PAG joint, 6/6 heads u=1": MemoryCase("sdpa", heads=6, u=1.0),
    "sdpa PAG image, 6/6 heads u=1": MemoryCase("sdpa", scope="image", heads=6, u=1.0),
    "reference SoftPAG joint, 3/6 heads u=0.5": MemoryCase("reference", heads=3, u=0.5),
    "reference SoftPAG image, 3/6 heads u=0.5": MemoryCase("reference", scope="image", heads=3, u=0.5),
    # the call HeadGuidance makes at a perturbed layer: [uncond, cond, perturbed cond]
    "plain SDPA, B=3": MemoryCase("plain", batch=3),
    "sdpa guided call B=3, row 3 joint 6/6 u=1": MemoryCase("sdpa", batch=3, heads=6, u=1.0, rows=(2,)),
    "sdpa guided call B=3, row 3 image 6/6 u=1": MemoryCase("sdpa", batch=3, scope="image", heads=6, u=1.0, rows=(2,)),
}
QUICK_MEMORY_CASES = [
    "plain SDPA, B=1",
    "sdpa SoftPAG joint, 3/6 heads u=0.5",
    "sdpa SoftPAG image, 3/6 heads u=0.5",
    "reference SoftPAG joint, 3/6 heads u=0.5",
]
MEM_HEADS, MEM_IMAGE, MEM_TEXT, MEM_DIM = 6, 4096, 77, 64


def _import_kernels():
    """dit_attn.kernels without running dit_attn/__init__ (which imports diffusers: ~5 s per subprocess)."""
    import importlib.util
    import types

    if "dit_attn" not in sys.modules:
        package = types.ModuleType("dit_attn")
        package.__path__ = list(importlib.util.find_spec("dit_attn").submodule_search_locations)
        sys.modules["dit_attn"] = package
    import dit_attn.kernels

    return dit_attn.kernels


def _rss_kb() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {key: int(re.search(key + r":\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def _attention_call(case: MemoryCase, seq_len: int, image_tokens: int):
    """(inputs, a zero-argument function running the case on them)."""
    kernels = _import_kernels()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(case.batch, MEM_HEADS, seq_len, MEM_DIM, generator=g) for _ in range(3))
    if case.backend == "plain":
        return (q, k, v), lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    u = torch.zeros(case.batch, MEM_HEADS)
    u[list(case.rows), : case.heads] = case.u
    plan = kernels.AttentionPlan((kernels.Perturbation(u, "identity", case.scope),), image_tokens=(0, image_tokens))
    return (q, k, v), lambda: kernels.attention(q, k, v, plan, backend=case.backend)


def memory_case(name: str) -> dict:
    """Runs in a subprocess: peak extra RSS of one attention call at full size, in MB."""
    case = MEMORY_CASES[name]
    _, warm = _attention_call(case, 256 + MEM_TEXT, 256)
    warm()  # same code path on a small sequence: code pages, thread pool, allocator state
    del warm
    inputs, run = _attention_call(case, MEM_IMAGE + MEM_TEXT, MEM_IMAGE)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = _rss_kb()["VmRSS"]
    out = run()
    peak = _rss_kb()["VmHWM"]
    input_mb = sum(x.numel() * x.element_size() for x in inputs) / 2**20
    return {"extra_mb": (peak - before) / 1024, "input_mb": input_mb, "out_mb": out.numel() * out.element_size() / 2**20}


def measure_memory(name: str, threads: int, repeats: int) -> dict:
    """Median over `repeats` fresh subprocesses (the allocator's reuse of freed pages varies a little)."""
    cmd = [sys.executable, __file__, "--memory-case", name, "--threads", str(threads)]
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout) for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def memory_table(names: list[str], threads: int, repeats: int) -> str:
    results = {}
    for name in names:
        # the reference path is ~100x plain: one run is enough to show it
        results[name] = measure_memory(name, threads, 1 if MEMORY_CASES[name].backend == "reference" else repeats)
    s = MEM_IMAGE + MEM_TEXT
    one = results["plain SDPA, B=1"]
    lines = [
        f"H={MEM_HEADS}, S={MEM_IMAGE}+{MEM_TEXT}={s}, D={MEM_DIM}, fp32, {threads} thread(s); per batch row: "
        f"q,k,v = {one['input_mb']:.1f} MB, output = {one['out_mb']:.1f} MB, one H·S² map = {MEM_HEADS * s * s * 4 / 2**20:.0f} MB; "
        f"median of {repeats} fresh processes per case (reference: 1)",
        "",
        "| case | extra MB (peak - before call) | extra / plain | total MB (inputs + extra) | total / plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        plain = results[MEMORY_CASES[name].plain_name]
        total, plain_total = r["input_mb"] + r["extra_mb"], plain["input_mb"] + plain["extra_mb"]
        lines.append(
            f"| {name} | {r['extra_mb']:.1f} | {r['extra_mb'] / plain['extra_mb']:.2f} | {total:.1f} | {total / plain_total:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _cpu_ticks() -> list[int]:
    """Aggregate CPU ticks from /proc/stat: user nice system idle iowait irq softirq steal."""
    return [int(x) for x in open("/proc/stat").readline().split()[1:9]]


def _busy_and_steal(before: list[int], after: list[int]) -> tuple[float, float]:
    delta = [b - a for a, b in zip(before, after)]
    total = max(1, sum(delta))
    return 1 - (delta[3] + delta[4]) / total, delta[7] / total


def check_equivalence(latents: dict, pairs: list[tuple[str, str]]) -> str:
    lines = []
    for ours, theirs in pairs:
        diff = (latents[ours] - latents[theirs]).abs().max().item()
        scale = latents[theirs].abs().max().item()
        lines.append(f"max |ours - diffusers PAG| final latents, {ours}: {diff:.2e} (latents max |x| {scale:.2f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 60 s): 1 round of 3 steps, no warm-up, 4 memory cases")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps per pipeline call (N-1 timed intervals)")
    parser.add_argument("--t5-tokens", type=int, default=77, help="max_sequence_length: zero T5 tokens after 16 CLIP")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)  # internal: one memory case in this process
    parser.add_argument("--family", choices=("sd3", "qwen_image"), default="sd3",
                        help="qwen_image: the Qwen-Image-shaped step timing only (--t5-tokens sets its text tokens)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case)))
        return
    if args.quick:
        args.rounds, args.steps = 1, 3
    if args.family == "qwen_image":
        qwen_section(args)
        return

    import diffusers

    pipe, pag = build_pipelines()
    text_tokens = pipe.tokenizer.model_max_length + args.t5_tokens
    image_tokens = (LATENT // 2) ** 2
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
    print(
        f"SD3Transformer2DModel: {NUM_LAYERS} layers x {NUM_HEADS} heads x {HEAD_DIM} (hidden {NUM_HEADS * HEAD_DIM}), "
        f"qk_norm=None, {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.1f}M params"
    )
    print(
        f"tokens per row: {image_tokens} image + {text_tokens} text ({pipe.tokenizer.model_max_length} CLIP + "
        f"{args.t5_tokens} zero T5) = {image_tokens + text_tokens}; 1 prompt: CFG = 2 rows, CFG+PAG = 3 rows"
    )
    print(f"CFG g={CFG_SCALE}, PAG/HeadGuidance s={PAG_SCALE}, u=1; layer {PAG_LAYER} = 2/3 depth")
    print(f"{args.rounds} rounds x {args.steps} steps per call ({args.steps - 1} timed steps per call)")
    print(f"load average before timing: {open('/proc/loadavg').read().split()[0]} ({os.cpu_count()} CPUs)\n")
    cpu_before = _cpu_ticks()

    configs = make_configs(pipe, pag)
    intervals, per_round, latents, seen = time_configs(configs, args.rounds, args.steps, args.t5_tokens, warmup=not args.quick)
    busy, steal = _busy_and_steal(cpu_before, _cpu_ticks())
    print(f"load average after timing: {open('/proc/loadavg').read().split()[0]}; during timing all CPUs were "
          f"{busy:.0%} busy (this benchmark uses {args.threads} of {os.cpu_count()}), steal {steal:.0%}")
    baseline = f"diffusers PAG blocks.{PAG_LAYER}"
    for layer in (PAG_LAYER, 0):
        print(f"diffusers PAG blocks.{layer} processors: {seen[f'diffusers PAG blocks.{layer}']}")
    print()
    table, ratios = timing_table(configs, intervals, per_round, baseline)
    print(table)
    for name, target in (
        (f"ours L{PAG_LAYER} scope=image share_prefix=False", 1.0),
        (f"ours L{PAG_LAYER} scope=image share_prefix=True", 0.85),
        (f"ours L{PAG_LAYER} scope=joint share_prefix=True", 0.85),
    ):
        wall, cpu = ratios[name]
        print(f"target {name} <= {target}: wall {wall:.3f} ({'meets' if wall <= target else 'MISSES'}), "
              f"CPU {cpu:.3f} ({'meets' if cpu <= target else 'MISSES'})")
    print()
    print(
        check_equivalence(
            latents,
            [
                (f"ours L{PAG_LAYER} scope=image share_prefix=True", baseline),
                (f"ours L{PAG_LAYER} scope=image share_prefix=False", baseline),
                ("ours L0 scope=image share_prefix=True", "diffusers PAG blocks.0"),
            ],
        )
    )
    if not args.skip_memory:
        print()
        names, repeats = (QUICK_MEMORY_CASES, 1) if args.quick else (list(MEMORY_CASES), 3)
        print(memory_table(names, args.threads, repeats))
        print("target: sdpa SoftPAG path <= 1.1x plain SDPA (see the ratio columns)")


if __name__ == "__main__":
    main()
