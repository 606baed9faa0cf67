"""LoRA on the localized layers only: a peft LoraConfig whose target modules are exact
full module names, and saving it so `pipe.load_lora_weights` restores its alpha."""
from __future__ import annotations

import os
import re

import torch

from ..handle import layers as layer_map

# inside the attention module; FLUX single blocks have no to_out/add_* and keep to_q/k/v
from ..train.config import LORA_TARGETS as DEFAULT_TARGETS


def _block_name(attention_name: str) -> str:
    return attention_name.rsplit(".", 1)[0]  # "transformer_blocks.3.attn" -> "transformer_blocks.3"


def localized_lora_modules(pipe_or_transformer, layers, targets=DEFAULT_TARGETS) -> list[str]:
    """Full names of the Linear modules a localized LoRA trains.

    A target is looked up in each layer's attention module (`to_q` → `transformer_blocks.3.attn.to_q`),
    then in its block (`proj_mlp`, `ff.net.2`, `attn2.to_q`); layers without it (e.g. `to_out.0`
    in a FLUX single block) are skipped. Raises ValueError for a layer outside the model or a
    target that names no Linear module in any given layer.
    """
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    info = layer_map(transformer)
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise ValueError("give at least one layer for the LoRA")
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(info)]
    if bad:
        raise ValueError(f"layers {bad} do not exist: this model has layers 0-{len(info) - 1}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("give at least one target module name, e.g. 'to_q'")
    modules = dict(transformer.named_modules())
    names, found = [], set()
    for layer in sorted(set(layers)):
        attention, block = info[layer].name, _block_name(info[layer].name)
        for target in targets:
            for name in (f"{attention}.{target}", f"{block}.{target}"):
                if isinstance(modules.get(name), torch.nn.Linear):
                    names.append(name)
                    found.add(target)
                    break
    missing = [t for t in targets if t not in found]
    if missing:
        block = _block_name(info[layers[0]].name)
        valid = sorted(n[len(block) + 1:] for n, m in modules.items() if n.startswith(block + ".") and isinstance(m, torch.nn.Linear))
        raise ValueError(f"targets {missing} name no Linear module of layers {sorted(set(layers))}; "
                         f"Linear modules of {block}: {', '.join(valid)}")
    return names


def exact_names_regex(names: list[str]) -> str:
    """A regex that matches exactly these module names (peft full-matches a string target)."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def localized_lora_config(pipe_or_transformer, layers, rank: int = 4, alpha: float | None = None,
                          targets=DEFAULT_TARGETS, dropout: float = 0.0):
    """A peft LoraConfig training only `targets` of `layers` (alpha defaults to rank).

    target_modules is one regex of exact full names: a list entry such as "to_q" would
    match that name as a suffix in every block.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    names = localized_lora_modules(pipe_or_transformer, layers, targets)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=exact_names_regex(names))


def save_lora(pipe, directory: str | os.PathLike, adapter_name: str = "default", weight_name: str | None = None) -> str:
    """Save the transformer's LoRA `adapter_name` with its config as metadata, so
    `pipe.load_lora_weights(directory)` restores lora_alpha (without metadata it loads at
    alpha = rank). Returns the directory."""
    from peft.utils import get_peft_model_state_dict

    transformer = pipe.transformer
    config = getattr(transformer, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"the transformer has no LoRA adapter {adapter_name!r}")
    layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    type(pipe).save_lora_weights(
        os.fspath(directory), transformer_lora_layers=layers, weight_name=weight_name,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return os.fspath(directory)


def lora_parameter_count(transformer: torch.nn.Module) -> int:
    """Trainable LoRA parameters of a transformer with adapters."""
    return sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
