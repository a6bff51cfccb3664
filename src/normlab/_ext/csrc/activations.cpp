// Passes over (N, C, S) activations, read as N * C rows of S positions: Online
// Normalization's, fused (Chiley et al. 2019, arXiv:1905.05894), and batch statistics.
//
// Online Normalization: `OnlineNormFunction` in normlab/functional.py is the
// specification; its eager path runs these as torch operations, 4 passes forward after
// the moments (y, the affine map, the clamp) and 5 backward (the affine map again, the
// clamp's gradient, the sums, the scaling, the correction along y). Here each row is
// visited once per pass, as BatchNorm's kernels visit it:
//   forward:  y = x * scale + shift and out = clamp(gamma * y + beta), one pass;
//   backward: the clamp's mask is recomputed from y, never stored; one pass sums
//             g * y and g over each row, one pass writes g * p + q + r * y.
// `limit` is the clamp's bound (infinity: no clamp).
//
// Batch statistics: `torch.batch_norm_update_stats` (Welford's update per element) took
// ~4x the time of a pass over the activations on CPU; `channel_moments` takes two
// vectorized passes per channel, the second over data still in cache.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

// As in enorm.cpp: the row loops are compiled for AVX2 + FMA and for the baseline, and
// the CPU picks at load time. The forward and the backward of a row run the same clone,
// so the affine map, contracted to an FMA or not, gives the same z in both.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ROW_LOOP __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ROW_LOOP
#endif

namespace {

constexpr int64_t kGrainElements = 32768;  // per parallel task: ~L2-sized, enough to amortize
constexpr int64_t kSumBlock = 256;  // positions summed in the activation's dtype; see reduce_row

// gamma * y + beta, the value the clamp sees; one definition for forward and backward.
template <typename scalar_t>
inline scalar_t affine(scalar_t gamma, scalar_t y, scalar_t beta) {
  return gamma * y + beta;
}

// The clamp's gradient, as aten's hardtanh_backward: 0 at and beyond the bounds (a NaN
// z passes the gradient, as there).
template <typename scalar_t>
inline scalar_t masked(scalar_t grad, scalar_t z, scalar_t limit) {
  return (z <= -limit || z >= limit) ? scalar_t(0) : grad;
}

template <typename scalar_t>
ROW_LOOP void forward_row(const scalar_t* x, scalar_t* y, scalar_t* out, int64_t size,
                          scalar_t scale, scalar_t shift, scalar_t gamma, scalar_t beta,
                          scalar_t limit) {
  for (int64_t i = 0; i < size; ++i) {
    const scalar_t normalized = x[i] * scale + shift;
    y[i] = normalized;
    // std::max/min keep a NaN (the first argument), as torch.clamp does
    out[i] = std::min(std::max(affine(gamma, normalized, beta), -limit), limit);
  }
}

// The sums run in the activation's dtype over blocks of kSumBlock positions (vectorized:
// in float32, converting every element to double took ~4x the time of torch's float
// sums) and in double across blocks.
template <typename scalar_t>
ROW_LOOP void reduce_row(const scalar_t* grad, const scalar_t* y, int64_t size, scalar_t gamma,
                         scalar_t beta, scalar_t limit, double* dot, double* total) {
  double dot_sum = 0, grad_sum = 0;
  for (int64_t start = 0; start < size; start += kSumBlock) {
    const int64_t stop = std::min(size, start + kSumBlock);
    scalar_t block_dot = 0, block_grad = 0;
#pragma omp simd reduction(+ : block_dot, block_grad)
    for (int64_t i = start; i < stop; ++i) {
      const scalar_t g = masked(grad[i], affine(gamma, y[i], beta), limit);
      block_dot += g * y[i];
      block_grad += g;
    }
    dot_sum += block_dot;
    grad_sum += block_grad;
  }
  *dot = dot_sum;
  *total = grad_sum;
}

// Sum of x, and sum of (x - center)^2, over a row: blocks in the dtype, double across.
template <typename scalar_t>
ROW_LOOP double row_sum(const scalar_t* x, int64_t size) {
  double sum = 0;
  for (int64_t start = 0; start < size; start += kSumBlock) {
    const int64_t stop = std::min(size, start + kSumBlock);
    scalar_t block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = start; i < stop; ++i) block += x[i];
    sum += block;
  }
  return sum;
}

template <typename scalar_t>
ROW_LOOP double row_square_deviation(const scalar_t* x, int64_t size, scalar_t center) {
  double sum = 0;
  for (int64_t start = 0; start < size; start += kSumBlock) {
    const int64_t stop = std::min(size, start + kSumBlock);
    scalar_t block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = start; i < stop; ++i) block += (x[i] - center) * (x[i] - center);
    sum += block;
  }
  return sum;
}

template <typename scalar_t>
ROW_LOOP void grad_input_row(const scalar_t* grad, const scalar_t* y, scalar_t* out,
                             int64_t size, scalar_t gamma, scalar_t beta, scalar_t limit,
                             scalar_t p, scalar_t q, scalar_t r) {
  for (int64_t i = 0; i < size; ++i) {
    const scalar_t g = masked(grad[i], affine(gamma, y[i], beta), limit);
    out[i] = g * p + q + r * y[i];
  }
}

void check_rows(const char* what, const at::Tensor& activation,
                std::initializer_list<at::Tensor> per_row, const at::Tensor& gamma,
                const at::Tensor& beta) {
  TORCH_CHECK(activation.dim() == 3 && activation.is_floating_point(), what,
              ": expected an (N, C, S) float32 or float64 tensor, got ", activation.sizes());
  const auto rows = activation.sizes().slice(0, 2);
  for (const auto& t : per_row) {
    TORCH_CHECK(t.sizes() == rows && t.scalar_type() == activation.scalar_type(), what,
                ": expected per-row tensors of shape ", rows, " and the activation's dtype");
  }
  for (const auto& t : {gamma, beta}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == activation.size(1) &&
                    t.scalar_type() == activation.scalar_type(),
                what, ": expected per-channel tensors of shape (", activation.size(1),
                ",) and the activation's dtype");
  }
}

// Calls body(row, channel, begin offset) for the rows, in parallel on torch's threads.
template <typename Body>
void for_each_row(const at::Tensor& activation, const Body& body) {
  const int64_t channels = activation.size(1), size = activation.size(2);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(size, 1));
  at::parallel_for(0, activation.size(0) * channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) body(row, row % channels, row * size);
  });
}

}  // namespace

// (y, out): y = x * scale + shift per row, out = clamp(gamma * y + beta, +-limit).
std::vector<at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& scale_in,
                                const at::Tensor& shift_in, const at::Tensor& gamma_in,
                                const at::Tensor& beta_in, double limit) {
  const auto x = x_in.contiguous(), scale = scale_in.contiguous(),
             shift = shift_in.contiguous(), gamma = gamma_in.contiguous(),
             beta = beta_in.contiguous();
  check_rows("online forward", x, {scale, shift}, gamma, beta);
  auto y = at::empty_like(x), out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "online_forward", [&] {
    const scalar_t *xs = x.data_ptr<scalar_t>(), *sc = scale.data_ptr<scalar_t>(),
                   *sh = shift.data_ptr<scalar_t>(), *ga = gamma.data_ptr<scalar_t>(),
                   *be = beta.data_ptr<scalar_t>();
    scalar_t *ys = y.data_ptr<scalar_t>(), *os = out.data_ptr<scalar_t>();
    const auto bound = static_cast<scalar_t>(limit);
    for_each_row(x, [&](int64_t row, int64_t channel, int64_t at) {
      forward_row(xs + at, ys + at, os + at, x.size(2), sc[row], sh[row], ga[channel],
                  be[channel], bound);
    });
  });
  return {y, out};
}

// (sum of g * y, sum of g) per row, float64 (N, C), with g the gradient masked by the clamp.
std::vector<at::Tensor> backward_sums(const at::Tensor& grad_in, const at::Tensor& y_in,
                                      const at::Tensor& gamma_in, const at::Tensor& beta_in,
                                      double limit) {
  const auto grad = grad_in.contiguous(), y = y_in.contiguous(), gamma = gamma_in.contiguous(),
             beta = beta_in.contiguous();
  check_rows("online backward_sums", y, {}, gamma, beta);
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type(),
              "online backward_sums: expected a gradient of y's shape and dtype");
  const auto rows = y.sizes().slice(0, 2);
  auto dot = at::empty(rows, y.options().dtype(at::kDouble)), total = at::empty_like(dot);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "online_backward_sums", [&] {
    const scalar_t *gs = grad.data_ptr<scalar_t>(), *ys = y.data_ptr<scalar_t>(),
                   *ga = gamma.data_ptr<scalar_t>(), *be = beta.data_ptr<scalar_t>();
    double *dots = dot.data_ptr<double>(), *totals = total.data_ptr<double>();
    const auto bound = static_cast<scalar_t>(limit);
    for_each_row(y, [&](int64_t row, int64_t channel, int64_t at) {
      reduce_row(gs + at, ys + at, y.size(2), ga[channel], be[channel], bound, dots + row,
                 totals + row);
    });
  });
  return {dot, total};
}

// g * p + q + r * y per row (p, q, r of shape (N, C)), g masked by the clamp.
at::Tensor backward_input(const at::Tensor& grad_in, const at::Tensor& y_in,
                          const at::Tensor& gamma_in, const at::Tensor& beta_in, double limit,
                          const at::Tensor& p_in, const at::Tensor& q_in,
                          const at::Tensor& r_in) {
  const auto grad = grad_in.contiguous(), y = y_in.contiguous(), gamma = gamma_in.contiguous(),
             beta = beta_in.contiguous(), p = p_in.contiguous(), q = q_in.contiguous(),
             r = r_in.contiguous();
  check_rows("online backward_input", y, {p, q, r}, gamma, beta);
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type(),
              "online backward_input: expected a gradient of y's shape and dtype");
  auto out = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "online_backward_input", [&] {
    const scalar_t *gs = grad.data_ptr<scalar_t>(), *ys = y.data_ptr<scalar_t>(),
                   *ga = gamma.data_ptr<scalar_t>(), *be = beta.data_ptr<scalar_t>(),
                   *ps = p.data_ptr<scalar_t>(), *qs = q.data_ptr<scalar_t>(),
                   *rs = r.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    const auto bound = static_cast<scalar_t>(limit);
    for_each_row(y, [&](int64_t row, int64_t channel, int64_t at) {
      grad_input_row(gs + at, ys + at, os + at, y.size(2), ga[channel], be[channel], bound,
                     ps[row], qs[row], rs[row]);
    });
  });
  return out;
}

// (mean, biased variance) of each channel over N and S, float64 (C,), in two passes.
std::vector<at::Tensor> channel_moments(const at::Tensor& x_in) {
  const auto x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 3 && x.is_floating_point() && x.size(0) * x.size(2) > 0,
              "channel_moments: expected a non-empty (N, C, S) float32 or float64 tensor, got ",
              x.sizes());
  const int64_t samples = x.size(0), channels = x.size(1), size = x.size(2);
  const double count = static_cast<double>(samples * size);
  auto mean = at::empty({channels}, x.options().dtype(at::kDouble)), var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_moments", [&] {
    const scalar_t* xs = x.data_ptr<scalar_t>();
    double *means = mean.data_ptr<double>(), *vars = var.data_ptr<double>();
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double total = 0;
        for (int64_t n = 0; n < samples; ++n) total += row_sum(xs + (n * channels + c) * size, size);
        const double m = total / count;
        const auto center = static_cast<scalar_t>(m);
        double squares = 0;
        for (int64_t n = 0; n < samples; ++n) {
          squares += row_square_deviation(xs + (n * channels + c) * size, size, center);
        }
        const double offset = m - static_cast<double>(center);  // the center's rounding
        means[c] = m;
        vars[c] = std::max(0.0, squares / count - offset * offset);
      }
    });
  });
  return {mean, var};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("online_forward", &forward);
  module.def("online_backward_sums", &backward_sums);
  module.def("online_backward_input", &backward_input);
  module.def("channel_moments", &channel_moments);
}
