"""A compressed model as a standard Hugging Face checkpoint: fewer layers or heads in the config.

The fused graph reads its weights under the original module paths
(``model.layers.7.mlp.down_proj.weight``), repaired weights included. The
layer stack is the ``nn.ModuleList`` of the source model with one entry per
``config.num_hidden_layers`` whose weights the graph reads; a layer none of
whose weights the graph reads any more was removed. The checkpoint is the
source model's state dict without the removed layers, the later ones
renumbered, every weight the graph holds taken from the graph, and a config
with ``num_hidden_layers`` (and per-layer lists such as ``layer_types``)
cut to match. A model loaded from a GGUF file is de-quantized on load, so
the checkpoint is a plain floating-point one. Pruned or merged heads are written with
``num_attention_heads`` / ``num_key_value_heads`` set to the kept counts and
``head_dim`` kept, where they are the same in every layer and the config has
a ``head_dim`` (LLaMA-style configs; BERT's derives it from the width).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxfuse.errors import InputError


def save_pretrained(source: nn.Module, graph_module: nn.Module, unit: str, removed: int, directory: str | Path) -> None:
    """Write the checkpoint of ``graph_module`` (``source`` compressed, ``removed`` ``unit`` taken out)."""
    rebuild(source, graph_module, unit, removed).save_pretrained(str(directory))


def rebuild(source: nn.Module, graph_module: nn.Module, unit: str, removed: int) -> nn.Module:
    """The ``transformers`` model of ``source``'s class, with the compressed config and ``graph_module``'s weights
    (what :func:`save_pretrained` writes): it generates with a cache of the compressed size."""
    config = getattr(source, "config", None)
    if config is None or not hasattr(source, "save_pretrained"):
        raise InputError(f"save_pretrained needs a Hugging Face transformers model; the compressed model came "
                         f"from a {type(source).__name__}")
    held = {**dict(graph_module.named_parameters()), **dict(graph_module.named_buffers())}
    if unit == "latent_kv" and removed:
        raise InputError(
            "latent attention has no transformers config that computes the same function: DeepSeek-V3's (the MLA "
            "form transformers has) normalizes the latent (kv_a_layernorm) and derives its rotary frequencies from "
            "qk_rope_head_dim, while fxfuse's latent is not normalized and keeps a chosen subset of the source's "
            "frequencies. Generate in process with compressed.to_transformers()")
    if unit in ("heads", "kv_heads"):
        new_config = _heads_config(config, graph_module)
        state = {name: held.get(name, value).detach().clone() for name, value in source.state_dict().items()}
    elif unit == "layers" or not removed:
        new_config, state = _without_layers(source, config, held, removed)
    else:
        raise InputError(
            f"{removed} {unit.replace('_', ' ')} were removed, which {type(config).__name__} cannot express (every "
            f"layer has both sublayers). Compress with layers= for a checkpoint transformers can load, or keep "
            f"the compressed module in this process")
    with torch.device("meta"):
        model = type(source)(new_config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    # Buffers outside the state dict (RoPE frequencies) come from the config: the source's are the same.
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(model.named_buffers()):
        kept = source_buffers.get(name)
        if buffer.is_meta and kept is not None and kept.shape == buffer.shape:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, kept.clone(), persistent=False)
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise InputError(f"the compressed checkpoint would lack {missing[:5]}; cannot save it")
    return model.eval()


def _without_layers(source: nn.Module, config: Any, held: dict[str, torch.Tensor],
                    removed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """The config and state dict of ``source`` without the layers whose weights the graph no longer reads."""
    prefix, count = _layer_stack(source, config, held)
    kept = [i for i in range(count) if any(name.startswith(f"{prefix}.{i}.") for name in held)]
    if count - len(kept) != removed:
        raise InputError(f"the graph reads the weights of {len(kept)} of the {count} layers under {prefix!r}, but "
                         f"{removed} layers were removed; cannot map the compressed model back onto its modules")
    renumber = {old: new for new, old in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for name, value in source.state_dict().items():
        target = name
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1:].split(".", 1)
            if int(index) not in renumber:
                continue
            target = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[target] = held.get(name, value).detach().clone()
    return _cut_config(config, kept, count), state


def _heads_config(config: Any, graph_module: nn.Module) -> Any:
    """``config`` with the pruned or merged head counts, which must be the same in every layer."""
    from fxfuse.compress.heads import find_heads

    counts = {(h.q_heads, h.kv_heads, h.head_dim) for h in find_heads(graph_module)}
    if len(counts) != 1:
        raise InputError(f"the layers keep different numbers of heads ({sorted(counts)}), which "
                         f"{type(config).__name__} cannot express (one head count for all layers). Compress with "
                         f"uniform=True for a checkpoint transformers can load")
    (q_heads, kv_heads, head_dim), = counts
    if kv_heads < q_heads and not hasattr(config, "num_key_value_heads"):
        raise InputError(f"{type(config).__name__} has no num_key_value_heads: it cannot express {kv_heads} key/value "
                         f"heads for {q_heads} query heads; keep the compressed module in this process")
    resized = (q_heads, head_dim) != (config.num_attention_heads, getattr(config, "head_dim", head_dim))
    if resized and "head_dim" not in config.to_dict():
        raise InputError(f"{type(config).__name__} derives the head size from hidden_size / num_attention_heads, so "
                         f"it cannot express {q_heads} heads of {head_dim}; keep the compressed module in this process")
    new = _cut_config(config, list(range(config.num_hidden_layers)), config.num_hidden_layers)
    new.num_attention_heads = q_heads
    if "head_dim" in config.to_dict():
        new.head_dim = head_dim
    if hasattr(new, "num_key_value_heads"):
        new.num_key_value_heads = kv_heads
    return new


def _layer_stack(source: nn.Module, config: Any, held: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(path, length) of the ModuleList of ``num_hidden_layers`` entries whose weights the graph reads."""
    layers = getattr(config, "num_hidden_layers", None)
    for path, module in source.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and \
                any(name.startswith(path + ".") for name in held):
            return path, layers
    raise InputError(f"found no list of {layers} layers (config.num_hidden_layers) in {type(source).__name__} "
                     f"whose weights the compressed graph reads")


def _cut_config(config: Any, kept: list[int], count: int) -> Any:
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(kept)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == count and key != "architectures":
            setattr(new, key, [value[i] for i in kept])
    for key in ("quantization_config", "gguf_file"):  # de-quantized on load: the checkpoint is floating point
        if hasattr(new, key):
            delattr(new, key)
    return new
