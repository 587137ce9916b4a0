// Row-invariant RMS norm: y = (x * r) * w with r = 1 / sqrt(mean(x^2) + eps), per row of the last dimension.
// The sum of squares runs in 16 lanes over the row (a lane holds columns l, l + 16, ...; the columns past the
// last whole 16 are added one by one after), lanes added by a fixed tree: a fixed sequence of IEEE operations
// (built with -ffp-contract=off) that depends only on the row, so its bits do not depend on how many rows share
// the call or how they are split between threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "lanes.h"

using leapdecode::kLanes;
using leapdecode::lane_sum;
using leapdecode::load;
using leapdecode::splat;
using leapdecode::store;
using leapdecode::v16;

namespace {

void norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  v16 acc = splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const v16 v = load(x + j);
    acc = acc + v * v;
  }
  float sum = lane_sum(acc);
  for (; j < n; ++j) sum = sum + x[j] * x[j];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  const v16 rv = splat(r);
  j = 0;
  for (; j + kLanes <= n; j += kLanes) store(y + j, (load(x + j) * rv) * load(w + j));
  for (; j < n; ++j) y[j] = (x[j] * r) * w[j];
}

}  // namespace

// x (..., n) float32 contiguous, weight (n) float32 (the module's scale, Gemma's 1 + w already added) -> like x
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous(), "x: contiguous float32");
  TORCH_CHECK(weight.dtype() == at::kFloat && weight.dim() == 1 && weight.is_contiguous() &&
                  x.dim() >= 1 && x.size(-1) == weight.size(0),
              "weight: (n) float32, n the last dimension of x");
  at::Tensor y = at::empty_like(x);
  const int64_t n = weight.size(0), rows = n == 0 ? 0 : x.numel() / n;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) norm_row(xp + m * n, wp, e, n, yp + m * n);
  });
  return y;
}
