"""What `apply` does for a LocalAttention edit besides the processors: pooling modules
on the attention modules (down-sampled variant) and trained weights, both undone on remove."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .edits import LocalAttention
from .heads import LayerInfo
from .processors.state import POOL_MODULE, LocalPool, LocalSetting


def local_attention_modules(layer_map: list[LayerInfo], layers) -> list[str]:
    """Module names of the attention modules the edit makes local (SD3.5's attn2 included)."""
    names = []
    for info in layer_map:
        if info.index in layers:
            names.append(info.name)
            if info.dual_attention:
                names.append(info.name.removesuffix(".attn") + ".attn2")
    return names


def local_setting(edit: LocalAttention, layer_map: list[LayerInfo]) -> LocalSetting:
    if edit.layers is None:
        layers = frozenset(info.index for info in layer_map)
    else:
        bad = [i for i in edit.layers if i >= len(layer_map)]
        if bad:
            raise ValueError(f"LocalAttention layers {bad} do not exist: this model has layers 0-{len(layer_map) - 1}")
        layers = frozenset(edit.layers)
    radius = tuple(float(r) for r in edit.radius) if isinstance(edit.radius, tuple) else float(edit.radius)
    return LocalSetting(radius, layers, edit.downsample, edit.train_tokens, edit.shape)


@dataclass
class LocalInstall:
    """Undo record: pooling modules added, parameters overwritten by loaded weights."""

    transformer: torch.nn.Module
    pooled_modules: list[str] = field(default_factory=list)
    overwritten: dict[str, torch.Tensor] = field(default_factory=dict)
    save_hook: object = None  # the model's state dict stays the stock one (save_pretrained writes a stock checkpoint)

    def stock_state_dict(self, state_dict: dict, prefix: str) -> None:
        """State-dict post hook: without the pooling weights, with the original values of overwritten ones."""
        for key in [k for k in state_dict if f".{POOL_MODULE}." in k]:
            del state_dict[key]
        for name, original in self.overwritten.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = original

    def undo(self) -> None:
        if self.save_hook is not None:
            self.save_hook.remove()
            self.save_hook = None
        with torch.no_grad():
            for name, original in self.overwritten.items():
                self.transformer.get_parameter(name).copy_(original)
        for name in self.pooled_modules:
            delattr(self.transformer.get_submodule(name), POOL_MODULE)
        self.overwritten.clear()
        self.pooled_modules.clear()


def install_local(transformer: torch.nn.Module, edit: LocalAttention, setting: LocalSetting,
                  layer_map: list[LayerInfo]) -> LocalInstall:
    record = LocalInstall(transformer)
    record.save_hook = transformer.register_state_dict_post_hook(  # torch marks the hook: a plain function
        lambda module, state_dict, prefix, local_metadata: record.stock_state_dict(state_dict, prefix))
    try:
        if setting.downsample:
            reference = next(transformer.parameters())
            for name in local_attention_modules(layer_map, setting.layers):
                pool = LocalPool(setting.downsample).to(device=reference.device, dtype=reference.dtype)
                transformer.get_submodule(name).add_module(POOL_MODULE, pool)
                record.pooled_modules.append(name)
        if edit.weights is not None:
            load_local_weights(transformer, os.fspath(edit.weights), record)
    except BaseException:
        record.undo()
        raise
    return record


LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def _lora_rank(metadata: dict, path: str) -> int:
    text = metadata.get("lora_rank")
    try:
        rank = float(text)
    except (TypeError, ValueError):
        rank = float("nan")
    if not rank >= 1 or not rank.is_integer():
        raise ValueError(f"{path!r}: lora_rank metadata must be a whole number >= 1, got {text!r}")
    return int(rank)


def check_lora_pairs(shapes: dict[str, tuple[int, ...]], path: str, rank: int | None = None) -> list[str]:
    """The module names of the LoRA pairs in a file's tensor shapes (peft names: M.lora_A.weight of shape
    (r, in), M.lora_B.weight of shape (out, r)): ValueError naming the tensor if a pair is incomplete, a rank
    is 0, or the two disagree on it (or with `rank`, the file's metadata)."""
    modules = sorted({n[: -len(suffix)] for n in shapes for suffix in (LORA_A, LORA_B) if n.endswith(suffix)})
    for module in modules:
        down, up = shapes.get(module + LORA_A), shapes.get(module + LORA_B)
        if down is None or up is None:
            raise ValueError(f"{path!r}: the LoRA of {module!r} is incomplete (it needs {LORA_A[1:]} and {LORA_B[1:]})")
        if len(down) != 2 or len(up) != 2:
            raise ValueError(f"{path!r}: the LoRA of {module!r} has shapes {down} and {up}; both must be matrices")
        if down[0] < 1 or up[1] < 1:
            raise ValueError(f"{path!r}: the LoRA of {module!r} has rank 0 ({module}{LORA_A} {down}, {LORA_B[1:]} {up})")
        if down[0] != up[1]:
            raise ValueError(f"{path!r}: the LoRA of {module!r} has mismatched shapes: {LORA_A[1:]} {down} is rank "
                             f"{down[0]}, {LORA_B[1:]} {up} rank {up[1]}")
        if rank is not None and down[0] != rank:
            raise ValueError(f"{path!r}: the LoRA of {module!r} is rank {down[0]}, its lora_rank metadata says {rank}")
    return modules


def check_lora_against(modules: list[str], shapes: dict[str, tuple[int, ...]], params: dict, path: str,
                       prefix: str = "") -> None:
    """Each LoRA pair against the model's weight of its module: (out, in) must be (B rows, A columns)."""
    for module in modules:
        name = module.removeprefix(prefix)
        weight = params.get(name + ".weight")
        if weight is None:
            raise ValueError(f"{path!r}: the LoRA of {module!r} names no module of this model")
        down, up = shapes[module + LORA_A], shapes[module + LORA_B]
        if (up[0], down[1]) != tuple(weight.shape):
            raise ValueError(f"{path!r}: the LoRA of {module!r} makes a {up[0]}x{down[1]} update, the model's weight "
                             f"is {tuple(weight.shape)} (a LoRA for another model?)")


def file_shapes(path: str) -> tuple[dict[str, tuple[int, ...]], dict]:
    """(tensor shapes, metadata) of a safetensors file, from its header only; ValueError if it is not one."""
    try:
        with safe_open(path, framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a file that is not one
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from None
    return shapes, metadata


def check_weights_file(path: str, what: str = "weights") -> None:
    """A LocalAttention weights file (from `dit-attn distill-clear`), checked without a model: a safetensors
    file whose LoRA pairs, if any, are complete, of rank >= 1 and of the rank its metadata says."""
    shapes, metadata = file_shapes(os.fspath(path))
    if not shapes:
        raise ValueError(f"{what} {os.fspath(path)!r} holds no tensors")
    if any(n.endswith(LORA_A) or n.endswith(LORA_B) for n in shapes):
        check_lora_pairs(shapes, os.fspath(path), _lora_rank(metadata, os.fspath(path)))


def lora_weights_file(path: str) -> str | None:
    """The safetensors file of a diffusers LoRA given as a file or a folder (None: neither exists here, e.g. a hub id)."""
    if os.path.isdir(path):
        found = [n for n in sorted(os.listdir(path)) if n.endswith(".safetensors")]
        preferred = "pytorch_lora_weights.safetensors"
        return os.path.join(path, preferred if preferred in found else found[0]) if found else None
    return path if os.path.isfile(path) else None


def check_lora_file(path: str, transformer: torch.nn.Module | None = None) -> None:
    """A diffusers LoRA (`pipe.load_lora_weights`), checked before it is loaded: its pairs are complete and
    of rank >= 1 and, with `transformer`, fit that model's weights (diffusers prefixes them 'transformer.')."""
    file = lora_weights_file(path)
    if file is None:
        if os.path.isdir(path):
            raise ValueError(f"{path!r} holds no .safetensors LoRA file")
        return  # not here: a hub id, for diffusers to resolve
    shapes, _ = file_shapes(file)
    modules = check_lora_pairs(shapes, file)
    if not modules:
        raise ValueError(f"{file!r} holds no LoRA tensors (names ending {LORA_A} / {LORA_B})")
    if transformer is not None:
        ours = [m for m in modules if m.startswith("transformer.")] or modules
        check_lora_against(ours, shapes, dict(transformer.named_parameters()), file,
                           "transformer." if ours[0].startswith("transformer.") else "")


def merge_lora(tensors: dict[str, torch.Tensor], metadata: dict, params: dict, path: str) -> dict[str, torch.Tensor]:
    """LoRA pairs (peft names) → the full weights W + (alpha / rank)·B·A; other tensors unchanged."""
    pairs = sorted(n[: -len(LORA_A)] for n in tensors if n.endswith(LORA_A))
    if not pairs and not any(n.endswith(LORA_B) for n in tensors):
        return tensors
    if "lora_alpha" not in metadata or "lora_rank" not in metadata:
        raise ValueError(f"{path!r} holds LoRA tensors but no lora_alpha/lora_rank metadata")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    pairs = check_lora_pairs(shapes, path, _lora_rank(metadata, path))
    check_lora_against(pairs, shapes, params, path)
    try:
        alpha = float(metadata["lora_alpha"])
    except ValueError:
        alpha = float("nan")
    if not math.isfinite(alpha):
        raise ValueError(f"{path!r}: lora_alpha metadata must be a finite number, got {metadata['lora_alpha']!r}")
    scale = alpha / _lora_rank(metadata, path)
    merged = {n: t for n, t in tensors.items() if not (n.endswith(LORA_A) or n.endswith(LORA_B))}
    for module in pairs:
        down, up = tensors[module + LORA_A].float(), tensors[module + LORA_B].float()
        base = params[module + ".weight"].detach()
        merged[module + ".weight"] = (base.float() + scale * (up @ down)).to(base.dtype)
    return merged


def load_local_weights(transformer: torch.nn.Module, path: str, record: LocalInstall) -> None:
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from err
    params = dict(transformer.named_parameters())
    tensors = merge_lora(tensors, metadata, params, path)
    unknown = [name for name in tensors if name not in params]
    if unknown:
        hint = "; the file was made with downsample=… — give the same downsample" if any(POOL_MODULE in n for n in unknown) else ""
        raise ValueError(
            f"{path!r} holds {len(unknown)} tensors this model does not have, e.g. {unknown[0]!r} "
            f"(names must be the transformer's parameter names, e.g. {next(iter(params))!r}){hint}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{path!r}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            record.overwritten[name] = params[name].detach().clone()
            params[name].copy_(tensor)
