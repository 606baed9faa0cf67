"""`dit-attn train-tiny`, `dit-attn train-lora` and `dit-attn distill-clear`: one option per training setting."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from ..io import parse_layer_groups
from ..train.config import LORA_MODES, LORA_TARGETS, DistillConfig, LoraTrainConfig, TrainConfig
from .common import DEMO, TINY, check_input_file, check_out_dir, check_out_file, finite_float, load, warn_skipped

BACKENDS = ("auto", "triton", "tiled", "flex", "reference")


def add_config_options(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of a config dataclass: --field-name with the field's type and default."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        option = f"--{f.name.replace('_', '-')}"
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        base = next((t for t in (int, float, str) if kind is t or kind == (t | None)), str)
        base = finite_float if base is float else base  # no setting wants nan or inf
        if f.default is dataclasses.MISSING:
            parser.add_argument(option, type=base, required=True)
        else:
            parser.add_argument(option, type=base, default=f.default)


def config_from(args: argparse.Namespace, config: type, **overrides):
    names = {f.name for f in dataclasses.fields(config)}
    return config(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def check_work_and_out(args, out_is_file: bool = False) -> None:
    """--work and --out (and --package) can be written, before any data is rendered or a model loads."""
    check_out_dir("--work", args.work)
    if out_is_file:
        check_out_file("--out", args.out, "clear.safetensors")
    else:
        check_out_dir("--out", args.out)
    if getattr(args, "package", None):
        check_out_dir("--package", args.package)


def cmd_train_tiny(args) -> int:
    from ..limits import whole_number
    from ..toy.tiny import export_half
    from ..train.tiny import train_tiny

    whole_number("--images", args.images, 1)
    for flag in ("batch", "vae_batch", "threads", "checkpoint_every", "layers"):
        whole_number("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    check_work_and_out(args)
    train_tiny(config_from(args, TrainConfig), args.work, args.out, restart=args.restart)
    if args.package:
        export_half(args.out, args.package)
    return 0


def check_train_numbers(cfg) -> None:
    """A trainer's image size and seed against the limits (the config checks its own counts)."""
    from ..limits import check_pixels, check_seed

    check_seed(cfg.seed, "--seed")
    if getattr(cfg, "size", None) is not None:
        try:
            check_pixels(cfg.size, cfg.size)
        except ValueError as err:
            raise ValueError(f"--size: {err}") from None
    if getattr(cfg, "sample_steps", None) is not None:
        from ..limits import check_steps

        check_steps(cfg.sample_steps, "--sample-steps")


def cmd_distill_clear(args) -> int:
    from ..train.distill_clear import distill
    from ..workflows.batch import read_prompts

    cfg = config_from(args, DistillConfig)
    check_train_numbers(cfg)
    check_work_and_out(args, out_is_file=True)
    prompts = None
    if args.prompts:
        items, bad = read_prompts(check_input_file("--prompts", args.prompts))
        warn_skipped(args.prompts, bad)
        prompts = [item.prompt for item in items]
    summary = distill(load(args), cfg, args.work, args.out, prompts, restart=args.restart)
    print(f"dit-attn distill-clear: {summary['steps']} steps, last loss {summary['losses'][-1]:.4f} -> {args.out}")
    return 0


def cmd_train_lora(args) -> int:
    from ..train.lora import train_lora, write_sign_data

    layers = tuple(i for group in parse_layer_groups(args.layers) for i in group) if args.layers else ()
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    cfg = config_from(args, LoraTrainConfig, layers=layers, targets=targets)
    check_train_numbers(cfg)
    check_work_and_out(args)
    if args.make_signs or args.make_sets:
        check_out_dir("--data", args.data)
    elif not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data!r}: data directory not found (give a folder of captioned images, or --make-signs N)")
    if args.make_signs:
        write_sign_data(args.data, args.make_signs, args.seed)
    if args.make_sets:
        from ..ic.data import write_set_data

        write_set_data(args.data, args.make_sets, args.seed)
    args.model = args.model or (TINY if cfg.mode == "ic" else DEMO)
    summary = train_lora(load(args), cfg, args.data, args.work, args.out, restart=args.restart)
    share = summary["lora_parameters"] / summary["transformer_parameters"]
    print(f"dit-attn train-lora: {summary['mode']} LoRA on layers {summary['layers']}, {summary['lora_parameters']} "
          f"parameters ({share:.3%} of the transformer), last loss {summary['losses'][-1]:.4f} -> {summary['out']}")
    return 0


def add_restart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--restart", action="store_true",
                        help="discard the checkpoints in --work and start over (a rerun otherwise resumes, "
                             "and stops if its settings or data differ from the checkpoint's)")


def add_commands(sub) -> None:
    tiny = sub.add_parser("train-tiny", help="train the embedded tiny model from scratch")
    tiny.add_argument("--work", required=True, help="work directory for caches and checkpoints (resume by rerunning)")
    tiny.add_argument("--out", required=True, help="where to save the trained pipeline (float32)")
    tiny.add_argument("--package", default=None,
                      help="also write the float16 copy that ships as package data (dit_attn/toy/weights/tiny)")
    add_config_options(tiny, TrainConfig)
    add_restart(tiny)
    tiny.set_defaults(func=cmd_train_tiny)

    distill = sub.add_parser("distill-clear", help="distil a model into CLEAR local attention")
    distill.add_argument("--model", default=TINY, help="pipeline directory, hub id or an embedded model name (default: tiny)")
    distill.add_argument("--work", required=True, help="directory for the teacher samples and checkpoints (rerun to resume)")
    distill.add_argument("--out", required=True, help="the .safetensors file to write (load with LocalAttention(weights=...))")
    distill.add_argument("--prompts", default=None, help="prompt file (.txt/.jsonl/.csv); default: the synthetic captions")
    distill.add_argument("--backend", default="auto", choices=BACKENDS,
                         help="attention kernel for the local windows (auto: triton on CUDA, tiled on the CPU)")
    distill.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    distill.add_argument("--device", default=None)
    add_config_options(distill, DistillConfig, skip=("backend",))
    add_restart(distill)
    distill.set_defaults(func=cmd_distill_clear)

    lora = sub.add_parser("train-lora", help="train a LoRA: text layers, all layers, or in-context sets")
    lora.add_argument("--model", default=None,
                      help=f"pipeline directory, hub id or an embedded model name (default: {TINY!r} for --mode ic, else {DEMO!r})")
    lora.add_argument("--mode", default="localized", choices=LORA_MODES,
                      help="LoRA on --layers only, on every layer, or an in-context LoRA on panel sets (every layer)")
    lora.add_argument("--layers", default="", help="the text layers, e.g. '3' or '3,4' (from dit-attn localize)")
    lora.add_argument("--targets", default=",".join(LORA_TARGETS), help="module names inside each layer's attention or block")
    lora.add_argument("--data", required=True, help="images + captions: metadata.jsonl (file_name, text) or NAME.png + NAME.txt; "
                      "--mode ic also: panels + sets.json (see dit_attn.ic.data)")
    lora.add_argument("--make-signs", type=int, default=0, help="first render N sign images of the tiny model's world into --data")
    lora.add_argument("--make-sets", type=int, default=0, help="first render N two-panel sets of the tiny model's world into --data")
    lora.add_argument("--work", required=True, help="directory for the encoded data and checkpoints (rerun to resume)")
    lora.add_argument("--out", required=True, help="directory for the LoRA (pytorch_lora_weights.safetensors)")
    lora.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    lora.add_argument("--device", default=None)
    add_config_options(lora, LoraTrainConfig, skip=("mode", "layers", "targets"))
    add_restart(lora)
    lora.set_defaults(func=cmd_train_lora)
