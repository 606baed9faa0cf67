"""Batch generation bookkeeping: prompt files, shards, and a manifest that makes reruns resume.

An item is finished when its manifest line exists; its PNG is written atomically before
that line, so a killed run leaves no partial file and a rerun redoes only what is missing.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

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
