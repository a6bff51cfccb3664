// Equilibrium Normalization's kernel transform and its gradient, one call each
// (Defazio and Bottou, arXiv:1812.04549, section 4).
//
// `functional.equi_norm` in normlab/functional/equinorm.py is the eager path and the
// specification. On a ResNet's small kernels it is ~90 tensor operations forward and
// ~150 in autograd's backward per layer, ~1.4 ms a layer on CPU, 15% of a ResNet-20
// step. Here each output row d of a (D, C, J) weight (J kernel positions) is one loop:
//   K = W / m (m = max |W_d|, a constant),   S = sum_c mu_c,   A = sum_c mu_c sum_j K_cj,
//   b = -A / (J S),   P_c = sum_j K_cj [K_cj > 0] + b #{j: K_cj > 0}  (single pass)
//                     or sum_j max(K_cj + b, 0)                          (two pass),
//   C = sum_c mu_c P_c,   s = ratio / C,   out = gain s (K + b),
// S and C replaced by their floors where they are (near) zero, as `_guarded` does, the
// floors differentiated through. Sums run in double; the outputs are rounded to the
// weight's dtype. The backward is the chain rule of these lines, written out.
//
// Every sum over a row is a sum over its C x J weights with each weight's channel mean
// beside it (the means repeated J times, once per call), so that each pass is one flat
// loop that vectorizes, whatever J. Rows run in parallel.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 32768;  // weights per parallel task
constexpr int64_t kMaxChunks = 64;  // bounds the backward's per-chunk input-mean gradients

// Which value a guarded denominator took (functional._guarded).
enum Guard : int8_t { kValue = 0, kFloor = 1, kOne = 2 };

Guard guarded(double value, double floor, double* out) {
  if (std::abs(value) > floor) {
    *out = value;
    return kValue;
  }
  *out = floor == 0 ? 1.0 : floor;  // a zero floor: zero inputs or weights, numerator zero
  return floor == 0 ? kOne : kFloor;
}

// The element functions below select values, never branch (std::max selects a reference:
// a branch), so that the loops calling them vectorize.
inline double sign(double v) { return static_cast<double>((v > 0) - (v < 0)); }

inline double positive_only(double v) { return v > 0 ? v : 0.0; }

// dP_c / dK_cj: [K > 0] single pass; two pass, torch's clamp(min=0) gradient, [K + b >= 0].
template <bool kSinglePass>
inline double positive_slope(double k, double shift) {
  return static_cast<double>(kSinglePass ? k > 0 : k + shift >= 0);
}

// P's summand for one weight: K [K > 0] + b [K > 0] single pass, max(K + b, 0) two pass.
template <bool kSinglePass>
inline double positive_part(double k, double shift) {
  return kSinglePass ? static_cast<double>(k > 0) * (k + shift) : positive_only(k + shift);
}

// The means beside a row's weights: (groups, C J), each channel's mean repeated J times, and
// per group sum_c mu_c and sum_c |mu_c|.
struct WeightMeans {
  std::vector<double> repeated, sum, abs_sum;
  int64_t row_size;

  template <typename scalar_t>
  WeightMeans(const scalar_t* mean, int64_t groups, int64_t channels, int64_t positions)
      : repeated(groups * channels * positions), sum(groups), abs_sum(groups),
        row_size(channels * positions) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < channels; ++c) {
        const double m = mean[g * channels + c];
        std::fill_n(repeated.data() + g * row_size + c * positions, positions, m);
        sum[g] += m;
        abs_sum[g] += std::abs(m);
      }
    }
  }

  const double* of_group(int64_t g) const { return repeated.data() + g * row_size; }
};

// What the forward solves per row, and the backward reads: kept between them as a (D, 5)
// float64 tensor of the five values and a (D, 2) int8 one of the guards.
struct Solved {
  double row_max, shift, scale, input_sum, contribution;
  Guard input_guard, contribution_guard;

  static constexpr int64_t kValues = 5;

  void store(double* values, int8_t* guards) const {
    const double ordered[kValues] = {row_max, shift, scale, input_sum, contribution};
    std::copy_n(ordered, kValues, values);
    guards[0] = input_guard;
    guards[1] = contribution_guard;
  }

  static Solved load(const double* values, const int8_t* guards) {
    return {values[0], values[1], values[2], values[3], values[4], static_cast<Guard>(guards[0]),
            static_cast<Guard>(guards[1])};
  }
};

// One row: `size` = C J weights `w`, their means `m`. The sums of K come from those of W
// (one pass, with max |W|) by the degree of each in K.
template <typename scalar_t>
Solved forward_row(const scalar_t* w, const double* m, int64_t size, int64_t positions,
                   double input_sum, double input_abs, double gain, double ratio,
                   bool single_pass, double floor_scale, scalar_t* out) {
  double weighted = 0, weighted_abs = 0, positive_weighted = 0, positive_mean = 0, largest = 0;
#pragma omp simd reduction(+ : weighted, weighted_abs, positive_weighted, positive_mean) \
    reduction(max : largest)
  for (int64_t i = 0; i < size; ++i) {
    const double v = w[i], magnitude = std::abs(v);
    weighted += m[i] * v;
    weighted_abs += std::abs(m[i]) * magnitude;
    positive_weighted += m[i] * positive_only(v);
    positive_mean += m[i] * static_cast<double>(v > 0);
    largest = largest > magnitude ? largest : magnitude;
  }
  Solved solved;
  solved.row_max = largest > 0 ? largest : 1.0;
  const double inv_row_max = 1.0 / solved.row_max;  // in double: K neither overflows nor underflows
  solved.input_guard = guarded(input_sum, floor_scale * input_abs, &solved.input_sum);
  const double b = -weighted * inv_row_max / (static_cast<double>(positions) * solved.input_sum);
  double contribution = positive_weighted * inv_row_max + b * positive_mean;
  if (!single_pass) {
    contribution = 0;
#pragma omp simd reduction(+ : contribution)
    for (int64_t i = 0; i < size; ++i) contribution += m[i] * positive_only(w[i] * inv_row_max + b);
  }
  solved.contribution_guard =
      guarded(contribution, floor_scale * weighted_abs * inv_row_max, &solved.contribution);
  solved.shift = b;
  solved.scale = ratio / solved.contribution;
  const double factor = gain * solved.scale;
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) {
    out[i] = static_cast<scalar_t>(factor * (w[i] * inv_row_max + b));
  }
  return solved;
}

// The gradient of one row: into grad_w, each weight's part of its channel's input-mean
// gradient added to grad_mean (C J, double); returns the gain's gradient and adds the
// row's per-channel part (its sign(mu_c) share into *per_sign) to *per_channel.
template <bool kSinglePass, typename scalar_t>
double backward_row(const scalar_t* w, const double* m, int64_t size, int64_t positions,
                    double gain, const Solved& solved, const scalar_t* grad_out,
                    double floor_scale, scalar_t* grad_w, double* grad_mean,
                    double* per_channel, double* per_sign) {
  const double b = solved.shift, s = solved.scale, inv_row_max = 1.0 / solved.row_max;
  double projection = 0, grad_sum = 0, slope_mean = 0;  // sum G (K + b), sum G, sum m dP/dK
#pragma omp simd reduction(+ : projection, grad_sum, slope_mean)
  for (int64_t i = 0; i < size; ++i) {
    const double k = w[i] * inv_row_max, g = grad_out[i];
    projection += g * (k + b);
    grad_sum += g;
    slope_mean += m[i] * positive_slope<kSinglePass>(k, b);
  }
  const double grad_c = -gain * projection * s / solved.contribution;  // dL/dC
  // dL/dP_c = grad_positive m_c
  const double grad_positive = solved.contribution_guard == kValue ? grad_c : 0.0;
  const double grad_shift = gain * s * grad_sum + grad_positive * slope_mean;  // dL/db
  const double grad_weighted = -grad_shift / (static_cast<double>(positions) * solved.input_sum);
  const double grad_input_sum = -grad_shift * b / solved.input_sum;
  *per_channel += solved.input_guard == kValue ? grad_input_sum : 0.0;
  *per_sign += solved.input_guard == kFloor ? grad_input_sum * floor_scale : 0.0;
  const double grad_scaled = gain * s;
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) {
    const double k = w[i] * inv_row_max;
    const double grad_k = grad_scaled * grad_out[i] +
                          m[i] * (grad_positive * positive_slope<kSinglePass>(k, b) + grad_weighted);
    grad_w[i] = static_cast<scalar_t>(grad_k * inv_row_max);
    grad_mean[i] += grad_weighted * k + grad_positive * positive_part<kSinglePass>(k, b);
  }
  if (solved.contribution_guard == kFloor) {  // the floor's terms: a degenerate row only
    const double grad_floor = grad_c * floor_scale;
    for (int64_t i = 0; i < size; ++i) {
      const double k = w[i] * inv_row_max;
      grad_w[i] = static_cast<scalar_t>(grad_w[i] +
                                        grad_floor * std::abs(m[i]) * sign(k) * inv_row_max);
      grad_mean[i] += grad_floor * sign(m[i]) * std::abs(k);
    }
  }
  return s * projection;
}

void check(const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& gain) {
  TORCH_CHECK(weight.dim() == 3 && weight.is_floating_point() && weight.size(2) > 0,
              "equinorm: expected a (D, C, J) float32 or float64 weight, got ", weight.sizes());
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) > 0 && weight.size(0) % mean.size(0) == 0 &&
                  mean.size(1) == weight.size(1) && mean.scalar_type() == weight.scalar_type(),
              "equinorm: expected input means of shape (groups, C), groups dividing D, and the "
              "weight's dtype; got ", mean.sizes(), " for a weight of shape ", weight.sizes());
  TORCH_CHECK(gain.dim() == 1 && gain.size(0) == weight.size(0) &&
                  gain.scalar_type() == weight.scalar_type(),
              "equinorm: expected a gain of shape (D,) and the weight's dtype");
}

int64_t rows_per_task(int64_t row_size) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row_size, 1));
}

}  // namespace

// (out, solved, guards): out = gain s (W / m + b) of shape (D, C, J); per row, m, b, s and
// the two guarded denominators S, C (solved, (D, 5) float64) and the `Guard` S and C took
// (guards, (D, 2) int8). `mean` is (groups, C): the input channel means of each group, row
// d in group d / (D / groups).
std::vector<at::Tensor> forward(const at::Tensor& weight_in, const at::Tensor& mean_in,
                                const at::Tensor& gain_in, double ratio, bool single_pass,
                                double floor_scale) {
  const auto weight = weight_in.contiguous(), mean = mean_in.contiguous(),
             gain = gain_in.contiguous();
  check(weight, mean, gain);
  const int64_t rows = weight.size(0), channels = weight.size(1), positions = weight.size(2);
  const int64_t groups = mean.size(0), rows_per_group = rows / groups;
  const int64_t size = channels * positions;
  auto out = at::empty_like(weight);
  auto solved_rows = at::empty({rows, Solved::kValues}, weight.options().dtype(at::kDouble));
  auto guards = at::empty({rows, 2}, weight.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "equinorm_forward", [&] {
    const scalar_t *w = weight.data_ptr<scalar_t>(), *g = gain.data_ptr<scalar_t>();
    const WeightMeans means(mean.data_ptr<scalar_t>(), groups, channels, positions);
    scalar_t* o = out.data_ptr<scalar_t>();
    double* solved_out = solved_rows.data_ptr<double>();
    int8_t* guard = guards.data_ptr<int8_t>();
    at::parallel_for(0, rows, rows_per_task(size), [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        const int64_t group = d / rows_per_group;
        const Solved solved = forward_row(
            w + d * size, means.of_group(group), size, positions, means.sum[group],
            means.abs_sum[group], static_cast<double>(g[d]), ratio, single_pass, floor_scale,
            o + d * size);
        solved.store(solved_out + d * Solved::kValues, guard + 2 * d);
      }
    });
  });
  return {out, solved_rows, guards};
}

// (grad_weight (D, C, J), grad_mean (groups, C), grad_gain (D,)) from the gradient of out and
// what `forward` returned.
std::vector<at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& weight_in,
                                 const at::Tensor& mean_in, const at::Tensor& gain_in,
                                 const at::Tensor& solved_in, const at::Tensor& guards_in,
                                 bool single_pass, double floor_scale) {
  const auto grad = grad_in.contiguous(), weight = weight_in.contiguous(),
             mean = mean_in.contiguous(), gain = gain_in.contiguous(),
             solved_rows = solved_in.contiguous(), guards = guards_in.contiguous();
  check(weight, mean, gain);
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.scalar_type() == weight.scalar_type(),
              "equinorm backward: expected a gradient of the weight's shape and dtype");
  const int64_t rows = weight.size(0), channels = weight.size(1), positions = weight.size(2);
  TORCH_CHECK(solved_rows.sizes() == at::IntArrayRef({rows, Solved::kValues}) &&
                  solved_rows.scalar_type() == at::kDouble &&
                  guards.sizes() == at::IntArrayRef({rows, 2}) && guards.scalar_type() == at::kChar,
              "equinorm backward: expected what forward solved for this weight");
  const int64_t groups = mean.size(0), rows_per_group = rows / groups;
  const int64_t size = channels * positions;
  // Fixed chunks of rows, each with its own input-mean gradients, summed in chunk order: the
  // result does not depend on the thread count. Per chunk and group: one per weight, then
  // the parts that are the same for each channel and those that are its sign's multiples.
  const int64_t chunk_rows = std::max(rows_per_task(size), (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const int64_t chunk_stride = groups * (size + 2);
  auto grad_weight = at::empty_like(weight), grad_gain = at::empty_like(gain);
  auto grad_mean = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "equinorm_backward", [&] {
    const scalar_t *w = weight.data_ptr<scalar_t>(), *mu = mean.data_ptr<scalar_t>(),
                   *g = gain.data_ptr<scalar_t>(), *go = grad.data_ptr<scalar_t>();
    const WeightMeans means(mu, groups, channels, positions);
    const double* solved_values = solved_rows.data_ptr<double>();
    const int8_t* guard = guards.data_ptr<int8_t>();
    scalar_t *gw = grad_weight.data_ptr<scalar_t>(), *gg = grad_gain.data_ptr<scalar_t>();
    std::vector<double> chunk_sums(chunks * chunk_stride, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
      for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
        const int64_t end = std::min(rows, (chunk + 1) * chunk_rows);
        for (int64_t d = chunk * chunk_rows; d < end; ++d) {
          const int64_t group = d / rows_per_group, at = d * size;
          double* sums = chunk_sums.data() + chunk * chunk_stride + group * (size + 2);
          const Solved solved = Solved::load(solved_values + d * Solved::kValues, guard + 2 * d);
          const auto row = single_pass ? backward_row<true, scalar_t> : backward_row<false, scalar_t>;
          gg[d] = static_cast<scalar_t>(row(w + at, means.of_group(group), size, positions,
                                            static_cast<double>(g[d]), solved, go + at,
                                            floor_scale, gw + at, sums, sums + size,
                                            sums + size + 1));
        }
      }
    });
    scalar_t* gm = grad_mean.data_ptr<scalar_t>();
    for (int64_t group = 0; group < groups; ++group) {
      for (int64_t c = 0; c < channels; ++c) {
        double total = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const double* sums = chunk_sums.data() + chunk * chunk_stride + group * (size + 2);
          for (int64_t j = 0; j < positions; ++j) total += sums[c * positions + j];
          total += sums[size] + sums[size + 1] * sign(static_cast<double>(mu[group * channels + c]));
        }
        gm[group * channels + c] = static_cast<scalar_t>(total);
      }
    }
  });
  return {grad_weight, grad_mean, grad_gain};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &forward);
  module.def("backward", &backward);
}
