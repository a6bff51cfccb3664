// FastNorm's fused mode on CPU: the training forward, its backward and the SGD
// step of one layer, each one call with its per-row arithmetic in one pass.
//
// The eager paths in normlab/functional/fastnorm.py (`_RecordedLinear`,
// `fused_sgd_step`) are the specification; these compute the same
// quantities without the dozens of tensor operations (each a dispatch, at
// batch 1 costing more than its arithmetic) that dominate a small-batch step.
// The matrix products stay BLAS calls.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

// Per row i (m rows) over B samples, in acc_t (the dtype of t and s):
//   a_bi = gain_i t_i delta_bi,   a.p_i = s_i sum_b a_bi q_bi,   kappa_i = t_i^2 a.p_i
//   c_i = 1 - lr wd + lr kappa_i,   s_i' = c_i s_i,   coef_bi = a_bi / s_i'
//   tracked: ||W_i'||^2 = (1 - lr wd)^2 / t_i^2 + lr^2 max(a_i^T K a_i - kappa_i a.p_i, 0)
// First the check that the samples explain the gain's gradient (nothing is
// written if they do not), then the update of s and t in place.
// The (B, m) arrays are walked sample by sample along i, with per-row sums:
// walking a row's B samples instead strides by m elements, and at m = 1024
// float32 that 4 KiB stride maps every sample to one cache set.
template <typename weight_t, typename acc_t>
bool step_rows(const weight_t* q, const weight_t* delta, const weight_t* gain,
               const weight_t* gain_grad, double grad_eps, acc_t* t, acc_t* s,
               const acc_t* gram, int64_t B, int64_t m, double lr, double wd, weight_t* coef) {
  std::vector<acc_t> u(m), a(B * m), a_dot_p(m, acc_t(0)), a_gram_a(m, acc_t(0));
  for (int64_t i = 0; i < m; ++i) u[i] = acc_t(gain[i]) * t[i];
  acc_t magnitude = 0;  // sum |a_bi p_bi|: the rounding scale of the check
  for (int64_t b = 0; b < B; ++b) {
    const weight_t *q_b = q + b * m, *delta_b = delta + b * m;
    acc_t* a_b = a.data() + b * m;
    for (int64_t i = 0; i < m; ++i) {
      a_b[i] = acc_t(delta_b[i]) * u[i];
      const acc_t a_q = a_b[i] * acc_t(q_b[i]);
      a_dot_p[i] += a_q;
      magnitude += std::abs(a_q * s[i]);
    }
  }
  acc_t explained = 0;
  for (int64_t i = 0; i < m; ++i) {
    a_dot_p[i] *= s[i];
    explained += a_dot_p[i];
  }
  if (gain_grad != nullptr) {
    // sum_i gain_i dL/dgain_i = sum_i a_i . p_i, up to rounding ~ sum |a_bi p_bi|
    acc_t gain_dot_grad = 0;
    for (int64_t i = 0; i < m; ++i) gain_dot_grad += acc_t(gain[i]) * acc_t(gain_grad[i]);
    if (std::abs(double(gain_dot_grad - explained)) >
        double(magnitude) * std::sqrt(grad_eps) + 1e-30) {
      return false;
    }
  }
  const acc_t decay = acc_t(1) - acc_t(lr * wd);
  std::vector<acc_t> new_scale(m);
  for (int64_t i = 0; i < m; ++i) {
    new_scale[i] = (decay + acc_t(lr) * t[i] * t[i] * a_dot_p[i]) * s[i];  // c_i s_i
  }
  for (int64_t b = 0; b < B; ++b) {
    const acc_t* a_b = a.data() + b * m;
    weight_t* coef_b = coef + b * m;
    for (int64_t i = 0; i < m; ++i) coef_b[i] = weight_t(a_b[i] / new_scale[i]);
    if (gram != nullptr) {
      // a_i^T K a_i over the pairs c <= b of the symmetric K (B x B)
      for (int64_t c = 0; c <= b; ++c) {
        const acc_t k = gram[b * B + c] * (c == b ? acc_t(1) : acc_t(2));
        const acc_t* a_c = a.data() + c * m;
        for (int64_t i = 0; i < m; ++i) a_gram_a[i] += k * a_b[i] * a_c[i];
      }
    }
  }
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  for (int64_t i = 0; i < m; ++i) {
    if (gram != nullptr) {
      const acc_t kappa = t[i] * t[i] * a_dot_p[i];
      const acc_t grad_sq = std::max(a_gram_a[i] - kappa * a_dot_p[i], acc_t(0));
      const acc_t sq = decay * decay / (t[i] * t[i]) + acc_t(lr * lr) * grad_sq;
      t[i] = acc_t(1) / std::sqrt(std::max(sq, tiny));
    }
    s[i] = new_scale[i];
  }
  return true;
}

}  // namespace

// torch.optim.SGD's update without momentum, p <- p - lr (g + wd p), of a (m,) parameter,
// rounded as torch's single-tensor path rounds it (the direction first, in p's dtype).
void sgd_update(at::Tensor param, const std::optional<at::Tensor>& grad, double lr,
                double weight_decay) {
  if (!grad.has_value() || !grad->defined()) return;
  TORCH_CHECK(param.is_contiguous() && param.dim() == 1 &&
                  grad->scalar_type() == param.scalar_type(),
              "fused_step: expected a contiguous (m,) gain or bias, and its gradient");
  const auto grad_values = grad->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "sgd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad_values.data_ptr<scalar_t>();
    const opmath_t step = opmath_t(-lr), decay = opmath_t(weight_decay);
    for (int64_t i = 0; i < param.numel(); ++i) {
      const scalar_t direction =
          weight_decay != 0 ? scalar_t(opmath_t(g[i]) + decay * opmath_t(p[i])) : g[i];
      p[i] = scalar_t(opmath_t(p[i]) + step * opmath_t(direction));
    }
  });
}

// The whole fused update: s (and, if `track`, t) in place, then
// V <- V - lr (A / s')^T H, then SGD on the gain and the bias (given).
// Returns false, with nothing written, when the samples do not explain `gain_grad`.
bool fused_step(const at::Tensor& inputs, const at::Tensor& outputs,
                const at::Tensor& output_grads, at::Tensor gain, at::Tensor inv_norm,
                at::Tensor row_scale, at::Tensor weight,
                const std::optional<at::Tensor>& gain_grad, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& bias_grad, double lr, double weight_decay,
                bool track) {
  TORCH_CHECK(inv_norm.is_contiguous() && row_scale.is_contiguous(),
              "fused_step: t and s must be contiguous");
  const auto q = outputs.contiguous(), delta = output_grads.contiguous();
  const auto g = gain.contiguous();
  const int64_t B = q.size(0), m = q.size(1);
  const auto h = inputs.contiguous();
  TORCH_CHECK(h.scalar_type() == q.scalar_type(), "fused_step: inputs and outputs of one dtype");
  auto coef = at::empty_like(q);
  at::Tensor gram, grad;
  double grad_eps = 0;
  if (track) {
    const auto h_acc = h.to(inv_norm.scalar_type());
    gram = at::mm(h_acc, h_acc.t());  // K = H H^T
  }
  if (gain_grad.has_value() && gain_grad->defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gain_grad->scalar_type(), "eps", [&] {
      grad_eps = double(std::numeric_limits<scalar_t>::epsilon());
    });
    grad = gain_grad->to(gain.scalar_type()).contiguous();
  }
  bool explained = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastnorm_rows", [&] {
    using weight_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(inv_norm.scalar_type(), "fastnorm_rows_acc", [&] {
      using acc_t = scalar_t;
      explained = step_rows<weight_t, acc_t>(
          q.data_ptr<weight_t>(), delta.data_ptr<weight_t>(), g.data_ptr<weight_t>(),
          grad.defined() ? grad.data_ptr<weight_t>() : nullptr, grad_eps,
          inv_norm.data_ptr<acc_t>(), row_scale.data_ptr<acc_t>(),
          track ? gram.data_ptr<acc_t>() : nullptr, B, m, lr, weight_decay,
          coef.data_ptr<weight_t>());
    });
  });
  if (!explained) return false;
  weight.addmm_(coef.t(), h, 1, -lr);
  sgd_update(gain, gain_grad, lr, weight_decay);
  if (bias.has_value() && bias->defined()) sgd_update(*bias, bias_grad, lr, weight_decay);
  return true;
}

// The fused mode's training forward on (B, n) rows x, an autograd function:
// q = x V^T and z = q * gain t s + bias (per output i), in one pass over q.
// `probe` (B, m) is a leaf that receives dL/dz as its gradient: autograd
// accumulates the step's samples without a Python hook. V gets no gradient.
// Returns (z, q), q not differentiable.
struct RecordedLinear : public torch::autograd::Function<RecordedLinear> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gain,
      const at::Tensor& bias, const at::Tensor& probe, const at::Tensor& weight,
      const at::Tensor& inv_norm, const at::Tensor& row_scale) {
    const auto q = at::mm(x, weight.t());
    auto z = at::empty_like(q);
    const int64_t B = q.size(0), m = q.size(1);
    const bool has_bias = bias.numel() > 0;  // empty: no bias (an autograd input must exist)
    const auto g = gain.contiguous(), t = inv_norm.contiguous(), s = row_scale.contiguous();
    const auto b = has_bias ? bias.contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastnorm_forward", [&] {
      using weight_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fastnorm_forward_acc", [&] {
        using acc_t = scalar_t;
        const weight_t *q_ = q.data_ptr<weight_t>(), *g_ = g.data_ptr<weight_t>();
        const weight_t* b_ = has_bias ? b.data_ptr<weight_t>() : nullptr;
        const acc_t *t_ = t.data_ptr<acc_t>(), *s_ = s.data_ptr<acc_t>();
        weight_t* z_ = z.data_ptr<weight_t>();
        for (int64_t r = 0; r < B; ++r) {
          for (int64_t i = 0; i < m; ++i) {
            const acc_t scaled = acc_t(q_[r * m + i]) * (acc_t(g_[i]) * t_[i] * s_[i]);
            z_[r * m + i] = weight_t(has_bias ? scaled + acc_t(b_[i]) : scaled);
          }
        }
      });
    });
    ctx->save_for_backward({weight, gain, inv_norm, row_scale});
    ctx->set_materialize_grads(false);  // q's gradient stays undefined: no zeros made
    ctx->saved_data["q"] = q;
    ctx->mark_non_differentiable({q});
    return {z, q};
  }

  // dL/dgain_i = t_i s_i sum_b delta_bi q_bi, dL/dbias_i = sum_b delta_bi,
  // dL/dx = (delta * gain t s) V, and delta itself for the probe.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "FastNormLinear(mode='fused') has no double backward (create_graph=True); "
                "use mode='dense'");
    const auto saved = ctx->get_saved_variables();
    const auto &weight = saved[0], &gain = saved[1], &inv_norm = saved[2], &row_scale = saved[3];
    const auto q = ctx->saved_data["q"].toTensor();
    const auto delta = grads[0].contiguous();
    const auto g = gain.contiguous(), t = inv_norm.contiguous(), s = row_scale.contiguous();
    const int64_t B = q.size(0), m = q.size(1);
    const bool needs_x = ctx->needs_input_grad(0);
    auto grad_gain = at::empty_like(g), grad_bias = at::empty_like(g);
    at::Tensor scaled_delta = needs_x ? at::empty_like(delta) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastnorm_backward", [&] {
      using weight_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fastnorm_backward_acc", [&] {
        using acc_t = scalar_t;
        const weight_t *d_ = delta.data_ptr<weight_t>(), *q_ = q.data_ptr<weight_t>();
        const weight_t* g_ = g.data_ptr<weight_t>();
        const acc_t *t_ = t.data_ptr<acc_t>(), *s_ = s.data_ptr<acc_t>();
        weight_t *gg_ = grad_gain.data_ptr<weight_t>(), *gb_ = grad_bias.data_ptr<weight_t>();
        weight_t* sd_ = needs_x ? scaled_delta.data_ptr<weight_t>() : nullptr;
        // sample by sample along i (see step_rows), with per-row sums
        std::vector<acc_t> u(m), scale(m), delta_dot_q(m, acc_t(0)), delta_sum(m, acc_t(0));
        for (int64_t i = 0; i < m; ++i) {
          u[i] = t_[i] * s_[i];
          scale[i] = acc_t(g_[i]) * u[i];
        }
        for (int64_t r = 0; r < B; ++r) {
          const weight_t *d_r = d_ + r * m, *q_r = q_ + r * m;
          for (int64_t i = 0; i < m; ++i) {
            const acc_t d = acc_t(d_r[i]);
            delta_dot_q[i] += d * acc_t(q_r[i]);
            delta_sum[i] += d;
          }
          if (sd_ != nullptr) {
            for (int64_t i = 0; i < m; ++i) sd_[r * m + i] = weight_t(acc_t(d_r[i]) * scale[i]);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          gg_[i] = weight_t(delta_dot_q[i] * u[i]);
          gb_[i] = weight_t(delta_sum[i]);
        }
      });
    });
    const bool has_bias = ctx->needs_input_grad(2);
    return {needs_x ? at::mm(scaled_delta, weight) : at::Tensor(), grad_gain,
            has_bias ? grad_bias : at::Tensor(), delta, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::vector<at::Tensor> recorded_linear(const at::Tensor& x, const at::Tensor& gain,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& probe, const at::Tensor& weight,
                                        const at::Tensor& inv_norm, const at::Tensor& row_scale) {
  return RecordedLinear::apply(x, gain, bias.has_value() ? *bias : at::empty({0}, gain.options()),
                               probe, weight, inv_norm, row_scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fused_step", &fused_step);
  module.def("recorded_linear", &recorded_linear);
}
