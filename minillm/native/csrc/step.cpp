// Every block of a Llama-style model over a few new tokens, in one call: the native step behind minillm/backends/native_step.py
// (read its docstring first). Built there at first use:
//     g++ -O3 -march=native -fopenmp -shared -fPIC step.cpp   (+ PyTorch's headers and libraries: native.torch_flags)
// A compiled decode step (backends/compiled.py) still enters Python and dynamo once per block and runs inductor's kernels
// between the matmuls; here the whole stack of blocks is one op, and between the matmuls (gemv.h's and tiles.h's
// kernels, called directly) the norms, RoPE, cache writes, attention and SwiGLU are plain loops over a few rows of
// 576 values. Per block, for T rows x (T, D):
//     h = rmsnorm(x) -> q, k, v = h Wqkv -> RoPE on q, k -> k, v into the cache at slots start.. -> attention
//     over the slots the mask shows -> x += a Wo -> h = rmsnorm(x) -> g, u = h W13 -> x += (silu(g) u) W2
// in the activations' dtype (float32 or bfloat16), rounded where model/llama.py's eager code rounds (after each op), the
// arithmetic in float32. Every row is computed from its own inputs alone, in the same order whatever T is (the
// kernels promise that for the matmuls; the rest works row by row), so a token's result from a 1-row decode step
// and from an 8-row verify step are bit-equal (tests/test_cpu_step.py).
#include <math.h>

#include <ATen/ops/empty_like.h>

#include "gemv.h"
#include "tiles.h"
#include "attention.h"   // last: its macros (NB, NC, ...) would clash with names in the others

enum Kind { GEMV_BF16, GEMV_INT8, GEMV_INT4, TILES_BF16, TILES_INT8, TILES_INT4, KINDS };
static const char *KIND_NAMES[KINDS] = {"gemv_bf16", "gemv_int8", "gemv_int4", "tiles_bf16", "tiles_int8", "tiles_int4"};

struct Linear {            // a linear layer as its kernel reads it: y (M, N) = x (M, K) W^T
    int kind, N, K, g;
    const void *w;
    const float *scales, *offsets;
};

template <class E>
static int linear(const Linear &l, const typename E::T *x, int M, typename E::T *y) {
    switch (l.kind) {
#if HAVE_GEMV
    case GEMV_BF16: return gemv_bf16<E>(x, M, (const uint16_t *)l.w, l.K, y, l.N, l.K);
    case GEMV_INT8: return gemv_int8<E>(x, M, (const int8_t *)l.w, l.scales, y, l.N, l.K);
    case GEMV_INT4: return gemv_int4<E>(x, M, (const uint8_t *)l.w, l.scales, l.offsets, y, l.N, l.K, l.g);
#endif
#if HAVE_TILES
    case TILES_BF16: tiles_bf16<E>(x, M, (const uint16_t *)l.w, y, l.N, l.K); return 0;
    case TILES_INT8: tiles_int8<E>(x, M, (const int8_t *)l.w, l.scales, y, l.N, l.K); return 0;
    case TILES_INT4: tiles_int4<E>(x, M, (const uint8_t *)l.w, l.scales, l.offsets, y, l.N, l.K, l.g); return 0;
#endif
    default: return 2;
    }
}

// RMSNorm as model/llama.py's: (x / rms(x)) * w, in float32, rounded once
template <class E>
static void rmsnorm(const typename E::T *x, const typename E::T *w, typename E::T *out, int M, int D, float eps) {
    for (int m = 0; m < M; m++) {
        const typename E::T *xm = x + (long)m * D;
        vf acc = {};                                   // the sum of squares 16 lanes at a time, then across
        int i = 0;
        for (; i + W <= D; i += W) {
            vf v = E::load(xm + i);
            acc += v * v;
        }
        float ss = 0.0f;
        for (int j = 0; j < W; j++) ss += acc[j];
        for (; i < D; i++) ss += E::get(xm + i) * E::get(xm + i);
        float r = 1.0f / sqrtf(ss / D + eps);
        typename E::T *om = out + (long)m * D;
        for (i = 0; i + W <= D; i += W) E::store(om + i, E::load(xm + i) * r * E::load(w + i));
        for (; i < D; i++) om[i] = E::put(E::get(xm + i) * r * E::get(w + i));
    }
}

// RoPE on one head's row in place, "rotate half" pairs (i, i + hd/2) as model.apply_rope
template <class E>
static void rope(typename E::T *h, const float *cos, const float *sin, int hd) {
    float t[256];
    const int half = hd / 2;
    for (int i = 0; i < hd; i++) t[i] = E::get(h + i);
    for (int i = 0; i < half; i++) {
        h[i] = E::put(t[i] * cos[i] - t[i + half] * sin[i]);
        h[i + half] = E::put(t[i + half] * cos[i + half] + t[i] * sin[i + half]);
    }
}

// silu(g) * u, g and u rounded as model/llama.py's F.silu(gate) * up in the activations' dtype; silu(x) = x / (1 + e^-x),
// e^-|x| from vec.h's vexp, 16 at a time (scalar code took ~1.5 ms of an 8-row step)
template <class E>
static void swiglu(const typename E::T *gu, typename E::T *out, int M, int F) {
    for (int m = 0; m < M; m++) {
        const typename E::T *g = gu + (long)m * 2 * F, *u = g + F;
        typename E::T *o = out + (long)m * F;
        for (int i0 = 0; i0 < F; i0 += W) {
            vf x = {}, e;
            int n = F - i0 < W ? F - i0 : W;
            if (n == W) x = E::load(g + i0);
            else for (int j = 0; j < n; j++) x[j] = E::get(g + i0 + j);
            e = vexp(x > 0.0f ? -x : x);                       // e^-|x|
            vf s = E::round(x > 0.0f ? x / (1.0f + e) : x * e / (1.0f + e));
            if (n == W) { E::store(o + i0, s * E::load(u + i0)); continue; }
            for (int j = 0; j < n; j++) o[i0 + j] = E::put(s[j] * E::get(u + i0 + j));
        }
    }
}

// x += y over n values, rounded to the activations' dtype (the residual connections)
template <class E>
static void add_into(typename E::T *x, const typename E::T *y, long n) {
    long i = 0;
    for (; i + W <= n; i += W) E::store(x + i, E::load(x + i) + E::load(y + i));
    for (; i < n; i++) x[i] = E::put(E::get(x + i) + E::get(y + i));
}

struct Model {
    int L, D, H, KV, hd, F, S;
    float eps;
};

// Every block over the T rows of x (T, D), in place; keys and values written at cache slots start..start+T-1 of
// k_cache / v_cache (L, 1, KV, S, hd); mask (T, start + T): which slots each row sees; cos / sin (T, hd) float32.
// lin: 4 linears per layer (qkv, o, gate-up, down); norms: 2 weights per layer (D). Returns 0, else a kernel's status.
template <class E>
static int blocks(typename E::T *x, int T, const Model &md, const Linear *lin, const typename E::T *const *norms,
                  typename E::T *k_cache, typename E::T *v_cache, int start, const uint8_t *mask, const float *cos,
                  const float *sin) {
    typedef typename E::T A;
    const int D = md.D, H = md.H, KV = md.KV, hd = md.hd, F = md.F, S = md.S, view = start + T;
    const int QKV = (H + 2 * KV) * hd;
    std::vector<A> h((long)T * D), qkv((long)T * QKV), att((long)T * H * hd), qg((long)T * H * hd), og((long)T * H * hd), o((long)T * D), gu((long)T * 2 * F),
        act((long)T * F);
    for (int l = 0; l < md.L; l++) {
        const Linear *ll = lin + 4 * l;
        rmsnorm<E>(x, norms[2 * l], h.data(), T, D, md.eps);
        int status = linear<E>(ll[0], h.data(), T, qkv.data());
        if (status) return status;
        A *kc = k_cache + (long)l * KV * S * hd, *vc = v_cache + (long)l * KV * S * hd;
        for (int t = 0; t < T; t++) {
            A *row = qkv.data() + (long)t * QKV;
            for (int j = 0; j < H + KV; j++) rope<E>(row + j * hd, cos + (long)t * hd, sin + (long)t * hd, hd);
            for (int j = 0; j < KV; j++) {
                memcpy(kc + ((long)j * S + start + t) * hd, row + (H + j) * hd, sizeof(A) * hd);
                memcpy(vc + ((long)j * S + start + t) * hd, row + (H + KV + j) * hd, sizeof(A) * hd);
            }
        }
        // attention.h's kernel, which takes per kv head its query heads' rows one after another: (H, T, hd) from
        // the rows' (T, H, hd), and back
        for (int t = 0; t < T; t++)
            for (int j = 0; j < H; j++)
                memcpy(&qg[((long)j * T + t) * hd], &qkv[(long)t * QKV + j * hd], sizeof(A) * hd);
        status = attend<E>(qg.data(), kc, vc, mask, og.data(), 1, KV, H / KV * T, T, view, 0, (long)S * hd, 0,
                           (long)S * hd, 0, 1.0f / sqrtf((float)hd));
        if (status) return 10 + status;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < H; j++)
                memcpy(&att[((long)t * H + j) * hd], &og[((long)j * T + t) * hd], sizeof(A) * hd);
        if ((status = linear<E>(ll[1], att.data(), T, o.data()))) return status;
        add_into<E>(x, o.data(), (long)T * D);
        rmsnorm<E>(x, norms[2 * l + 1], h.data(), T, D, md.eps);
        if ((status = linear<E>(ll[2], h.data(), T, gu.data()))) return status;
        swiglu<E>(gu.data(), act.data(), T, F);
        if ((status = linear<E>(ll[3], act.data(), T, o.data()))) return status;
        add_into<E>(x, o.data(), (long)T * D);
    }
    return 0;
}

// --- the op: torch.ops.minillm.decode_layers_hd<HD> ---------------------------------------------------------------

// The dtype, layout and (N, K) of a linear's weight for its kernel; its scales' and offsets' sizes.
static Linear describe_linear(int kind, int g, const at::Tensor &w, const at::Tensor &s, const at::Tensor &o, int layer,
                              int which) {
    static const char *NAMES[4] = {"wqkv", "wo", "w13", "w2"};
    TORCH_CHECK(kind >= 0 && kind < KINDS, "decode_layers: layer ", layer, " ", NAMES[which], ": unknown kernel ", kind);
    const char *k = KIND_NAMES[kind];
    static const at::ScalarType DT[KINDS] = {at::kBFloat16, at::kChar, at::kByte, at::kBFloat16, at::kChar, at::kByte};
    bool tiles = kind >= TILES_BF16;
    TORCH_CHECK(w.scalar_type() == DT[kind] && w.dim() == (tiles ? 4 : 2) && w.is_contiguous() && w.device().is_cpu(),
                "decode_layers: layer ", layer, " ", NAMES[which], ": ", k, " takes a contiguous ", DT[kind], " weight of ",
                tiles ? 4 : 2, " dims, got ", w.scalar_type(), " ", w.sizes());
    Linear l{kind, 0, 0, g, w.data_ptr(), nullptr, nullptr};
    l.N = tiles ? 16 * w.size(0) : w.size(0);
    l.K = tiles ? 32 * w.size(1) : (kind == GEMV_INT4 ? 2 * w.size(1) : w.size(1));
    if (kind == GEMV_INT8 || kind == TILES_INT8 || kind == GEMV_INT4 || kind == TILES_INT4) {
        bool int4 = kind == GEMV_INT4 || kind == TILES_INT4;
        TORCH_CHECK(!int4 || (g > 0 && l.K % g == 0), "decode_layers: layer ", layer, " ", NAMES[which], ": group size ", g,
                    " does not divide ", l.K);
        long want = int4 ? (long)l.N * (l.K / g) : l.N;
        auto check = [&](const at::Tensor &t, const char *what) {
            TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == want && t.is_contiguous(), "decode_layers: layer ",
                        layer, " ", NAMES[which], ": ", k, " takes float32 ", what, " of ", want, " values, got ",
                        t.scalar_type(), " ", t.sizes());
            return t.data_ptr<float>();
        };
        l.scales = check(s, "scales");
        l.offsets = int4 ? check(o, "offsets") : nullptr;
    }
    return l;
}

static std::tuple<at::Tensor, at::Tensor> decode_layers_op(
        const at::Tensor &x_in, at::TensorList weights, at::IntArrayRef kinds, const at::Tensor &k_cache,
        const at::Tensor &v_cache, int64_t start, const at::Tensor &mask, const at::Tensor &cos, const at::Tensor &sin,
        const at::Tensor &norm, int64_t n_heads, int64_t n_kv_heads, double eps) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) >= 1 && x_in.size(0) <= 16, "decode_layers takes x (T, dim) with T in 1..16, got ",
                x_in.sizes());
    TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
                "decode_layers takes float32 or bfloat16 activations, got ", x_in.scalar_type());
    const int T = x_in.size(0), D = x_in.size(1);
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(1) == 1 && k_cache.sizes() == v_cache.sizes() &&
                k_cache.scalar_type() == x_in.scalar_type() && v_cache.scalar_type() == x_in.scalar_type() &&
                k_cache.is_contiguous() && v_cache.is_contiguous(),
                "decode_layers takes contiguous caches (layers, 1, kv heads, slots, head_dim) in x's dtype, got ",
                k_cache.scalar_type(), " ", k_cache.sizes());
    Model md{(int)k_cache.size(0), D, (int)n_heads, (int)n_kv_heads, (int)k_cache.size(4), 0, (int)k_cache.size(3), (float)eps};
    TORCH_CHECK(md.KV == k_cache.size(2) && md.KV > 0 && md.H % md.KV == 0 && md.hd == HD && md.H / md.KV * T <= MAXR,
                "decode_layers: ", md.H, " heads over a cache of ", k_cache.size(2), " kv heads of ", md.hd,
                " values (this build takes head_dim ", HD, ")");
    TORCH_CHECK(start >= 0 && start + T <= md.S, "decode_layers: slots ", start, "..", start + T, " past the cache's ", md.S);
    const int view = start + T;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == T && mask.size(1) == view &&
                mask.is_contiguous(), "decode_layers takes a contiguous bool mask (", T, ", ", view, "), got ",
                mask.scalar_type(), " ", mask.sizes());
    for (const at::Tensor *t : {&cos, &sin})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == T && t->size(1) == md.hd &&
                    t->is_contiguous(), "decode_layers takes float32 cos and sin (", T, ", ", md.hd, "), got ", t->sizes());
    TORCH_CHECK((long)weights.size() == 14L * md.L && (long)kinds.size() == 8L * md.L, "decode_layers takes 14 tensors and 8 "
                "ints a layer for ", md.L, " layers, got ", weights.size(), " and ", kinds.size());
    auto check_norm = [&](const at::Tensor &w) {
        TORCH_CHECK(w.scalar_type() == x_in.scalar_type() && w.numel() == D && w.is_contiguous(),
                    "decode_layers takes norm weights of ", D, " values in x's dtype, got ", w.scalar_type(), " ", w.sizes());
    };
    check_norm(norm);
    std::vector<Linear> lin;
    std::vector<const void *> norms;
    for (int l = 0; l < md.L; l++) {
        const at::Tensor *lw = &weights[14 * l];
        check_norm(lw[0]); check_norm(lw[1]);
        norms.push_back(lw[0].data_ptr()); norms.push_back(lw[1].data_ptr());
        for (int j = 0; j < 4; j++)
            lin.push_back(describe_linear(kinds[8 * l + 2 * j], kinds[8 * l + 2 * j + 1], lw[2 + 3 * j], lw[3 + 3 * j],
                                          lw[4 + 3 * j], l, j));
        const Linear *ll = &lin[4 * l];
        md.F = ll[3].K;
        TORCH_CHECK(ll[0].K == D && ll[0].N == (md.H + 2 * md.KV) * md.hd && ll[1].K == md.H * md.hd && ll[1].N == D &&
                    ll[2].K == D && ll[2].N == 2 * md.F && ll[3].N == D, "decode_layers: layer ", l, "'s linears (",
                    ll[0].N, "x", ll[0].K, ", ", ll[1].N, "x", ll[1].K, ", ", ll[2].N, "x", ll[2].K, ", ", ll[3].N, "x",
                    ll[3].K, ") do not fit dim ", D, " with ", md.H, " + 2 x ", md.KV, " heads of ", md.hd);
    }
    at::Tensor x = x_in.clone(), h = at::empty_like(x_in);
    int status;
    if (x.scalar_type() == at::kBFloat16) {
        typedef uint16_t A;
        status = blocks<BF16>((A *)x.data_ptr(), T, md, lin.data(), (const A *const *)norms.data(), (A *)k_cache.data_ptr(),
                              (A *)v_cache.data_ptr(), start, (const uint8_t *)mask.data_ptr(), cos.data_ptr<float>(),
                              sin.data_ptr<float>());
        if (!status) rmsnorm<BF16>((A *)x.data_ptr(), (const A *)norm.data_ptr(), (A *)h.data_ptr(), T, D, md.eps);
    } else {
        status = blocks<F32>(x.data_ptr<float>(), T, md, lin.data(), (const float *const *)norms.data(),
                             k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), start, (const uint8_t *)mask.data_ptr(),
                             cos.data_ptr<float>(), sin.data_ptr<float>());
        if (!status) rmsnorm<F32>(x.data_ptr<float>(), norm.data_ptr<float>(), h.data_ptr<float>(), T, D, md.eps);
    }
    TORCH_CHECK(status != 2, "decode_layers: a kernel this library was built without (cpu_step.available() says which)");
    TORCH_CHECK(status == 0, "decode_layers: a kernel does not take these shapes (status ", status, ")");
    return {x, h};
}

extern "C" int minillm_step_kernels(void) { return HAVE_GEMV + 2 * HAVE_TILES; }
extern "C" int minillm_step_head_dim(void) { return HD; }

// One op per head size, decode_layers_hd<HD>: a build for each head size a process uses (a tiny model's and
// SmolLM2's in one notebook), and the dispatcher takes each name once (a second "decode_layers" would abort).
#define STR2(x) #x
#define STR(x) STR2(x)
#if TILES_EMULATED   // a build on emulated tiles (tiles.h) registers a name of its own
#define OP_NAME "decode_layers_emulated_hd" STR(HD)
#else
#define OP_NAME "decode_layers_hd" STR(HD)
#endif
TORCH_LIBRARY_FRAGMENT(minillm, m) {
    m.def(OP_NAME "(Tensor x, Tensor[] weights, int[] kinds, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
          "Tensor mask, Tensor cos, Tensor sin, Tensor norm, int n_heads, int n_kv_heads, float eps) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl(OP_NAME, &decode_layers_op); }
