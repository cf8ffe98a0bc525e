// Shared declarations of the fedlora reparameterization ops (CPU in feddora_ops.cpp, CUDA in feddora_ops_cuda.cu).
//
// The math is stated once, in fedlora_kernels/reference.py's docstring. Each op handles one factor of it,
// F = V diag(s m / n) for a matrix V (rows × cols) with column norms n, a magnitude m (cols,) and a scale s:
// scaled_factor(V, m, s) -> (F, 1/n) and scaled_factor_backward(dF, V, m, 1/n, s) -> (dV, dm), the projection through
// the column norms stated there (with m replaced by s m).
//
// Precision: the column sums (Σ V², <dF, V>), 1/n (returned as float64) and the per-column coefficients are fp64, the
// element-wise products are in opmath (fp32, or fp64 for float64 inputs). dV is a cancellation — it vanishes when
// dF_j ∥ V_j, e.g. for every column of a one-row V_A (rank 1) — and accurate sums keep it at the rounding of the
// products instead of a multiple of ulp(dF) · s m / n. The cost is one fp64 multiply-add per element of these small
// (r×k, d×r) matrices: cheap on CPUs and data-centre GPUs.
//
// FedDoRA uses it twice: A = scaled_factor(V_A (r×k), m_A) and s·B = scaled_factor(V_B (d×r), m_B, s).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace fedlora {

// Must equal fedlora_kernels.reference.NORM_EPS (tests/test_native.py::test_zero_column_uses_norm_eps checks it).
constexpr double kNormEps = 1e-12;

inline void check_factor_args(const char* op, const at::Tensor& direction, const at::Tensor& magnitude) {
  TORCH_CHECK(direction.dim() == 2, op, ": direction must be a 2-D (rows, cols) matrix, got shape ", direction.sizes());
  TORCH_CHECK(magnitude.dim() == 1 && magnitude.size(0) == direction.size(1), op, ": magnitude must have shape (",
              direction.size(1), ",), one entry per column of direction ", direction.sizes(), ", got ",
              magnitude.sizes());
  const auto dtype = direction.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": direction must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(magnitude.scalar_type() == dtype, op, ": magnitude dtype ", magnitude.scalar_type(),
              " differs from direction dtype ", dtype);
  TORCH_CHECK(magnitude.device() == direction.device(), op, ": magnitude is on ", magnitude.device(),
              " but direction is on ", direction.device());
}

inline void check_factor_backward_args(const char* op, const at::Tensor& grad_factor, const at::Tensor& direction,
                                       const at::Tensor& magnitude, const at::Tensor& inv_norm) {
  check_factor_args(op, direction, magnitude);
  TORCH_CHECK(grad_factor.sizes() == direction.sizes(), op, ": grad_factor shape ", grad_factor.sizes(),
              " differs from direction shape ", direction.sizes());
  TORCH_CHECK(grad_factor.scalar_type() == direction.scalar_type(), op, ": grad_factor dtype ",
              grad_factor.scalar_type(), " differs from direction dtype ", direction.scalar_type());
  TORCH_CHECK(grad_factor.device() == direction.device(), op, ": grad_factor is on ", grad_factor.device(),
              " but direction is on ", direction.device());
  TORCH_CHECK(inv_norm.dim() == 1 && inv_norm.size(0) == direction.size(1) && inv_norm.scalar_type() == at::kDouble,
              op, ": inv_norm must be the (", direction.size(1), ",) float64 vector returned by scaled_factor, got shape ",
              inv_norm.sizes(), " and dtype ", inv_norm.scalar_type());
  TORCH_CHECK(inv_norm.device() == direction.device(), op, ": inv_norm is on ", inv_norm.device(),
              " but direction is on ", direction.device());
}

// Uninitialized (factor, inv_norm) outputs for a contiguous direction.
inline std::tuple<at::Tensor, at::Tensor> empty_factor_outputs(const at::Tensor& direction) {
  return {at::empty(direction.sizes(), direction.options()),
          at::empty({direction.size(1)}, direction.options().dtype(at::kDouble))};
}

}  // namespace fedlora
