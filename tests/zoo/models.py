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
    mlp_op: str | None  # "gelu" or "gated_mlp_act", one per layer; None for a ReLU MLP
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


def _encoder_norms(layers: int = LAYERS) -> dict:
    """Post-LN encoder: embedding LN plus two residual LNs per layer."""
    return dict(norms=2 * layers + 1, residual_norms=2 * layers)


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
    ZooModel(
        "distilbert",
        lambda: transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                              hidden_dim=2 * HIDDEN, max_position_embeddings=64),
        attention=LAYERS, norm_op="layer_norm", mlp_op="gelu", **_encoder_norms(),
    ),
    # Parallel attention/MLP: both LNs of a layer read the same residual stream, one of them fused with the add.
    ZooModel("gpt_neox", _decoder(transformers.GPTNeoXConfig), attention=LAYERS, norms=2 * LAYERS + 1,
             norm_op="layer_norm", residual_norms=LAYERS, mlp_op="gelu", rope=LAYERS),
    # OPT flattens (batch, seq) before the MLP's LN, so only the attention LN of layer 1 reads an add.
    ZooModel(
        "opt",
        lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, ffn_dim=2 * HIDDEN, max_position_embeddings=64,
                                       word_embed_proj_dim=HIDDEN, bos_token_id=0, eos_token_id=0, pad_token_id=1),
        attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=1, mlp_op=None,
    ),
    ZooModel("mixtral", _decoder(transformers.MixtralConfig, num_key_value_heads=2, num_local_experts=4,
                                 num_experts_per_tok=2),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Qwen3 adds a per-head RMSNorm on q and on k in every layer.
    ZooModel("qwen3", _decoder(transformers.Qwen3Config, num_key_value_heads=2, head_dim=8),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Phi: one LN per layer feeds attention and MLP in parallel; partial rotary.
    ZooModel("phi", _decoder(transformers.PhiConfig), attention=LAYERS, norms=LAYERS + 1, norm_op="layer_norm",
             residual_norms=LAYERS, mlp_op="gelu", rope=LAYERS),
    ZooModel("phi3", _decoder(transformers.Phi3Config, num_key_value_heads=2),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Gemma: RMSNorm scales by (1 + w), GeGLU MLP.
    ZooModel("gemma", _decoder(transformers.GemmaConfig, num_key_value_heads=2, head_dim=8),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
]

CASES = [(m, impl) for m in ZOO for impl in m.impls]
CASE_IDS = [f"{m.name}-{impl}" for m, impl in CASES]