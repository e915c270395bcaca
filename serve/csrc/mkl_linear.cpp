// MKL's packed sgemm for serving linear layers, which tch does not expose.
//
// A linear layer's forward pass at a small row count spends about half its
// time copying (packing) the weight matrix for the matrix kernel, again on
// every call. PyTorch registers two operators that pack the weight once and
// reuse it: `mkl::_mkl_reorder_linear_weight(weight, batch_size)` and
// `mkl::_mkl_linear(x, packed, weight, bias, batch_size)`, which uses the
// packed copy when `x` has `batch_size` rows (and plain `linear` otherwise).
// They are reached here through the dispatcher, as `torch.ops.mkl.*` reaches
// them from Python. The Rust side is serve/src/packed.rs.
//
// `tensor` arguments are tch's `C_tensor*`, which point to `at::Tensor`;
// results are new `at::Tensor*` that tch takes ownership of.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <exception>
#include <optional>

namespace {

int fail(const std::exception& e, char* error, size_t error_len) {
  if (error != nullptr && error_len > 0) {
    std::snprintf(error, error_len, "%s", e.what());
  }
  return 1;
}

}  // namespace

extern "C" {

// Whether this libtorch has the operators (built with MKL).
int kiln_mkl_linear_available() {
  return c10::Dispatcher::singleton()
                 .findSchema({"mkl::_mkl_linear", ""})
                 .has_value() &&
         c10::Dispatcher::singleton()
             .findSchema({"mkl::_mkl_reorder_linear_weight", ""})
             .has_value();
}

// Packs `weight` ([out, in], f32) for passes of `rows` rows into *out.
// Returns 0, or 1 with a message in `error`.
int kiln_mkl_pack(void* weight, int64_t rows, void** out, char* error,
                  size_t error_len) {
  try {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkl::_mkl_reorder_linear_weight", "")
            .typed<at::Tensor(const at::Tensor&, int64_t)>();
    at::Tensor packed = op.call(*static_cast<at::Tensor*>(weight), rows);
    *out = new at::Tensor(std::move(packed));
    return 0;
  } catch (const std::exception& e) {
    return fail(e, error, error_len);
  }
}

// x [rows, in] times weight [out, in] transposed, plus bias, with the packed
// weight of `rows` rows, into *out. Returns 0, or 1 with a message.
int kiln_mkl_linear(void* x, void* packed, void* weight, void* bias,
                    int64_t rows, void** out, char* error, size_t error_len) {
  try {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkl::_mkl_linear", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                              const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t)>();
    std::optional<at::Tensor> b;
    if (bias != nullptr) {
      b = *static_cast<at::Tensor*>(bias);
    }
    at::Tensor y = op.call(*static_cast<at::Tensor*>(x),
                           *static_cast<at::Tensor*>(packed),
                           *static_cast<at::Tensor*>(weight), b, rows);
    *out = new at::Tensor(std::move(y));
    return 0;
  } catch (const std::exception& e) {
    return fail(e, error, error_len);
  }
}

}  // extern "C"
