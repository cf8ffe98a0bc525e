// The fedlora op library (schemas), its CPU kernels and the Python module fedlora_kernels._C that loads it.
// The math is stated in fedlora_kernels/reference.py's docstring; precision in feddora_ops.h.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "feddora_ops.h"

#ifndef FEDLORA_WITH_CUDA
#define FEDLORA_WITH_CUDA 0
#endif

namespace fedlora {
namespace {

// Columns one task owns: their accumulators stay in L1 while the rows stream by, and the inner loops run over
// contiguous memory (the matrices are row-major).
constexpr int64_t kColumnBlock = 256;
// Elements a task should touch before at::parallel_for splits the work further.
constexpr int64_t kGrainElements = int64_t{1} << 15;

// Calls body(col_begin, col_end) for every block of at most kColumnBlock columns, blocks in parallel.
template <typename Body>
void for_each_column_block(int64_t rows, int64_t cols, const Body& body) {
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, rows * kColumnBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      body(block * kColumnBlock, std::min(cols, (block + 1) * kColumnBlock));
    }
  });
}

// (F, inv_norm) of scaled_factor (feddora_ops.h): F = V · diag(s m / n), inv_norm = 1/n.
template <typename scalar_t>
void scaled_factor_kernel(const scalar_t* direction, const scalar_t* magnitude, double scale, int64_t rows,
                          int64_t cols, scalar_t* factor, double* inv_norm) {
  using opmath_t = at::opmath_type<scalar_t>;
  for_each_column_block(rows, cols, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::array<double, kColumnBlock> sum_sq{};
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* v = direction + i * cols + begin;
      for (int64_t j = 0; j < width; ++j) {
        const double value = static_cast<double>(v[j]);
        sum_sq[j] += value * value;
      }
    }
    std::array<opmath_t, kColumnBlock> gain;  // s m_j / n_j
    for (int64_t j = 0; j < width; ++j) {
      const double inv = 1.0 / std::sqrt(sum_sq[j] + kNormEps);
      inv_norm[begin + j] = inv;
      gain[j] = static_cast<opmath_t>(scale * static_cast<double>(magnitude[begin + j]) * inv);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* v = direction + i * cols + begin;
      scalar_t* f = factor + i * cols + begin;
      for (int64_t j = 0; j < width; ++j) {
        f[j] = static_cast<scalar_t>(static_cast<opmath_t>(v[j]) * gain[j]);
      }
    }
  });
}

// (dV, dm): the column-norm backward of reference.py's docstring with m → s m; t_j = <dF_j, V_j> / n_j².
template <typename scalar_t>
void scaled_factor_backward_kernel(const scalar_t* grad_factor, const scalar_t* direction, const scalar_t* magnitude,
                                   const double* inv_norm, double scale, int64_t rows, int64_t cols,
                                   scalar_t* grad_direction, scalar_t* grad_magnitude) {
  using opmath_t = at::opmath_type<scalar_t>;
  for_each_column_block(rows, cols, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::array<double, kColumnBlock> dot{};
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* g = grad_factor + i * cols + begin;
      const scalar_t* v = direction + i * cols + begin;
      for (int64_t j = 0; j < width; ++j) {
        dot[j] += static_cast<double>(g[j]) * static_cast<double>(v[j]);
      }
    }
    std::array<opmath_t, kColumnBlock> gain;     // s m_j / n_j
    std::array<opmath_t, kColumnBlock> tangent;  // t_j
    for (int64_t j = 0; j < width; ++j) {
      const double inv = inv_norm[begin + j];
      grad_magnitude[begin + j] = static_cast<scalar_t>(scale * dot[j] * inv);
      gain[j] = static_cast<opmath_t>(scale * static_cast<double>(magnitude[begin + j]) * inv);
      tangent[j] = static_cast<opmath_t>(dot[j] * inv * inv);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* g = grad_factor + i * cols + begin;
      const scalar_t* v = direction + i * cols + begin;
      scalar_t* dv = grad_direction + i * cols + begin;
      for (int64_t j = 0; j < width; ++j) {
        dv[j] = static_cast<scalar_t>(gain[j] * (static_cast<opmath_t>(g[j]) - static_cast<opmath_t>(v[j]) * tangent[j]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> scaled_factor_cpu(const at::Tensor& direction, const at::Tensor& magnitude,
                                                     double scale) {
  check_factor_args("fedlora::scaled_factor", direction, magnitude);
  const auto v = direction.contiguous();
  const auto m = magnitude.contiguous();
  at::Tensor factor, inv_norm;
  std::tie(factor, inv_norm) = empty_factor_outputs(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fedlora::scaled_factor", [&] {
    scaled_factor_kernel<scalar_t>(v.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), scale, v.size(0),
                                   v.size(1), factor.mutable_data_ptr<scalar_t>(),
                                   inv_norm.mutable_data_ptr<double>());
  });
  return {factor, inv_norm};
}

std::tuple<at::Tensor, at::Tensor> scaled_factor_backward_cpu(const at::Tensor& grad_factor,
                                                              const at::Tensor& direction,
                                                              const at::Tensor& magnitude, const at::Tensor& inv_norm,
                                                              double scale) {
  check_factor_backward_args("fedlora::scaled_factor_backward", grad_factor, direction, magnitude, inv_norm);
  const auto g = grad_factor.contiguous();
  const auto v = direction.contiguous();
  const auto m = magnitude.contiguous();
  const auto inv = inv_norm.contiguous();
  auto grad_direction = at::empty(v.sizes(), v.options());
  auto grad_magnitude = at::empty(m.sizes(), m.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fedlora::scaled_factor_backward", [&] {
    scaled_factor_backward_kernel<scalar_t>(
        g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
        inv.const_data_ptr<double>(), scale, v.size(0), v.size(1),
        grad_direction.mutable_data_ptr<scalar_t>(), grad_magnitude.mutable_data_ptr<scalar_t>());
  });
  return {grad_direction, grad_magnitude};
}

}  // namespace
}  // namespace fedlora

TORCH_LIBRARY(fedlora, m) {
  m.def("scaled_factor(Tensor direction, Tensor magnitude, float scale=1.0) -> (Tensor factor, Tensor inv_norm)");
  m.def(
      "scaled_factor_backward(Tensor grad_factor, Tensor direction, Tensor magnitude, Tensor inv_norm, "
      "float scale=1.0) -> (Tensor grad_direction, Tensor grad_magnitude)");
}

TORCH_LIBRARY_IMPL(fedlora, CPU, m) {
  m.impl("scaled_factor", &fedlora::scaled_factor_cpu);
  m.impl("scaled_factor_backward", &fedlora::scaled_factor_backward_cpu);
}

// Importing fedlora_kernels._C loads this library, which runs the registrations above; the module itself only says
// whether CUDA kernels were compiled in (with_cuda).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "FedDoRA native ops (torch.ops.fedlora).", -1,
                                   nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", FEDLORA_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
