// Autograd kernel of fedlora::scaled_factor (any device): its backward is fedlora::scaled_factor_backward, the
// projection through the column norm stated in fedlora_kernels/reference.py's docstring. 1/n is marked
// non-differentiable; scaled_factor_backward itself has no derivative (no double backward). Registered in C++ so that
// a call costs no Python autograd overhead.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace fedlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

TensorPair call_scaled_factor(const at::Tensor& direction, const at::Tensor& magnitude, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fedlora::scaled_factor", "")
                             .typed<TensorPair(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(direction, magnitude, scale);
}

TensorPair call_scaled_factor_backward(const at::Tensor& grad_factor, const at::Tensor& direction,
                                       const at::Tensor& magnitude, const at::Tensor& inv_norm, double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fedlora::scaled_factor_backward", "")
          .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad_factor, direction, magnitude, inv_norm, scale);
}

class ScaledFactor : public torch::autograd::Function<ScaledFactor> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& direction, const at::Tensor& magnitude,
                               double scale) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor factor, inv_norm;
    std::tie(factor, inv_norm) = call_scaled_factor(direction, magnitude, scale);
    ctx->save_for_backward({direction, magnitude, inv_norm});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({inv_norm});
    return {factor, inv_norm};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_direction, grad_magnitude;
    std::tie(grad_direction, grad_magnitude) = call_scaled_factor_backward(
        grad_outputs[0], saved[0], saved[1], saved[2], ctx->saved_data["scale"].toDouble());
    return {grad_direction, grad_magnitude, at::Tensor()};
  }
};

TensorPair scaled_factor_autograd(const at::Tensor& direction, const at::Tensor& magnitude, double scale) {
  const auto outputs = ScaledFactor::apply(direction, magnitude, scale);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace fedlora

TORCH_LIBRARY_IMPL(fedlora, Autograd, m) {
  m.impl("scaled_factor", &fedlora::scaled_factor_autograd);
}
