// The ops behind gemv.py's tile variant: tiles.h's kernels registered with PyTorch's dispatcher. Built there at
// first use: g++ -O3 -march=native -fopenmp -shared -fPIC tiles.cpp   (+ PyTorch's: native.torch_flags)
#include "tiles.h"

extern "C" int minillm_tiles_available(void) { return tiles_permitted(); }


// The ops torch sees: torch.ops.minillm.tiles_bf16 / tiles_int8 / tiles_int4, with the weights in the tile layout;
// the same function serves the Meta key (shapes only) and the CPU key (checks, then the kernel).
static void check_tiles(std::initializer_list<const at::Tensor *> ts, const char *what) {
    check_cpu(ts, what);
    TORCH_CHECK(HAVE_TILES && minillm_tiles_available(), what, ": AMX tiles are not available here "
                "(minillm.native.gemv.tiles_available() says why)");
}

static void check_layout(const at::Tensor &w, at::ScalarType dtype, int64_t row, const char *what) {
    TORCH_CHECK(w.dim() == 4 && w.scalar_type() == dtype && w.size(2) == 16 && w.size(3) == row, what,
                " takes weights in the tile layout (out / 16, in / 32, 16, ", row, ") of ", dtype, ", got ",
                w.scalar_type(), " ", w.sizes(), " (minillm.native.gemv.pack_tiles_* makes it)");
}

#if HAVE_TILES
#define KERNEL(...) __VA_ARGS__
#else
#define KERNEL(...)
#endif

static at::Tensor tiles_bf16_op(const at::Tensor &x, const at::Tensor &w) {
    check_layout(w, at::kBFloat16, 32, "tiles_bf16");
    int64_t N = 16 * w.size(0), K = 32 * w.size(1);
    check_x(x, K, MAXM, "tiles_bf16");
    at::Tensor y = out_like(x, N);
    if (x.is_meta()) return y;
    at::Tensor xc = x.contiguous();
    check_tiles({&xc, &w, &y}, "tiles_bf16");
    int M = xc.numel() / K;
    if (M == 0) return y;
    const uint16_t *wp = (const uint16_t *)w.data_ptr();
    if (xc.scalar_type() == at::kBFloat16)
        KERNEL(tiles_bf16<BF16>((const uint16_t *)xc.data_ptr(), M, wp, (uint16_t *)y.data_ptr(), N, K));
    else
        KERNEL(tiles_bf16<F32>(xc.data_ptr<float>(), M, wp, y.data_ptr<float>(), N, K));
    return y;
}

static at::Tensor tiles_int8_op(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales) {
    check_layout(w, at::kChar, 32, "tiles_int8");
    int64_t N = 16 * w.size(0), K = 32 * w.size(1);
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == N,
                "tiles_int8 takes float32 scales (", N, ",), got ", scales.scalar_type(), " ", scales.sizes());
    check_x(x, K, MAXM, "tiles_int8");
    at::Tensor y = out_like(x, N);
    if (x.is_meta()) return y;
    at::Tensor xc = x.contiguous();
    check_tiles({&xc, &w, &scales, &y}, "tiles_int8");
    int M = xc.numel() / K;
    if (M == 0) return y;
    const int8_t *wp = (const int8_t *)w.data_ptr();
    const float *sp = scales.data_ptr<float>();
    if (xc.scalar_type() == at::kBFloat16)
        KERNEL(tiles_int8<BF16>((const uint16_t *)xc.data_ptr(), M, wp, sp, (uint16_t *)y.data_ptr(), N, K));
    else
        KERNEL(tiles_int8<F32>(xc.data_ptr<float>(), M, wp, sp, y.data_ptr<float>(), N, K));
    return y;
}

static at::Tensor tiles_int4_op(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales,
                                const at::Tensor &offsets, int64_t g) {
    check_layout(w, at::kByte, 16, "tiles_int4");   // (N / 16, K / 32, 16, 16): 4 x 16 x 4 as 16 x 16
    int64_t N = 16 * w.size(0), K = 32 * w.size(1);
    TORCH_CHECK(g > 0 && g % 32 == 0 && K % g == 0, "tiles_int4 takes a group size a multiple of 32 dividing in_features ",
                K, ", got ", g);
    for (auto t : {&scales, &offsets})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == N / 16 && t->size(1) == K / g &&
                    t->size(2) == 16, "tiles_int4 takes float32 scales and offsets in blocks (", N / 16, ", ", K / g,
                    ", 16), got ", t->scalar_type(), " ", t->sizes());
    check_x(x, K, MAXM, "tiles_int4");
    at::Tensor y = out_like(x, N);
    if (x.is_meta()) return y;
    at::Tensor xc = x.contiguous();
    check_tiles({&xc, &w, &scales, &offsets, &y}, "tiles_int4");
    int M = xc.numel() / K;
    if (M == 0) return y;
    const uint8_t *wp = w.data_ptr<uint8_t>();
    const float *sp = scales.data_ptr<float>(), *op = offsets.data_ptr<float>();
    if (xc.scalar_type() == at::kBFloat16)
        KERNEL(tiles_int4<BF16>((const uint16_t *)xc.data_ptr(), M, wp, sp, op, (uint16_t *)y.data_ptr(), N, K, g));
    else
        KERNEL(tiles_int4<F32>(xc.data_ptr<float>(), M, wp, sp, op, y.data_ptr<float>(), N, K, g));
    return y;
}

TORCH_LIBRARY_FRAGMENT(minillm, m) {
    m.def(TILES_NAME("bf16") "(Tensor x, Tensor w) -> Tensor");
    m.def(TILES_NAME("int8") "(Tensor x, Tensor w, Tensor scales) -> Tensor");
    m.def(TILES_NAME("int4") "(Tensor x, Tensor w, Tensor scales, Tensor offsets, int group_size) -> Tensor");
}
MINILLM_IMPL(
    m.impl(TILES_NAME("bf16"), &tiles_bf16_op);
    m.impl(TILES_NAME("int8"), &tiles_int8_op);
    m.impl(TILES_NAME("int4"), &tiles_int4_op);
)
