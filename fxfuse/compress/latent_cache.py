"""Latent attention inside a ``transformers`` model: generation whose cache holds only the latent and rotary key.

:func:`with_latent_attention` copies the source model and replaces each
attention module the latent graph rewrote (found from where its latent
weights live, ``model.layers.3.self_attn.latent_*``) by a
:class:`LatentSelfAttention` holding those weights. It is called the way
decoder layers call their attention (hidden states, the rotary cos/sin,
the mask, the cache) and stores ``(latent, rotary key)`` in the cache layer
where the source stored ``(keys, values)``, so ``generate()`` with a
dynamic cache keeps (R + Dr) numbers per token and layer.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxfuse.codegen import eager
from fxfuse.errors import InputError
from fxfuse.ir import dialect
from fxfuse.ir.dialect import OPS

WEIGHTS = ("latent", "rope_key", "query_latent", "query_rope")


class LatentSelfAttention(nn.Module):
    """Self-attention on a latent cache (the module :func:`with_latent_attention` puts in place)."""

    def __init__(self, weights: dict[str, Tensor], rope_index: Optional[Tensor], heads: int, scale: float,
                 layer_idx: int) -> None:
        super().__init__()
        for name in (*WEIGHTS, "output"):
            self.register_parameter(f"{name}_weight", nn.Parameter(weights[f"{name}_weight"], requires_grad=False))
            bias = weights.get(f"{name}_bias")
            self.register_parameter(f"{name}_bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.register_buffer("rope_index", rope_index)
        self.heads, self.scale, self.layer_idx = heads, scale, layer_idx

    def _project(self, x: Tensor, name: str, heads: int) -> Tensor:
        out = nn.functional.linear(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"))
        return out.unflatten(-1, (heads, -1)).transpose(1, 2)

    def forward(self, hidden_states: Tensor, position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
                attention_mask: Optional[Tensor] = None, cache: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[Tensor, None]:
        """(output, None), as the source attention module returns; the cache gets (latent, rotary key)."""
        cache = cache if cache is not None else past_key_values
        latent = self._project(hidden_states, "latent", 1)
        q_latent = self._project(hidden_states, "query_latent", self.heads)
        q_rope = self._project(hidden_states, "query_rope", self.heads)
        k_rope = self._project(hidden_states, "rope_key", 1)
        # The ops' eager forms, called directly: through the dispatcher each call cost ~0.2-0.5 ms per layer
        # and decode step on this CPU (Python custom ops).
        if self.rope_index is not None:
            cos, sin = (t.index_select(-1, self.rope_index).unsqueeze(1) for t in position_embeddings)
            q_rope, k_rope = eager.rope(q_rope, k_rope, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx, kwargs)
        # transformers passes no mask where attention is plainly causal over the whole cache
        causal = attention_mask is None and q_latent.shape[2] > 1
        mask = attention_mask[..., :latent.shape[2]] if attention_mask is not None else None
        out = dialect.latent_attention(q_latent, q_rope, latent, k_rope, mask, self.scale, causal)
        merged = out.transpose(1, 2).flatten(2)
        return nn.functional.linear(merged, self.output_weight, self.output_bias), None


def with_latent_attention(source: nn.Module, graph_module: fx.GraphModule) -> nn.Module:
    """A copy of ``source`` whose attention modules are the latent ones of ``graph_module`` (the source
    compressed by :func:`fxfuse.compress.latent.to_latent`), for ``generate()`` with a latent cache."""
    model = copy.deepcopy(source).eval()
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is not OPS["latent_attention"]:
            continue
        path = _module_of(node)
        held = graph_module.get_submodule(path)
        original = model.get_submodule(path) if path else None
        if original is None or not hasattr(original, "layer_idx"):
            raise InputError(f"{path or 'the root'} is not an attention module of {type(source).__name__} with a "
                             "layer_idx; the latent model cannot be built for generation")
        weights = {f"{name}_{kind}": getattr(held, f"latent_{name}_{kind}")
                   for name in (*WEIGHTS, "output") for kind in ("weight", "bias")
                   if getattr(held, f"latent_{name}_{kind}", None) is not None}
        heads = node.args[0].meta["val"].shape[1]
        module = LatentSelfAttention(weights, getattr(held, "latent_rope_index", None), heads, node.args[5],
                                     original.layer_idx)
        owner, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, module)
    return model


def _module_of(attention: fx.Node) -> str:
    """The module path the latent weights of a ``latent_attention`` node live in (its latent's projection's)."""
    n = attention.args[2]
    while n.target is not torch.ops.aten.linear.default:
        n = n.args[0]
    return n.args[1].target.rpartition(".")[0]
