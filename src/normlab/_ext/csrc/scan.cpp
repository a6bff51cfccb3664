// The linear recurrence h_t = coef_t h_{t-1} + drive_t along dim 0, as a loop.
//
// `_linear_scan_eager` in normlab/functional/online_norm.py is the eager path
// and the specification: a Hillis-Steele scan, log2(N) rounds of three tensor
// operations over the whole (N, C) state, which at Online Normalization's
// (128, 256) shapes costs more than the layer's passes over the activations.
// This is the sequential loop that scan stands in for: one pass.
#include <torch/extension.h>

// All h_t, (N, C) float64, for float64 coef (N, C) (any strides: an expanded
// scalar or (N, 1) column is read in place), drive (N, C) and init (C,).
at::Tensor linear_scan(const at::Tensor& coef, const at::Tensor& drive, const at::Tensor& init) {
  TORCH_CHECK(drive.dim() == 2 && coef.sizes() == drive.sizes() && init.dim() == 1 &&
                  init.size(0) == drive.size(1) && drive.scalar_type() == at::kDouble &&
                  coef.scalar_type() == at::kDouble && init.scalar_type() == at::kDouble,
              "linear_scan: expected float64 coef and drive of one (N, C) shape and init (C,)");
  const int64_t steps = drive.size(0), width = drive.size(1);
  auto out = at::empty({steps, width}, drive.options());
  const auto c = coef.accessor<double, 2>();
  const auto d = drive.accessor<double, 2>();
  const auto h0 = init.accessor<double, 1>();
  double* h = out.data_ptr<double>();
  for (int64_t t = 0; t < steps; ++t) {
    double* row = h + t * width;
    const double* previous = t == 0 ? nullptr : row - width;
    for (int64_t j = 0; j < width; ++j) {
      row[j] = c[t][j] * (previous == nullptr ? h0[j] : previous[j]) + d[t][j];
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("linear_scan", &linear_scan);
}
