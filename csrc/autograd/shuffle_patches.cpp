// Autograd of ppml::shuffle_patches, registered in C++ (TORCH_LIBRARY_IMPL(ppml, Autograd, m)) for CPU and CUDA alike.
//
// Why not torch.library.register_autograd, as the other ops do: that puts a Python function in front of every call of
// torch.ops.ppml.shuffle_patches, gradients or not. It cost 3 us a call at B = 1 (10.6 vs 7.6 us), and at B = 64
// uint8 the fresh output came out 0.89-0.91x torch.clone against 0.96x for the same kernel called below autograd
// (Intel Xeon, 2 threads, round-robin timing; benchmarks/RESULTS.md, "Issue 22 closed: ..."): the Python
// call's own allocations in between change which heap block the next 9.6 MB output gets. torch.clone, which the
// target compares with, has its autograd in C++ too. When ppml._C is not built, ppml/ops/shuffle_patches.py
// registers the same backward in Python (ppml/ops/_common.py::autograd_fallback).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace ppml::ops {
namespace {

// The op through the dispatcher (below autograd when the caller's guard says so): the CPU, CUDA or Meta kernel, or
// a Python fake kernel while tracing.
at::Tensor call_shuffle_patches(const at::Tensor& images, const at::Tensor& perm, int64_t patch_size) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ppml::shuffle_patches", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(images, perm, patch_size);
}

// inv[b, perm[b, i]] = i, as ppml/keys.py::invert_permutations (a scatter: no host synchronisation on a GPU).
at::Tensor invert_permutations(const at::Tensor& perm) {
  const at::Tensor positions = at::arange(perm.size(-1), perm.options()).expand_as(perm);
  return at::empty_like(perm, at::MemoryFormat::Contiguous).scatter_(-1, perm, positions);
}

class ShufflePatchesFunction : public torch::autograd::Function<ShufflePatchesFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& images, const at::Tensor& perm,
                            int64_t patch_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({perm});
    ctx->saved_data["patch_size"] = patch_size;
    return call_shuffle_patches(images, perm, patch_size);
  }

  // Shuffling is a permutation of tiles, so its adjoint is the same op with the inverse permutation. It goes through
  // the dispatcher with autograd on, so the backward is differentiable again (double backward).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor perm = ctx->get_saved_variables()[0];
    const int64_t patch_size = ctx->saved_data["patch_size"].toInt();
    at::Tensor grad_images;
    if (grads[0].defined()) grad_images = call_shuffle_patches(grads[0], invert_permutations(perm), patch_size);
    return {grad_images, at::Tensor(), at::Tensor()};
  }
};

at::Tensor shuffle_patches_autograd(const at::Tensor& images, const at::Tensor& perm, int64_t patch_size) {
  if (!(at::GradMode::is_enabled() && images.requires_grad())) {
    // No graph to record: straight to the kernel, without the Function's bookkeeping.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_shuffle_patches(images, perm, patch_size);
  }
  return ShufflePatchesFunction::apply(images, perm, patch_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, Autograd, m) { m.impl("shuffle_patches", &shuffle_patches_autograd); }

}  // namespace ppml::ops
