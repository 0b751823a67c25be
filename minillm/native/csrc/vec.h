// What the hand-written CPU kernels share (attention.h, rows.cpp, gemv.h, tiles.h, step.cpp): vectors of W = 16
// floats in GCC/Clang vector extensions (one AVX-512 register, two AVX2 ones: the compiler picks the instructions
// for the CPU it builds on), loads of bfloat16 and float32 storage as float32 vectors, exp without library calls,
// and (where the CPU has AVX512-BF16) rounding a row of activations to bfloat16.
#pragma once
#include <stdint.h>
#include <string.h>

#define W 16              // floats in one vector

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W), aligned(2)));
typedef uint8_t vb __attribute__((vector_size(W), aligned(1)));

struct BF16 {                                  // bfloat16 storage: the top half of a float32
    typedef uint16_t T;
    static float get(const T *p) { uint32_t u = (uint32_t)*p << 16; float f; memcpy(&f, &u, 4); return f; }
    static vf load(const T *p) {
        vh h; memcpy(&h, p, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        vf f; memcpy(&f, &u, sizeof f); return f;
    }
    static T put(float f) {                    // round to nearest even, as PyTorch's .to(bfloat16)
        uint32_t u; memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40);   // NaN stays NaN
        return (T)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    static vu bits(vf f) {                     // put's rounding, 16 at a time, kept in the top halves
        vu u; memcpy(&u, &f, sizeof u);
        vu nan = (u & 0x7fffffffu) > 0x7f800000u;
        return nan ? (u | 0x00400000u) & 0xffff0000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    }
    static vf round(vf f) { vu u = bits(f); vf r; memcpy(&r, &u, sizeof r); return r; }   // get(put(f)) each
    static void store(T *p, vf f) { vh h = __builtin_convertvector(bits(f) >> 16, vh); memcpy(p, &h, sizeof h); }
};
struct F32 {
    typedef float T;
    static float get(const T *p) { return *p; }
    static vf load(const T *p) { vf f; memcpy(&f, p, sizeof f); return f; }
    static T put(float f) { return f; }
    static vf round(vf f) { return f; }
    static void store(T *p, vf f) { memcpy(p, &f, sizeof f); }
};

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// n values of x (float32 or bfloat16 storage) rounded to bfloat16 into out: float32 16 at a time (vcvtneps2bf16,
// round to nearest even), the rest one by one; gemv.h's and tiles.h's kernels round their activations so.
template <class E>
static void to_bf16(const typename E::T *x, uint16_t *out, long n) {
    long k = 0;
    if constexpr (sizeof(typename E::T) == 4)
        for (; k + 16 <= n; k += 16)
            _mm256_storeu_si256((__m256i *)(out + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps((const float *)x + k)));
    for (; k < n; k++) out[k] = BF16::put(E::get(x + k));
}
#endif

// A 16 x 16 block of floats transposed in registers: r[i][j] becomes r[j][i]. On AVX-512 four rounds of
// shuffles (64 instructions, no memory); elsewhere element by element.
static inline void transpose16(vf r[16]) {
#if defined(__AVX512F__) && W == 16
    __m512 a[16], b[16];
    for (int i = 0; i < 16; i++) memcpy(&a[i], &r[i], sizeof(vf));
    for (int i = 0; i < 16; i += 2) {          // pairs of rows: 32-bit elements interleaved
        b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)            // quads: 64-bit elements interleaved
        for (int j = 0; j < 2; j++) {
            a[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i + j]), _mm512_castps_pd(b[i + j + 2])));
            a[i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i + j]), _mm512_castps_pd(b[i + j + 2])));
        }
    for (int i = 0; i < 16; i += 8)            // 128-bit lanes: rows i.. and i+4..
        for (int j = 0; j < 4; j++) {
            b[i + j] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0x88);
            b[i + j + 4] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {              // 256-bit halves: rows j and j+8
        a[j] = _mm512_shuffle_f32x4(b[j], b[j + 8], 0x88);
        a[j + 8] = _mm512_shuffle_f32x4(b[j], b[j + 8], 0xdd);
    }
    static const int order[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    for (int i = 0; i < 16; i++) memcpy(&r[order[i]], &a[i], sizeof(vf));
#else
    for (int i = 0; i < W; i++)
        for (int j = i + 1; j < W; j++) { float t = r[i][j]; r[i][j] = r[j][i]; r[j][i] = t; }
#endif
}

static inline vf vexp(vf x) {                  // exp(x) for x <= 0: Cephes' expf polynomial, no calls
    x = x < -87.0f ? (vf){} - 87.0f : x;
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round to nearest
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
    vf y = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf s; memcpy(&s, &e, sizeof s); return y * s;
}
