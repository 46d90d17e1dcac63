"""The ``fxfuse export-onnx`` command on a ``module:callable``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from fxfuse.cli import main

pytest.importorskip("onnxruntime")

BUILDERS = textwrap.dedent('''
    import torch, transformers

    def bert():
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(0)
        return transformers.AutoModel.from_config(config, attn_implementation="eager")

    class Mystery(torch.nn.Module):  # an op no ONNX translation exists for
        def forward(self, x):
            return torch.special.chebyshev_polynomial_t(x, 3)

    def mystery():
        return Mystery(), {"x": torch.randn(2, 8)}

    not_a_model = 42
''')


@pytest.fixture
def builders(tmp_path, monkeypatch):
    (tmp_path / "cli_builders.py").write_text(BUILDERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("cli_builders", None)
    return tmp_path


def test_export_onnx_from_a_callable(builders, capsys):
    out = builders / "out" / "bert.onnx"
    code = main(["export-onnx", "cli_builders:bert", "-o", str(out), "--batch", "2", "--seq", "8"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "com.microsoft::Attention×1" in printed and "validated with ONNX Runtime" in printed
    assert "padded/rescaled at 2×8 → 3×11" in printed


def test_standard_target_and_explicit_inputs(builders, capsys):
    out = builders / "bert-std.onnx"
    code = main(["export-onnx", "cli_builders:bert", "-o", str(out), "--target", "onnx",
                 "--input", "input_ids=3x5", "--input", "attention_mask=3x5:int64"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "Attention×1" in printed and "com.microsoft" not in printed and "padded/rescaled at 3×5 → 4×8" in printed


def test_a_model_that_cannot_be_exported_fails_cleanly(builders, capsys):
    out = builders / "mystery.onnx"
    assert main(["export-onnx", "cli_builders:mystery", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no ONNX translation for the op" in err and "chebyshev_polynomial_t" in err
    assert not out.exists() and sorted(p.name for p in builders.iterdir()) == ["cli_builders.py"]


@pytest.mark.parametrize("spec, message", [("cli_builders:not_a_model", "not an nn.Module"),
                                           ("cli_builders:missing", "cannot load"),
                                           ("no-such-dir", "neither a model directory")])
def test_bad_model_specs_are_explained(builders, spec, message):
    with pytest.raises(SystemExit, match=message):
        main(["export-onnx", spec, "-o", "x.onnx"])


def test_bad_input_spec_is_explained(builders):
    with pytest.raises(SystemExit, match="NAME=SHAPE"):
        main(["export-onnx", "cli_builders:bert", "-o", "x.onnx", "--input", "input_ids"])


def test_the_module_entry_point_prints_help():
    done = subprocess.run([sys.executable, "-m", "fxfuse.cli", "export-onnx", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "module:callable" in done.stdout and "--target" in done.stdout


def _tiny_causal_lm_dir(path):
    """A 4-layer LLaMA-style causal LM with a word-level tokenizer of 128 words, saved as a transformers dir."""
    import tokenizers
    import transformers

    words = [f"w{i}" for i in range(127)]
    vocab = {"[UNK]": 127, **{w: i for i, w in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(path)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[j] for j in torch.randint(0, 127, (300,), generator=g).tolist()) for _ in range(12)]
    return words, lines


def test_compress_writes_a_checkpoint_that_transformers_loads(tmp_path, capsys):
    import transformers

    _, lines = _tiny_causal_lm_dir(tmp_path / "model")
    (tmp_path / "cal.txt").write_text("\n".join(lines[:8]))
    (tmp_path / "held.txt").write_text("\n".join(lines[8:]))
    code = main(["compress", str(tmp_path / "model"), "--layers", "1", "--scorer", "similarity",
                 "--calibration", str(tmp_path / "cal.txt"), "--held-out", str(tmp_path / "held.txt"),
                 "-o", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fxfuse compress: layers" in printed and "wrote" in printed
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 3
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("w3 w5")["input_ids"] == [3, 5]


def test_compress_merges_kv_heads_into_a_gqa_checkpoint(tmp_path, capsys):
    import transformers

    _, lines = _tiny_causal_lm_dir(tmp_path / "model")
    (tmp_path / "cal.txt").write_text("\n".join(lines))
    code = main(["compress", str(tmp_path / "model"), "--kv-heads", "1", "--calibration", str(tmp_path / "cal.txt"),
                 "-o", str(tmp_path / "out")])
    assert code == 0 and "aligned merge" in capsys.readouterr().out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (4, 1)
    assert reloaded.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)


def test_compress_of_sublayers_explains_why_there_is_no_checkpoint(tmp_path, capsys):
    _, lines = _tiny_causal_lm_dir(tmp_path / "model")
    (tmp_path / "cal.txt").write_text("\n".join(lines))
    code = main(["compress", str(tmp_path / "model"), "--attention-sublayers", "1", "--scorer", "similarity",
                 "--calibration", str(tmp_path / "cal.txt"), "-o", str(tmp_path / "out")])
    assert code == 1
    assert "Compress with layers=" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = main(["compress", str(tmp_path / "model"), "--params", "1.2",
                 "--calibration", str(tmp_path / "cal.txt"), "-o", str(tmp_path / "out")])
    assert code == 1 and "params= is the fraction of the original to keep" in capsys.readouterr().err
