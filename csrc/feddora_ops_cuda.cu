// CUDA kernels of the fedlora ops; the math is stated in fedlora_kernels/reference.py's docstring.
//
// One block per group of up to 32 adjacent columns: threadIdx.x picks the column (so a warp reads contiguous memory
// along a row), threadIdx.y strides over the rows. The block reduces its per-thread fp64 partial sums over threadIdx.y
// in shared memory, derives the per-column coefficients (fp64) and then maps the same rows, which are still in L1/L2,
// with opmath element-wise products — the precision of the CPU kernels (feddora_ops.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "feddora_ops.h"

namespace fedlora {
namespace {

constexpr int kMaxColumnsPerBlock = 32;
constexpr int kMaxThreadsPerBlock = 1024;

struct ColumnGroupLaunch {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
};

// Power-of-two block shape: up to 32 columns wide, as many rows deep as the matrix has (up to 1024 threads).
ColumnGroupLaunch column_group_launch(int64_t rows, int64_t cols) {
  int width = 1;
  while (width < kMaxColumnsPerBlock && width < cols) {
    width *= 2;
  }
  int depth = 1;
  while (depth < rows && width * depth < kMaxThreadsPerBlock) {
    depth *= 2;
  }
  const auto groups = static_cast<unsigned int>((cols + width - 1) / width);
  return {dim3(groups), dim3(width, depth), sizeof(double) * width * depth};
}

// Σ over threadIdx.y of every thread's value, per threadIdx.x; returned to all threads of the block.
// blockDim.y must be a power of two; the dynamic shared memory holds blockDim.x · blockDim.y doubles.
__device__ double column_sum(double value) {
  extern __shared__ double partial[];
  const int lane = threadIdx.x;
  const int width = blockDim.x;
  partial[threadIdx.y * width + lane] = value;
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
      partial[threadIdx.y * width + lane] += partial[(threadIdx.y + stride) * width + lane];
    }
    __syncthreads();
  }
  return partial[lane];
}

// (F, inv_norm) of scaled_factor (feddora_ops.h): F = V · diag(s m / n), inv_norm = 1/n.
template <typename scalar_t>
__global__ void scaled_factor_kernel(const scalar_t* __restrict__ direction, const scalar_t* __restrict__ magnitude,
                                     double scale, int64_t rows, int64_t cols, scalar_t* __restrict__ factor,
                                     double* __restrict__ inv_norm) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool in_range = col < cols;
  double sum_sq = 0;
  if (in_range) {
    for (int64_t i = threadIdx.y; i < rows; i += blockDim.y) {
      const auto value = static_cast<double>(direction[i * cols + col]);
      sum_sq += value * value;
    }
  }
  const double inv = 1.0 / sqrt(column_sum(sum_sq) + kNormEps);
  if (!in_range) {
    return;
  }
  if (threadIdx.y == 0) {
    inv_norm[col] = inv;
  }
  const auto gain = static_cast<opmath_t>(scale * static_cast<double>(magnitude[col]) * inv);
  for (int64_t i = threadIdx.y; i < rows; i += blockDim.y) {
    factor[i * cols + col] = static_cast<scalar_t>(static_cast<opmath_t>(direction[i * cols + col]) * gain);
  }
}

// (dV, dm): the column-norm backward of reference.py's docstring with m → s m; t_j = <dF_j, V_j> / n_j².
template <typename scalar_t>
__global__ void scaled_factor_backward_kernel(const scalar_t* __restrict__ grad_factor,
                                              const scalar_t* __restrict__ direction,
                                              const scalar_t* __restrict__ magnitude,
                                              const double* __restrict__ inv_norm, double scale, int64_t rows,
                                              int64_t cols, scalar_t* __restrict__ grad_direction,
                                              scalar_t* __restrict__ grad_magnitude) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool in_range = col < cols;
  double dot = 0;
  if (in_range) {
    for (int64_t i = threadIdx.y; i < rows; i += blockDim.y) {
      dot += static_cast<double>(grad_factor[i * cols + col]) * static_cast<double>(direction[i * cols + col]);
    }
  }
  dot = column_sum(dot);
  if (!in_range) {
    return;
  }
  const double inv = inv_norm[col];
  if (threadIdx.y == 0) {
    grad_magnitude[col] = static_cast<scalar_t>(scale * dot * inv);
  }
  const auto gain = static_cast<opmath_t>(scale * static_cast<double>(magnitude[col]) * inv);
  const auto tangent = static_cast<opmath_t>(dot * inv * inv);
  for (int64_t i = threadIdx.y; i < rows; i += blockDim.y) {
    const int64_t idx = i * cols + col;
    grad_direction[idx] = static_cast<scalar_t>(
        gain * (static_cast<opmath_t>(grad_factor[idx]) - static_cast<opmath_t>(direction[idx]) * tangent));
  }
}

std::tuple<at::Tensor, at::Tensor> scaled_factor_cuda(const at::Tensor& direction, const at::Tensor& magnitude,
                                                      double scale) {
  check_factor_args("fedlora::scaled_factor", direction, magnitude);
  const c10::cuda::CUDAGuard guard(direction.device());
  const auto v = direction.contiguous();
  const auto m = magnitude.contiguous();
  at::Tensor factor, inv_norm;
  std::tie(factor, inv_norm) = empty_factor_outputs(v);
  const int64_t rows = v.size(0);
  const int64_t cols = v.size(1);
  if (cols == 0) {
    return {factor, inv_norm};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fedlora::scaled_factor", [&] {
    const auto launch = column_group_launch(rows, cols);
    scaled_factor_kernel<scalar_t>
        <<<launch.grid, launch.block, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
            v.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), scale, rows, cols,
            factor.mutable_data_ptr<scalar_t>(), inv_norm.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {factor, inv_norm};
}

std::tuple<at::Tensor, at::Tensor> scaled_factor_backward_cuda(const at::Tensor& grad_factor,
                                                               const at::Tensor& direction,
                                                               const at::Tensor& magnitude,
                                                               const at::Tensor& inv_norm, double scale) {
  check_factor_backward_args("fedlora::scaled_factor_backward", grad_factor, direction, magnitude, inv_norm);
  const c10::cuda::CUDAGuard guard(direction.device());
  const auto g = grad_factor.contiguous();
  const auto v = direction.contiguous();
  const auto m = magnitude.contiguous();
  const auto inv = inv_norm.contiguous();
  auto grad_direction = at::empty(v.sizes(), v.options());
  auto grad_magnitude = at::empty(m.sizes(), m.options());
  const int64_t rows = v.size(0);
  const int64_t cols = v.size(1);
  if (cols == 0) {
    return {grad_direction, grad_magnitude};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fedlora::scaled_factor_backward", [&] {
    const auto launch = column_group_launch(rows, cols);
    scaled_factor_backward_kernel<scalar_t>
        <<<launch.grid, launch.block, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
            g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
            inv.const_data_ptr<double>(), scale, rows, cols,
            grad_direction.mutable_data_ptr<scalar_t>(), grad_magnitude.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_direction, grad_magnitude};
}

}  // namespace
}  // namespace fedlora

TORCH_LIBRARY_IMPL(fedlora, CUDA, m) {
  m.impl("scaled_factor", &fedlora::scaled_factor_cuda);
  m.impl("scaled_factor_backward", &fedlora::scaled_factor_backward_cuda);
}
