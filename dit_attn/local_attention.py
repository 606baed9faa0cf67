"""What `apply` does for a LocalAttention edit besides the processors: pooling modules
on the attention modules (down-sampled variant) and trained weights, both undone on remove."""
from __future__ import annotations

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
    return LocalSetting(float(edit.radius), layers, edit.downsample, edit.train_tokens)


@dataclass
class LocalInstall:
    """Undo record: pooling modules added, parameters overwritten by loaded weights."""

    transformer: torch.nn.Module
    pooled_modules: list[str] = field(default_factory=list)
    overwritten: dict[str, torch.Tensor] = field(default_factory=dict)

    def undo(self) -> None:
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


def merge_lora(tensors: dict[str, torch.Tensor], metadata: dict, params: dict, path: str) -> dict[str, torch.Tensor]:
    """LoRA pairs (peft names) → the full weights W + (alpha / rank)·B·A; other tensors unchanged."""
    pairs = sorted(n[: -len(LORA_A)] for n in tensors if n.endswith(LORA_A))
    if not pairs:
        return tensors
    if "lora_alpha" not in metadata or "lora_rank" not in metadata:
        raise ValueError(f"{path!r} holds LoRA tensors but no lora_alpha/lora_rank metadata")
    scale = float(metadata["lora_alpha"]) / float(metadata["lora_rank"])
    merged = {n: t for n, t in tensors.items() if not (n.endswith(LORA_A) or n.endswith(LORA_B))}
    for module in pairs:
        if module + LORA_B not in tensors or module + ".weight" not in params:
            raise ValueError(f"{path!r}: LoRA for {module!r} is incomplete or names no module of this model")
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
