"""fxfuse: a compiler-style graph optimizer for PyTorch transformer models."""

from fxfuse.api import OptimizedModule, optimize
from fxfuse.compress import CompressedModule, CompressReport, compress
from fxfuse.dynamo import Backend, backend, last_report
from fxfuse.errors import FxfuseError, InputError
from fxfuse.ir import dialect as _dialect  # registers the fxfuse:: ops
from fxfuse.ir.capture import CaptureError
from fxfuse.ir.verify import VerificationError
from fxfuse.onnx_export import OnnxExport, OnnxExportError, export_onnx
from fxfuse.passes.manager import NumericsError, PassFailure, PassResult, Rejection
from fxfuse.report import Report

ops = _dialect.OPS

__all__ = [
    "Backend", "backend", "last_report", "CaptureError", "CompressReport", "CompressedModule", "compress", "FxfuseError", "InputError", "NumericsError", "OnnxExport", "OnnxExportError", "OptimizedModule",
    "PassFailure", "PassResult", "Rejection", "Report", "VerificationError", "export_onnx", "optimize", "ops",
]
__version__ = "0.1.0"
