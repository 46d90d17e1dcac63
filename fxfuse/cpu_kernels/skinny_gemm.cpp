// Skinny GEMMs on the CPU: y = epilogue(x @ w.T + b) for x of at most a few rows (a decode step).
//
// At one row a GEMM is a matrix-vector product: every weight is read once and used once, so its speed is
// the memory bandwidth. The kernels below stream each weight row once, split the output rows over ATen's
// intra-op threads (at::parallel_for), and apply the epilogue (bias, activation, gate * up, residual add)
// to the few output values in registers, so nothing but the result is written.
//
// Built with torch.utils.cpp_extension (fxfuse/cpu_kernels/build.py) without -march flags, so the binary
// runs on any x86-64 CPU; the AVX2/FMA kernel is picked at run time where the CPU has it.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FXFUSE_X86 1
#endif

namespace fxfuse_cpu {
namespace {

enum Act : int64_t { kNone = 0, kRelu = 1, kSilu = 2, kGeluErf = 3, kGeluTanh = 4 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case kRelu: return v > 0.f ? v : 0.f;
    case kSilu: return v / (1.f + std::exp(-v));
    case kGeluErf: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case kGeluTanh: {
      const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + std::tanh(inner));
    }
    default: return v;
  }
}

// sum_i x[i] * w[i]: the portable form (the compiler vectorizes it for the baseline ISA).
float dot_generic(const float* x, const float* w, int64_t k) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * w[i + j];
  float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < k; ++i) sum += x[i] * w[i];
  return sum;
}

#ifdef FXFUSE_X86
// The same with AVX2 and FMA, four accumulators (32 floats a step). One weight row at a time keeps the
// weight one sequential stream per thread, which the hardware prefetcher follows best: on an AMD EPYC Zen 4
// it read 25 GB/s on one thread, against 11 GB/s for four rows side by side (four streams) and 21 GB/s
// with AVX-512 (benchmarks/results/decode.md).
__attribute__((target("avx2,fma"))) float dot_avx2(const float* x, const float* w, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
  const __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float sum = _mm_cvtss_f32(s);
  for (; i < k; ++i) sum += x[i] * w[i];
  return sum;
}
#endif

using Dot = float (*)(const float*, const float*, int64_t);

Dot pick_dot() {
#ifdef FXFUSE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return dot_avx2;
#endif
  return dot_generic;
}

const Dot dot_kernel = pick_dot();

// Output rows per parallel task unit: a thread gets a contiguous run of weight rows (one stream), and a
// matrix of fewer rows than this runs on one thread (the parallel region's start costs more than it saves).
constexpr int64_t GRAIN_ROWS = 64;

void check_operands(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                    const char* what) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, what, ": float32 only, got ",
              x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, what, ": the weight must be (out, in) with unit stride in `in`");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), what, ": x's last dim ", x.size(-1),
              " does not match the weight's in-features ", w.size(1));
  if (b.has_value()) {
    TORCH_CHECK(b->device().is_cpu() && b->scalar_type() == at::kFloat && b->dim() == 1 &&
                b->size(0) == w.size(0) && b->is_contiguous(),
                what, ": the bias must be a contiguous float32 CPU vector of the weight's out-features");
  }
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

}  // namespace

// act(x @ w.T + b) (+ residual), for every row of x.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& b, int64_t act,
                  const c10::optional<at::Tensor>& residual_in) {
  check_operands(x_in, w, b, "fxfuse skinny_gemm.linear");
  TORCH_CHECK(act >= kNone && act <= kGeluTanh, "fxfuse skinny_gemm.linear: unknown activation ", act);
  const int64_t n = w.size(0), k = w.size(1), ldw = w.stride(0);
  const at::Tensor x = x_in.contiguous().view({-1, k});
  const int64_t m = x.size(0);
  at::Tensor out = at::empty(out_shape(x_in, n), x_in.options());
  const float* residual = nullptr;
  at::Tensor residual_c;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->device().is_cpu() && residual_in->sizes() == out.sizes() &&
                residual_in->scalar_type() == at::kFloat,
                "fxfuse skinny_gemm.linear: the residual must be a float32 CPU tensor of the output's shape");
    residual_c = residual_in->contiguous();
    residual = residual_c.data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, n, GRAIN_ROWS, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* wr = wp + r * ldw;
      const float bias = bp ? bp[r] : 0.f;
      for (int64_t row = 0; row < m; ++row) {
        const int64_t j = row * n + r;
        const float v = activate(dot_kernel(xp + row * k, wr, k) + bias, act);
        yp[j] = residual ? v + residual[j] : v;
      }
    }
  });
  return out;
}

// act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up): the gated MLP's two GEMMs in one call, the
// (rows x intermediate) gate and up products never written to memory.
at::Tensor gated(const at::Tensor& x_in, const at::Tensor& w_gate, const c10::optional<at::Tensor>& b_gate,
                 const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up, int64_t act) {
  check_operands(x_in, w_gate, b_gate, "fxfuse skinny_gemm.gated (gate)");
  check_operands(x_in, w_up, b_up, "fxfuse skinny_gemm.gated (up)");
  TORCH_CHECK(w_gate.size(0) == w_up.size(0), "fxfuse skinny_gemm.gated: gate and up have ", w_gate.size(0),
              " and ", w_up.size(0), " out-features");
  TORCH_CHECK(act >= kNone && act <= kGeluTanh, "fxfuse skinny_gemm.gated: unknown activation ", act);
  const int64_t n = w_gate.size(0), k = w_gate.size(1), ldg = w_gate.stride(0), ldu = w_up.stride(0);
  const at::Tensor x = x_in.contiguous().view({-1, k});
  const int64_t m = x.size(0);
  at::Tensor out = at::empty(out_shape(x_in, n), x_in.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = w_gate.data_ptr<float>();
  const float* up = w_up.data_ptr<float>();
  const float* bg = b_gate.has_value() ? b_gate->data_ptr<float>() : nullptr;
  const float* bu = b_up.has_value() ? b_up->data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  // Each thread reads its gate rows, then the same up rows: one sequential stream at a time. Reading gate
  // row r beside up row r (two streams a thread) read 40% slower on an AMD EPYC Zen 4.
  at::parallel_for(0, n, GRAIN_ROWS / 2, [&](int64_t r0, int64_t r1) {
    std::vector<float> gates((r1 - r0) * m);
    for (int64_t r = r0; r < r1; ++r) {
      const float* gr = gp + r * ldg;
      for (int64_t row = 0; row < m; ++row)
        gates[(r - r0) * m + row] = activate(dot_kernel(xp + row * k, gr, k) + (bg ? bg[r] : 0.f), act);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const float* ur = up + r * ldu;
      for (int64_t row = 0; row < m; ++row)
        yp[row * n + r] = gates[(r - r0) * m + row] * (dot_kernel(xp + row * k, ur, k) + (bu ? bu[r] : 0.f));
    }
  });
  return out;
}

std::string isa() {
  return dot_kernel == dot_generic ? "generic" : "avx2+fma";
}

}  // namespace fxfuse_cpu
