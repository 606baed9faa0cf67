"""One resume rule for every trainer (train-tiny, train-lora, distill-clear).

Every file a trainer keeps in its work directory (checkpoints and caches) carries, under
`RUN_KEY`, the record of the run that wrote it: the settings (the config dataclass as a
dict, plus the run's other inputs, such as the model's fingerprint) and a sha256
fingerprint of the data (the rendered data set, the captioned images, the prompts). A
rerun continues from such a file only when the record matches its own; otherwise
`check_resumable` stops it with a ValueError that names each setting that differs
(old → new) and whether the data differ, and says how to go on: `--restart`
(restart=True) to discard the work directory, or a new `--work` directory.

`checkpoint_every` may change between a run and its resume: it decides when checkpoints
are written, never what is trained. Every other setting must match.

Files written before these records existed are refused, not guessed at: without the
settings and data they were trained with, a resume cannot be shown to continue the same
run (an older train-lora checkpoint kept its config but no fingerprint of its data; the
other trainers' kept neither).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

from ..io import as_stored

RUN_KEY = "run"
RECORD_FORMAT = "dit-attn-run/1"
# settings that may differ between a run and its resume (they change no trained value)
FREE_SETTINGS = ("checkpoint_every",)
HOW_TO_GO_ON = "use --restart (restart=True) to start over, or a new --work directory"


def run_record(settings: dict, fingerprint: str) -> dict:
    """The record a checkpoint keeps under RUN_KEY: {"format", "settings", "fingerprint"}."""
    return {"format": RECORD_FORMAT, "settings": as_stored(settings, default=str), "fingerprint": str(fingerprint)}


_MISSING = object()


def _show(value) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


def check_resumable(checkpoint, settings: dict, fingerprint: str, where: str = "the checkpoint") -> None:
    """Stop (ValueError) unless `checkpoint` (a dict with a RUN_KEY record) was written by a run with these
    settings and data. The message names each differing setting (old → new), says whether the data differ,
    and how to go on."""
    record = checkpoint.get(RUN_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"cannot resume from {where}: it was written without the settings and data fingerprint of "
                         f"its run (an older dit-attn), so it cannot be checked against this run; {HOW_TO_GO_ON}")
    old, new = record.get("settings") or {}, as_stored(settings, default=str)
    changed = [f"{name} {_show(old.get(name, _MISSING))} → {_show(new.get(name, _MISSING))}"
               for name in sorted(set(old) | set(new))
               if name not in FREE_SETTINGS and old.get(name, _MISSING) != new.get(name, _MISSING)]
    data_differ = record.get("fingerprint") != str(fingerprint)
    if not changed and not data_differ:
        return
    parts = []
    if changed:
        parts.append("its run had other settings: " + ", ".join(changed))
    if data_differ:
        parts.append(f"the data differ (fingerprint {str(record.get('fingerprint'))[:12]}… → {str(fingerprint)[:12]}…)")
    raise ValueError(f"cannot resume from {where}: " + "; and ".join(parts) + f"; {HOW_TO_GO_ON}")


def load_checkpoint(path: str, settings: dict, fingerprint: str) -> dict | None:
    """torch.load(path, weights_only=True), checked with check_resumable; None when there is no such file."""
    if not os.path.exists(path):
        return None
    checkpoint = torch.load(path, weights_only=True)
    check_resumable(checkpoint, settings, fingerprint, where=path)
    return checkpoint


# ---- fingerprints -------------------------------------------------------------------------------------------------

def _feed(h, value) -> None:
    """Feed one value into a hash, tagged by type and length so that different structures never collide."""
    if value is None:
        h.update(b"N")
    elif isinstance(value, (bool, int, float)):
        text = repr(value).encode()
        h.update(b"n" + type(value).__name__.encode() + struct.pack("<Q", len(text)) + text)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        h.update(b"s" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        h.update(b"b" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(b"t" + str(t.dtype).encode() + struct.pack("<Q", t.ndim) + struct.pack(f"<{t.ndim}Q", *t.shape))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, (list, tuple)):
        h.update(b"l" + struct.pack("<Q", len(value)))
        for item in value:
            _feed(h, item)
    elif isinstance(value, dict):
        h.update(b"d" + struct.pack("<Q", len(value)))
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        _feed(h, ["image", value.mode, list(value.size), value.tobytes()])
    else:
        raise TypeError(f"cannot fingerprint a {type(value).__name__}; supported: None, numbers, str, bytes, tensors, "
                        "PIL images, lists, tuples and dicts of them")


def fingerprint(*parts) -> str:
    """sha256 (hex) of values: None, numbers, str, bytes, tensors (dtype, shape, bytes), PIL images, lists, dicts."""
    h = hashlib.sha256()
    _feed(h, list(parts))
    return h.hexdigest()


def file_digest(path: str) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(pipe, values: int = 16) -> str:
    """A short identity of a pipeline's weights: its class, and for every model component (transformer, VAE, text
    encoders) its class, config and each tensor's name, dtype, shape and first and last `values` values; the
    scheduler's config. Another checkpoint, fine-tune or dtype differs without reading every weight."""
    h = hashlib.sha256()
    _feed(h, type(pipe).__name__)
    components = getattr(pipe, "components", None) or {"transformer": pipe.transformer}
    for name in sorted(components):
        component = components[name]
        if isinstance(component, torch.nn.Module):
            config = getattr(component, "config", None)
            config = dict(config) if isinstance(config, dict) else (config.to_dict() if hasattr(config, "to_dict") else {})
            config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}  # not paths
            _feed(h, [name, type(component).__name__, json.dumps(config, sort_keys=True, default=str)])
            for key, tensor in component.state_dict().items():
                flat = tensor.detach().reshape(-1)
                _feed(h, [key, str(tensor.dtype), list(tensor.shape)])
                if flat.device.type != "meta" and flat.numel():
                    _feed(h, torch.cat([flat[:values], flat[-values:]]))
        elif name == "scheduler" and component is not None and hasattr(component, "config"):
            config = {k: v for k, v in dict(component.config).items() if not k.startswith("_")}
            _feed(h, [name, type(component).__name__, json.dumps(config, sort_keys=True, default=str)])
    return f"{type(pipe).__name__}, weights {h.hexdigest()[:16]}"
