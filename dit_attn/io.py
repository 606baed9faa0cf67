"""Files and text the project reads and writes: atomic writes (with the umask's permissions),
PNGs that carry their settings, and the parsers of sizes, head lists and layer groups.

Sizes are (height, width) everywhere inside dit-attn; the text form is `N` or `WIDTHxHEIGHT`
(as image tools write it) and is parsed here once.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from typing import Callable

PNG_SETTINGS_KEY = "dit-attn"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every PNG (empty, fixed checksum)


def _read_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it and putting it back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions a plain `open(path, "w")` would give a new file under the current umask."""
    return 0o666 & ~_read_umask()


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be synced."""
    if os.name == "nt":  # Windows: no directory handles to sync
        return
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable, tmp_prefix: str = ".partial-") -> None:
    """Call write(binary file) on a temporary file beside `path`, flush it to disk, rename it into place and
    flush the directory: a reader sees the old file or the whole new one, never a part, and once this returns
    the new file survives a crash (so a record written after it never names a file that is not there).
    The file gets the umask's mode. A folder at `path` is refused before anything is written."""

    def write_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    write_path_atomic(path, write_file, tmp_prefix)


def write_path_atomic(path: str | os.PathLike, write_file: Callable[[str], None], tmp_prefix: str = ".partial-") -> None:
    """As `write_atomic`, for writers that take a file name (e.g. an ffmpeg process): write_file(temporary
    path) writes the whole file there; it is flushed, renamed into place and the directory flushed."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a folder is there, give a file name", path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write_file(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        fsync_directory(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def save_torch_atomic(obj, path: str | os.PathLike) -> None:
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_atomic(path, lambda f: f.write(data))


def write_png_atomic(image, path: str | os.PathLike, settings: dict | None = None, tmp_prefix: str = ".partial-") -> None:
    """Save a PNG whose `dit-attn` text chunk holds `settings` (JSON); never leaves a partial file."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if settings is not None:
        info.add_text(PNG_SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info), tmp_prefix)


def read_png_settings(path: str | os.PathLike) -> dict:
    """The settings stored by `write_png_atomic` in a PNG's `dit-attn` text chunk."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(PNG_SETTINGS_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{os.fspath(path)!r} has no {PNG_SETTINGS_KEY!r} settings chunk (not written by dit-attn)")
    return json.loads(text)


def verified_png_settings(path: str | os.PathLike) -> dict:
    """The `dit-attn` settings of a PNG that is whole: ValueError if the file is missing, empty, truncated or
    damaged (every chunk's checksum is checked through IEND, without decoding the pixels) or has no
    settings chunk. Used by batch resume to trust a file only when it is the image its record names."""
    from PIL import Image

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - len(PNG_END), 0))
            whole = f.read() == PNG_END
        if not whole:
            raise ValueError(f"{path!r} is not a whole PNG: it does not end with the IEND chunk")
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"{path!r} is a {image.format} file, not a PNG")
            text = image.info.get(PNG_SETTINGS_KEY)  # written before the image data by write_png_atomic
            image.verify()
    except ValueError:
        raise
    except Exception as err:  # missing, empty, truncated, bad checksum (PIL raises OSError, SyntaxError, struct.error)
        raise ValueError(f"{path!r} is not a whole PNG: {err}") from None
    if not isinstance(text, str):
        raise ValueError(f"{path!r} has no {PNG_SETTINGS_KEY!r} settings chunk (not written by dit-attn)")
    try:
        settings = json.loads(text)
    except ValueError:
        raise ValueError(f"{path!r}: its {PNG_SETTINGS_KEY!r} chunk is not JSON") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path!r}: its {PNG_SETTINGS_KEY!r} chunk is not a settings object")
    return settings


def as_stored(value, default=None):
    """`value` as it reads back from a JSON file (tuples as lists, keys as strings), to compare settings with
    what a file holds. default: as for json.dumps (e.g. str for values JSON has no form of)."""
    return json.loads(json.dumps(value, sort_keys=True, default=default))


class SizeError(ValueError):
    pass


def parse_size(text: str) -> tuple[int, int]:
    """'64' → (64, 64); '96x64' (WIDTHxHEIGHT) → (height 64, width 96)."""
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", str(text).strip())
    if match is None:
        raise SizeError(f"size must be N or WIDTHxHEIGHT (e.g. 64 or 96x64), got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    return height, width


def format_size(size: tuple[int, int]) -> str:
    """(height, width) → 'WIDTHxHEIGHT', the inverse of `parse_size`."""
    height, width = size
    return f"{width}x{height}"


def parse_radius(value, name: str = "local radius") -> float | tuple[float, float, float]:
    """A local-attention radius: a number (image grids) or frames, height and width radii (video grids)
    as 'T,H,W' or [t, h, w] → (t, h, w). Their ranges are the edit's to check."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    numbers = []
    for part in parts:
        try:
            if isinstance(part, bool):
                raise ValueError
            number = float(part)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a number, or FRAMES,HEIGHT,WIDTH token radii on video models "
                             f"(e.g. 2 or 1,4,4), got {value!r}")
        numbers.append(number)
    if len(numbers) == 1 and not isinstance(value, (list, tuple)):
        return numbers[0]
    if len(numbers) != 3:
        raise ValueError(f"{name} must be one number or 3 (FRAMES,HEIGHT,WIDTH), got {value!r}")
    return tuple(numbers)


def parse_heads(text: str) -> list[str]:
    """'L1H10,L11H15,sd3:dark' → ['L1H10', 'L11H15', 'sd3:dark']."""
    return [part.strip() for part in str(text).split(",") if part.strip()]


def parse_layer_groups(text: str) -> list[list[int]]:
    """'3,5+6,10' → [[3], [5, 6], [10]] (a '+' joins layers patched together)."""
    groups = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            groups.append([int(x) for x in part.split("+")])
        except ValueError:
            raise ValueError(f"cannot read layers {text!r}: use indices like '3,5+6,10' ('+' patches layers together)") from None
    if not groups:
        raise ValueError(f"no layers in {text!r}")
    return groups


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def read_records(path: str | os.PathLike, columns: tuple[str, ...], what: str = "file",
                 text_suffixes: tuple[str, ...] | None = (".txt",)) -> list[tuple[int, dict | ValueError]]:
    """(line number, record or the ValueError of a bad line) of a .jsonl (a JSON object a line), a .csv
    (a header with `columns`) or a text file (a line each, '#' comments; several columns split by tabs).
    text_suffixes: the suffixes read as text (None: every suffix but .jsonl and .csv). UTF-8, a byte-order
    mark allowed. Errors of the whole file (its kind, its encoding, a CSV header) raise ValueError."""
    import csv
    import io as stdio

    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    is_text = suffix not in (".jsonl", ".csv") and (text_suffixes is None or suffix in text_suffixes)
    if suffix not in (".jsonl", ".csv") and not is_text:
        raise ValueError(f"{what} must be {', '.join(text_suffixes)}, .jsonl or .csv, got {path!r}")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is not part of a line
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the {what} as UTF-8") from None
    records: list[tuple[int, dict | ValueError]] = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must be a JSON object")
                records.append((number, record))
            except ValueError as err:
                records.append((number, ValueError(str(err))))
    elif suffix == ".csv":
        reader = csv.DictReader(stdio.StringIO(text))
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: the CSV header needs {' and '.join(repr(c) for c in missing)} column(s)")
        for row in reader:
            records.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = [line] if len(columns) == 1 else line.split("\t")
            if len(fields) != len(columns):
                records.append((number, ValueError(f"expected {'<TAB>'.join(columns)}")))
            else:
                records.append((number, dict(zip(columns, fields))))
    return records
