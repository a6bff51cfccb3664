// Equilibrium Normalization's kernel transform and its gradient, one call each
// (Defazio and Bottou, arXiv:1812.04549, section 4).
//
// `functional.equi_norm` in normlab/functional.py is the eager path and the
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
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

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

double sign(double v) { return static_cast<double>((v > 0) - (v < 0)); }

// Per row: the (C, J) kernel as doubles K = W / m, and per channel the sums that the
// forward and the backward both need.
struct Row {
  int64_t channels, positions;
  std::vector<double> kernel, total, absolute, positive;  // K; sum K, sum |K|, sum K[K>0]
  std::vector<int64_t> positive_count;

  Row(int64_t channels, int64_t positions)
      : channels(channels),
        positions(positions),
        kernel(channels * positions),
        total(channels),
        absolute(channels),
        positive(channels),
        positive_count(channels) {}

  template <typename scalar_t>
  void load(const scalar_t* w, scalar_t row_max) {
    for (int64_t c = 0; c < channels; ++c) {
      double sum = 0, abs_sum = 0, positive_sum = 0;
      int64_t count = 0;
      for (int64_t j = 0; j < positions; ++j) {
        // divided in the weight's dtype, as the eager path divides
        const double k = static_cast<double>(w[c * positions + j] / row_max);
        kernel[c * positions + j] = k;
        sum += k;
        abs_sum += std::abs(k);
        positive_sum += k > 0 ? k : 0;
        count += k > 0;
      }
      total[c] = sum;
      absolute[c] = abs_sum;
      positive[c] = positive_sum;
      positive_count[c] = count;
    }
  }

  // P_c, the positive part's sum after the shift b.
  double positive_part(int64_t c, double shift, bool single_pass) const {
    if (single_pass) return positive[c] + shift * static_cast<double>(positive_count[c]);
    double sum = 0;
    for (int64_t j = 0; j < positions; ++j) sum += std::max(kernel[c * positions + j] + shift, 0.0);
    return sum;
  }

  // dP_c / dK_cj: [K > 0] single pass; two pass, torch's clamp(min=0) gradient, [K + b >= 0].
  double positive_slope(int64_t c, int64_t j, double shift, bool single_pass) const {
    const double k = kernel[c * positions + j];
    return single_pass ? (k > 0) : (k + shift >= 0);
  }
};

template <typename scalar_t>
scalar_t row_max_of(const scalar_t* w, int64_t size) {
  scalar_t largest = 0;
  for (int64_t i = 0; i < size; ++i) largest = std::max<scalar_t>(largest, std::abs(w[i]));
  return largest > 0 ? largest : scalar_t(1);
}

void check(const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& gain) {
  TORCH_CHECK(weight.dim() == 3 && weight.is_floating_point() && weight.size(2) > 0,
              "equinorm: expected a (D, C, J) float32 or float64 weight, got ", weight.sizes());
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == weight.size(0) &&
                  mean.size(1) == weight.size(1) && mean.scalar_type() == weight.scalar_type(),
              "equinorm: expected input means of shape (D, C) and the weight's dtype");
  TORCH_CHECK(gain.dim() == 1 && gain.size(0) == weight.size(0) &&
                  gain.scalar_type() == weight.scalar_type(),
              "equinorm: expected a gain of shape (D,) and the weight's dtype");
}

}  // namespace

// (out, shift, scale, input_sum, contribution, guards): out = gain s (W / m + b) of shape
// (D, C, J); b, s and the two guarded denominators S, C per row, float64; guards (2, D)
// int8, the `Guard` S and C took. `mean` is (D, C): each row's input channel means.
std::vector<at::Tensor> forward(const at::Tensor& weight_in, const at::Tensor& mean_in,
                                const at::Tensor& gain_in, double ratio, bool single_pass,
                                double floor_scale) {
  const auto weight = weight_in.contiguous(), mean = mean_in.contiguous(),
             gain = gain_in.contiguous();
  check(weight, mean, gain);
  const int64_t rows = weight.size(0), channels = weight.size(1), positions = weight.size(2);
  auto out = at::empty_like(weight);
  auto per_row = weight.options().dtype(at::kDouble);
  auto shift = at::empty({rows}, per_row), scale = at::empty({rows}, per_row),
       input_sum = at::empty({rows}, per_row), contribution = at::empty({rows}, per_row);
  auto guards = at::empty({2, rows}, weight.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "equinorm_forward", [&] {
    const scalar_t *w = weight.data_ptr<scalar_t>(), *mu = mean.data_ptr<scalar_t>(),
                   *g = gain.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    int8_t* guard = guards.data_ptr<int8_t>();
    Row row(channels, positions);
    for (int64_t d = 0; d < rows; ++d) {
      const int64_t at = d * channels * positions;
      row.load(w + at, row_max_of(w + at, channels * positions));
      const scalar_t* m = mu + d * channels;
      double sum = 0, abs_sum = 0, weighted = 0, weighted_abs = 0;
      for (int64_t c = 0; c < channels; ++c) {
        sum += m[c];
        abs_sum += std::abs(static_cast<double>(m[c]));
        weighted += m[c] * row.total[c];
        weighted_abs += std::abs(static_cast<double>(m[c])) * row.absolute[c];
      }
      double s_guarded, c_guarded;
      guard[d] = guarded(sum, floor_scale * abs_sum, &s_guarded);
      const double b = -weighted / (static_cast<double>(positions) * s_guarded);
      double contribution_sum = 0;
      for (int64_t c = 0; c < channels; ++c) {
        contribution_sum += m[c] * row.positive_part(c, b, single_pass);
      }
      guard[rows + d] = guarded(contribution_sum, floor_scale * weighted_abs, &c_guarded);
      const double s = ratio / c_guarded, factor = static_cast<double>(g[d]) * s;
      for (int64_t i = 0; i < channels * positions; ++i) {
        o[at + i] = static_cast<scalar_t>(factor * (row.kernel[i] + b));
      }
      shift.data_ptr<double>()[d] = b;
      scale.data_ptr<double>()[d] = s;
      input_sum.data_ptr<double>()[d] = s_guarded;
      contribution.data_ptr<double>()[d] = c_guarded;
    }
  });
  return {out, shift, scale, input_sum, contribution, guards};
}

// (grad_weight (D, C, J), grad_mean (D, C), grad_gain (D,)) from the gradient of out and
// what `forward` returned.
std::vector<at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& weight_in,
                                 const at::Tensor& mean_in, const at::Tensor& gain_in,
                                 const at::Tensor& shift, const at::Tensor& scale,
                                 const at::Tensor& input_sum, const at::Tensor& contribution,
                                 const at::Tensor& guards, bool single_pass,
                                 double floor_scale) {
  const auto grad = grad_in.contiguous(), weight = weight_in.contiguous(),
             mean = mean_in.contiguous(), gain = gain_in.contiguous();
  check(weight, mean, gain);
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.scalar_type() == weight.scalar_type(),
              "equinorm backward: expected a gradient of the weight's shape and dtype");
  const int64_t rows = weight.size(0), channels = weight.size(1), positions = weight.size(2);
  auto grad_weight = at::empty_like(weight), grad_mean = at::empty_like(mean),
       grad_gain = at::empty_like(gain);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "equinorm_backward", [&] {
    const scalar_t *w = weight.data_ptr<scalar_t>(), *mu = mean.data_ptr<scalar_t>(),
                   *g = gain.data_ptr<scalar_t>(), *go = grad.data_ptr<scalar_t>();
    const double *shifts = shift.data_ptr<double>(), *scales = scale.data_ptr<double>(),
                 *input_sums = input_sum.data_ptr<double>(),
                 *contributions = contribution.data_ptr<double>();
    const int8_t* guard = guards.data_ptr<int8_t>();
    scalar_t *gw = grad_weight.data_ptr<scalar_t>(), *gm = grad_mean.data_ptr<scalar_t>(),
             *gg = grad_gain.data_ptr<scalar_t>();
    Row row(channels, positions);
    std::vector<double> grad_positive(channels);
    for (int64_t d = 0; d < rows; ++d) {
      const int64_t at = d * channels * positions;
      const scalar_t row_max = row_max_of(w + at, channels * positions);
      row.load(w + at, row_max);
      const scalar_t* m = mu + d * channels;
      const scalar_t* grad_out = go + at;
      const double b = shifts[d], s = scales[d], gain_d = g[d];
      double projection = 0, grad_sum = 0;  // sum G (K + b), sum G
      for (int64_t i = 0; i < channels * positions; ++i) {
        projection += grad_out[i] * (row.kernel[i] + b);
        grad_sum += grad_out[i];
      }
      gg[d] = static_cast<scalar_t>(s * projection);
      const double grad_c = -gain_d * projection * s / contributions[d];  // dL/dC
      const Guard c_guard = static_cast<Guard>(guard[rows + d]);
      double grad_shift = gain_d * s * grad_sum;  // dL/db: through out, then through P
      for (int64_t c = 0; c < channels; ++c) {
        grad_positive[c] = c_guard == kValue ? grad_c * m[c] : 0.0;  // dL/dP_c
        if (single_pass) {
          grad_shift += grad_positive[c] * static_cast<double>(row.positive_count[c]);
        } else {
          for (int64_t j = 0; j < positions; ++j) {
            grad_shift += grad_positive[c] * row.positive_slope(c, j, b, false);
          }
        }
      }
      const double grad_weighted = -grad_shift / (static_cast<double>(positions) * input_sums[d]);
      const double grad_input_sum = -grad_shift * b / input_sums[d];
      const Guard s_guard = static_cast<Guard>(guard[d]);
      for (int64_t c = 0; c < channels; ++c) {
        const double mc = m[c], abs_m = std::abs(mc);
        for (int64_t j = 0; j < positions; ++j) {
          const int64_t i = c * positions + j;
          double grad_k = gain_d * s * grad_out[i] +
                          grad_positive[c] * row.positive_slope(c, j, b, single_pass) +
                          grad_weighted * mc;
          if (c_guard == kFloor) grad_k += grad_c * floor_scale * abs_m * sign(row.kernel[i]);
          gw[at + i] = static_cast<scalar_t>(grad_k / static_cast<double>(row_max));
        }
        double grad_m = grad_weighted * row.total[c];
        if (s_guard == kValue) grad_m += grad_input_sum;
        if (s_guard == kFloor) grad_m += grad_input_sum * floor_scale * sign(mc);
        if (c_guard == kValue) grad_m += grad_c * row.positive_part(c, b, single_pass);
        if (c_guard == kFloor) grad_m += grad_c * floor_scale * sign(mc) * row.absolute[c];
        gm[d * channels + c] = static_cast<scalar_t>(grad_m);
      }
    }
  });
  return {grad_weight, grad_mean, grad_gain};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &forward);
  module.def("backward", &backward);
}
