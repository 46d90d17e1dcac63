"""fxfuse in a dozen lines: optimize a Hugging Face model and read the report."""

import torch
import transformers

import fxfuse

config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
ids = torch.randint(0, 1000, (2, 16))

optimized = fxfuse.optimize(model, example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
print(optimized.report)                       # what each pass fused, and why anything was left alone

ids = torch.randint(0, 1000, (3, 40))          # other batch size and sequence length
with torch.no_grad():
    out = optimized(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
print("max abs difference:", (out - ref).abs().max().item())
