// The ops behind minillm/native/gemv.py: gemv.h's kernels registered with PyTorch's dispatcher. Built there at first use:
//     g++ -O3 -march=native -fopenmp -shared -fPIC gemv.cpp   (+ PyTorch's headers and libraries: native.torch_flags)
#include "gemv.h"

extern "C" int minillm_gemv_available(void) { return HAVE_GEMV; }

// The ops torch sees: torch.ops.minillm.gemv_bf16 / gemv_int8 / gemv_int4, registered when the library is loaded,
// so that a compiled graph calls each as one op through the dispatcher (a Python op cost ~10 us more a call, x 121
// linears a step). The same function serves the Meta key (shapes only) and the CPU key (checks, then the kernel).
static void check_status(int status, const char *what) {
    TORCH_CHECK(status != 2, what, ": this library was built without AVX512-BF16 (cpu_gemv.available() says so)");
    TORCH_CHECK(status == 0, what, ": the kernel does not take these shapes (status ", status, ")");
}

#if HAVE_GEMV
#define KERNEL(call) call
#else
#define KERNEL(call) 2
#endif

static at::Tensor gemv_bf16_op(const at::Tensor &x, const at::Tensor &w) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(1) % 32 == 0,
                "gemv_bf16 takes a bfloat16 weight (out, in) with in a multiple of 32, got ", w.scalar_type(), " ", w.sizes());
    check_x(x, w.size(1), 1 << 20, "gemv_bf16");
    at::Tensor y = out_like(x, w.size(0));
    if (x.is_meta()) return y;
    TORCH_CHECK(w.stride(1) == 1, "gemv_bf16 takes a weight with contiguous rows");
    at::Tensor xc = x.contiguous();
    check_cpu({&xc, &y}, "gemv_bf16");
    TORCH_CHECK(w.device().is_cpu(), "gemv_bf16 takes CPU tensors");
    int N = w.size(0), K = w.size(1), M = xc.numel() / K;
    if (M == 0) return y;
    const uint16_t *wp = (const uint16_t *)w.data_ptr();
    int status = xc.scalar_type() == at::kBFloat16
        ? KERNEL((gemv_bf16<BF16>((const uint16_t *)xc.data_ptr(), M, wp, w.stride(0), (uint16_t *)y.data_ptr(), N, K)))
        : KERNEL((gemv_bf16<F32>(xc.data_ptr<float>(), M, wp, w.stride(0), y.data_ptr<float>(), N, K)));
    check_status(status, "gemv_bf16");
    return y;
}

static at::Tensor gemv_int8_op(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.size(1) % 32 == 0,
                "gemv_int8 takes an int8 weight (out, in) with in a multiple of 32, got ", w.scalar_type(), " ", w.sizes());
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == w.size(0),
                "gemv_int8 takes float32 scales (out,), got ", scales.scalar_type(), " ", scales.sizes());
    check_x(x, w.size(1), 1 << 20, "gemv_int8");
    at::Tensor y = out_like(x, w.size(0));
    if (x.is_meta()) return y;
    at::Tensor xc = x.contiguous();
    check_cpu({&xc, &w, &scales, &y}, "gemv_int8");
    int N = w.size(0), K = w.size(1), M = xc.numel() / K;
    if (M == 0) return y;
    const int8_t *wp = (const int8_t *)w.data_ptr();
    const float *sp = scales.data_ptr<float>();
    int status = xc.scalar_type() == at::kBFloat16
        ? KERNEL((gemv_int8<BF16>((const uint16_t *)xc.data_ptr(), M, wp, sp, (uint16_t *)y.data_ptr(), N, K)))
        : KERNEL((gemv_int8<F32>(xc.data_ptr<float>(), M, wp, sp, y.data_ptr<float>(), N, K)));
    check_status(status, "gemv_int8");
    return y;
}

static at::Tensor gemv_int4_op(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales,
                               const at::Tensor &offsets, int64_t g) {
    TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, "gemv_int4 takes packed uint8 weights (out, in / 2), got ",
                packed.scalar_type(), " ", packed.sizes());
    int64_t N = packed.size(0), K = 2 * packed.size(1);
    TORCH_CHECK(K % 64 == 0 && g > 0 && K % g == 0 && (g == 32 || g % 64 == 0), "gemv_int4 takes in_features a multiple of 64 "
                "and a group size of 32 or a multiple of 64 dividing it, got in_features ", K, ", group size ", g);
    for (auto t : {&scales, &offsets})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == N && t->size(1) == K / g,
                    "gemv_int4 takes float32 scales and offsets (", N, ", ", K / g, "), got ", t->scalar_type(), " ", t->sizes());
    check_x(x, K, 1 << 20, "gemv_int4");
    at::Tensor y = out_like(x, N);
    if (x.is_meta()) return y;
    at::Tensor xc = x.contiguous();
    check_cpu({&xc, &packed, &scales, &offsets, &y}, "gemv_int4");
    int M = xc.numel() / K;
    if (M == 0) return y;
    const uint8_t *pp = packed.data_ptr<uint8_t>();
    const float *sp = scales.data_ptr<float>(), *op = offsets.data_ptr<float>();
    int status = xc.scalar_type() == at::kBFloat16
        ? KERNEL((gemv_int4<BF16>((const uint16_t *)xc.data_ptr(), M, pp, sp, op, (uint16_t *)y.data_ptr(), N, K, g)))
        : KERNEL((gemv_int4<F32>(xc.data_ptr<float>(), M, pp, sp, op, y.data_ptr<float>(), N, K, g)));
    check_status(status, "gemv_int4");
    return y;
}

TORCH_LIBRARY_FRAGMENT(minillm, m) {
    m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
    m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
    m.def("gemv_int4(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int group_size) -> Tensor");
}
MINILLM_IMPL(
    m.impl("gemv_bf16", &gemv_bf16_op);
    m.impl("gemv_int8", &gemv_int8_op);
    m.impl("gemv_int4", &gemv_int4_op);
)
