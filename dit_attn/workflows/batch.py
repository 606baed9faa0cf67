"""Batch generation: prompt files, per-item settings and edits, shards, and a manifest that makes reruns resume.

An item is finished when its manifest line exists; its PNG is written atomically before
that line, so a killed run leaves no partial file and a rerun redoes only what is missing.

Stored settings (a PNG's `dit-attn` chunk, a manifest line, from `dit-attn generate` and the
app alike) use diffusers' names and hold the edits themselves:
{"prompt", "model", "seed", "num_inference_steps", "guidance_scale", "height", "width", "dtype",
"max_sequence_length" (only when set), "edits": [edit.to_dict(), ...]}; `regenerate` rebuilds
an image from them.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass, field

from ..edits import HeadGuidance, LocalAttention, edit_from_dict
from ..io import parse_heads, parse_size, read_png_settings, slug, write_png_atomic

# Per-line settings of a prompt file (and the run's options of `dit-attn generate`, flag --x-y = key x_y).
# The HeadGuidance options are stored as that edit's fields (pag_scale as its "scale"), the local ones
# as LocalAttention's (radius, downsample, weights).
CALL_SETTINGS = {"seed": int, "num_inference_steps": int, "guidance_scale": float, "height": int, "width": int,
                 "max_sequence_length": int}
EDIT_OPTIONS = {"heads": str, "pag_scale": float, "u": float, "target": str, "scope": str, "start": float, "end": float,
                "local_radius": float, "local_downsample": int, "local_weights": str}
SETTING_TYPES = {**CALL_SETTINGS, **EDIT_OPTIONS}
ALIASES = {"steps": "num_inference_steps", "cfg": "guidance_scale"}  # older names, still read
SIZE_ALIAS = "size"  # N, "WIDTHxHEIGHT" or [width, height]: sets height and width


@dataclass(frozen=True)
class Item:
    index: int  # position among the file's valid prompts: fixes the file name and the default seed
    prompt: str
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def _overrides(record: dict) -> dict:
    valid = {"prompt", *SETTING_TYPES, *ALIASES, SIZE_ALIAS}
    unknown = set(record) - valid
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; valid: prompt, {', '.join(SETTING_TYPES)} "
                         f"(older names: {', '.join(ALIASES)}, {SIZE_ALIAS})")
    given = {k: v for k, v in record.items() if k != "prompt" and v not in (None, "")}
    out = {}
    for key, value in given.items():
        if key == SIZE_ALIAS:
            if "height" in given or "width" in given:
                raise ValueError("give size or height/width, not both")
            if isinstance(value, list) and len(value) == 2:
                value = f"{value[0]}x{value[1]}"  # [width, height]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ValueError(f"size must be N, 'WIDTHxHEIGHT' or [width, height], got {value!r}")
            out["height"], out["width"] = parse_size(str(value))
            continue
        name = ALIASES.get(key, key)
        if name != key and name in given:
            raise ValueError(f"give {key} or {name}, not both")
        if name == "heads" and isinstance(value, list):
            value = ",".join(map(str, value))
        out[name] = _convert(name, value, key)
    return out


def _convert(key: str, value, label: str | None = None):
    """`value` as the type of setting `key`; errors name it as written (`label`, e.g. an older name)."""
    kind = SETTING_TYPES[key]
    bad = isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer())
    try:
        if bad:
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label or key} must be {kind.__name__}, got {value!r}") from None


def _prompt(record: dict) -> str:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty 'prompt'")
    return prompt.strip()


def read_prompts(path: str) -> tuple[list[Item], list[BadLine]]:
    """Items from a .txt (one prompt a line, '#' comments), .jsonl (objects with "prompt" and
    per-line settings) or .csv (a "prompt" column and optional setting columns) file."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".txt", ".jsonl", ".csv"):
        raise ValueError(f"prompt file must be .txt, .jsonl or .csv, got {path!r}")
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    records: list[tuple[int, dict | Exception]] = []
    if extension == ".txt":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                records.append((number, {"prompt": line}))
    elif extension == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must be a JSON object")
                records.append((number, record))
            except ValueError as err:
                records.append((number, err))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: the CSV header needs a 'prompt' column")
        for row in reader:
            records.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    items, bad = [], []
    for number, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            items.append(Item(len(items), _prompt(record), _overrides(record)))
        except ValueError as err:
            bad.append(BadLine(number, str(err)))
    return items, bad


def shard(items: list[Item], num_shards: int, shard_index: int) -> list[Item]:
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index must be in [0, {num_shards - 1}] for {num_shards} shards, got {shard_index}")
    return [item for item in items if item.index % num_shards == shard_index]


class Manifest:
    """Append-only JSON-lines record of finished items, one file per shard."""

    def __init__(self, directory: str, num_shards: int = 1, shard_index: int = 0):
        self.directory = directory
        name = "manifest.jsonl" if num_shards == 1 else f"manifest-{shard_index:03d}-of-{num_shards:03d}.jsonl"
        self.path = os.path.join(directory, name)
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """A kill in the middle of an append leaves a last line without its newline: drop it."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(keep)
            os.replace(tmp, self.path)

    def finished(self) -> set[str]:
        """Files recorded by any shard's manifest in the directory."""
        done = set()
        for name in os.listdir(self.directory):
            if name.startswith("manifest") and name.endswith(".jsonl"):
                with open(os.path.join(self.directory, name)) as f:
                    for line in f:
                        try:
                            done.add(json.loads(line)["file"])
                        except (ValueError, KeyError):
                            continue
        return done

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def item_file(item: Item) -> str:
    """The PNG name of an item: its index fixes the order, the slug makes it readable."""
    return f"{item.index:05d}-{slug(item.prompt)}.png"


def stored_settings(prompt: str, *, model: str, seed: int, num_inference_steps: int, guidance_scale: float | None = None,
                    height: int | None = None, width: int | None = None, dtype: str = "float32",
                    max_sequence_length: int | None = None, edits=()) -> dict:
    """The settings a PNG and a manifest line store (None: the pipeline's default); `edits` as objects."""
    settings = {"prompt": prompt, "model": model, "seed": seed, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "height": height, "width": width, "dtype": dtype}
    if max_sequence_length is not None:
        settings["max_sequence_length"] = max_sequence_length
    settings["edits"] = [edit.to_dict() for edit in edits]
    return settings


def item_settings(base: dict, item: Item) -> dict:
    """The stored settings of one item: the run's options, then the item's own overrides.

    `base` holds the keys of SETTING_TYPES plus model and dtype (see `cli.generate.run_settings`);
    the edit options become the edits (`edits_from_options`), which check their fields here.
    """
    options = {**base, "seed": base["seed"] + item.index, **item.overrides}
    return stored_settings(item.prompt, model=options["model"], dtype=options["dtype"],
                           edits=edits_from_options(options), **{k: options.get(k) for k in CALL_SETTINGS})


def edits_from_options(options: dict) -> tuple:
    """The edits the options ask for: head guidance and/or CLEAR local attention (none: the stock model)."""
    edits = []
    heads = options.get("heads")
    if isinstance(heads, str):
        heads = parse_heads(heads)
    if heads:
        edits.append(HeadGuidance(
            heads=heads, scale=options.get("pag_scale", 3.0), u=options.get("u", 1.0),
            target=options.get("target", "identity"), scope=options.get("scope", "joint"),
            start=options.get("start", 0.0), end=options.get("end", 1.0),
        ))
    radius, downsample, weights = (options.get(k) for k in ("local_radius", "local_downsample", "local_weights"))
    if radius is not None:
        edits.append(LocalAttention(radius, downsample=downsample, weights=weights))
    elif downsample is not None or weights is not None:
        raise ValueError("local downsample and weights need a local attention radius (--local-radius): set the radius too")
    return tuple(edits)


def edits_for(settings: dict) -> tuple:
    """The edits of stored settings (their "edits" list rebuilt with `edit_from_dict`)."""
    return tuple(edit_from_dict(data) for data in settings.get("edits") or ())


def pipeline_kwargs(settings: dict) -> dict:
    """The pipeline-call keyword arguments of stored settings (None values: the pipeline's default)."""
    kwargs = {"num_inference_steps": settings["num_inference_steps"]}
    for key in ("guidance_scale", "height", "width", "max_sequence_length"):
        if settings.get(key) is not None:
            kwargs[key] = settings[key]
    return kwargs


def with_image_size(settings: dict, image) -> dict:
    """Settings that record the size the model drew (its default where none was given)."""
    return {**settings, "height": image.height, "width": image.width}


def render(pipe, settings: dict, **call):
    """The image of stored settings on `pipe`: one seeded call with their edits applied for it.

    `call`: further pipeline-call arguments that do not change the image (e.g. callback_on_step_end).
    """
    import torch

    from ..handle import apply
    from ..loading import call_defaults

    edits = edits_for(settings)
    generator = torch.Generator(device="cpu").manual_seed(settings["seed"])
    with apply(pipe, *edits) if edits else contextlib.nullcontext():
        return pipe(settings["prompt"], generator=generator,
                    **{**call_defaults(pipe), **pipeline_kwargs(settings), **call}).images[0]


def regenerate(png_path: str | os.PathLike, pipe=None, *, device: str | None = None):
    """The image a dit-attn PNG (from `dit-attn generate` or the app) was made from, generated again from its
    `dit-attn` settings chunk: the edits rebuilt, the model loaded (model, dtype; on `device`) unless `pipe` is
    given. Same model, software and device give the same pixels, for images made one per pipeline call
    (`--batch-size` above 1 changes float rounding)."""
    settings = read_png_settings(png_path)
    missing = [k for k in ("prompt", "model", "seed", "num_inference_steps", "edits") if k not in settings]
    if missing:
        raise ValueError(f"{os.fspath(png_path)!r}: its settings lack {missing} (written by an older dit-attn?)")
    if pipe is None:
        from ..loading import load_pipeline

        pipe = load_pipeline(settings["model"], dtype=settings.get("dtype") or "float32", device=device)
        pipe.set_progress_bar_config(disable=True)
    return render(pipe, settings)


def batches(ready: list, size: int) -> list[list]:
    """Consecutive (item, settings, edits) entries whose settings differ only in prompt and seed, at most `size` a batch."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    groups: list[list] = []
    last_key = None
    for entry in ready:
        key = {k: v for k, v in entry[1].items() if k not in ("prompt", "seed")}
        if groups and len(groups[-1]) < size and key == last_key:
            groups[-1].append(entry)
        else:
            groups.append([entry])
        last_key = key
    return groups


@dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (item, reason)


def generate_batch(items: list[Item], base: dict, out: str, *, batch_size: int = 1, num_shards: int = 1,
                   shard_index: int = 0, device: str | None = None, progress: bool = True) -> BatchReport:
    """Generate this shard's items into `out` (PNG + manifest line each), skipping finished ones.

    `base`: the run's options (see `item_settings`). Items whose own settings are bad, or
    whose call fails (e.g. out of memory at one size), are reported and the rest go on.
    """
    import torch
    from tqdm.auto import tqdm

    from ..handle import apply
    from ..loading import call_defaults, load_pipeline

    items = shard(items, num_shards, shard_index)
    run_edits = edits_for(item_settings(base, Item(0, "")))  # bad run settings fail before loading a model
    os.makedirs(out, exist_ok=True)
    tmp_prefix = f".partial-{shard_index}-of-{num_shards}-"
    for name in os.listdir(out):  # left by a killed run of this shard
        if name.startswith(tmp_prefix) and name.endswith(".tmp"):
            os.unlink(os.path.join(out, name))
    manifest = Manifest(out, num_shards, shard_index)
    finished = manifest.finished()
    todo = [item for item in items if item_file(item) not in finished]
    report = BatchReport(skipped=len(items) - len(todo))
    if not todo:
        return report
    pipe = load_pipeline(base["model"], dtype=base["dtype"], device=device)
    pipe.set_progress_bar_config(disable=True)
    if run_edits:
        apply(pipe, *run_edits).remove()  # heads or layers outside the model fail here, once
    ready = []
    for item in todo:
        try:
            settings = item_settings(base, item)
            ready.append((item, settings, edits_for(settings)))
        except (ValueError, TypeError) as err:
            report.failed.append((item, str(err)))
    handle, handle_edits = None, ()
    bar = tqdm(total=len(ready), desc="generate", unit="image", disable=not progress)
    try:
        for group in batches(ready, batch_size):
            edits, settings = group[0][2], group[0][1]
            try:
                if edits != handle_edits:
                    if handle is not None:
                        handle.remove()
                    handle, handle_edits = None, ()  # stays so if apply fails
                    if edits:
                        handle = apply(pipe, *edits)
                    handle_edits = edits
                generators = [torch.Generator(device="cpu").manual_seed(s["seed"]) for _, s, _ in group]
                images = pipe([item.prompt for item, _, _ in group], generator=generators,
                              **{**call_defaults(pipe), **pipeline_kwargs(settings)}).images
            except (ValueError, TypeError, RuntimeError) as err:
                report.failed.extend((item, f"{type(err).__name__}: {err}") for item, _, _ in group)
                bar.update(len(group))
                continue
            for (item, own_settings, _), image in zip(group, images):
                name = item_file(item)
                own_settings = with_image_size(own_settings, image)
                write_png_atomic(image, os.path.join(out, name), own_settings, tmp_prefix)
                manifest.append({"file": name, **own_settings})
                report.done += 1
            bar.update(len(group))
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    return report


def shard_from_launcher(num_shards: int, shard_index: int) -> tuple[int, int]:
    """Under `accelerate launch --num_processes N` (or torchrun) each process takes its own shard.

    Read from the launcher's RANK / WORLD_SIZE: no process group is needed to split work,
    and accelerate's state reports a single process on a CPU-only machine.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if num_shards == 1 and world > 1:
        return world, int(os.environ.get("RANK", "0"))
    return num_shards, shard_index
