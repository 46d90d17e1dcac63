// fxfuse's CPU kernels for decode-sized calls (a few rows): what bindings.cpp exposes to Python.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fxfuse_cpu {

// skinny_gemm.cpp: act is the Act code of skinny_gemm.py's ACTIVATIONS.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, int64_t act,
                  const c10::optional<at::Tensor>& residual);
at::Tensor gated(const at::Tensor& x, const at::Tensor& w_gate, const c10::optional<at::Tensor>& b_gate,
                 const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up, int64_t act);
std::string isa();

// rows.cpp
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& w, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const c10::optional<at::Tensor>& w, double eps);
// None where cos and sin do not broadcast within q's and k's shapes.
std::optional<std::tuple<at::Tensor, at::Tensor>> rope(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& cos, const at::Tensor& sin);

}  // namespace fxfuse_cpu
