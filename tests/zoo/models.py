"""The model zoo: small random-weight `transformers` models, one entry per architecture.

Each entry says how to build the model and how many blocks of each kind a
fully fused graph must contain; the zoo tests hold fxfuse to those counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers

LAYERS = 2
HIDDEN = 32
HEADS = 4
VOCAB = 128


@dataclass(frozen=True)
class ZooModel:
    """One architecture: its config, and the fused-op counts a full fusion gives."""

    name: str
    config: Callable[[], transformers.PretrainedConfig]
    attention: int
    norms: int
    norm_op: str  # "layer_norm" or "rms_norm"
    residual_norms: int
    mlp_op: str  # "gelu" or "gated_mlp_act"; one per layer
    rope: int = 0  # fused q/k rotary embeddings
    impls: tuple[str, ...] = ("eager", "sdpa")

    def build(self, impl: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModel.from_config(self.config(), attn_implementation=impl).eval()

    def inputs(self, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Token ids and a padding mask (the last row padded) of the given size."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, seq - 2:] = 0
        return {"input_ids": ids, "attention_mask": mask}


def _decoder(cls, **extra) -> Callable[[], transformers.PretrainedConfig]:
    return lambda: cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, **extra,
    )


ZOO: list[ZooModel] = [
    ZooModel(
        "bert",
        lambda: transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=2 * HIDDEN, max_position_embeddings=64,
        ),
        attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=2 * LAYERS,
        mlp_op="gelu",
    ),
    ZooModel(
        "gpt2",
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        ),
        # ln_1 of layer 0 reads the embedding sum (token + position of batch 1): a broadcasting add.
        attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=2 * LAYERS,
        mlp_op="gelu",
    ),
    ZooModel("llama", _decoder(transformers.LlamaConfig, num_key_value_heads=2),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    ZooModel("mistral", _decoder(transformers.MistralConfig, num_key_value_heads=2),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    ZooModel("qwen2", _decoder(transformers.Qwen2Config, num_key_value_heads=2),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
]

CASES = [(m, impl) for m in ZOO for impl in m.impls]
CASE_IDS = [f"{m.name}-{impl}" for m, impl in CASES]
