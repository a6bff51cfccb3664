// One ENorm cycle on a chain of layers, in one call (Stock et al., "Equi-normalization
// of Neural Networks", arXiv:1902.10416).
//
// `ENorm._balance` in normlab/enorm.py is the eager path and the specification. It
// makes about 8 weight-sized accesses per weight (|w|^p into a buffer, its row and
// column sums, the outer product of the factors, the scaling) and ~20 small tensor
// operations per layer. Here each weight is accessed 3 times:
//   1. the column sums of |w|^p of every layer but the head, all at once: they are
//      read from the weights as they were before the cycle, which no pair changes
//      before reading them (W_{k+1} is scaled after pair k has read its columns);
//   2. per layer k in order, per unit i: its row sum of |w|^p (columns weighted by
//      the previous pair's scale s^p under the paper schedule), whose d_i needs
//      nothing but that sum and the next layer's column sum i, so the row is scaled
//      by d_i s_j (and its optimizer state by (d_i s_j)^power) while it is in cache.
// A weight is read as (units, in_units, positions), contiguous, like its state
// tensors. Sums of |w|^p run in the weight's dtype over blocks (as the eager path's torch
// sums do) and in double across blocks; d and the factors in the weight's dtype, as the
// eager path computes them.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

// |x|^p for an integer p, written out so that the loops vectorize (std::pow would not,
// and costs ~8x the eager path's vectorized pow at p = 3).
template <int P>
struct IntegerPower {
  static_assert(1 <= P && P <= 4, "p in 1 .. 4");
  template <typename T>
  T operator()(T x) const {
    const T a = std::abs(x);
    if constexpr (P == 1) return a;
    if constexpr (P == 2) return x * x;
    if constexpr (P == 3) return a * a * a;
    if constexpr (P == 4) return (x * x) * (x * x);
  }
};

// A tensor that is scaled with a weight or bias, as (tensor, power): momentum scales
// by the factor^-1, Adam's second moments by the factor^-2.
template <typename scalar_t>
struct Scaled {
  scalar_t* data;
  int64_t power;
};

template <typename scalar_t>
inline scalar_t raised(scalar_t factor, int64_t power) {
  // the special cases of torch.pow(tensor, scalar), which the eager path calls
  switch (power) {
    case 1: return factor;
    case -1: return scalar_t(1) / factor;
    case -2: return scalar_t(1) / (factor * factor);
    default: return std::pow(factor, scalar_t(power));
  }
}

template <typename scalar_t>
struct Layer {
  scalar_t* weight;
  int64_t units, in_units, positions;
  scalar_t* bias;  // nullptr: none
  std::vector<Scaled<scalar_t>> weight_states, bias_states;
  int64_t row_size() const { return in_units * positions; }
};

// Sums of |w|^p run in the weight's dtype over blocks (vectorized without converting each
// element), in double across blocks.
constexpr int64_t kRowBlock = 32, kSumBlock = 256;

// acc[j] += sum over rows i in [begin, end) and positions r of |w_ijr|^p.
template <typename scalar_t, typename Power>
void add_column_powers(const Layer<scalar_t>& layer, int64_t begin, int64_t end, double* acc,
                       Power power) {
  const int64_t in_units = layer.in_units, positions = layer.positions;
  if (positions == 1) {
    // blocks of kRowBlock rows summed in the dtype, then into acc in double
    std::vector<scalar_t> block(in_units);
    scalar_t* __restrict__ partial = block.data();
    for (int64_t first = begin; first < end; first += kRowBlock) {
      std::fill(block.begin(), block.end(), scalar_t(0));
      for (int64_t i = first; i < std::min(end, first + kRowBlock); ++i) {
        const scalar_t* __restrict__ row = layer.weight + i * in_units;
#pragma omp simd
        for (int64_t j = 0; j < in_units; ++j) partial[j] += power(row[j]);
      }
      for (int64_t j = 0; j < in_units; ++j) acc[j] += partial[j];
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* __restrict__ row = layer.weight + i * layer.row_size();
    for (int64_t j = 0; j < in_units; ++j) {
      double total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t r = 0; r < positions; ++r) total += power(double(row[j * positions + r]));
      acc[j] += total;
    }
  }
}

// sum over j and r of column_weight_j |w_ijr|^p for one row (column_weight empty: 1).
template <typename scalar_t, typename Power>
double row_powers(const scalar_t* __restrict__ row, int64_t in_units, int64_t positions,
                  const std::vector<scalar_t>& column_weight, Power power) {
  double total = 0;
  if (column_weight.empty()) {
    const int64_t size = in_units * positions;
    for (int64_t first = 0; first < size; first += kSumBlock) {  // blocks in the dtype
      scalar_t block = 0;
#pragma omp simd reduction(+ : block)
      for (int64_t e = first; e < std::min(size, first + kSumBlock); ++e) block += power(row[e]);
      total += block;
    }
    return total;
  }
  const scalar_t* __restrict__ weight = column_weight.data();
  if (positions == 1) {
    for (int64_t first = 0; first < in_units; first += kSumBlock) {
      scalar_t block = 0;
#pragma omp simd reduction(+ : block)
      for (int64_t j = first; j < std::min(in_units, first + kSumBlock); ++j) {
        block += weight[j] * power(row[j]);
      }
      total += block;
    }
    return total;
  }
  for (int64_t j = 0; j < in_units; ++j) {
    double block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t r = 0; r < positions; ++r) block += power(double(row[j * positions + r]));
    total += double(weight[j]) * block;
  }
  return total;
}

// row_jr *= (d s_j)^power (s empty: 1), the factor rounded to scalar_t as the eager
// path's outer product is.
template <typename scalar_t>
void scale_row(scalar_t* __restrict__ row, int64_t in_units, int64_t positions, scalar_t d,
               const std::vector<scalar_t>& s, int64_t power) {
  if (s.empty()) {
    const scalar_t factor = raised(d, power);
    const int64_t size = in_units * positions;
#pragma omp simd
    for (int64_t e = 0; e < size; ++e) row[e] *= factor;
    return;
  }
  for (int64_t j = 0; j < in_units; ++j) {
    const scalar_t factor = raised(scalar_t(d * s[j]), power);
#pragma omp simd
    for (int64_t r = 0; r < positions; ++r) row[j * positions + r] *= factor;
  }
}

// The positions == 1 case of scale_row for the weight itself (power 1), vectorized.
template <typename scalar_t>
void scale_linear_row(scalar_t* __restrict__ row, int64_t in_units, scalar_t d,
                      const scalar_t* __restrict__ s) {
#pragma omp simd
  for (int64_t j = 0; j < in_units; ++j) row[j] *= scalar_t(d * s[j]);
}

// Rows per task: enough work (~32k elements) to be worth a thread.
int64_t grain(int64_t row_size) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_size, 1)); }
              
              template <typename scalar_t, typename Power>
              void balance(std::vector<Layer<scalar_t>>& chain, int64_t last, double p, double c,
              bool balance_bias, bool weighted_rows, Power power) {
  // 1. column sums of layers 1 .. last, each thread over its share of their rows
  std::vector<int64_t> offset(last + 1, 0), first_row(last + 1, 0);
  int64_t columns = 0, rows = 0;
  for (int64_t k = 1; k <= last; ++k) {
    offset[k] = columns, first_row[k] = rows;
    columns += chain[k].in_units, rows += chain[k].units;
  }
  const int threads = at::get_num_threads();
  std::vector<double> partial(size_t(threads) * columns, 0.0);
  int64_t total_size = 0;
  for (int64_t k = 1; k <= last; ++k) total_size += chain[k].units * chain[k].row_size();
  at::parallel_for(0, rows, grain(rows > 0 ? total_size / rows : 1), [&](int64_t begin, int64_t end) {
    double* acc = partial.data() + at::get_thread_num() * columns;
    for (int64_t k = 1; k <= last; ++k) {
      const int64_t lo = std::max(begin, first_row[k]) - first_row[k];
      const int64_t hi = std::min(end, first_row[k] + chain[k].units) - first_row[k];
      if (lo < hi) add_column_powers(chain[k], lo, hi, acc + offset[k], power);
    }
  });
  std::vector<double> column_powers(partial.begin(), partial.begin() + columns);
  for (int t = 1; t < threads; ++t) {
    for (int64_t j = 0; j < columns; ++j) column_powers[j] += partial[t * columns + j];
  }

  // 2. layer by layer: row sums, d, the scaling
  const scalar_t inv_sqrt_c = scalar_t(1 / std::sqrt(c));
  const scalar_t exponent = scalar_t(0.5 / p);
  std::vector<scalar_t> s;  // the previous pair's column scale 1 / d (empty: 1)
  for (int64_t k = 0; k <= last; ++k) {
    Layer<scalar_t>& layer = chain[k];
    const double* next_columns = k < last ? column_powers.data() + offset[k + 1] : nullptr;
    std::vector<scalar_t> column_weight;  // s^p, for the paper schedule's row sums
    if (weighted_rows && !s.empty()) {
      column_weight.resize(s.size());
      for (size_t j = 0; j < s.size(); ++j) column_weight[j] = power(s[j]);
    }
    std::vector<scalar_t> d(layer.units, scalar_t(1));
    const int64_t size = layer.row_size();
    at::parallel_for(0, layer.units, grain(size), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = layer.weight + i * size;
        if (next_columns != nullptr) {
          double norm = row_powers(row, layer.in_units, layer.positions, column_weight, power);
          if (balance_bias && layer.bias != nullptr) norm += power(double(layer.bias[i]));
          // d = sqrt(||col||_p / (c ||row||_p)); dead units (0, Inf, NaN) stay unscaled
          const scalar_t unit = std::pow(scalar_t(next_columns[i]) / scalar_t(norm), exponent) *
                                inv_sqrt_c;
          d[i] = unit > 0 && unit < std::numeric_limits<scalar_t>::infinity() ? unit : 1;
        }
        if (layer.positions == 1 && !s.empty()) {
          scale_linear_row(row, layer.in_units, d[i], s.data());
        } else {
          scale_row(row, layer.in_units, layer.positions, d[i], s, 1);
        }
        for (const auto& state : layer.weight_states) {
          scale_row(state.data + i * size, layer.in_units, layer.positions, d[i], s, state.power);
        }
        if (next_columns != nullptr && layer.bias != nullptr) {
          layer.bias[i] *= d[i];
          for (const auto& state : layer.bias_states) state.data[i] *= raised(d[i], state.power);
        }
      }
    });
    s.resize(layer.units);
    for (int64_t i = 0; i < layer.units; ++i) s[i] = scalar_t(1) / d[i];
  }
}

template <typename scalar_t>
std::vector<Scaled<scalar_t>> scaled(const std::vector<at::Tensor>& tensors,
                                     const std::vector<int64_t>& powers,
                                     const at::Tensor& like, const char* what) {
  TORCH_CHECK(tensors.size() == powers.size(), "enorm: one power per ", what, " state tensor");
  std::vector<Scaled<scalar_t>> out;
  for (size_t n = 0; n < tensors.size(); ++n) {
    const auto& tensor = tensors[n];
    TORCH_CHECK(tensor.sizes() == like.sizes() && tensor.scalar_type() == like.scalar_type() &&
                    tensor.is_contiguous() && tensor.device().is_cpu(),
                "enorm: the optimizer state of a ", what, " must be a contiguous CPU tensor of "
                "its shape ", like.sizes(), " and dtype ", like.scalar_type(), ", got ",
                tensor.sizes(), " ", tensor.scalar_type());
    out.push_back({tensor.data_ptr<scalar_t>(), powers[n]});
  }
  return out;
}

}  // namespace

// One cycle over the chain `weights` (with `biases`, None for none): the pairs
// (k, k+1) for k < `last`; layer `last` only has its columns scaled, the layers after
// it are left alone. `in_units[k]`: the units of layer k - 1 that layer k reads (1 for
// the head). `weighted_rows`: the paper schedule (row sums after the previous pair's
// column scaling); false: the official one (before it). The state tensors are scaled
// with their parameter, each by the factor to its power.
void balance_chain(const std::vector<at::Tensor>& weights,
                   const std::vector<std::optional<at::Tensor>>& biases,
                   const std::vector<int64_t>& in_units,
                   const std::vector<std::vector<at::Tensor>>& weight_states,
                   const std::vector<std::vector<int64_t>>& weight_powers,
                   const std::vector<std::vector<at::Tensor>>& bias_states,
                   const std::vector<std::vector<int64_t>>& bias_powers, int64_t last, double p,
                   double c, bool balance_bias, bool weighted_rows) {
  const size_t count = weights.size();
  TORCH_CHECK(count >= 2 && biases.size() == count && in_units.size() == count &&
                  weight_states.size() == count && weight_powers.size() == count &&
                  bias_states.size() == count && bias_powers.size() == count &&
                  last >= 1 && size_t(last) < count,
              "enorm: expected per-layer lists of one length (>= 2) and 1 <= last < ", count);
  const auto dtype = weights[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "enorm: expected float32 or float64 weights, got ", dtype);
  TORCH_CHECK(p == 1 || p == 2 || p == 3 || p == 4,
              "enorm: the compiled cycle takes p = 1, 2, 3 or 4 (the eager path any p), got ", p);
  AT_DISPATCH_FLOATING_TYPES(dtype, "enorm_balance_chain", [&] {
    std::vector<Layer<scalar_t>> chain;
    for (size_t k = 0; k < count; ++k) {
      const auto& weight = weights[k];
      TORCH_CHECK(weight.scalar_type() == dtype && weight.is_contiguous() &&
                      weight.device().is_cpu() && weight.dim() >= 1 && in_units[k] >= 1 &&
                      weight.numel() % (weight.size(0) * in_units[k]) == 0,
                  "enorm: layer ", k, "'s weight must be a contiguous CPU ", dtype,
                  " tensor whose units (dim 0) read ", in_units[k], " units each, got ",
                  weight.sizes(), " ", weight.scalar_type());
      Layer<scalar_t> layer{weight.data_ptr<scalar_t>(), weight.size(0), in_units[k],
                            weight.numel() / (weight.size(0) * in_units[k]), nullptr, {}, {}};
      layer.weight_states = scaled<scalar_t>(weight_states[k], weight_powers[k], weight, "weight");
      if (biases[k].has_value()) {
        const auto& bias = *biases[k];
        TORCH_CHECK(bias.scalar_type() == dtype && bias.is_contiguous() && bias.device().is_cpu() &&
                        bias.numel() == weight.size(0),
                    "enorm: layer ", k, "'s bias must be a contiguous CPU ", dtype, " tensor of ",
                    weight.size(0), " elements, got ", bias.sizes(), " ", bias.scalar_type());
        layer.bias = bias.data_ptr<scalar_t>();
        layer.bias_states = scaled<scalar_t>(bias_states[k], bias_powers[k], bias, "bias");
      }
      chain.push_back(std::move(layer));
    }
    for (size_t k = 1; k < count; ++k) {
      TORCH_CHECK(chain[k].in_units == chain[k - 1].units,
                  "enorm: layer ", k, " reads ", chain[k].in_units, " units, layer ", k - 1,
                  " has ", chain[k - 1].units);
    }
    const auto run = [&](auto power) {
      balance(chain, last, p, c, balance_bias, weighted_rows, power);
    };
    switch (int(p)) {
      case 1: run(IntegerPower<1>{}); break;
      case 2: run(IntegerPower<2>{}); break;
      case 3: run(IntegerPower<3>{}); break;
      default: run(IntegerPower<4>{}); break;
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("balance_chain", &balance_chain);
}
