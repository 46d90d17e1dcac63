// The Python module of fxfuse's CPU kernels (built by fxfuse/cpu_kernels/build.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &fxfuse_cpu::linear, "act(x @ w.T + b) (+ residual) for skinny x",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("act"), py::arg("residual"));
  m.def("gated", &fxfuse_cpu::gated, "act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up) for skinny x",
        py::arg("x"), py::arg("w_gate"), py::arg("b_gate"), py::arg("w_up"), py::arg("b_up"), py::arg("act"));
  m.def("isa", &fxfuse_cpu::isa, "the instruction set the GEMM kernels picked on this CPU");
  m.def("rms_norm", &fxfuse_cpu::rms_norm, "RMSNorm over the last dim", py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("add_rms_norm", &fxfuse_cpu::add_rms_norm, "(rms_norm(x + residual), x + residual)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rope", &fxfuse_cpu::rope, "rotate_half rotary embedding of q and k", py::arg("q"), py::arg("k"),
        py::arg("cos"), py::arg("sin"));
}
