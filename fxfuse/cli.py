"""The ``fxfuse`` command line.

    fxfuse export-onnx MODEL -o model.onnx [--target ort|onnx] [--batch 2 --seq 16] [--input NAME=SHAPE[:DTYPE]]…
    fxfuse compress MODEL_DIR --layers 3 --calibration texts.txt [--held-out other.txt] -o OUT_DIR
    fxfuse compress MODEL_DIR --kv-heads 1 --calibration texts.txt -o OUT_DIR

MODEL is a ``transformers`` model directory (loaded with ``AutoModel``) or a
Python ``module:callable`` that returns an ``nn.Module`` (or a pair of the
module and its example keyword inputs). Without ``--input``, a text model
gets ``input_ids`` (random token ids) and ``attention_mask`` (ones) of shape
``--batch`` × ``--seq``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "bool": torch.bool}


def _load(spec: str) -> tuple[nn.Module, dict[str, Any] | None]:
    """A model from a directory or a ``module:callable``; the callable may also return example kwargs."""
    if Path(spec).is_dir():
        import transformers

        return transformers.AutoModel.from_pretrained(spec), None
    if ":" not in spec:
        raise SystemExit(f"fxfuse: {spec!r} is neither a model directory nor a 'module:callable'")
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"fxfuse: cannot load {spec!r}: {e}") from e
    built = target() if callable(target) and not isinstance(target, nn.Module) else target
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        return built[0], dict(built[1])
    if not isinstance(built, nn.Module):
        raise SystemExit(f"fxfuse: {spec!r} gave a {type(built).__name__}, not an nn.Module")
    return built, None


def _parse_input(text: str) -> tuple[str, tuple[int, ...], torch.dtype]:
    """NAME=2x16[:int64] → ("NAME", (2, 16), torch.int64)."""
    name, eq, rest = text.partition("=")
    shape_text, _, dtype_text = rest.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x"))
    except ValueError:
        shape = ()
    if not eq or not name or not shape:
        raise SystemExit(f"fxfuse: --input takes NAME=SHAPE[:DTYPE] (e.g. input_ids=2x16:int64), got {text!r}")
    if dtype_text and dtype_text not in _DTYPES:
        raise SystemExit(f"fxfuse: unknown dtype {dtype_text!r} (one of {', '.join(_DTYPES)})")
    default = torch.int64 if "ids" in name or "mask" in name else torch.float32
    return name, shape, _DTYPES.get(dtype_text, default)


def _example(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", None) or 1000)
    specs = [_parse_input(t) for t in args.input] or [
        ("input_ids", (args.batch, args.seq), torch.int64), ("attention_mask", (args.batch, args.seq), torch.int64)]
    example = {}
    for name, shape, dtype in specs:
        if "mask" in name:
            example[name] = torch.ones(shape, dtype=dtype)
        elif dtype.is_floating_point:
            example[name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            example[name] = torch.randint(0, vocab, shape, generator=gen).to(dtype)
    return example


def _export_onnx(args: argparse.Namespace) -> int:
    from fxfuse import OnnxExportError, export_onnx
    from fxfuse.ir.capture import CaptureError

    model, example = _load(args.model)
    if example is None or args.input:
        example = _example(model, args)
    try:
        result = export_onnx(model.eval(), example_kwargs=example, path=args.output, target=args.target,
                             dynamic=not args.static, validate=not args.no_validate)
    except (OnnxExportError, CaptureError) as e:
        print(f"fxfuse export-onnx: {e}", file=sys.stderr)
        return 1
    if args.report:
        print(result.report)
    print(result)
    return 0


def _compress(args: argparse.Namespace) -> int:
    import transformers

    from fxfuse import FxfuseError, compress

    if not Path(args.model).is_dir():
        raise SystemExit(f"fxfuse compress: {args.model!r} is not a transformers model directory")
    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, **gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **gguf).eval()

    def texts(path: str) -> tuple[Any, list[str]]:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        return tokenizer, lines

    units = {"layers": args.layers, "attention_sublayers": args.attention_sublayers, "params": args.params,
             "kv_heads": args.kv_heads}
    scorer = {} if args.kv_heads else {"scorer": args.scorer}  # merging KV heads scores nothing
    try:
        compressed = compress(model, texts(args.calibration), held_out=texts(args.held_out) if args.held_out else None,
                              repair=not args.no_repair, max_quality_loss=args.max_quality_loss, **scorer,
                              **{k: v for k, v in units.items() if v})
        print(compressed.compress_report)
        compressed.save_pretrained(args.output)
    except FxfuseError as e:
        print(f"fxfuse compress: {e}", file=sys.stderr)
        return 1
    tokenizer.save_pretrained(args.output)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxfuse", description="fxfuse: fuse and export PyTorch transformer models.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export-onnx", help="optimize a model and write it as validated ONNX with fused ops",
        description="Optimize MODEL with fxfuse and write it as ONNX (fused ops), validated in ONNX Runtime.")
    export.add_argument("model", help="a transformers model directory, or module:callable returning an nn.Module")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--target", choices=["ort", "onnx"], default="ort",
                        help="ort: ONNX Runtime contrib ops (default); onnx: standard opset-23 ops only")
    export.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    export.add_argument("--seq", type=int, default=16, help="example sequence length (default 16)")
    export.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                        help="an example input, e.g. pixel_values=2x3x224x224:float32 (repeatable; replaces the "
                             "default input_ids/attention_mask)")
    export.add_argument("--static", action="store_true", help="fix every input dim to the example's")
    export.add_argument("--no-validate", action="store_true", help="skip onnx.checker and the ONNX Runtime check")
    export.add_argument("--report", action="store_true", help="also print the optimize() report")
    export.set_defaults(run=_export_onnx)

    comp = commands.add_parser(
        "compress", help="remove layers of a causal LM on calibration text and write a transformers checkpoint",
        description="Remove whole layers (or attention sublayers) of the causal LM in MODEL_DIR, scored and "
                    "repaired on calibration text, and write the result as a transformers checkpoint.")
    comp.add_argument("model", help="a transformers causal-LM directory")
    comp.add_argument("-o", "--output", required=True, help="the checkpoint directory to write")
    comp.add_argument("--calibration", required=True, help="a UTF-8 text file, one document per line")
    comp.add_argument("--held-out", help="another text file for held-out perplexity (default: part of --calibration)")
    comp.add_argument("--layers", type=int, default=0, help="whole layers to remove")
    comp.add_argument("--params", type=float, help="instead of a count: remove whole layers until at most this "
                      "fraction of the parameters is left (0.8 = 80%%)")
    comp.add_argument("--attention-sublayers", type=int, default=0,
                      help="attention sublayers to remove (not expressible in a transformers config: reported only)")
    comp.add_argument("--kv-heads", type=int, default=0,
                      help="instead: merge every layer's key/value heads down to this many (aligned merge; the "
                           "checkpoint has that num_key_value_heads)")
    comp.add_argument("--scorer", choices=["loss", "similarity"], default="loss")
    comp.add_argument("--no-repair", action="store_true", help="skip the closed-form repair")
    comp.add_argument("--max-quality-loss", type=float, help="stop before perplexity rises by more (0.1 = +10%%)")
    comp.add_argument("--gguf-file", help="the GGUF file in MODEL_DIR to load (de-quantized to float32)")
    comp.set_defaults(run=_compress)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
