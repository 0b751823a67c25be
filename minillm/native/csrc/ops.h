// What the sources that register ops with PyTorch's dispatcher share (gemv.cpp, tiles.cpp): the checks on the
// activations and tensors every op makes, its output, and the registration of one function for both the CPU key
// (checks, then the kernel) and the Meta key (shapes only, for torch.compile's tracing).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

// x (..., K) of float32 or bfloat16, at most max_rows rows
static inline void check_x(const at::Tensor &x, int64_t K, int64_t max_rows, const char *what) {
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, what, " takes activations (..., ", K, "), got shape ", x.sizes());
    TORCH_CHECK(x.numel() / K <= max_rows, what, " takes at most ", max_rows, " rows, got ", x.numel() / K);
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
                " takes float32 or bfloat16 activations, got ", x.scalar_type());
}

// the output (..., N) for x (..., K)
static inline at::Tensor out_like(const at::Tensor &x, int64_t N) {
    auto shape = x.sizes().vec();
    shape.back() = N;
    return at::empty(shape, x.options());
}

static inline void check_cpu(std::initializer_list<const at::Tensor *> ts, const char *what) {
    for (auto t : ts) TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), what, " takes contiguous CPU tensors");
}

// TORCH_LIBRARY_IMPL for the CPU and the Meta keys at once: MINILLM_IMPL(m.impl("op", &op_fn); ...)
#define MINILLM_IMPL(...)                                    \
    TORCH_LIBRARY_IMPL(minillm, CPU, m) { __VA_ARGS__ }      \
    TORCH_LIBRARY_IMPL(minillm, Meta, m) { __VA_ARGS__ }
