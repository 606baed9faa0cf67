"""`dit-attn hunt` (head search) and `dit-attn atlas` (every head's effect as a picture)."""
from __future__ import annotations

import os

from ..io import parse_heads
from .common import (TINY, add_model_options, check_call_flags, check_input_file, check_out_file, check_seeds, finite_float,
                     load, size_argument, warn_skipped)
from .generate import add_guidance_options


def search_inputs(args):
    """(objective, prompts, pipeline) of `hunt`/`atlas`; a missing objective model fails before the pipeline loads."""
    from ..guidance.objectives import differentiable_objective, get_objective
    from ..workflows.batch import read_prompts

    check_search_flags(args)
    objective = get_objective(args.objective)
    if args.command == "hunt" and args.strategy == "screen+race":
        differentiable_objective(objective, args.objective)
    items, bad = read_prompts(check_input_file("--prompts", args.prompts_file))
    warn_skipped(args.prompts_file, bad)
    if not items:
        raise ValueError(f"--prompts {args.prompts_file!r} holds no prompts")
    return objective, [item.prompt for item in items], load(args)


def check_search_flags(args) -> None:
    """The numbers and the output of `hunt`/`atlas`, before a model loads (the heads are checked once it has)."""
    from ..limits import whole_number

    check_call_flags(args)
    check_seeds("--seeds", args.seeds)
    whole_number("--batch-size", args.batch_size, 1)
    if args.command == "hunt":
        whole_number("--k", args.k, 1)
        whole_number("--rounds", args.rounds, 1)
        check_seeds("--confirm-seeds", args.confirm_seeds or ())
        if args.min_z is not None and args.min_z < 0:
            raise ValueError(f"--min-z must be >= 0 (standard errors), got {args.min_z}")
        check_out_file("--out", args.out, "hunt.json")
        if args.checkpoint:
            check_out_file("--checkpoint", args.checkpoint, "hunt.checkpoint")
    else:
        check_out_file("--out", args.out + ".json", "atlas.json")


def call_settings(args) -> dict:
    """num_inference_steps, guidance_scale, height, width of the flags (--size WIDTHxHEIGHT arrives as (height, width))."""
    height, width = args.size or (None, None)
    return {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "height": height, "width": width}


def add_call_options(parser) -> None:
    """--num-inference-steps (--steps), --guidance-scale (--cfg), --size: the pipeline call's settings."""
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=20,
                        help="denoising steps (--steps: the older name)")
    parser.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=finite_float, default=None,
                        help="classifier-free guidance scale (pipeline default if omitted; --cfg: the older name)")
    parser.add_argument("--size", type=size_argument, default=None,
                        help="N or WIDTHxHEIGHT in pixels (stored as height and width; default: the model's)")


def cmd_atlas(args) -> int:
    from ..guidance.atlas import atlas, render_html, render_png

    objective, prompts, pipe = search_inputs(args)
    result = atlas(pipe, objective, prompts, args.seeds, u=args.u, scale=args.pag_scale, **call_settings(args),
                   batch_size=args.batch_size, target=args.target, scope=args.scope,
                   max_sequence_length=args.max_sequence_length, checkpoint=args.out + ".checkpoint.json",
                   maps_word=args.maps_word)
    result.settings["objective"] = args.objective
    result.save(args.out + ".json")
    render_png(result, args.out + ".png")
    render_html(result, args.out + ".html")
    print(f"dit-attn atlas: {len(result.scores)} heads -> {args.out}.png, {args.out}.html, {args.out}.json")
    return 0


def cmd_hunt(args) -> int:
    from ..guidance.search import hunt

    objective, prompts, pipe = search_inputs(args)
    result = hunt(
        pipe, objective, prompts, args.seeds, k=args.k, rounds=args.rounds, u=args.u,
        scale=args.pag_scale, **call_settings(args),
        candidates=parse_heads(args.candidates) if args.candidates else None,
        checkpoint=args.checkpoint or args.out + ".checkpoint", batch_size=args.batch_size,
        target=args.target, scope=args.scope, max_sequence_length=args.max_sequence_length, min_z=args.min_z,
        confirm_seeds=args.confirm_seeds, confirm_top=args.confirm_top, confirm_together=args.confirm_together,
        strategy=args.strategy, race_start=args.race_start, race_z=args.race_z, race_eta=args.race_eta,
        screen_top=args.screen_top, u0=args.u0, screen_pairs=args.screen_pairs,
    )
    result.settings["objective"] = args.objective
    if int(os.environ.get("RANK", "0")) == 0:
        result.save(args.out)
        print(f"dit-attn hunt: selected {','.join(result.selected)} -> {args.out}")
    return 0


def add_search_options(parser) -> None:
    """Options shared by `hunt` and `atlas`: model, objective, prompts and the guidance used to score heads."""
    add_model_options(parser, TINY)
    parser.add_argument("--objective", required=True,
                        help="judge, judge:soft, color:<name>, clip-score[:model], pickscore[:model], aesthetic:<dir>")
    parser.add_argument("--prompts", dest="prompts_file", required=True, help="prompt file: .txt, .jsonl or .csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="each prompt is generated with each seed")
    add_guidance_options(parser)
    add_call_options(parser)
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (the tiny model needs only 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="heads scored per pipeline call")


def add_commands(sub) -> None:
    hunt = sub.add_parser("hunt", help="search the heads whose guidance serves an objective (HeadHunter)")
    add_search_options(hunt)
    hunt.add_argument("--k", type=int, default=3, help="heads added per round")
    hunt.add_argument("--rounds", type=int, default=5)
    hunt.add_argument("--min-z", type=finite_float, default=None,
                      help="a head joins only if its paired gain over the current selection exceeds this many "
                           "standard errors; the hunt stops at a round where none does (default: plain top-k)")
    hunt.add_argument("--confirm-seeds", type=int, nargs="+", default=None,
                      help="with --min-z: fresh seeds on which each round's best candidates are scored again; "
                           "only those scores decide who joins")
    hunt.add_argument("--confirm-top", type=int, default=None, help="candidates confirmed per round (default 3k)")
    hunt.add_argument("--confirm-together", action="store_true",
                      help="with --confirm-seeds: confirm each round's top k as one set (all join or none), for "
                           "heads too weak to confirm one by one")
    hunt.add_argument("--strategy", choices=("exhaustive", "race", "screen+race"), default="exhaustive",
                      help="exhaustive: every candidate on every pair; race: drop candidates clearly behind the "
                           "leader as pairs come in; screen+race: rank every head by one gradient pass first and race "
                           "the best (needs a differentiable objective: color:<name>, judge:soft)")
    hunt.add_argument("--race-start", type=int, default=None, help="race: pairs per candidate in the first stage (default 2)")
    hunt.add_argument("--race-z", type=finite_float, default=2.0,
                      help="race: drop a candidate this many standard errors below the leader (default 2)")
    hunt.add_argument("--race-eta", type=finite_float, default=2.0,
                      help="race: at most 1/ETA of the candidates go on from each stage (1: no halving; default 2)")
    hunt.add_argument("--screen-top", type=int, default=None,
                      help="screen+race: candidates that race (default: a quarter, at least 4·max(k, confirm-top))")
    hunt.add_argument("--u0", type=finite_float, default=0.0, help="screen+race: strength the gradients are taken at")
    hunt.add_argument("--screen-pairs", type=int, default=None,
                      help="screen+race: (prompt, seed) pairs the screening runs on (default: all)")
    hunt.add_argument("--candidates", default=None, help="heads to search over, e.g. 'L0,L1H2' (default: all)")
    hunt.add_argument("--checkpoint", default=None, help="resume file (default: OUT.checkpoint)")
    hunt.add_argument("--out", default="hunt.json", help="result: selected heads, every round's scores, settings")
    hunt.set_defaults(func=cmd_hunt)

    atlas = sub.add_parser("atlas", help="picture every head's effect on an objective (PNG heatmap + HTML page)")
    add_search_options(atlas)
    atlas.add_argument("--maps-word", default=None,
                       help="a word of the first prompt: each head's cross-attention map of it on the unguided image, "
                            "drawn beside the head's change (one extra generation)")
    atlas.add_argument("--out", default="atlas", help="writes OUT.png, OUT.html, OUT.json (resume: OUT.checkpoint.json)")
    atlas.set_defaults(func=cmd_atlas)
