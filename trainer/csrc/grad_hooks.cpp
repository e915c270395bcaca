// Post-accumulate-grad hooks for kiln's overlapped all-reduce.
//
// tch has no autograd hooks. libtorch calls a tensor's post-accumulate-grad
// hook (`torch::autograd::impl::set_post_acc_grad_hooks`, the C++ side of
// PyTorch's `Tensor.register_post_accumulate_grad_hook`) right after backward
// has accumulated that parameter's gradient into `.grad`, on the thread
// running backward. The hook below calls a plain C function with the
// parameter's index; the Rust side (trainer/src/worker/hooks.rs) counts the
// gradients of each bucket and hands a complete bucket to the thread that
// all-reduces it while backward goes on (DDP's design).
//
// `tensor` arguments are tch's `C_tensor*`, which point to `at::Tensor`.

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdio>
#include <exception>
#include <memory>

extern "C" {
typedef void (*kiln_grad_ready_fn)(void* context, int64_t index);
}

namespace {

struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(kiln_grad_ready_fn fn, void* context, int64_t index)
      : fn_(fn), context_(context), index_(index) {}

  void operator()(const torch::autograd::Variable& /*tensor*/) override {
    fn_(context_, index_);
  }

  kiln_grad_ready_fn fn_;
  void* context_;
  int64_t index_;
};

int fail(const std::exception& e, char* error, size_t error_len) {
  if (error != nullptr && error_len > 0) {
    std::snprintf(error, error_len, "%s", e.what());
  }
  return 1;
}

}  // namespace

extern "C" {

// Installs (replacing any earlier one) the hook calling `fn(context, index)`
// after each accumulation into `tensor`'s gradient. Returns 0, or 1 with a
// message in `error`.
int kiln_set_grad_ready_hook(void* tensor, kiln_grad_ready_fn fn, void* context,
                             int64_t index, char* error, size_t error_len) {
  try {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    torch::autograd::impl::set_post_acc_grad_hooks(
        t, std::make_unique<GradReadyHook>(fn, context, index));
    return 0;
  } catch (const std::exception& e) {
    return fail(e, error, error_len);
  }
}

// Removes `tensor`'s post-accumulate-grad hook. Returns 0, or 1 with a
// message in `error`.
int kiln_clear_grad_ready_hook(void* tensor, char* error, size_t error_len) {
  try {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
    return 0;
  } catch (const std::exception& e) {
    return fail(e, error, error_len);
  }
}

}  // extern "C"
