// Row-wise ops of a decode step (RMSNorm, residual add + RMSNorm, rotary embedding) on a few rows.
//
// At decode sizes (one token: a 576-wide row, 12 heads of 64) these ops are a few hundred floats: the time
// of their ATen composites (5-8 kernels each, about 30-60 us a call) is all dispatch. One C++ call each
// computes the same values in a few microseconds. Float32 only; bigger calls keep the ATen forms.

#include "kernels.h"

#include <cmath>
#include <optional>
#include <vector>

namespace fxfuse_cpu {
namespace {

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, ": float32 CPU tensors only, got ",
              t.scalar_type(), " on ", t.device());
}

const float* weight_of(const c10::optional<at::Tensor>& w, int64_t n, const char* what) {
  if (!w.has_value()) return nullptr;
  check_float_cpu(*w, what);
  TORCH_CHECK(w->dim() == 1 && w->size(0) == n && w->is_contiguous(), what,
              ": the weight must be a contiguous vector of the last dim's size ", n);
  return w->data_ptr<float>();
}

// y = x * rsqrt(mean(x^2) + eps) (* w) for one row; the sum of squares in double, so the result is the
// float32 reference's to within its own rounding.
void normalize_row(const float* x, const float* w, float* y, int64_t n, double eps) {
  double squares = 0;
  for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float scale = static_cast<float>(1.0 / std::sqrt(squares / n + eps));
  if (w) {
    for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * scale);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale;
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& w, double eps) {
  check_float_cpu(x_in, "fxfuse rows.rms_norm");
  TORCH_CHECK(x_in.dim() >= 1, "fxfuse rows.rms_norm: x must have a last dim");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* wp = weight_of(w, n, "fxfuse rows.rms_norm");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) normalize_row(xp + r * n, wp, yp + r * n, n, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const c10::optional<at::Tensor>& w, double eps) {
  check_float_cpu(x_in, "fxfuse rows.add_rms_norm");
  check_float_cpu(residual_in, "fxfuse rows.add_rms_norm");
  TORCH_CHECK(x_in.sizes() == residual_in.sizes() && x_in.dim() >= 1,
              "fxfuse rows.add_rms_norm: x and the residual must have one shape");
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous();
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* wp = weight_of(w, n, "fxfuse rows.add_rms_norm");
  at::Tensor total = at::empty_like(x), out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  float* sp = total.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  for (int64_t i = 0; i < rows * n; ++i) sp[i] = xp[i] + rp[i];
  for (int64_t r = 0; r < rows; ++r) normalize_row(sp + r * n, wp, yp + r * n, n, eps);
  return {out, total};
}

namespace {

// x' = x cos + rotate_half(x) sin on the first R = cos.size(-1) dims, the rest copied, for every row of x
// (all dims but the last, in any layout); cos and sin are expanded views of x's shape (zero strides).
at::Tensor rotate_half(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = cos.size(-1);
  const at::Tensor c = cos.expand(shape), s = sin.expand(shape);
  at::Tensor out = at::empty_like(x);
  const int64_t dims = x.dim(), d = x.size(-1), r = cos.size(-1), half = r / 2;
  const int64_t rows = d ? x.numel() / d : 0;
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(-1), cs = c.stride(-1), ss = s.stride(-1), os = out.stride(-1);
  for (int64_t row = 0; row < rows; ++row) {
    int64_t xo = 0, co = 0, so = 0, oo = 0, rest = row;
    for (int64_t dim = dims - 2; dim >= 0; --dim) {
      const int64_t i = rest % x.size(dim);
      rest /= x.size(dim);
      xo += i * x.stride(dim);
      co += i * c.stride(dim);
      so += i * s.stride(dim);
      oo += i * out.stride(dim);
    }
    const float* xr = xp + xo;
    const float* cr = cp + co;
    const float* sr = sp + so;
    float* orow = op + oo;
    for (int64_t j = 0; j < half; ++j) {
      orow[j * os] = xr[j * xs] * cr[j * cs] - xr[(j + half) * xs] * sr[j * ss];
      orow[(j + half) * os] = xr[(j + half) * xs] * cr[(j + half) * cs] + xr[j * xs] * sr[(j + half) * ss];
    }
    for (int64_t j = r; j < d; ++j) orow[j * os] = xr[j * xs];
  }
  return out;
}

}  // namespace

namespace {

// True if cos's dims before the last broadcast to x's without adding any (x keeps its shape).
bool broadcasts_within(const at::Tensor& cos, const at::Tensor& x) {
  if (cos.dim() > x.dim()) return false;
  for (int64_t i = 2; i <= cos.dim(); ++i) {
    const int64_t c = cos.size(-i);
    if (c != 1 && c != x.size(-i)) return false;
  }
  return true;
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> rope(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* t : {&q, &k, &cos, &sin}) check_float_cpu(*t, "fxfuse rows.rope");
  TORCH_CHECK(cos.sizes() == sin.sizes(), "fxfuse rows.rope: cos and sin must have one shape");
  const int64_t r = cos.size(-1);
  TORCH_CHECK(r % 2 == 0 && r <= q.size(-1) && r <= k.size(-1),
              "fxfuse rows.rope: the rotary dim must be even and at most the head dim");
  if (!broadcasts_within(cos, q) || !broadcasts_within(cos, k)) return std::nullopt;
  return std::make_tuple(rotate_half(q, cos, sin), rotate_half(k, cos, sin));
}

}  // namespace fxfuse_cpu
