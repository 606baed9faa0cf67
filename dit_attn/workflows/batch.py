"""Batch generation: prompt files, per-item settings and edits, shards, and a manifest that makes reruns resume.

An item is finished when its manifest line exists; its PNG is written atomically before
that line, so a killed run leaves no partial file and a rerun redoes only what is missing.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

from ..edits import HeadGuidance, LocalAttention
from ..io import parse_heads, parse_size, slug, write_png_atomic

SETTING_TYPES = {
    "seed": int, "steps": int, "cfg": float, "pag_scale": float, "u": float, "start": float, "end": float,
    "heads": str, "target": str, "scope": str, "size": str,
    "local_radius": float, "local_downsample": int, "local_weights": str,
}


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
    unknown = set(record) - set(SETTING_TYPES) - {"prompt"}
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; valid: prompt, {', '.join(SETTING_TYPES)}")
    out = {}
    for key, value in record.items():
        if key == "prompt" or value in (None, ""):
            continue
        if key == "heads" and isinstance(value, list):
            value = ",".join(map(str, value))
        if key == "size" and isinstance(value, list) and len(value) == 2:
            value = f"{value[0]}x{value[1]}"  # [width, height]
        out[key] = _convert(key, value)
    return out


def _convert(key: str, value):
    kind = SETTING_TYPES[key]
    bad = isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer())
    try:
        if bad:
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from None


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


def item_settings(base: dict, item: Item) -> dict:
    """The full settings of one item: the run's settings, then the item's own overrides.
    `base` holds the keys of SETTING_TYPES plus model and dtype; size is (height, width) or None."""
    settings = {"prompt": item.prompt, **base, "seed": base["seed"] + item.index}
    settings.update(item.overrides)
    size = settings.pop("size")
    if isinstance(size, str):
        size = parse_size(size)
    settings["height"], settings["width"] = size or (None, None)
    settings["heads"] = parse_heads(settings["heads"]) if isinstance(settings["heads"], str) else settings["heads"]
    return settings


def edits_for(settings: dict) -> tuple:
    """The edits settings ask for: head guidance and/or CLEAR local attention (none: the stock model)."""
    edits = []
    if settings.get("heads"):
        edits.append(HeadGuidance(
            heads=settings["heads"], scale=settings["pag_scale"], u=settings["u"], target=settings["target"],
            scope=settings["scope"], start=settings["start"], end=settings["end"],
        ))
    radius, downsample, weights = (settings.get(k) for k in ("local_radius", "local_downsample", "local_weights"))
    if radius is not None:
        edits.append(LocalAttention(radius, downsample=downsample, weights=weights))
    elif downsample is not None or weights is not None:
        raise ValueError("local downsample and weights need a local attention radius (--local-radius): set the radius too")
    return tuple(edits)


def pipeline_kwargs(settings: dict) -> dict:
    """The pipeline-call keyword arguments of settings (None values: the pipeline's default)."""
    from ..loading import call_options

    size = (settings["height"], settings["width"]) if settings.get("height") else None
    return {"num_inference_steps": settings["steps"], **call_options(settings["cfg"], size)}


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

    `base`: the run's settings (see `item_settings`). Items whose own settings are bad, or
    whose call fails (e.g. out of memory at one size), are reported and the rest go on.
    """
    import torch
    from tqdm.auto import tqdm

    from ..handle import apply
    from ..loading import call_defaults, load_pipeline

    items = shard(items, num_shards, shard_index)
    edits_for(item_settings(base, Item(0, "")))  # bad run settings fail before loading a model
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
    run_edits = edits_for(item_settings(base, Item(0, "")))
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
                images = pipe([item.prompt for item, _, _ in group], generator=generators, **call_defaults(pipe),
                              **pipeline_kwargs(settings)).images
            except (ValueError, TypeError, RuntimeError) as err:
                report.failed.extend((item, f"{type(err).__name__}: {err}") for item, _, _ in group)
                bar.update(len(group))
                continue
            for (item, own_settings, _), image in zip(group, images):
                name = item_file(item)
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
