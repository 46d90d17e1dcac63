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
IMAGE = 32  # image side, in pixels (4×4 patches of 8)
MELS = 16
AUDIO_POSITIONS = 16  # Whisper's encoder takes exactly twice this many frames


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
    part: str | None = None  # "encoder": test the encoder of an encoder-decoder model
    modality: str = "text"  # "text" (token ids + padding mask), "image" or "audio"
    extra_mlp_ops: int = 0  # activations beyond one per layer (a convolution stem, shared experts, a dense layer)
    kv_heads: int | None = None  # key/value heads, where the config does not say num_key_value_heads

    def build(self, impl: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(self.config(), attn_implementation=impl)
        if self.part == "encoder":
            model = model.get_encoder()
        return model.eval()

    def inputs(self, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs of the given batch size; text inputs also take ``seq`` (images and audio have a fixed size).

        Text: token ids and a padding mask with the last row padded.
        """
        gen = torch.Generator().manual_seed(seed)
        if self.modality == "image":
            return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}
        if self.modality == "audio":
            return {"input_features": torch.randn(batch, MELS, 2 * AUDIO_POSITIONS, generator=gen)}
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
    # Mistral with a sliding window shorter than the test sequences: the window lives in the mask.
    ZooModel("mistral", _decoder(transformers.MistralConfig, num_key_value_heads=2, sliding_window=4),
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


def _seq2seq(cls, **extra) -> Callable[[], transformers.PretrainedConfig]:
    return lambda: cls(
        d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=2 * HIDDEN, decoder_ffn_dim=2 * HIDDEN, **extra,
    )


def _vision(cls, **extra) -> Callable[[], transformers.PretrainedConfig]:
    return lambda: cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=2 * HIDDEN, image_size=IMAGE, patch_size=8, **extra)


_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)

ZOO += [
    # T5: RMSNorm without mean-centering, unscaled attention plus a relative position bias, ReLU MLP.
    ZooModel("t5", lambda: transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=2 * HIDDEN,
                                                 num_layers=LAYERS, num_heads=HEADS, **_TOKENS),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS, mlp_op=None,
             part="encoder"),
    # BART's embedding LN reads token + position embeddings of the full (batch, seq) shape: fused with that add too.
    ZooModel("bart", _seq2seq(transformers.BartConfig, vocab_size=VOCAB, max_position_embeddings=64, **_TOKENS),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=2 * LAYERS + 1,
             mlp_op="gelu", part="encoder"),
    # Whisper's encoder: two convolutions with GELU before the pre-LN layers, a final LN.
    ZooModel("whisper", _seq2seq(transformers.WhisperConfig, vocab_size=VOCAB, num_mel_bins=MELS,
                                 max_source_positions=AUDIO_POSITIONS, max_target_positions=AUDIO_POSITIONS,
                                 decoder_start_token_id=0, **_TOKENS),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=2 * LAYERS,
             mlp_op="gelu", part="encoder", modality="audio", extra_mlp_ops=2),
    ZooModel("vit", _vision(transformers.ViTConfig), attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm",
             residual_norms=2 * LAYERS, mlp_op="gelu", modality="image"),
    # CLIP: quick GELU x·σ(1.702x); the vision tower has a pre-LN and a post-LN on the pooled token.
    ZooModel("clip_text", lambda: transformers.CLIPTextConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, max_position_embeddings=64, **_TOKENS),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=2 * LAYERS, mlp_op="gelu"),
    ZooModel("clip_vision", _vision(transformers.CLIPVisionConfig), attention=LAYERS, norms=2 * LAYERS + 2,
             norm_op="layer_norm", residual_norms=2 * LAYERS - 1, mlp_op="gelu", modality="image"),
]

ZOO += [
    # Gemma 2: attention logits soft-capped with tanh; pre- and post-norms around attention and MLP.
    ZooModel("gemma2", _decoder(transformers.Gemma2Config, num_key_value_heads=2, head_dim=8),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS, impls=("eager",)),
    # Falcon: parallel attention/MLP reading one LN, multi-query attention, in-place score scaling.
    ZooModel("falcon", lambda: transformers.FalconConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                bos_token_id=0, eos_token_id=0),
             attention=LAYERS, norms=LAYERS + 1, norm_op="layer_norm", residual_norms=LAYERS, mlp_op="gelu",
             rope=LAYERS, kv_heads=1),
    # BLOOM: ALiBi position bias through baddbmm on 3-D (batch·heads) tensors, tanh GELU by hand.
    ZooModel("bloom", lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                                       n_head=HEADS, bos_token_id=0, eos_token_id=0),
             attention=LAYERS, norms=2 * LAYERS + 2, norm_op="layer_norm", residual_norms=2 * LAYERS,
             mlp_op="gelu", impls=("eager",)),
    # GPT-J: parallel attention/MLP, interleaved partial rotary (rotary_dim < head_dim).
    ZooModel("gptj", lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                                     n_positions=64, rotary_dim=4, bos_token_id=0, eos_token_id=0),
             attention=LAYERS, norms=LAYERS + 1, norm_op="layer_norm", residual_norms=LAYERS, mlp_op="gelu",
             rope=LAYERS, impls=("eager",)),
    # DeBERTa-v2 (v3 settings): disentangled attention (content-to-position and position-to-content bias terms),
    # scale folded into k; a LayerNorm on the relative position embeddings.
    ZooModel("deberta-v2", lambda: transformers.DebertaV2Config(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, max_position_embeddings=64, relative_attention=True,
                pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=64, norm_rel_ebd="layer_norm",
                share_att_key=True, position_biased_input=False),
             attention=LAYERS, norms=2 * LAYERS + 2, norm_op="layer_norm", residual_norms=2 * LAYERS, mlp_op="gelu",
             impls=("eager",)),
]

_MOE = dict(num_experts=4, num_experts_per_tok=2)
_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
_LOCAL_GLOBAL = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])

# Families released in the last two years (windows of 4 < the test sequences, so local layers mask something).
ZOO += [
    # Gemma 3: alternating sliding/global layers with their own rope tables, q/k RMSNorm, sandwich norms, GeGLU.
    ZooModel("gemma3", _decoder(transformers.Gemma3TextConfig, num_key_value_heads=2, head_dim=8,
                                query_pre_attn_scalar=8, **_LOCAL_GLOBAL),
             attention=LAYERS, norms=6 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Qwen3-MoE: softmax → top-k router, experts through grouped GEMMs, q/k norm.
    ZooModel("qwen3_moe", _decoder(transformers.Qwen3MoeConfig, num_key_value_heads=2, head_dim=8,
                                   moe_intermediate_size=HIDDEN, **_MOE),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Qwen2-MoE: routed experts plus a sigmoid-gated shared expert (two gated MLPs per layer).
    ZooModel("qwen2_moe", _decoder(transformers.Qwen2MoeConfig, num_key_value_heads=2, moe_intermediate_size=HIDDEN,
                                   shared_expert_intermediate_size=2 * HIDDEN, **_MOE),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", extra_mlp_ops=LAYERS, rope=LAYERS),
    ZooModel("olmoe", _decoder(transformers.OlmoeConfig, num_key_value_heads=2, **_MOE),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # MiniCPM3: latent attention (MLA) with a decoupled rotary key shared by the heads, rotate_half rope.
    ZooModel("minicpm3", _decoder(transformers.MiniCPM3Config, num_key_value_heads=HEADS, dim_model_base=HIDDEN,
                                  **_MLA),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # ModernBERT: rotary encoder, alternating global/local attention, GeGLU, bias-free LN (layer 0 has no attn norm).
    ZooModel("modernbert", lambda: transformers.ModernBertConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64, local_attention=4,
                layer_types=["full_attention", "sliding_attention"], pad_token_id=0, bos_token_id=0, eos_token_id=0,
                cls_token_id=0, sep_token_id=0),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Nomic BERT: post-LN rotary encoder with SwiGLU (embedding models).
    ZooModel("nomic_bert", lambda: transformers.NomicBertConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64, pad_token_id=0),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="layer_norm", residual_norms=2 * LAYERS + 1,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # OLMo 2: norms on the branch outputs (post-norm) and q/k RMSNorm over the whole projection.
    ZooModel("olmo2", _decoder(transformers.Olmo2Config, num_key_value_heads=2),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=1,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # SmolLM3: no rope on every other layer.
    ZooModel("smollm3", _decoder(transformers.SmolLM3Config, num_key_value_heads=2, no_rope_layer_interval=2),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=1),
    # GLM-4: partial interleaved rotary, sandwich norms after attention and MLP.
    ZooModel("glm4", _decoder(transformers.Glm4Config, num_key_value_heads=2, head_dim=8),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # DeepSeek-V3: MLA with a decoupled rotary key shared by the heads (q·k head dim 12, v 8), interleaved rope
    # whose output is de-interleaved, sigmoid group-limited router, a shared expert, a dense first layer
    # (three gated MLPs: dense, routed experts, shared expert).
    ZooModel("deepseek_v3", _decoder(transformers.DeepseekV3Config, num_key_value_heads=HEADS, n_routed_experts=4,
                                     num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=HIDDEN,
                                     first_k_dense_replace=1, n_group=2, topk_group=1, **_MLA),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", extra_mlp_ops=1, rope=LAYERS),
    # GPT-OSS: learned per-head sink logits joined to the scores and dropped after the softmax, alternating
    # sliding/full layers, half-width YaRN rope on chunked halves, MoE whose clamped SwiGLU fuses its x·σ(1.702x)
    # core ("gelu"). Hugging Face gives it no SDPA path.
    ZooModel("gpt_oss", _decoder(transformers.GptOssConfig, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                 num_experts_per_tok=2, **_LOCAL_GLOBAL),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gelu", rope=LAYERS, impls=("eager",)),
    # DiffLlama: differential attention, two softmax maps per layer over the halves of V (two attention ops per
    # layer; in the eager spelling CSE first merges the two identical score chains into one softmax).
    ZooModel("diffllama", _decoder(transformers.DiffLlamaConfig, num_key_value_heads=2),
             attention=2 * LAYERS, norms=3 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Cohere 2: parallel attention/MLP on one hand-written LayerNorm, interleaved rope on the sliding layers only.
    ZooModel("cohere2", _decoder(transformers.Cohere2Config, num_key_value_heads=2, **_LOCAL_GLOBAL),
             attention=LAYERS, norms=LAYERS + 1, norm_op="layer_norm", residual_norms=LAYERS,
             mlp_op="gated_mlp_act", rope=1),
    # HunYuan dense: q/k RMSNorm after the rope (the rope's final add is no residual).
    ZooModel("hunyuan_v1_dense", _decoder(transformers.HunYuanDenseV1Config, num_key_value_heads=2, head_dim=8),
             attention=LAYERS, norms=4 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
    # Granite: scalar multipliers on embeddings, residuals, attention scores and logits.
    ZooModel("granite", _decoder(transformers.GraniteConfig, num_key_value_heads=2, embedding_multiplier=2.0,
                                 residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0),
             attention=LAYERS, norms=2 * LAYERS + 1, norm_op="rms_norm", residual_norms=2 * LAYERS,
             mlp_op="gated_mlp_act", rope=LAYERS),
]
CASES = [(m, impl) for m in ZOO for impl in m.impls]
CASE_IDS = [f"{m.name}-{impl}" for m, impl in CASES]
