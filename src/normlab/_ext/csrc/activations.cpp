// Passes over (N, C, S) activations, read as N * C rows of S positions: Online
// Normalization's, fused (Chiley et al. 2019, arXiv:1905.05894), batch statistics, and Batch
// Renormalization's training step (Ioffe 2017, arXiv:1702.03275), one call each way.
//
// Online Normalization: `OnlineNormFunction` in normlab/functional/online_norm.py is the
// specification; its eager path runs these as torch operations, 4 passes forward after
// the moments (y, the affine map, the clamp) and 5 backward (the affine map again, the
// clamp's gradient, the sums, the scaling, the correction along y). Here each row is
// visited once per pass, as BatchNorm's kernels visit it:
//   forward:  y = x * scale + shift and out = clamp(gamma * y + beta), one pass;
//   backward: the clamp's mask is recomputed from y, never stored; one pass sums
//             g * y and g over each row, one pass writes g * p + q + r * y.
// The training step (stream_forward/backward) writes only out and keeps x, as BatchNorm
// does: its backward recomputes y from x and the row's scale and shift (for S = 1, from the
// forward's stream, replayed), and runs each channel's rows in turn, the sums, the stream's
// step and the row's pass in one parallel region (the row still in cache).
// `limit` is the clamp's bound (infinity: no clamp).
//
// A channels_last (or channels_last_3d) activation reaches here as an (N, C, S) view whose
// channels are adjacent ("positions-major": (N, S, C) in memory). The stream kernels,
// channel_moments and channel_batch_norm_backward read it as it is, each position's channels
// one vectorized row, and write their outputs in its layout; the other entry points copy it
// to (N, C, S) first.
//
// Batch statistics: `torch.batch_norm_update_stats` (Welford's update per element) took
// ~4x the time of a pass over the activations on CPU; `channel_moments` takes two
// vectorized passes per channel, the second over data still in cache (one pass over a
// positions-major activation, around each channel's first value).
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 32768;  // per parallel task: ~L2-sized, enough to amortize
constexpr int64_t kSumBlock = 256;  // positions summed in the activation's dtype; see reduce_row
constexpr int64_t kChannelBlock = 64;  // channels summed together in positions-major sums
constexpr int64_t kCacheElements = 1 << 18;  // a range of samples read twice: for_sample_ranges
constexpr int64_t kCenterPositions = 16;  // averaged for the center of positions-major moments

// gamma * y + beta, the value the clamp sees; one definition for forward and backward.
template <typename scalar_t>
inline scalar_t affine(scalar_t gamma, scalar_t y, scalar_t beta) {
  return gamma * y + beta;
}

// The clamp's gradient, as aten's hardtanh_backward: 0 at and beyond the bounds (a NaN
// z passes the gradient, as there).
template <typename scalar_t>
inline scalar_t masked(scalar_t grad, scalar_t z, scalar_t limit) {
  // `|`, not `||`: no branch, so the loops around it vectorize
  return ((z <= -limit) | (z >= limit)) ? scalar_t(0) : grad;
}

// y = x * scale + shift, the normalized value: written by the forward of the spec's path,
// recomputed from x everywhere else (one definition, so the recomputed y is the written one).
template <typename scalar_t>
inline scalar_t normalized(scalar_t x, scalar_t scale, scalar_t shift) {
  return x * scale + shift;
}

// out = clamp(gamma * y + beta) of one element.
template <typename scalar_t>
inline scalar_t output_element(scalar_t y, scalar_t gamma, scalar_t beta, scalar_t limit) {
  // std::max then std::min, written as selects of values (theirs select references: a
  // branch, which keeps the loops around from vectorizing); a NaN stays, as in torch.clamp
  const scalar_t z = affine(gamma, y, beta);
  const scalar_t above_lower = z < -limit ? -limit : z;
  return limit < above_lower ? limit : above_lower;
}

// The input gradient g * p + q + r * y of one element, g the gradient masked by the clamp.
template <typename scalar_t>
inline scalar_t grad_input_element(scalar_t g, scalar_t y, scalar_t p, scalar_t q, scalar_t r) {
  return g * p + q + r * y;
}

// out over a row, and y there too unless `y` is null.
template <typename scalar_t>
void forward_row(const scalar_t* x, scalar_t* y, scalar_t* out, int64_t size,
                 scalar_t scale, scalar_t shift, scalar_t gamma, scalar_t beta,
                 scalar_t limit) {
  if (y == nullptr) {
    for (int64_t i = 0; i < size; ++i) {
      out[i] = output_element(normalized(x[i], scale, shift), gamma, beta, limit);
    }
    return;
  }
  for (int64_t i = 0; i < size; ++i) {
    y[i] = normalized(x[i], scale, shift);
    out[i] = output_element(y[i], gamma, beta, limit);
  }
}

// The sums of g * y and of g over a row, g the gradient masked by the clamp, y recomputed
// from x (scale 1 and shift 0 where x is y). They run in the activation's dtype over blocks
// of kSumBlock positions (vectorized: in float32, converting every element to double took
// ~4x the time of torch's float sums) and in double across blocks.
template <typename scalar_t>
void reduce_row(const scalar_t* grad, const scalar_t* x, int64_t size, scalar_t scale,
                scalar_t shift, scalar_t gamma, scalar_t beta, scalar_t limit, double* dot,
                double* total) {
  double dot_sum = 0, grad_sum = 0;
  for (int64_t start = 0; start < size; start += kSumBlock) {
    const int64_t stop = std::min(size, start + kSumBlock);
    scalar_t block_dot = 0, block_grad = 0;
#pragma omp simd reduction(+ : block_dot, block_grad)
    for (int64_t i = start; i < stop; ++i) {
      const scalar_t y = normalized(x[i], scale, shift);
      const scalar_t g = masked(grad[i], affine(gamma, y, beta), limit);
      block_dot += g * y;
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
double row_sum(const scalar_t* x, int64_t size) {
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
double row_square_deviation(const scalar_t* x, int64_t size, scalar_t center) {
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

// out = x * scale over a row.
template <typename scalar_t>
void scaled_row(const scalar_t* x, scalar_t* out, int64_t size, scalar_t scale) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) out[i] = x[i] * scale;
}

// Layer scaling's gradient over a sample's row, out the forward's output:
// (grad - out mean_dot) scale.
template <typename scalar_t>
void layer_scale_grad_row(const scalar_t* grad, const scalar_t* out, scalar_t* grad_z,
                          int64_t size, scalar_t mean_dot, scalar_t scale) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) grad_z[i] = (grad[i] - out[i] * mean_dot) * scale;
}

// Sum of x and of x^2 over a row: blocks in the dtype, double across.
template <typename scalar_t>
void row_power_sums(const scalar_t* x, int64_t size, double* sum, double* square_sum) {
  double total = 0, squares = 0;
  for (int64_t start = 0; start < size; start += kSumBlock) {
    const int64_t stop = std::min(size, start + kSumBlock);
    scalar_t block = 0, block_squares = 0;
#pragma omp simd reduction(+ : block, block_squares)
    for (int64_t i = start; i < stop; ++i) {
      block += x[i];
      block_squares += x[i] * x[i];
    }
    total += block;
    squares += block_squares;
  }
  *sum = total;
  *square_sum = squares;
}

// Online Normalization's two streams, one sample at a time per channel, in float64: the
// sequential loops the prefix scans of the eager path (OnlineNormFunction) stand in for.

// The forward stream: sample t (its mean and biased variance over positions) is normalized
// by the statistics (mu, sigma2) before it, which then take it in. Writes what the backward
// needs of the sample: 1 / sqrt(sigma2 + eps), mean(y) and mean(y^2). The first is computed
// in `inv_t`: for S = 1 the activation's dtype, whose value the row's scale and the control
// process then read (in float32 within a few ulps of the specification's float64 value; a
// float64 square root and division per element were a third of the forward).
struct ForwardStep {
  double inv_std, shift, y_mean, y_square_mean;
};

template <typename inv_t = double>
inline ForwardStep forward_step(double alpha, double eps, double mean, double var, double* mu,
                                double* sigma2) {
  const double inv_std = inv_t(1) / std::sqrt(static_cast<inv_t>(*sigma2 + eps));
  const double deviation = mean - *mu;
  const ForwardStep step{inv_std, -*mu * inv_std, deviation * inv_std,
                         (var + deviation * deviation) * inv_std * inv_std};
  *sigma2 = alpha * *sigma2 + ((1 - alpha) * var + alpha * (1 - alpha) * deviation * deviation);
  *mu = alpha * *mu + (1 - alpha) * mean;
  return step;
}

// The backward's control process: with dot_mean = mean(g y) and grad_mean = mean(g) of the
// sample (g the gradient of y), gives the input gradient's terms q and r of
// g * gamma * inv_std + q + r * y, then updates v and u.
struct BackwardStep {
  double q, r;
};

inline BackwardStep backward_step(double leak, double alpha, double dot_mean, double grad_mean,
                                  double inv_std, double y_mean, double y_square_mean,
                                  double* u, double* v) {
  const BackwardStep step{-leak * *u, -leak * *v * inv_std};
  const double v_before = *v;
  *v = (1 - leak * y_square_mean) * *v + dot_mean;
  *u = alpha * *u + inv_std * (grad_mean - leak * v_before * y_mean);
  return step;
}

// Rows of one position ((N, C) inputs): the forward of sample t over a block of channels,
// the stream and the row pass in one loop, vectorized over the channels. Only out is
// written; the backward replays the stream from the state before the batch (replay_sample).
// (Keeping y and 1 / sqrt(sigma2 + eps) instead, or the latter alone, made the step at
// (256, 1024) as fast or ~8% slower: the passes over them cost what the replay does.)
template <typename scalar_t>
void forward_sample(const scalar_t* x, scalar_t* out, int64_t channels, const scalar_t* gamma,
                    const scalar_t* beta, scalar_t limit, double alpha, double eps, double* mu,
                    double* sigma2) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const ForwardStep step = forward_step<scalar_t>(alpha, eps, x[c], 0.0, mu + c, sigma2 + c);
    out[c] = output_element(normalized(x[c], static_cast<scalar_t>(step.inv_std),
                                       static_cast<scalar_t>(step.shift)),
                            gamma[c], beta[c], limit);
  }
}

// ... the same step replayed in the backward: y and 1 / sqrt(sigma2 + eps) as the forward
// computed them, and the gradient masked by the clamp (`masked_grad`).
template <typename scalar_t>
void replay_sample(const scalar_t* x, const scalar_t* grad, int64_t channels,
                   const scalar_t* gamma, const scalar_t* beta, scalar_t limit, double alpha,
                   double eps, double* mu, double* sigma2, scalar_t* y, scalar_t* inv_std,
                   scalar_t* masked_grad) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const ForwardStep step = forward_step<scalar_t>(alpha, eps, x[c], 0.0, mu + c, sigma2 + c);
    inv_std[c] = static_cast<scalar_t>(step.inv_std);
    y[c] = normalized(x[c], inv_std[c], static_cast<scalar_t>(step.shift));
    masked_grad[c] = masked(grad[c], affine(gamma[c], y[c], beta[c]), limit);
  }
}

// ... and the control process and the input gradient in one loop (a loop apart from the
// replay's: together they did not vectorize); the weight and bias gradients accumulate in
// the dtype, over blocks of samples (see stream_backward).
template <typename scalar_t>
void backward_sample(const scalar_t* masked_grad, const scalar_t* y, scalar_t* grad_x,
                     int64_t channels, const scalar_t* gamma, double leak, double alpha,
                     const scalar_t* inv_std, double* u, double* v, scalar_t* grad_gamma,
                     scalar_t* grad_beta) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t g = masked_grad[c];
    const scalar_t dot = g * y[c];
    const double gain = gamma[c];
    const double y_mean = y[c];  // the row's mean(y), and its mean(y^2) y_mean^2
    const BackwardStep step = backward_step(leak, alpha, gain * dot, gain * g, inv_std[c],
                                            y_mean, y_mean * y_mean, u + c, v + c);
    grad_x[c] = grad_input_element(g, y[c], static_cast<scalar_t>(gain * inv_std[c]),
                                   static_cast<scalar_t>(step.q), static_cast<scalar_t>(step.r));
    grad_gamma[c] += dot;
    grad_beta[c] += g;
  }
}

// The input gradient's terms of a row: g * p + q + r * y.
template <typename scalar_t>
struct InputGradTerms {
  scalar_t p, q, r;
};

// The input gradient over a row, y recomputed from x (scale 1 and shift 0 where x is y).
template <typename scalar_t>
void grad_input_row(const scalar_t* grad, const scalar_t* x, scalar_t* out, int64_t size,
                    scalar_t scale, scalar_t shift, scalar_t gamma, scalar_t beta,
                    scalar_t limit, scalar_t p, scalar_t q, scalar_t r) {
  // simd: element by element, so it holds where out is grad itself (stream_backward's
  // overwrite_grad), which a runtime alias check would send to the scalar loop
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) {
    const scalar_t y = normalized(x[i], scale, shift);
    out[i] = grad_input_element(masked(grad[i], affine(gamma, y, beta), limit), y, p, q, r);
  }
}

// Positions-major layout: `x` points at channel `begin` of a sample's first position, its
// positions `stride` apart; `count` (<= kChannelBlock) channels from there.

// Per channel, the sum of x - center and of (x - center)^2 over `positions` positions: blocks
// of kSumBlock positions in the dtype, vectorized over the channels, double across blocks.
template <typename scalar_t>
void position_power_sums(const scalar_t* x, int64_t positions, int64_t stride,
                         int64_t count, const scalar_t* center, double* sum,
                         double* square_sum) {
  scalar_t block[kChannelBlock], block_squares[kChannelBlock];
  std::fill(sum, sum + count, 0.0);
  std::fill(square_sum, square_sum + count, 0.0);
  for (int64_t start = 0; start < positions; start += kSumBlock) {
    std::fill(block, block + count, scalar_t(0));
    std::fill(block_squares, block_squares + count, scalar_t(0));
    for (int64_t s = start; s < std::min(positions, start + kSumBlock); ++s) {
      const scalar_t* row = x + s * stride;
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) {
        const scalar_t deviation = row[c] - center[c];
        block[c] += deviation;
        block_squares[c] += deviation * deviation;
      }
    }
    for (int64_t c = 0; c < count; ++c) {
      sum[c] += block[c];
      square_sum[c] += block_squares[c];
    }
  }
}

// reduce_row's sums for `count` channels over the positions; scale, shift, gamma and beta
// point at the block's channels.
template <typename scalar_t>
void position_grad_sums(const scalar_t* grad, const scalar_t* x, int64_t positions,
                        int64_t stride, int64_t count, const scalar_t* scale,
                        const scalar_t* shift, const scalar_t* gamma, const scalar_t* beta,
                        scalar_t limit, double* dot, double* total) {
  scalar_t block_dot[kChannelBlock], block_grad[kChannelBlock];
  std::fill(dot, dot + count, 0.0);
  std::fill(total, total + count, 0.0);
  for (int64_t start = 0; start < positions; start += kSumBlock) {
    std::fill(block_dot, block_dot + count, scalar_t(0));
    std::fill(block_grad, block_grad + count, scalar_t(0));
    for (int64_t s = start; s < std::min(positions, start + kSumBlock); ++s) {
      const scalar_t *g_row = grad + s * stride, *x_row = x + s * stride;
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) {
        const scalar_t y = normalized(x_row[c], scale[c], shift[c]);
        const scalar_t g = masked(g_row[c], affine(gamma[c], y, beta[c]), limit);
        block_dot[c] += g * y;
        block_grad[c] += g;
      }
    }
    for (int64_t c = 0; c < count; ++c) {
      dot[c] += block_dot[c];
      total[c] += block_grad[c];
    }
  }
}

// The output for one position's channels, each with its own row's scale and shift.
template <typename scalar_t>
void forward_position(const scalar_t* x, scalar_t* out, int64_t channels,
                      const scalar_t* scale, const scalar_t* shift,
                      const scalar_t* gamma, const scalar_t* beta, scalar_t limit) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    out[c] = output_element(normalized(x[c], scale[c], shift[c]), gamma[c], beta[c], limit);
  }
}

// grad_input_row for one position's channels.
template <typename scalar_t>
void grad_input_position(const scalar_t* grad, const scalar_t* x, scalar_t* out,
                         int64_t channels, const scalar_t* scale, const scalar_t* shift,
                         const scalar_t* gamma, const scalar_t* beta, scalar_t limit,
                         const scalar_t* p, const scalar_t* q, const scalar_t* r) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t y = normalized(x[c], scale[c], shift[c]);
    out[c] = grad_input_element(masked(grad[c], affine(gamma[c], y, beta[c]), limit), y, p[c],
                                q[c], r[c]);
  }
}

// Batch normalization's input gradient for one position's channels: grad * p + (x - mean) * r
// + q, per channel.
template <typename scalar_t>
void grad_batch_norm_position(const scalar_t* grad, const scalar_t* x, scalar_t* out,
                              int64_t channels, const scalar_t* mean,
                              const scalar_t* p, const scalar_t* q, const scalar_t* r) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) out[c] = grad[c] * p[c] + (x[c] - mean[c]) * r[c] + q[c];
}

// (x - center) * scale + shift over a row, and over one position's channels (each its own
// center, scale and shift).
template <typename scalar_t>
void affine_row(const scalar_t* x, scalar_t* out, int64_t size, scalar_t center,
                scalar_t scale, scalar_t shift) {
  for (int64_t i = 0; i < size; ++i) out[i] = (x[i] - center) * scale + shift;
}

template <typename scalar_t>
void affine_position(const scalar_t* x, scalar_t* out, int64_t channels,
                     const scalar_t* center, const scalar_t* scale,
                     const scalar_t* shift) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) out[c] = (x[c] - center[c]) * scale[c] + shift[c];
}

// Whether (N, C, S) `t` is positions-major: the (N, C, S) view of a channels_last tensor.
bool positions_major(const at::Tensor& t) {
  if (t.dim() != 3) return false;
  const int64_t channels = t.size(1), size = t.size(2);
  return channels > 1 && size > 1 && t.stride(1) == 1 && t.stride(2) == channels &&
         (t.size(0) == 1 || t.stride(0) == channels * size);
}

// `t` in `like`'s layout (positions-major or (N, C, S) contiguous), copied only if it is not.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

// Whether (N, C, *) `t` has one position per sample: S = 1, as (N, C) inputs.
bool one_position(const at::Tensor& t) {
  return t.numel() == t.size(0) * t.size(1);
}

// (N, C, *) `t` as the (N, C, S) view the passes read. With one position per sample, the
// positions-major (1, C, N) view of its (N, C) matrix: each sample's channels are then one
// vectorized row, where N * C rows of one element each took ~100x as long ((256, 1024):
// 2.4 ms for the moments).
at::Tensor channel_rows(const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2 && t.is_floating_point(), what,
              ": expected an (N, C, ...) float32 or float64 tensor, got ", t.sizes());
  if (one_position(t)) {  // one view op: at these sizes each op's dispatch is felt
    const auto matrix = t.reshape({t.size(0), t.size(1)});
    return matrix.as_strided({1, t.size(1), t.size(0)},
                             {t.size(0) * t.size(1), matrix.stride(1), matrix.stride(0)});
  }
  return t.reshape({t.size(0), t.size(1), -1});
}

// (N, C, *) `t` as the (N, C, S) view the stream passes read, S = 1 for (N, C): the samples
// stay the streams' steps (where channel_rows makes them positions).
at::Tensor stream_rows(const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2 && t.is_floating_point(), what,
              ": expected an (N, C, ...) float32 or float64 tensor, got ", t.sizes());
  int64_t size = 1;
  for (int64_t d = 2; d < t.dim(); ++d) size *= t.size(d);
  return t.reshape({t.size(0), t.size(1), size});
}

// Whether two (N, C, S) tensors lay their elements out alike (strides of size-1 dimensions,
// which address nothing, aside).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// An uninitialized tensor of (N, C, *) `like`'s shape, in like's memory format where its
// `rows_of` view has the layout of `rows` (like's rows as the passes read them: contiguous or
// positions-major), else contiguous; and that view, which the passes write. The result itself
// is no view: an in-place operation on a view that an autograd function returns is an error.
template <typename RowsOf>
std::pair<at::Tensor, at::Tensor> empty_with_rows(const char* what, const at::Tensor& like,
                                                  const at::Tensor& rows, const RowsOf& rows_of) {
  auto out = at::empty_like(like);
  auto out_rows = rows_of(what, out);  // a copy, not a view, for some dense layouts
  if (!same_layout(out_rows, rows) || out_rows.data_ptr() != out.data_ptr()) {
    out = at::empty(like.sizes(), like.options());
    out_rows = rows_of(what, out);
  }
  TORCH_INTERNAL_ASSERT(same_layout(out_rows, rows) && out_rows.data_ptr() == out.data_ptr());
  return {out, out_rows};
}

// Calls body(sample, begin, end) for the blocks of kChannelBlock channels of each sample in
// [first, last), in parallel: each block's sums over the sample's positions.
template <typename Body>
void for_sample_channel_blocks(int64_t first, int64_t last, int64_t channels, int64_t size,
                               const Body& body) {
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (size * kChannelBlock));
  at::parallel_for(first * blocks, last * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t channel = (task % blocks) * kChannelBlock;
      body(task / blocks, channel, std::min(channels, channel + kChannelBlock));
    }
  });
}

// Calls body(sample, at) for each position of the samples in [first, last) (at: the offset of
// its first channel), in parallel.
template <typename Body>
void for_each_position(int64_t first, int64_t last, int64_t channels, int64_t size,
                       const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / channels);
  at::parallel_for(first * size, last * size, grain, [&](int64_t begin, int64_t end) {
    for (int64_t position = begin; position < end; ++position) {
      body(position / size, position * channels);
    }
  });
}

// Calls body(first, last) for consecutive ranges of samples of about kCacheElements values
// each, in order: a positions-major pass that reads a range twice (its sums, then its
// outputs, the streams' steps between) finds it in cache the second time.
template <typename Body>
void for_sample_ranges(int64_t samples, int64_t sample_values, const Body& body) {
  const int64_t count =
      std::max<int64_t>(1, kCacheElements / std::max<int64_t>(sample_values, 1));
  for (int64_t first = 0; first < samples; first += count) {
    body(first, std::min(samples, first + count));
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

// Rows of `size` elements per parallel task.
int64_t rows_per_task(int64_t size) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(size, 1));
}

// Calls body(row, channel, begin offset) for the rows, in parallel on torch's threads.
template <typename Body>
void for_each_row(const at::Tensor& activation, const Body& body) {
  const int64_t channels = activation.size(1), size = activation.size(2);
  at::parallel_for(0, activation.size(0) * channels, rows_per_task(size), [&](int64_t begin,
                                                                              int64_t end) {
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
      reduce_row(gs + at, ys + at, y.size(2), scalar_t(1), scalar_t(0), ga[channel],
                 be[channel], bound, dots + row, totals + row);
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
      grad_input_row(gs + at, ys + at, os + at, y.size(2), scalar_t(1), scalar_t(0),
                     ga[channel], be[channel], bound, ps[row], qs[row], rs[row]);
    });
  });
  return out;
}

// Calls body(begin, end) for blocks of channels, in parallel: the streams run along the
// samples, each channel on its own, over `elements` elements of the channel.
template <typename Body>
void for_channel_blocks(int64_t elements, int64_t channels, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements, 1));
  at::parallel_for(0, channels, grain, body);
}

// A float64 copy of a per-channel state buffer (of any floating dtype and stride), read and
// written through its data: at batch 1 each torch operation's dispatch (a copy to float64
// and back was four of them) costs about as much as a pass over the activation.
std::vector<double> read_state(const char* what, const at::Tensor& state, int64_t channels) {
  TORCH_CHECK(state.dim() == 1 && state.size(0) == channels && state.is_floating_point(), what,
              ": expected per-channel state of shape (", channels, ",)");
  std::vector<double> values(channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, state.scalar_type(), "read_state",
                                  [&] {
    const scalar_t* data = state.data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) values[c] = data[c * state.stride(0)];
  });
  return values;
}

void write_state(at::Tensor& state, const std::vector<double>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, state.scalar_type(), "write_state",
                                  [&] {
    scalar_t* data = state.data_ptr<scalar_t>();
    for (int64_t c = 0; c < state.size(0); ++c) {
      data[c * state.stride(0)] = static_cast<scalar_t>(values[c]);
    }
  });
  torch::autograd::impl::bump_version(state);  // as an in-place torch operation would
}

// What the stream backward needs of the forward (the "record"). For S > 1, float64 per row
// (sample, channel): kRecordStats values, 1 / sqrt(sigma2 + eps), the shift -mu / sqrt(sigma2
// + eps) (y is recomputed from x with both, cast to x's dtype as the forward cast them),
// mean(y) and mean(y^2). For S = 1, the stream's state before the batch, (2, C) float64: mu,
// sigma2, from which the backward replays the forward's steps (forward_sample).
enum RecordStat { kInvStdRecord, kShiftRecord, kYMeanRecord, kYSquareMeanRecord, kRecordStats };

at::Tensor empty_record(const at::Tensor& x) {
  const int64_t samples = x.size(0), channels = x.size(1);
  if (x.size(2) == 1) return at::empty({2, channels}, x.options().dtype(at::kDouble));
  return at::empty({kRecordStats, samples, channels}, x.options().dtype(at::kDouble));
}

// Online Normalization's forward over a batch of (N, C, *) x, the whole of
// OnlineNormFunction.forward: (out, of x's shape and layout; the record; the (N, C, S)
// activation the backward reads: x's rows); running_mean and running_var are updated in
// place. out is the only activation-sized tensor written, and the backward reads x (which
// BatchNorm saves too) where the specification saves y: one fresh activation-sized buffer
// less a step.
std::vector<at::Tensor> stream_forward(const at::Tensor& x_in, const at::Tensor& gamma_in,
                                       const at::Tensor& beta_in, at::Tensor running_mean,
                                       at::Tensor running_var, double alpha, double eps,
                                       double limit) {
  const auto rows_in = stream_rows("online stream_forward", x_in);
  const bool by_position = positions_major(rows_in);
  const auto x = by_position ? rows_in : rows_in.contiguous(), gamma = gamma_in.contiguous(),
             beta = beta_in.contiguous();
  check_rows("online stream_forward", x, {}, gamma, beta);
  const int64_t samples = x.size(0), channels = x.size(1), size = x.size(2),
                rows = samples * channels;
  auto mu = read_state("online stream_forward", running_mean, channels);
  auto sigma2 = read_state("online stream_forward", running_var, channels);
  auto record = empty_record(x);
  const auto [out_full, out] = empty_with_rows("online stream_forward", x_in, x, stream_rows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "online_stream_forward", [&] {
    const scalar_t *xs = x.data_ptr<scalar_t>(), *ga = gamma.data_ptr<scalar_t>(),
                   *be = beta.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    const auto bound = static_cast<scalar_t>(limit);
    if (size == 1) {
      double* before = record.data_ptr<double>();
      std::copy(mu.begin(), mu.end(), before);
      std::copy(sigma2.begin(), sigma2.end(), before + channels);
      for_channel_blocks(samples, channels, [&](int64_t begin, int64_t end) {
        for (int64_t t = 0; t < samples; ++t) {
          const int64_t at = t * channels + begin;
          forward_sample(xs + at, os + at, end - begin, ga + begin, be + begin, bound, alpha,
                         eps, mu.data() + begin, sigma2.data() + begin);
        }
      });
      return;
    }
    double* kept = record.data_ptr<double>();
    double *inv = kept + kInvStdRecord * rows, *shifts = kept + kShiftRecord * rows,
           *y_means = kept + kYMeanRecord * rows,
           *y_square_means = kept + kYSquareMeanRecord * rows;
    // the stream's step at a row, from its sum and sum of squares
    const auto step_row = [&](int64_t row, int64_t c, double sum, double square_sum) {
      const double mean = sum / size, var = std::max(0.0, square_sum / size - mean * mean);
      const ForwardStep step = forward_step(alpha, eps, mean, var, &mu[c], &sigma2[c]);
      inv[row] = step.inv_std;
      shifts[row] = step.shift;
      y_means[row] = step.y_mean;
      y_square_means[row] = step.y_square_mean;
    };
    if (!by_position) {
      // per channel, each sample's row in turn: its sums, the step, its output (the row is
      // still in cache), all in one parallel region
      for_channel_blocks(samples * size, channels, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          for (int64_t row = c; row < rows; row += channels) {
            const int64_t at = row * size;
            double sum, square_sum;
            row_power_sums(xs + at, size, &sum, &square_sum);
            step_row(row, c, sum, square_sum);
            forward_row(xs + at, static_cast<scalar_t*>(nullptr), os + at, size,
                        static_cast<scalar_t>(inv[row]), static_cast<scalar_t>(shifts[row]),
                        ga[c], be[c], bound);
          }
        }
      });
      return;
    }
    // positions-major, by ranges of samples: the sums of each row, the streams' steps (C a
    // sample, in order), then one pass writing out, each position's channels a vectorized row
    std::vector<double> sums(rows), square_sums(rows);
    std::vector<scalar_t> scales(rows), row_shifts(rows);
    const std::vector<scalar_t> no_center(channels, scalar_t(0));
    for_sample_ranges(samples, channels * size, [&](int64_t first, int64_t last) {
      for_sample_channel_blocks(first, last, channels, size, [&](int64_t n, int64_t begin,
                                                                 int64_t end) {
        const int64_t row = n * channels + begin;
        position_power_sums(xs + n * size * channels + begin, size, channels, end - begin,
                            no_center.data() + begin, sums.data() + row,
                            square_sums.data() + row);
      });
      for (int64_t row = first * channels; row < last * channels; ++row) {
        step_row(row, row % channels, sums[row], square_sums[row]);
        scales[row] = static_cast<scalar_t>(inv[row]);
        row_shifts[row] = static_cast<scalar_t>(shifts[row]);
      }
      for_each_position(first, last, channels, size, [&](int64_t n, int64_t at) {
        forward_position(xs + at, os + at, channels, scales.data() + n * channels,
                         row_shifts.data() + n * channels, ga, be, bound);
      });
    });
  });
  write_state(running_mean, mu);
  write_state(running_var, sigma2);
  return {out_full, record, x};
}

// Its backward, the whole of OnlineNormFunction.backward, from what stream_forward kept (x's
// rows) and its record, given the gradient of its output: (grad_x, of the gradient's shape
// in x's layout, grad_gamma, grad_beta), the last two (C,) in x's dtype, summed in float64
// (for S = 1 in x's dtype over blocks of kSumBlock samples, as reduce_row sums positions);
// mean_control (u) and correlation_control (v) are updated in place. alpha_fwd and eps are
// the forward's, for its replay at S = 1. With `overwrite_grad` the gradient's buffer is the
// caller's own and not needed after: grad_x is written over it (each pass reads an element's
// gradient before it writes the element's grad_x), one fresh activation-sized buffer fewer.
std::vector<at::Tensor> stream_backward(const at::Tensor& grad_in, const at::Tensor& x,
                                        const at::Tensor& gamma_in, const at::Tensor& beta_in,
                                        const at::Tensor& record_in, at::Tensor mean_control,
                                        at::Tensor correlation_control, double alpha_bkw,
                                        double limit, double alpha_fwd, double eps,
                                        bool overwrite_grad) {
  const auto grad_rows = stream_rows("online stream_backward", grad_in);
  TORCH_CHECK(x.dim() == 3 && grad_rows.sizes() == x.sizes() &&
                  grad_in.scalar_type() == x.scalar_type() &&
                  (positions_major(x) || x.is_contiguous()),
              "online stream_backward: expected what stream_forward kept, and a gradient of its "
              "output's shape and dtype");
  const bool by_position = positions_major(x);
  const auto grad = in_layout_of(grad_rows, x), gamma = gamma_in.contiguous(),
             beta = beta_in.contiguous(), record = record_in.contiguous();
  check_rows("online stream_backward", x, {}, gamma, beta);
  const int64_t samples = x.size(0), channels = x.size(1), size = x.size(2),
                rows = samples * channels;
  const auto expected = empty_record(x);
  TORCH_CHECK(record.sizes() == expected.sizes() &&
                  record.scalar_type() == expected.scalar_type(),
              "online stream_backward: expected the record of shape ", expected.sizes(), " and ",
              "dtype ", expected.scalar_type(), " that stream_forward returned, got ",
              record.sizes());
  auto u = read_state("online stream_backward", mean_control, channels);
  auto v = read_state("online stream_backward", correlation_control, channels);
  std::vector<double> grad_sums(2 * channels, 0.0);  // of gamma, then of beta
  auto grad_affine = at::empty({2, channels}, x.options());
  auto grad_x = overwrite_grad ? grad : at::empty_like(x);
  const double leak = 1 - alpha_bkw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "online_stream_backward", [&] {
    const scalar_t *gs = grad.data_ptr<scalar_t>(), *xs = x.data_ptr<scalar_t>(),
                   *ga = gamma.data_ptr<scalar_t>(), *be = beta.data_ptr<scalar_t>();
    double *gga = grad_sums.data(), *gbe = gga + channels;
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    const auto bound = static_cast<scalar_t>(limit);
    if (size == 1) {
      const double* before = record.data_ptr<double>();
      std::vector<double> mu(before, before + channels), sigma2(before + channels,
                                                                before + 2 * channels);
      for_channel_blocks(samples, channels, [&](int64_t begin, int64_t end) {
        const int64_t count = end - begin;
        // per channel of the block: scratch of one sample, and the block of samples' sums
        std::vector<scalar_t> ys(count), inv_stds(count), masked_grad(count),
            block_gamma(count, scalar_t(0)), block_beta(count, scalar_t(0));
        const auto add_block_sums = [&] {
          for (int64_t c = 0; c < count; ++c) {
            gga[begin + c] += block_gamma[c];
            gbe[begin + c] += block_beta[c];
          }
          std::fill(block_gamma.begin(), block_gamma.end(), scalar_t(0));
          std::fill(block_beta.begin(), block_beta.end(), scalar_t(0));
        };
        for (int64_t t = 0; t < samples; ++t) {
          if (t > 0 && t % kSumBlock == 0) add_block_sums();
          const int64_t at = t * channels + begin;
          replay_sample(xs + at, gs + at, count, ga + begin, be + begin, bound, alpha_fwd, eps,
                        mu.data() + begin, sigma2.data() + begin, ys.data(), inv_stds.data(),
                        masked_grad.data());
          backward_sample(masked_grad.data(), ys.data(), out + at, count, ga + begin, leak,
                          alpha_bkw, inv_stds.data(), u.data() + begin, v.data() + begin,
                          block_gamma.data(), block_beta.data());
        }
        add_block_sums();
      });
      return;
    }
    const double* kept = record.data_ptr<double>();
    const double *inv = kept + kInvStdRecord * rows, *shifts = kept + kShiftRecord * rows,
                 *y_means = kept + kYMeanRecord * rows,
                 *y_square_means = kept + kYSquareMeanRecord * rows;
    // the control process's step at a row, from its sums of g * y and g: the input
    // gradient's (p, q, r); the weight and bias gradients accumulate
    const auto step_row = [&](int64_t row, int64_t c, double dot, double total) {
      const double gain = ga[c];
      const BackwardStep step =
          backward_step(leak, alpha_bkw, gain * dot / size, gain * total / size, inv[row],
                        y_means[row], y_square_means[row], &u[c], &v[c]);
      gga[c] += dot;
      gbe[c] += total;
      return InputGradTerms<scalar_t>{static_cast<scalar_t>(gain * inv[row]),
                                      static_cast<scalar_t>(step.q),
                                      static_cast<scalar_t>(step.r)};
    };
    if (!by_position) {
      for_channel_blocks(samples * size, channels, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          for (int64_t row = c; row < rows; row += channels) {
            const int64_t at = row * size;
            const auto scale = static_cast<scalar_t>(inv[row]),
                       shift = static_cast<scalar_t>(shifts[row]);
            double dot, total;
            reduce_row(gs + at, xs + at, size, scale, shift, ga[c], be[c], bound, &dot, &total);
            const auto [p, q, r] = step_row(row, c, dot, total);
            grad_input_row(gs + at, xs + at, out + at, size, scale, shift, ga[c], be[c], bound,
                           p, q, r);
          }
        }
      });
      return;
    }
    // positions-major, by ranges of samples as the forward
    std::vector<scalar_t> scales(rows), row_shifts(rows), ps(rows), qs(rows), rs(rows);
    for (int64_t row = 0; row < rows; ++row) {
      scales[row] = static_cast<scalar_t>(inv[row]);
      row_shifts[row] = static_cast<scalar_t>(shifts[row]);
    }
    std::vector<double> dots(rows), totals(rows);
    for_sample_ranges(samples, channels * size, [&](int64_t first, int64_t last) {
      for_sample_channel_blocks(first, last, channels, size, [&](int64_t n, int64_t begin,
                                                                 int64_t end) {
        const int64_t at = n * size * channels + begin, row = n * channels + begin;
        position_grad_sums(gs + at, xs + at, size, channels, end - begin, scales.data() + row,
                           row_shifts.data() + row, ga + begin, be + begin, bound,
                           dots.data() + row, totals.data() + row);
      });
      for (int64_t row = first * channels; row < last * channels; ++row) {
        const auto terms = step_row(row, row % channels, dots[row], totals[row]);
        ps[row] = terms.p;
        qs[row] = terms.q;
        rs[row] = terms.r;
      }
      for_each_position(first, last, channels, size, [&](int64_t n, int64_t at) {
        const int64_t row = n * channels;
        grad_input_position(gs + at, xs + at, out + at, channels, scales.data() + row,
                            row_shifts.data() + row, ga, be, bound, ps.data() + row,
                            qs.data() + row, rs.data() + row);
      });
    });
  });
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "online_grad_affine", [&] {
    std::copy(grad_sums.begin(), grad_sums.end(), grad_affine.data_ptr<scalar_t>());
  });
  write_state(mean_control, u);
  write_state(correlation_control, v);
  return {grad_x.view(grad_in.sizes()), grad_affine[0], grad_affine[1]};
}

// Positions-major channel_moments, in one pass: per (sample, channel) sums of the deviations
// from a center c within the data's spread (so that the variance E[(x - c)^2] - E[x - c]^2
// does not cancel as E[x^2] - E[x]^2 would at a large mean), in parallel, then their totals.
// The center is the mean of kCenterPositions positions spread over the batch: the first
// position alone, a few deviations from the mean, made E[x - c]^2 several times the variance,
// and the float32 block sums' rounding as many times larger in it.
template <typename scalar_t>
void position_channel_moments(const scalar_t* xs, int64_t samples, int64_t channels,
                              int64_t size, double* means, double* vars) {
  const int64_t positions = samples * size;
  const double count = static_cast<double>(positions);
  std::vector<double> sums(samples * channels), square_sums(samples * channels);
  std::vector<double> picked(channels, 0.0);
  const int64_t picks = std::min(positions, kCenterPositions);
  for (int64_t k = 0; k < picks; ++k) {
    const scalar_t* row = xs + (k * positions / picks) * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) picked[c] += row[c];
  }
  std::vector<scalar_t> center(channels);
  for (int64_t c = 0; c < channels; ++c) center[c] = static_cast<scalar_t>(picked[c] / picks);
  for_sample_channel_blocks(0, samples, channels, size, [&](int64_t n, int64_t begin,
                                                         int64_t end) {
    const int64_t row = n * channels + begin;
    position_power_sums(xs + n * size * channels + begin, size, channels, end - begin,
                        center.data() + begin, sums.data() + row, square_sums.data() + row);
  });
  for (int64_t c = 0; c < channels; ++c) {
    double total = 0, squares = 0;
    for (int64_t n = 0; n < samples; ++n) {
      total += sums[n * channels + c];
      squares += square_sums[n * channels + c];
    }
    const double deviation = total / count;
    means[c] = static_cast<double>(center[c]) + deviation;
    vars[c] = std::max(0.0, squares / count - deviation * deviation);
  }
}

// (mean, biased variance) of each channel of (N, C, S) `x` (positions-major or contiguous)
// over N and S, into `means` and `vars`: two passes per channel for a contiguous x, one for
// a positions-major one.
template <typename scalar_t>
void moments_into(const at::Tensor& x, bool by_position, double* means, double* vars) {
  TORCH_CHECK(x.dim() == 3 && x.is_floating_point() && x.size(0) * x.size(2) > 0,
              "channel_moments: expected a non-empty (N, C, S) float32 or float64 tensor, got ",
              x.sizes());
  const int64_t samples = x.size(0), channels = x.size(1), size = x.size(2);
  const double count = static_cast<double>(samples * size);
  const scalar_t* xs = x.data_ptr<scalar_t>();
  if (by_position) {
    position_channel_moments(xs, samples, channels, size, means, vars);
    return;
  }
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
}

// (mean, biased variance) of each channel of (N, C, *) x over all dims but 1, float64 (C,), in
// two passes (one for a positions-major x).
std::vector<at::Tensor> channel_moments(const at::Tensor& x_in) {
  const auto rows = channel_rows("channel_moments", x_in);
  const bool by_position = positions_major(rows);
  const auto x = by_position ? rows : rows.contiguous();
  auto mean = at::empty({x.size(1)}, x.options().dtype(at::kDouble)), var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_moments", [&] {
    moments_into<scalar_t>(x, by_position, mean.data_ptr<double>(), var.data_ptr<double>());
  });
  return {mean, var};
}

// Sum of grad * (x - center) and of grad over a row: blocks in the dtype, double across.
template <typename scalar_t>
void row_grad_sums(const scalar_t* grad, const scalar_t* x, int64_t size,
                   scalar_t center, double* dot, double* total) {
  double dot_sum = 0, grad_sum = 0;
  for (int64_t start = 0; start < size; start += kSumBlock) {
    const int64_t stop = std::min(size, start + kSumBlock);
    scalar_t block_dot = 0, block_grad = 0;
#pragma omp simd reduction(+ : block_dot, block_grad)
    for (int64_t i = start; i < stop; ++i) {
      block_dot += grad[i] * (x[i] - center);
      block_grad += grad[i];
    }
    dot_sum += block_dot;
    grad_sum += block_grad;
  }
  *dot = dot_sum;
  *total = grad_sum;
}

// Batch normalization's input gradient over a row: grad * p + (x - mean) * r + q.
template <typename scalar_t>
void grad_batch_norm_row(const scalar_t* grad, const scalar_t* x, scalar_t* out,
                         int64_t size, scalar_t mean, scalar_t p, scalar_t q,
                         scalar_t r) {
  for (int64_t i = 0; i < size; ++i) out[i] = grad[i] * p + (x[i] - mean) * r + q;
}

// Batch normalization's backward of (N, C, S) `x` (positions-major or contiguous, `grad` in
// its layout) given its batch mean and inverse std and `gain`, the weight: grad_x into `out`,
// and per channel the sums of grad * x_hat and of grad into `grad_scale` and `grad_bias`, with
// x_hat = (x - mean) * inv_std and the gradient taken through the batch statistics, as aten's
// native_batch_norm_backward computes them (whose channels_last kernel took ~2.5x its
// contiguous one on CPU). Two passes: the sums, then
// grad_x = (grad - mean(grad) - x_hat * mean(grad * x_hat)) * gain * inv_std.
template <typename scalar_t>
void batch_norm_backward_into(const at::Tensor& grad, const at::Tensor& x, bool by_position,
                              const scalar_t* gain, const scalar_t* ms, const scalar_t* is,
                              scalar_t* out, scalar_t* grad_scale, scalar_t* grad_bias) {
  const int64_t samples = x.size(0), channels = x.size(1), size = x.size(2);
  const scalar_t *gs = grad.data_ptr<scalar_t>(), *xs = x.data_ptr<scalar_t>();
  std::vector<double> dots(samples * channels), totals(samples * channels);
  if (by_position) {
    // reduce_row's sums with y = x * 1 - mean (x - mean exactly), gamma 1, beta 0, no clamp
    const std::vector<scalar_t> ones(channels, scalar_t(1)), zeros(channels, scalar_t(0));
    std::vector<scalar_t> minus_mean(channels);
    for (int64_t c = 0; c < channels; ++c) minus_mean[c] = -ms[c];
    const auto unclamped = std::numeric_limits<scalar_t>::infinity();
    for_sample_channel_blocks(0, samples, channels, size, [&](int64_t n, int64_t begin,
                                                           int64_t end) {
      const int64_t at = n * size * channels + begin, row = n * channels + begin;
      position_grad_sums(gs + at, xs + at, size, channels, end - begin, ones.data() + begin,
                         minus_mean.data() + begin, ones.data() + begin, zeros.data() + begin,
                         unclamped, dots.data() + row, totals.data() + row);
    });
  } else {
    for_each_row(x, [&](int64_t row, int64_t channel, int64_t at) {
      row_grad_sums(gs + at, xs + at, size, ms[channel], dots.data() + row, totals.data() + row);
    });
  }
  // per channel: grad_x = grad * p + (x - mean) * r + q
  std::vector<scalar_t> p(channels), q(channels), r(channels);
  const double count = static_cast<double>(samples * size);
  for (int64_t c = 0; c < channels; ++c) {
    double dot = 0, total = 0;
    for (int64_t n = 0; n < samples; ++n) {
      dot += dots[n * channels + c];
      total += totals[n * channels + c];
    }
    const double inv = is[c], scaled = static_cast<double>(gain[c]) * inv;
    p[c] = static_cast<scalar_t>(scaled);
    r[c] = static_cast<scalar_t>(-scaled * inv * inv * dot / count);
    q[c] = static_cast<scalar_t>(-scaled * total / count);
    grad_scale[c] = static_cast<scalar_t>(dot * inv);
    grad_bias[c] = static_cast<scalar_t>(total);
  }
  if (by_position) {
    for_each_position(0, samples, channels, size, [&](int64_t, int64_t at) {
      grad_batch_norm_position(gs + at, xs + at, out + at, channels, ms, p.data(), q.data(),
                               r.data());
    });
  } else {
    for_each_row(x, [&](int64_t, int64_t channel, int64_t at) {
      grad_batch_norm_row(gs + at, xs + at, out + at, size, ms[channel], p[channel], q[channel],
                          r[channel]);
    });
  }
}

void check_per_channel(const char* what, std::initializer_list<at::Tensor> per_channel,
                       const at::Tensor& x) {
  for (const auto& t : per_channel) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.scalar_type() == x.scalar_type(),
                what, ": expected per-channel tensors of shape (", x.size(1),
                ",) and x's dtype");
  }
}

void check_gradient(const char* what, const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), what,
              ": expected a gradient of x's shape and dtype");
}

// Batch normalization's backward for a positions-major (N, C, S) x, given its batch mean and
// inverse std and the weight: (grad_x in x's layout, sum of grad * x_hat, sum of grad), the
// sums per channel in x's dtype; see batch_norm_backward_into.
std::vector<at::Tensor> channel_batch_norm_backward(const at::Tensor& grad_in,
                                                    const at::Tensor& x,
                                                    const at::Tensor& weight_in,
                                                    const at::Tensor& mean_in,
                                                    const at::Tensor& inv_std_in) {
  TORCH_CHECK(positions_major(x) && x.is_floating_point(),
              "channel_batch_norm_backward: expected the (N, C, S) view of a channels_last "
              "float32 or float64 tensor, got sizes ", x.sizes(), " and strides ", x.strides());
  check_gradient("channel_batch_norm_backward", grad_in, x);
  const auto grad = in_layout_of(grad_in, x), weight = weight_in.contiguous(),
             mean = mean_in.contiguous(), inv_std = inv_std_in.contiguous();
  check_per_channel("channel_batch_norm_backward", {weight, mean, inv_std}, x);
  auto grad_x = at::empty_like(x);
  auto sums = at::empty({2, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_batch_norm_backward", [&] {
    batch_norm_backward_into(grad, x, true, weight.data_ptr<scalar_t>(),
                             mean.data_ptr<scalar_t>(), inv_std.data_ptr<scalar_t>(),
                             grad_x.data_ptr<scalar_t>(), sums[0].data_ptr<scalar_t>(),
                             sums[1].data_ptr<scalar_t>());
  });
  return {grad_x, sums[0], sums[1]};
}

// Online Normalization's "ls" error compensation (functional.LayerScale), each sample of an
// (N, M) z divided by sqrt(mean(z^2) + eps): (out, inv_rms), inv_rms float64 (N,). Two passes
// over a sample, where the torch operations took four and two temporaries. `in_place` writes
// out into a contiguous z (no fresh activation-sized buffer, whose page faults cost about a
// pass).
std::vector<at::Tensor> layer_scale_forward(const at::Tensor& z_in, double eps, bool in_place) {
  TORCH_CHECK(z_in.dim() == 2 && z_in.is_floating_point(),
              "layer_scale_forward: expected an (N, M) floating-point tensor, got ", z_in.sizes());
  TORCH_CHECK(!in_place || z_in.is_contiguous(),
              "layer_scale_forward: in place needs a contiguous tensor");
  const auto z = z_in.contiguous();
  const int64_t samples = z.size(0), size = z.size(1);
  auto out = in_place ? z : at::empty_like(z);
  auto inv_rms = at::empty({samples}, z.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "layer_scale_forward", [&] {
    const scalar_t* zs = z.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    double* inv = inv_rms.data_ptr<double>();
    at::parallel_for(0, samples, rows_per_task(size), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = zs + n * size;
        inv[n] = 1.0 / std::sqrt(row_square_deviation(row, size, scalar_t(0)) / size + eps);
        const auto scale = static_cast<scalar_t>(inv[n]);
        scaled_row(row, os + n * size, size, scale);
      }
    });
  });
  return {out, inv_rms};
}

// Its gradient, with o = out: (grad - o mean(grad o)) inv_rms per sample.
at::Tensor layer_scale_backward(const at::Tensor& grad_in, const at::Tensor& out_in,
                                const at::Tensor& inv_rms_in) {
  const auto out = out_in.contiguous(), grad = grad_in.contiguous().view(out.sizes()),
             inv_rms = inv_rms_in.contiguous();
  TORCH_CHECK(grad.scalar_type() == out.scalar_type() && inv_rms.scalar_type() == at::kDouble &&
                  inv_rms.dim() == 1 && inv_rms.size(0) == out.size(0),
              "layer_scale_backward: expected what layer_scale_forward returned");
  const int64_t samples = out.size(0), size = out.size(1);
  auto grad_z = at::empty_like(out);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "layer_scale_backward", [&] {
    const scalar_t *gs = grad.data_ptr<scalar_t>(), *os = out.data_ptr<scalar_t>();
    const double* inv = inv_rms.data_ptr<double>();
    scalar_t* gz = grad_z.data_ptr<scalar_t>();
    at::parallel_for(0, samples, rows_per_task(size), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t at = n * size;
        double dot, total;  // (the total is not needed)
        row_grad_sums(gs + at, os + at, size, scalar_t(0), &dot, &total);
        const auto mean_dot = static_cast<scalar_t>(dot / size);
        const auto scale = static_cast<scalar_t>(inv[n]);
        layer_scale_grad_row(gs + at, os + at, gz + at, size, mean_dot, scale);
      }
    });
  });
  return grad_z;
}

// Batch Renormalization (Ioffe 2017, arXiv:1702.03275) in training, one call each way:
// `_BatchRenorm` and `batch_renorm` in normlab/functional/batch_renorm.py are the
// specification, whose eager path takes ~15 small torch operations around the passes (the
// per-call cost that dominated at batch 2 and on (N, C) inputs). Forward: the moments, then
// per channel r, d, the running statistics and the affine map, then one pass writing
// out = x * alpha + beta. Backward: batch normalization's with the weight weight * r (r and d
// are constants of the backward pass), the weight's gradient r * grad_scale + d * grad_bias.
// The per-channel arithmetic is the eager path's, in x's dtype, except that the output is
// (x - mean) * alpha + shift where torch's batch norm computes x * alpha + (shift - mean * alpha):
// at a small batch variance (batch 2: two close values) alpha is large, and rounding
// mean * alpha cost float32 outputs 1e-5 of their scale.

enum RenormStat { kMean, kInvStd, kR, kD, kRenormStats };

// {out in x's layout, new running mean, new running var, stats (4, C): batch mean, batch
// inverse std, r, d} for (N, C, *) x; the running statistics given are not modified. The new
// ones move towards the batch's by `momentum`, the variance unbiased, as in torch's BatchNorm.
std::vector<at::Tensor> batch_renorm_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                             const at::Tensor& bias_in,
                                             const at::Tensor& running_mean_in,
                                             const at::Tensor& running_var_in, double momentum,
                                             double eps, double r_max, double d_max) {
  const auto rows = channel_rows("batch_renorm_forward", x_in);
  const bool by_position = positions_major(rows);
  const auto x = by_position ? rows : rows.contiguous(), weight = weight_in.contiguous(),
             bias = bias_in.contiguous(), running_mean = running_mean_in.contiguous(),
             running_var = running_var_in.contiguous();
  check_per_channel("batch_renorm_forward", {weight, bias, running_mean, running_var}, x);
  const int64_t channels = x.size(1);
  at::Tensor out, out_rows;
  std::tie(out, out_rows) = empty_with_rows("batch_renorm_forward", x_in, x, channel_rows);
  auto new_mean = at::empty_like(running_mean), new_var = at::empty_like(running_var),
       stats = at::empty({kRenormStats, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_renorm_forward", [&] {
    std::vector<double> batch_means(channels), batch_vars(channels);
    moments_into<scalar_t>(x, by_position, batch_means.data(), batch_vars.data());
    const double count = static_cast<double>(x.size(0) * x.size(2));
    const scalar_t *ws = weight.data_ptr<scalar_t>(), *bs = bias.data_ptr<scalar_t>(),
                   *rms = running_mean.data_ptr<scalar_t>(),
                   *rvs = running_var.data_ptr<scalar_t>();
    scalar_t* const stat = stats.data_ptr<scalar_t>();
    scalar_t *means = stat + kMean * channels, *inv_stds = stat + kInvStd * channels,
             *rs = stat + kR * channels, *ds = stat + kD * channels,
             *new_means = new_mean.data_ptr<scalar_t>(),
             *new_vars = new_var.data_ptr<scalar_t>();
    const auto epsilon = static_cast<scalar_t>(eps), keep = static_cast<scalar_t>(1 - momentum),
               rate = static_cast<scalar_t>(momentum), r_low = static_cast<scalar_t>(1 / r_max),
               r_high = static_cast<scalar_t>(r_max), d_limit = static_cast<scalar_t>(d_max);
    std::vector<scalar_t> alpha(channels), shift(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const auto mean = static_cast<scalar_t>(batch_means[c]);
      const scalar_t inv_std = scalar_t(1) / std::sqrt(static_cast<scalar_t>(batch_vars[c]) +
                                                       epsilon);
      const scalar_t sigma = std::sqrt(rvs[c] + epsilon);
      // std::max/min keep a NaN (the first argument), as torch.clamp does
      const scalar_t r = std::min(std::max(scalar_t(1) / (inv_std * sigma), r_low), r_high);
      const scalar_t d = std::min(std::max((mean - rms[c]) / sigma, -d_limit), d_limit);
      means[c] = mean;
      inv_stds[c] = inv_std;
      rs[c] = r;
      ds[c] = d;
      alpha[c] = inv_std * (ws[c] * r);
      shift[c] = bs[c] + ws[c] * d;
      const auto unbiased = static_cast<scalar_t>(batch_vars[c] * count / (count - 1));
      new_means[c] = rms[c] * keep + rate * mean;
      new_vars[c] = rvs[c] * keep + rate * unbiased;
    }
    const scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* os = out_rows.data_ptr<scalar_t>();
    if (by_position) {
      for_each_position(0, x.size(0), channels, x.size(2), [&](int64_t, int64_t at) {
        affine_position(xs + at, os + at, channels, means, alpha.data(), shift.data());
      });
    } else {
      const int64_t size = x.size(2);
      for_each_row(x, [&](int64_t, int64_t channel, int64_t at) {
        affine_row(xs + at, os + at, size, means[channel], alpha[channel], shift[channel]);
      });
    }
  });
  return {out, new_mean, new_var, stats};
}

// {grad_x in x's layout, grad_weight, grad_bias} of batch_renorm_forward's out, given its
// (N, C, *) x and stats.
std::vector<at::Tensor> batch_renorm_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                              const at::Tensor& weight_in,
                                              const at::Tensor& stats_in) {
  check_gradient("batch_renorm_backward", grad_in, x_in);
  const auto rows = channel_rows("batch_renorm_backward", x_in);
  const bool by_position = positions_major(rows);
  const auto x = by_position ? rows : rows.contiguous(), weight = weight_in.contiguous(),
             stats = stats_in.contiguous();
  check_per_channel("batch_renorm_backward", {weight}, x);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kRenormStats && stats.size(1) == x.size(1) &&
                  stats.scalar_type() == x.scalar_type(),
              "batch_renorm_backward: expected the (4, C) stats of batch_renorm_forward");
  const auto grad = in_layout_of(channel_rows("batch_renorm_backward", grad_in), x);
  const int64_t channels = x.size(1);
  at::Tensor grad_x, grad_x_rows;
  std::tie(grad_x, grad_x_rows) = empty_with_rows("batch_renorm_backward", x_in, x, channel_rows);
  auto grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_renorm_backward", [&] {
    const scalar_t* const stat = stats.data_ptr<scalar_t>();
    const scalar_t *ws = weight.data_ptr<scalar_t>(), *rs = stat + kR * channels,
                   *ds = stat + kD * channels;
    std::vector<scalar_t> gain(channels), grad_scale(channels);
    for (int64_t c = 0; c < channels; ++c) gain[c] = ws[c] * rs[c];
    scalar_t* grad_biases = grad_bias.data_ptr<scalar_t>();
    batch_norm_backward_into(grad, x, by_position, gain.data(), stat + kMean * channels,
                             stat + kInvStd * channels, grad_x_rows.data_ptr<scalar_t>(),
                             grad_scale.data(), grad_biases);
    // y = weight * (r x_hat + d) + bias
    scalar_t* grad_weights = grad_weight.data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      grad_weights[c] = rs[c] * grad_scale[c] + ds[c] * grad_biases[c];
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

// As Python's torch.autograd.function.once_differentiable: under create_graph, `gradients`
// (computed by the kernels, outside autograd) get a node that raises if they are differentiated.
torch::autograd::variable_list once_differentiable(const char* what, const at::Tensor& grad,
                                                  torch::autograd::variable_list gradients) {
  if (!at::GradMode::is_enabled() || !grad.requires_grad()) return gradients;
  for (auto& t : gradients) {
    if (t.defined()) t = t.detach().set_requires_grad(true);
  }
  const auto count = static_cast<int64_t>(gradients.size());
  return torch::autograd::DelayedError(std::string("trying to differentiate twice ") + what +
                                           "'s compiled backward, which has no double backward",
                                       count)
      .apply(std::move(gradients));
}

// Batch Renormalization's training step as an autograd function in C++: the backward runs
// without Python (whose autograd.Function cost ~20 us a step, a third of BatchNorm1d's whole
// step at (32, 512)). Saved: x, the weight and the (4, C) stats, as _BatchRenorm saves.
struct BatchRenormFunction : public torch::autograd::Function<BatchRenormFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
      const at::Tensor& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
      double momentum, double eps, double r_max, double d_max) {
    auto results = batch_renorm_forward(x, weight, bias, running_mean, running_var, momentum,
                                        eps, r_max, d_max);
    ctx->save_for_backward({x, weight, results[3]});
    ctx->mark_non_differentiable({results[1], results[2]});
    return {results[0], results[1], results[2]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto gradients = batch_renorm_backward(grads[0], saved[0], saved[1], saved[2]);
    gradients = once_differentiable("BatchRenorm", grads[0], std::move(gradients));
    return {gradients[0], gradients[1], gradients[2], at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(),   at::Tensor(),   at::Tensor()};
  }
};

// (out, new running mean, new running var) of Batch Renormalization's training step on
// (N, C, *) x, differentiable in x, weight and bias; see batch_renorm_forward.
torch::autograd::variable_list batch_renorm_train(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& bias,
                                                  const at::Tensor& running_mean,
                                                  const at::Tensor& running_var, double momentum,
                                                  double eps, double r_max, double d_max) {
  return BatchRenormFunction::apply(x, weight, bias, running_mean, running_var, momentum, eps,
                                    r_max, d_max);
}

// Online Normalization's training step in one process (OnlineNormFunction in
// normlab/functional/online_norm.py, its specification) as an autograd function in C++:
// stream_forward, then stream_backward, with no Python around them (a Python
// autograd.Function costs ~25 us a step: GroupNorm's whole step at batch 1). Saved: x and the
// forward's record, as BatchNorm saves x and its statistics. The running statistics are
// updated in forward, the control state (kept by reference) in backward.
// Each sample of an activation the stream kernels wrote ((N, C, S) or positions-major) as one
// row of its memory, (N, C * S): a sample's values are contiguous in both layouts, and layer
// scaling sums and scales a whole sample, in any order.
at::Tensor sample_rows(const at::Tensor& t) {
  const int64_t samples = t.size(0), size = samples == 0 ? 0 : t.numel() / samples;
  return t.as_strided({samples, size}, {size, 1});
}

struct OnlineNormStepFunction : public torch::autograd::Function<OnlineNormStepFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& gamma, const at::Tensor& beta,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            const at::Tensor& mean_control,
                            const at::Tensor& correlation_control, double alpha_fwd,
                            double alpha_bkw, double eps, double limit, bool layer_scale,
                            double ls_eps) {
    auto results = stream_forward(x, gamma, beta, running_mean, running_var, alpha_fwd, eps,
                                  limit);  // out, the record, x or y
    auto out = results[0];
    at::Tensor inv_rms;  // layer scaling's, in place on out: no fresh activation-sized buffer
    if (layer_scale) inv_rms = layer_scale_forward(sample_rows(out), ls_eps, true)[1];
    ctx->save_for_backward({results[2], gamma, beta, results[1],  // x's rows
                            layer_scale ? out : at::Tensor(), inv_rms});
    ctx->saved_data["mean_control"] = mean_control;
    ctx->saved_data["correlation_control"] = correlation_control;
    ctx->saved_data["alpha_bkw"] = alpha_bkw;
    ctx->saved_data["limit"] = limit;
    ctx->saved_data["alpha_fwd"] = alpha_fwd;
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &gamma = saved[1], &out = saved[4], &inv_rms = saved[5];
    auto grad = grads[0];
    const bool own_grad = inv_rms.defined();
    if (own_grad) {  // layer scaling's gradient, in out's layout, into a buffer of its own
      grad = layer_scale_backward(sample_rows(in_layout_of(grad, out)), sample_rows(out),
                                  inv_rms)
                 .as_strided(out.sizes(), out.strides());
    }
    auto gradients = stream_backward(
        grad, saved[0], gamma, saved[2], saved[3], ctx->saved_data["mean_control"].toTensor(),
        ctx->saved_data["correlation_control"].toTensor(),
        ctx->saved_data["alpha_bkw"].toDouble(), ctx->saved_data["limit"].toDouble(),
        ctx->saved_data["alpha_fwd"].toDouble(), ctx->saved_data["eps"].toDouble(), own_grad);
    gradients = once_differentiable("OnlineNorm", grads[0], std::move(gradients));
    return {gradients[0], gradients[1], gradients[2], at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(),   at::Tensor(),   at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// The output of Online Normalization's training step on (N, C, S) x, differentiable in x,
// gamma and beta; arguments as stream_forward's, the control state with alpha_bkw as
// stream_backward's, and with `layer_scale` the "ls" error compensation of the output
// (layer_scale_forward's, with ls_eps).
at::Tensor online_norm_train(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                             const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& mean_control,
                             const at::Tensor& correlation_control, double alpha_fwd,
                             double alpha_bkw, double eps, double limit, bool layer_scale,
                             double ls_eps) {
  return OnlineNormStepFunction::apply(x, gamma, beta, running_mean, running_var, mean_control,
                                       correlation_control, alpha_fwd, alpha_bkw, eps, limit,
                                       layer_scale, ls_eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("online_forward", &forward);
  module.def("online_backward_sums", &backward_sums);
  module.def("online_backward_input", &backward_input);
  module.def("channel_moments", &channel_moments);
  module.def("channel_batch_norm_backward", &channel_batch_norm_backward);
  module.def("online_stream_forward", &stream_forward);
  module.def("online_stream_backward", &stream_backward);
  module.def("layer_scale_forward", &layer_scale_forward);
  module.def("layer_scale_backward", &layer_scale_backward);
  module.def("batch_renorm_train", &batch_renorm_train);
  module.def("online_norm_train", &online_norm_train);
}
