"""Batch generation: prompt files, per-item settings and edits, shards, and a manifest that makes reruns resume.

Resume rule: an item is finished only when (1) a manifest line for its file records the settings this
run asks of it, and (2) its file is a whole PNG (every chunk's checksum through IEND) whose `dit-attn`
chunk holds that line's settings, or, for a video model, a video whose sidecar JSON holds them and whose
bytes are the ones the sidecar's SHA-256 names (`dit_attn.video`). Anything else is generated again: a missing, empty or damaged file, a
file or line made with other settings (another --seed, --heads, size, model ...). With overwrite=False
(`--no-overwrite`) an item whose PNG is a whole image made with other settings stops the run before a
model loads, naming the item and the settings that differ; missing or damaged files are still redone.
When an item is redone its new line is appended: the PNG on disk tells which of a file's lines is current.

Sizes: a line records the height and width the model drew (and a video's num_frames and fps). An item
that asks for no size (None: the model's default) matches a line only if that line's size was the model's
default too: such lines list the settings the model filled in under "model_defaults" (a key of manifest
lines only, not of the PNG chunk), e.g. "model_defaults": ["height", "width"]. An item that asks for a size matches the size drawn.
Lines written before this rule have no "model_defaults": their default-size items are redone once.

One process per output shard: a run holds an exclusive lock (fcntl.flock) on `.MANIFEST.lock` beside its
manifest, released when the process ends or is killed; a second run on the same shard stops at once.
Each image (video, then its sidecar) is written to a temporary file, flushed, renamed into place and its
folder flushed before its manifest line is appended and flushed, so a line never names a file that a crash
could lose. A video model writes videos (`video_format`: mp4, gif or webp; file names end with it).

Stored settings (a PNG's `dit-attn` chunk, a manifest line, from `dit-attn generate` and the
app alike) use diffusers' names and hold the edits themselves:
{"prompt", "model", "seed", "num_inference_steps", "guidance_scale", "height", "width", "dtype",
"max_sequence_length" (only when set), videos also "num_frames" and "fps", "edits": [edit.to_dict(), ...]};
`regenerate` rebuilds an image (or a video's frames) from them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field, replace

from ..edits import NAG, HeadGuidance, LocalAttention, edit_from_dict
from ..io import (as_stored, parse_heads, parse_radius, parse_size, read_png_settings, read_records, slug,
                  verified_png_settings, write_atomic, write_png_atomic)
from ..limits import (check_call, check_fps, check_frames, check_image_size, check_pixels, check_seed, check_steps,
                      check_video_size, number, whole_number)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, one process per --out is up to the user
    fcntl = None

# Per-line settings of a prompt file (and the run's options of `dit-attn generate`, flag --x-y = key x_y).
# The HeadGuidance options are stored as that edit's fields (pag_scale as its "scale"), the local ones
# as LocalAttention's (radius, downsample, weights).
CALL_SETTINGS = {"seed": int, "num_inference_steps": int, "guidance_scale": float, "height": int, "width": int,
                 "max_sequence_length": int, "num_frames": int}
VIDEO_SETTINGS = {"num_frames": int, "fps": float}  # video models only; stored only when set
EDIT_OPTIONS = {"heads": str, "pag_scale": float, "u": float, "target": str, "scope": str, "start": float, "end": float,
                "local_radius": float, "local_downsample": int, "local_weights": str,
                "nag_negative": str, "nag_scale": float, "nag_tau": float, "nag_alpha": float}
SETTING_TYPES = {**CALL_SETTINGS, **VIDEO_SETTINGS, **EDIT_OPTIONS}
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
    check_pixels(out.get("height"), out.get("width"))
    return out


def _convert(key: str, value, label: str | None = None):
    """`value` as the type of setting `key`, in its range; errors name it as written (`label`, e.g. an older name)."""
    kind = SETTING_TYPES[key]
    label = label or key
    if key == "local_radius":  # a number (images) or frames, height, width radii (videos)
        return parse_radius(value, label)
    bad = isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer())
    try:
        if bad:
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{label} must be {kind.__name__}, got {value!r}") from None
    if key == "fps":
        return check_fps(value, label)
    if kind is float:
        return number(label, value)  # NaN and infinities (JSON allows them) are refused
    if key == "seed":
        return check_seed(value, label)
    if key == "num_inference_steps":
        return check_steps(value, label)
    if key == "num_frames":
        return check_frames(value, label)
    if kind is int:  # height, width, max_sequence_length, local_downsample
        return whole_number(label, value, 1)
    return value


def check_settings(settings: dict) -> dict:
    """Stored settings in range before anything is allocated: a prompt, seed, steps, a finite guidance
    scale, a size within the machine's pixel budget, max_sequence_length >= 1."""
    prompt = settings.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the prompt is empty, got {prompt!r}")
    check_seed(settings["seed"])
    check_call(height=settings.get("height"), width=settings.get("width"),
               num_inference_steps=settings["num_inference_steps"], guidance_scale=settings.get("guidance_scale"))
    if settings.get("max_sequence_length") is not None:
        whole_number("max_sequence_length", settings["max_sequence_length"], 1)
    if settings.get("num_frames") is not None:
        check_frames(settings["num_frames"])
    if settings.get("fps") is not None:
        check_fps(settings["fps"])
    return settings


def _prompt(record: dict) -> str:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty 'prompt'")
    return prompt.strip()


def read_prompts(path: str) -> tuple[list[Item], list[BadLine]]:
    """Items from a .txt (one prompt a line, '#' comments), .jsonl (objects with "prompt" and
    per-line settings) or .csv (a "prompt" column and optional setting columns) file."""
    records = read_records(path, ("prompt",), what="prompt file")
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


class OutputLocked(RuntimeError):
    """Another process is generating the same shard into the same folder."""


class ResumeConflict(ValueError):
    """overwrite=False (--no-overwrite) and an item's PNG is a whole image made with other settings."""


MODEL_DEFAULTS = "model_defaults"  # manifest lines only: the settings the model filled in (the item asked None)
LINE_ONLY = ("file", MODEL_DEFAULTS)  # keys of a manifest line that are not stored settings
DRAWN = ("height", "width", "num_frames", "fps")  # recorded as made; asked None: the model's (the writer's) default


class Manifest:
    """Append-only JSON-lines record of finished items, one file per shard, and that shard's lock."""

    def __init__(self, directory: str, num_shards: int = 1, shard_index: int = 0):
        self.directory = directory
        name = "manifest.jsonl" if num_shards == 1 else f"manifest-{shard_index:03d}-of-{num_shards:03d}.jsonl"
        self.path = os.path.join(directory, name)
        self.lock_path = os.path.join(directory, f".{name}.lock")
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take this shard's lock (fcntl.flock, exclusive, not waiting): OutputLocked naming the lock file and the
        process holding it if another run has it. The kernel releases it when this process ends, even by kill -9."""
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            try:
                with open(self.lock_path) as f:
                    holder = f.read().strip()
            except OSError:
                holder = ""
            who = f"process {holder}" if holder else "another process"
            raise OutputLocked(f"{who} is already generating into {self.directory!r} (this shard's lock {self.lock_path!r} "
                               "is held); wait for it to finish, stop it, or give another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self):
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    def drop_torn_tail(self) -> None:
        """A kill in the middle of an append leaves a last line without its newline: drop it (under the lock)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            write_atomic(self.path, lambda f: f.write(keep), ".partial-manifest-")

    def records(self) -> dict[str, list[dict]]:
        """Every shard's manifest lines in the directory, by file name (in the order written per manifest)."""
        found: dict[str, list[dict]] = {}
        for name in sorted(os.listdir(self.directory)):
            if name.startswith("manifest") and name.endswith(".jsonl"):
                with open(os.path.join(self.directory, name), encoding="utf-8") as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                            found.setdefault(record["file"], []).append(record)
                        except (ValueError, KeyError, TypeError):
                            continue
        return found

    def finished(self) -> set[str]:
        """Files recorded by any shard's manifest in the directory (recorded: not yet checked, see `item_state`)."""
        return set(self.records())

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def settings_difference(asked: dict, record: dict) -> list[str]:
    """What differs between the stored settings an item asks for and a manifest line (or a PNG's chunk), each
    as 'setting: recorded value, asked value'; [] when the line is the item's. A size the item leaves to the
    model (None) matches only a line that lists it under "model_defaults"."""
    asked = as_stored(asked)
    made = {k: v for k, v in record.items() if k not in LINE_ONLY}
    defaults = set(record.get(MODEL_DEFAULTS) or ())
    differences = []
    for key in [*asked, *sorted(set(made) - set(asked))]:
        want, got = asked.get(key), made.get(key)
        if key in DRAWN and want is None:
            if key not in defaults:
                differences.append(f"{key}: {_short(got)} recorded (given then), the model's default asked")
        elif want != got:
            differences.append(f"{key}: {_short(got)} recorded, {_short(want)} asked")
    return differences


@dataclass(frozen=True)
class ItemState:
    finished: bool
    reason: str = ""  # why it is generated again ("" for a new item)
    conflict: bool = False  # a whole PNG made with other settings would be replaced (refused by --no-overwrite)


def item_state(out: str, name: str, asked: dict, records: list[dict]) -> ItemState:
    """Whether the item of file `name` in `out` is finished by the resume rule (see the module docstring).

    The PNG (or video) on disk decides which of the file's manifest lines is current (the last line whose
    settings it holds; older lines of a redone item are stale); that line must be the item's settings."""
    from ..video import verified_video_settings

    path = os.path.join(out, name)
    video = not name.endswith(".png")
    try:
        png = verified_video_settings(path) if video else verified_png_settings(path)
    except ValueError as err:
        if not os.path.lexists(path):
            return ItemState(False, f"its {'video' if video else 'PNG'} is missing" if records else "")
        what = "video with its sidecar" if video else "PNG"
        return ItemState(False, f"its file is not a whole dit-attn {what} ({err})")
    current = [r for r in records if {k: v for k, v in r.items() if k not in LINE_ONLY} == png]
    if current:
        difference = settings_difference(asked, current[-1])
        if not difference:
            return ItemState(True)
        return ItemState(False, f"made with other settings ({'; '.join(difference)})", True)
    difference = settings_difference(asked, {**png, MODEL_DEFAULTS: list(DRAWN)})  # sizes: as drawn
    if not difference:
        return ItemState(False, "its manifest line is missing")
    return ItemState(False, f"its PNG, which no manifest line records, was made with other settings "
                            f"({'; '.join(difference)})", True)


def item_file(item: Item, suffix: str = "png") -> str:
    """The file name of an item (suffix: png, or a video format): its index fixes the order, the slug makes it readable."""
    return f"{item.index:05d}-{slug(item.prompt)}.{suffix}"


def stored_settings(prompt: str, *, model: str, seed: int, num_inference_steps: int, guidance_scale: float | None = None,
                    height: int | None = None, width: int | None = None, dtype: str = "float32",
                    max_sequence_length: int | None = None, num_frames: int | None = None, fps: float | None = None,
                    edits=()) -> dict:
    """The settings a PNG (a video's sidecar) and a manifest line store (None: the pipeline's default); `edits` as objects."""
    settings = {"prompt": prompt, "model": model, "seed": seed, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "height": height, "width": width, "dtype": dtype}
    for key, value in (("max_sequence_length", max_sequence_length), ("num_frames", num_frames), ("fps", fps)):
        if value is not None:
            settings[key] = value
    settings["edits"] = [edit.to_dict() for edit in edits]
    return settings


def item_settings(base: dict, item: Item) -> dict:
    """The stored settings of one item: the run's options, then the item's own overrides.

    `base` holds the keys of SETTING_TYPES plus model and dtype (see `cli.generate.run_settings`);
    the edit options become the edits (`edits_from_options`), which check their fields here, and the
    call's settings are checked against the limits (`check_settings`).
    """
    options = {**base, "seed": base["seed"] + item.index, **item.overrides}
    return check_settings(stored_settings(item.prompt, model=options["model"], dtype=options["dtype"],
                                          edits=edits_from_options(options), fps=options.get("fps"),
                                          **{k: options.get(k) for k in CALL_SETTINGS}))


def edits_from_options(options: dict) -> tuple:
    """The edits the options ask for: head guidance, CLEAR local attention and/or NAG (none: the stock model)."""
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
    negative = options.get("nag_negative")
    if negative is not None:
        settings = {name: options[f"nag_{name}"] for name in ("scale", "tau", "alpha") if options.get(f"nag_{name}") is not None}
        edits.append(NAG(negative, **settings))
    elif any(options.get(f"nag_{name}") is not None for name in ("scale", "tau", "alpha")):
        raise ValueError("NAG's scale, tau and alpha need its negative prompt (--nag-negative): set it too")
    return tuple(edits)


def edits_for(settings: dict) -> tuple:
    """The edits of stored settings (their "edits" list rebuilt with `edit_from_dict`)."""
    return tuple(edit_from_dict(data) for data in settings.get("edits") or ())


def pipeline_kwargs(settings: dict) -> dict:
    """The pipeline-call keyword arguments of stored settings (None values: the pipeline's default)."""
    kwargs = {"num_inference_steps": settings["num_inference_steps"]}
    for key in ("guidance_scale", "height", "width", "max_sequence_length", "num_frames"):
        if settings.get(key) is not None:
            kwargs[key] = settings[key]
    return kwargs


def with_image_size(settings: dict, image) -> dict:
    """Settings that record the size the model drew (its default where none was given)."""
    return {**settings, "height": image.height, "width": image.width}


def with_video_size(settings: dict, frames: list) -> dict:
    """Settings that record the video the model made: its frames' size and count, and the fps it is written at."""
    from ..video import DEFAULT_FPS

    fps = settings.get("fps")
    return {**with_image_size(settings, frames[0]), "num_frames": len(frames),
            "fps": DEFAULT_FPS if fps is None else fps}


def makes_videos(pipe) -> bool:
    from ..families import family_of_pipeline

    return family_of_pipeline(pipe).makes_videos


def pipeline_output(pipe, result) -> list:
    """The images of a pipeline call's result, or its videos (each a list of PIL frames) for a video pipeline."""
    return result.frames if makes_videos(pipe) else result.images


def render(pipe, settings: dict, **call):
    """The image of stored settings on `pipe` (a video pipeline: the video's PIL frames): one seeded call
    with their edits applied for it.

    `call`: further pipeline-call arguments that do not change the image (e.g. callback_on_step_end).
    """
    import torch

    from ..handle import apply
    from ..loading import call_defaults, call_pipeline

    edits = edits_for(settings)
    generator = torch.Generator(device="cpu").manual_seed(settings["seed"])
    video = {"output_type": "pil"} if makes_videos(pipe) else {}
    with apply(pipe, *edits) if edits else contextlib.nullcontext():
        return pipeline_output(pipe, call_pipeline(pipe, prompt=settings["prompt"], generator=generator,
                                                   **{**call_defaults(pipe), **pipeline_kwargs(settings), **video, **call}))[0]


def regenerate(png_path: str | os.PathLike, pipe=None, *, device: str | None = None):
    """The image a dit-attn PNG (from `dit-attn generate` or the app) was made from, generated again from its
    `dit-attn` settings chunk (a video: its sidecar's settings; the result is its PIL frames): the edits rebuilt,
    the model loaded (model, dtype; on `device`) unless `pipe` is given. Same model, software and device give
    the same pixels, for images made one per pipeline call (`--batch-size` above 1 changes float rounding)."""
    from ..video import read_video_settings

    if os.fspath(png_path).lower().endswith(".png"):
        settings = read_png_settings(png_path)
    else:
        settings = read_video_settings(png_path)["settings"]
    missing = [k for k in ("prompt", "model", "seed", "num_inference_steps", "edits") if k not in settings]
    if missing:
        raise ValueError(f"{os.fspath(png_path)!r}: its settings lack {missing} (written by an older dit-attn?)")
    if pipe is None:
        from ..loading import load_pipeline

        pipe = load_pipeline(settings["model"], dtype=settings.get("dtype") or "float32", device=device)
        pipe.set_progress_bar_config(disable=True)
    return render(pipe, settings)


def batches(ready: list, size: int) -> list[list]:
    """Consecutive (item, settings, edits) entries whose settings differ only in prompt, seed and NAG's negative
    prompt, at most `size` a batch (`call_edits` gives a batch's edits)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    groups: list[list] = []
    last_key = None
    for entry in ready:
        key = _batch_key(entry[1])
        if groups and len(groups[-1]) < size and key == last_key:
            groups[-1].append(entry)
        else:
            groups.append([entry])
        last_key = key
    return groups


def _batch_key(settings: dict) -> dict:
    key = {k: v for k, v in settings.items() if k not in ("prompt", "seed", "edits")}
    key["edits"] = [{k: v for k, v in data.items() if k != "negative_prompt"} if data["edit"] == "NAG" else data
                    for data in settings.get("edits") or ()]
    return key


def call_edits(group: list) -> tuple:
    """The edits of one pipeline call for a batch from `batches`: its entries' edits, NAG's negative prompt one per
    prompt (`NAG(negative_prompt=[...])`) where the entries' differ."""
    edits = group[0][2]
    negatives = [next((e.negative_prompt for e in entry[2] if isinstance(e, NAG)), None) for entry in group]
    if len(set(negatives)) == 1:
        return edits
    return tuple(replace(e, negative_prompt=tuple(negatives)) if isinstance(e, NAG) else e for e in edits)


@dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (item, reason)
    redone: list = field(default_factory=list)  # (item, why it was generated again): part of `done` once written


RUN_CHECK_PROMPT = "(the run's settings)"  # stands for the prompt when the run's own options are checked


def check_output_kind(settings: dict, videos: bool) -> None:
    """Stored settings against what their model makes: num_frames and fps only on video models; a local
    attention radius is one number on image models and frames, height and width radii on video models."""
    model = settings["model"]
    if not videos:
        given = [key for key in VIDEO_SETTINGS if settings.get(key) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for video models; "
                             f"{model!r} makes images")
    for edit in edits_for(settings):
        if isinstance(edit, LocalAttention) and videos != isinstance(edit.radius, tuple):
            if videos:
                raise ValueError(f"{model!r} makes videos: its local radius is FRAMES,HEIGHT,WIDTH token radii "
                                 f"(e.g. 1,4,4), got {edit.radius}")
            raise ValueError(f"{model!r} makes images: its local radius is one number of tokens, got {list(edit.radius)}")


def plan_resume(items: list[Item], base: dict, out: str, manifest: Manifest, overwrite: bool = True,
                suffix: str = "png"):
    """(report, todo) for this shard's items: finished ones counted as skipped, bad ones as failed; todo holds
    (item, settings, why it is redone or "") for the rest. ResumeConflict with overwrite=False if any would
    replace a file or line made with other settings. suffix: png, or the video format of a video model."""
    records = manifest.records()
    report = BatchReport()
    todo, conflicts = [], []
    for item in items:
        try:
            asked = item_settings(base, item)
            check_output_kind(asked, suffix != "png")
        except (ValueError, TypeError) as err:
            report.failed.append((item, str(err)))
            continue
        name = item_file(item, suffix)
        state = item_state(out, name, asked, records.get(name, []))
        if state.finished:
            report.skipped += 1
            continue
        if state.conflict:
            conflicts.append((item, state.reason))
        todo.append((item, asked, state.reason))
    if conflicts and not overwrite:
        item, reason = conflicts[0]
        more = f"; {len(conflicts) - 1} more items differ too" if len(conflicts) > 1 else ""
        raise ResumeConflict(f"not overwriting item #{item.index} {item.prompt!r} ({os.path.join(out, item_file(item, suffix))}): "
                             f"{reason}{more}. Rerun without --no-overwrite (overwrite=False) to generate them again with "
                             "these settings, or give another --out")
    return report, todo


def output_suffix(settings: dict, video_format: str | None = None) -> str:
    """The suffix of the files the run's settings make: png for an image model, the video format for a video
    model (None: mp4 where it can be written, else gif). Read from the model's model_index.json, before it loads."""
    from ..video import check_video_format, model_makes_videos

    videos = model_makes_videos(settings["model"])
    check_output_kind(settings, videos)
    if videos:
        return check_video_format(video_format)
    if video_format is not None:
        raise ValueError(f"video_format is for video models; {settings['model']!r} makes images")
    return "png"


def generate_batch(items: list[Item], base: dict, out: str, *, batch_size: int = 1, num_shards: int = 1,
                   shard_index: int = 0, device: str | None = None, progress: bool = True,
                   overwrite: bool = True, video_format: str | None = None) -> BatchReport:
    """Generate this shard's items into `out` (PNG + manifest line each, or for a video model a video in
    `video_format` (see `output_suffix`) + its sidecar + a manifest line), skipping finished ones.

    `base`: the run's options (see `item_settings`). Items whose own settings are bad, or
    whose call fails (e.g. out of memory at one size), are reported and the rest go on.
    Finished follows the resume rule of this module's docstring: an item whose line or file was made with
    other settings is generated again, or with overwrite=False stops the run (ResumeConflict) before a model
    loads. A second process on the same shard of `out` stops at once (OutputLocked).
    """
    items = shard(items, num_shards, shard_index)
    run_settings = item_settings(base, Item(0, RUN_CHECK_PROMPT))  # bad run settings fail before loading a model
    suffix = output_suffix(run_settings, video_format)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(errno.ENOTDIR, "a file is there, the output must be a folder", out)
    os.makedirs(out, exist_ok=True)
    manifest = Manifest(out, num_shards, shard_index)
    with manifest.locked():
        tmp_prefix = f".partial-{shard_index}-of-{num_shards}-"
        for name in os.listdir(out):  # left by a killed run of this shard (none of it can be writing: the lock)
            if name.startswith(tmp_prefix) and name.endswith(".tmp"):
                os.unlink(os.path.join(out, name))
        manifest.drop_torn_tail()
        report, todo = plan_resume(items, base, out, manifest, overwrite, suffix)
        if todo:
            _generate(todo, base, run_settings, out, manifest, report, tmp_prefix, batch_size, device, progress, suffix)
    return report


def _needs_input_image(pipe) -> bool:
    import inspect

    image = inspect.signature(pipe.__call__).parameters.get("image")
    return image is not None and image.default is inspect.Parameter.empty


def _check_size(pipe, videos: bool, settings: dict) -> None:
    if videos:
        check_video_size(pipe, settings.get("num_frames"), settings["height"], settings["width"])
    else:
        check_call(pipe, height=settings["height"], width=settings["width"])


def _generate(todo: list, base: dict, run_settings: dict, out: str, manifest: Manifest, report: BatchReport,
              tmp_prefix: str, batch_size: int, device: str | None, progress: bool, suffix: str = "png") -> None:
    import inspect

    import torch
    from tqdm.auto import tqdm

    from ..handle import apply
    from ..loading import call_defaults, call_pipeline, load_pipeline
    from ..video import write_video_atomic

    videos = suffix != "png"
    pipe = load_pipeline(base["model"], dtype=base["dtype"], device=device)
    pipe.set_progress_bar_config(disable=True)
    if makes_videos(pipe) != videos:
        raise ValueError(f"{base['model']!r} loads as {type(pipe).__name__}, which does not make what its "
                         f"model_index.json says ({'videos' if videos else 'images'})")
    if videos and _needs_input_image(pipe):
        raise ValueError(f"{type(pipe).__name__} makes a video from an input image; generate makes videos from "
                         "text only (use the Python API with image=...)")
    if videos:  # the run's size, once, before generating
        check_video_size(pipe, run_settings.get("num_frames"), run_settings["height"], run_settings["width"])
    else:
        check_image_size(pipe, run_settings["height"], run_settings["width"])
    run_edits = edits_for(run_settings)
    if run_edits:
        apply(pipe, *run_edits).remove()  # heads or layers outside the model fail here, once
    ready = []
    for item, settings, reason in todo:
        try:
            _check_size(pipe, videos, settings)
            ready.append((item, settings, edits_for(settings)))
        except (ValueError, TypeError) as err:
            report.failed.append((item, str(err)))
            continue
        if reason:
            report.redone.append((item, reason))
    handle, handle_edits = None, ()
    # videos: a bar over denoising steps (one video can take long); images: over images
    units = {id(entry): entry[1]["num_inference_steps"] if videos else 1 for entry in ready}
    bar = tqdm(total=sum(units.values()), desc="generate", unit="step" if videos else "image", disable=not progress)
    advanced = [0]
    step_callbacks = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters  # not every pipeline has them

    def step_ended(_pipe, _step, _timestep, tensors):
        bar.update(len(group))
        advanced[0] += len(group)
        return tensors

    try:
        for group in batches(ready, batch_size):
            edits, settings = call_edits(group), group[0][1]
            group_units, advanced[0] = sum(units[id(entry)] for entry in group), 0
            video_call = {"output_type": "pil", **({"callback_on_step_end": step_ended} if step_callbacks else {})} if videos else {}
            try:
                if edits != handle_edits:
                    if handle is not None:
                        handle.remove()
                    handle, handle_edits = None, ()  # stays so if apply fails
                    if edits:
                        handle = apply(pipe, *edits)
                    handle_edits = edits
                generators = [torch.Generator(device="cpu").manual_seed(s["seed"]) for _, s, _ in group]
                outputs = pipeline_output(pipe, call_pipeline(pipe, prompt=[item.prompt for item, _, _ in group],
                                                              generator=generators,
                                                              **{**call_defaults(pipe), **pipeline_kwargs(settings), **video_call}))
            except (ValueError, TypeError, RuntimeError) as err:
                report.failed.extend((item, f"{type(err).__name__}: {err}") for item, _, _ in group)
                bar.update(group_units - advanced[0])
                continue
            for (item, asked, _), output in zip(group, outputs):
                name = item_file(item, suffix)
                path = os.path.join(out, name)
                # the file is on disk (file and folder flushed) before its line: a line never names a lost file
                if videos:
                    drawn = with_video_size(asked, output)
                    defaults = [key for key in DRAWN if asked.get(key) is None]
                    write_video_atomic(output, path, drawn, drawn["fps"], suffix, tmp_prefix)
                else:
                    drawn = with_image_size(asked, output)
                    defaults = [key for key in ("height", "width") if asked[key] is None]
                    write_png_atomic(output, path, drawn, tmp_prefix)
                manifest.append({"file": name, **drawn, **({MODEL_DEFAULTS: defaults} if defaults else {})})
                report.done += 1
            bar.update(group_units - advanced[0])
    finally:
        bar.close()
        if handle is not None:
            handle.remove()


def shard_from_launcher(num_shards: int, shard_index: int) -> tuple[int, int]:
    """Under `accelerate launch --num_processes N` (or torchrun) each process takes its own shard.

    Read from the launcher's RANK / WORLD_SIZE: no process group is needed to split work,
    and accelerate's state reports a single process on a CPU-only machine.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if num_shards == 1 and world > 1:
        return world, int(os.environ.get("RANK", "0"))
    return num_shards, shard_index
