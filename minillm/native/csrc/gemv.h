#pragma once
// The few-row kernels themselves (bfloat16, int8 and packed int4 weights), as templates over the activations'
// storage (F32 or BF16 of vec.h): included by gemv.cpp, which registers them as ops, and by step.cpp, whose
// native decode step calls them directly. HAVE_GEMV says whether this build has them (AVX512-BF16).
// A few rows times a weight matrix (the linears of a decode step, 1 row, and of a verify step, up to 16) on the
// CPU, for bfloat16, int8 and packed int4 weights: the kernels behind minillm/native/gemv.py (read its docstring
// first). Built there at first use:
//     g++ -O3 -march=native -fopenmp -shared -fPIC gemv.cpp
// A decode step reads every weight once for one row of activations, so its linears should run at the
// memory's speed, and a verify step's few rows should cost little more. What PyTorch's kernels lose on some CPUs (gemv.py has the figures), and what this file
// does instead:
//   - each row of W is one dot product with x, in vdpbf16ps (bfloat16 pairs multiplied, summed into float32;
//     products are exact, the sums float32): 32 weights an instruction;
//   - four rows of W at a time, so x's vectors are loaded once for four rows and four sums run side by side,
//     and up to four rows of x against each, so a weight loaded (and, int4, unpacked) once serves them all;
//   - a software prefetch PF bytes ahead in each row: with one stream per core the hardware prefetcher alone
//     kept too few lines in flight, and the kernels waited on memory (measured: 1.4-1.6x slower without);
//   - int4: the two nibbles of a byte are looked up in a 16-entry table of bfloat16 values 0..15 (vpermw),
//     the activations split once per call into the even and odd columns the low and high nibbles hold,
//     each group's dot product scaled once, and the offsets added as offset * (sum of x over the group).
// Needs AVX512-BF16 (and AVX512-BW): where the compiler's target lacks them this file compiles to a library
// whose minillm_gemv_available() returns 0 and whose ops refuse to run, and the callers keep PyTorch's kernels.
// Built against PyTorch's headers (build.py, torch=True): the ops are registered with its dispatcher.
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "ops.h"
#include "vec.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_GEMV 1
#else
#define HAVE_GEMV 0
#endif

#define PF 4096           // bytes prefetched ahead in a row
#define RB 4              // rows at a time


#if HAVE_GEMV
// The first 64-byte aligned element of v (v holds 64 bytes more than it needs).
template <class T>
static T *aligned64(std::vector<T> &v) {
    return v.data() + ((64 - ((uintptr_t)v.data() & 63)) & 63) / sizeof(T);
}

// Block b's RB rows of w (row stride ld); a short last block repeats its first row, and only the `rows`
// returned are written out.
template <class T>
static int block_rows(const T *w, long ld, int b, int N, const T **row) {
    int n0 = b * RB, rows = N - n0 < RB ? N - n0 : RB;
    for (int r = 0; r < RB; r++) row[r] = w + (long)(n0 + (r < rows ? r : 0)) * ld;
    return rows;
}

// Every kernel below runs over blocks of RB rows of W, and within a block over the M rows of x MB at a time
// (their RB x MB sums in registers). Each (row of W, row of x) pair is summed by the same
// instructions in the same order whatever M and the blocking are, so row m of an M-row call is bit-equal to a
// one-row call on row m alone: a verify step and a decode step get the same numbers (tests/test_cpu_gemv.py).
template <class F>
static void over_rows(int M, F &&block) {       // block(m0, mb) for each slice of at most 4 rows of x
    for (int m0 = 0; m0 < M; m0 += 4) {
        switch (M - m0 < 4 ? M - m0 : 4) {
        case 1: block.template operator()<1>(m0); break;
        case 2: block.template operator()<2>(m0); break;
        case 3: block.template operator()<3>(m0); break;
        default: block.template operator()<4>(m0); break;
        }
    }
}

// y (M, N) = x (M, K) W (N, K)^T; W bfloat16, row-major with row stride ldw (elements). K % 32 == 0.
template <class E>
static int gemv_bf16(const typename E::T *x, int M, const uint16_t *w, long ldw, typename E::T *y, int N, int K) {
    if (K % 32) return 1;
    std::vector<uint16_t> xb((long)M * K + 32);
    uint16_t *xa = aligned64(xb);                   // x in bfloat16, row m at xa + m K (64-byte aligned: K % 32 == 0)
    to_bf16<E>(x, xa, (long)M * K);
    const int blocks = (N + RB - 1) / RB;
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const uint16_t *row[RB];
        int n0 = b * RB, rows = block_rows(w, ldw, b, N, row);
        over_rows(M, [&]<int MB>(int m0) {
            __m512 acc[MB][RB];
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < RB; r++) acc[m][r] = _mm512_setzero_ps();
            const uint16_t *xm = xa + (long)m0 * K;
            for (int k = 0; k < K; k += 32)
                for (int r = 0; r < RB; r++) {
                    _mm_prefetch((const char *)(row[r] + k) + PF, _MM_HINT_T0);
                    __m512bh wv = (__m512bh)_mm512_loadu_si512(row[r] + k);
                    for (int m = 0; m < MB; m++)
                        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, (__m512bh)_mm512_load_si512(xm + (long)m * K + k));
                }
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < rows; r++) y[(long)(m0 + m) * N + n0 + r] = E::put(_mm512_reduce_add_ps(acc[m][r]));
        });
    }
    return 0;
}

// y (M, N) = scales[n] * (x W^T), W int8 (N, K); K % 32 == 0. The int8 values become float32 (exact) and meet x
// in float32 FMAs: int8 -> bfloat16 has no single instruction, and this kernel waits on memory either way.
template <class E>
static int gemv_int8(const typename E::T *x, int M, const int8_t *w, const float *scales, typename E::T *y, int N, int K) {
    if (K % 32) return 1;
    std::vector<float> xf((long)M * K + 16);
    float *xa = aligned64(xf);                      // float32: the int8 weights meet it in FMAs
    for (long k = 0; k < (long)M * K; k++) xa[k] = E::get(x + k);
    const int blocks = (N + RB - 1) / RB;
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int8_t *row[RB];
        int n0 = b * RB, rows = block_rows(w, K, b, N, row);
        over_rows(M, [&]<int MB>(int m0) {
            __m512 acc[MB][RB];
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < RB; r++) acc[m][r] = _mm512_setzero_ps();
            const float *xm = xa + (long)m0 * K;
            for (int k = 0; k < K; k += 32)
                for (int r = 0; r < RB; r++) {
                    _mm_prefetch((const char *)(row[r] + k) + PF, _MM_HINT_T0);
                    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row[r] + k))));
                    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row[r] + k + 16))));
                    for (int m = 0; m < MB; m++) {
                        const float *xk = xm + (long)m * K + k;
                        acc[m][r] = _mm512_fmadd_ps(w1, _mm512_load_ps(xk + 16), _mm512_fmadd_ps(w0, _mm512_load_ps(xk), acc[m][r]));
                    }
                }
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < rows; r++)
                    y[(long)(m0 + m) * N + n0 + r] = E::put(scales[n0 + r] * _mm512_reduce_add_ps(acc[m][r]));
        });
    }
    return 0;
}

// y (M, N) = x W^T with W[n, k] = scales[n, k / g] * q[n, k] + offsets[n, k / g], q in [0, 15] packed two a byte
// (byte j of a row: column 2j low nibble, 2j + 1 high), scales and offsets float32 (N, K / g).
// K % 64 == 0 and g = 32 or a multiple of 64.
template <class E>
static int gemv_int4(const typename E::T *x, int M, const uint8_t *packed, const float *scales, const float *offsets,
                     typename E::T *y, int N, int K, int g) {
    if (K % 64 || !(g == 32 || g % 64 == 0) || K % g) return 1;
    const int G = K / g, C = K / 64;
    // xs: per row of x and 64-column chunk, its 32 even columns then its 32 odd ones (bfloat16); xsum: per row
    // and group, the sum of the bfloat16-rounded x, which each group's offset multiplies
    std::vector<uint16_t> xsv((long)M * K + 32);
    uint16_t *xs = aligned64(xsv);
    // (vectorized: 64 columns at a time, rounded by vcvtne2ps2bf16, split by vpermt2w; the sums 16 lanes, then across)
    std::vector<float> xsum((long)M * G, 0.0f);
    __m512i even, odd;
    {
        uint16_t ie[32], io[32];
        for (int j = 0; j < 32; j++) ie[j] = 2 * j, io[j] = 2 * j + 1;
        even = _mm512_loadu_si512(ie), odd = _mm512_loadu_si512(io);
    }
    auto widen = [](__m512i v) {             // 32 bfloat16 -> the sum of their two halves as 16 float32
        __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
        __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
        return _mm512_add_ps(lo, hi);
    };
    for (int m = 0; m < M; m++) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < C; c++) {
            const typename E::T *xc = x + (long)m * K + 64 * c;
            __m512i v0, v1;                      // columns 0-31 and 32-63 of the chunk, bfloat16
            if constexpr (sizeof(typename E::T) == 4) {
                const float *f = (const float *)xc;
                v0 = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(f + 16), _mm512_loadu_ps(f));
                v1 = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(f + 48), _mm512_loadu_ps(f + 32));
            } else {
                v0 = _mm512_loadu_si512(xc);
                v1 = _mm512_loadu_si512(xc + 32);
            }
            _mm512_store_si512(xs + (long)m * K + 64 * c, _mm512_permutex2var_epi16(v0, even, v1));
            _mm512_store_si512(xs + (long)m * K + 64 * c + 32, _mm512_permutex2var_epi16(v0, odd, v1));
            if (g == 32) {                       // the chunk holds two groups
                xsum[(long)m * G + 2 * c] = _mm512_reduce_add_ps(widen(v0));
                xsum[(long)m * G + 2 * c + 1] = _mm512_reduce_add_ps(widen(v1));
            } else {
                acc = _mm512_add_ps(acc, _mm512_add_ps(widen(v0), widen(v1)));
                if ((64 * (c + 1)) % g == 0) {
                    xsum[(long)m * G + 64 * c / g] = _mm512_reduce_add_ps(acc);
                    acc = _mm512_setzero_ps();
                }
            }
        }
    }
    const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,       // bfloat16 15..0
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
        0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000);
    const __m512i low = _mm512_set1_epi16(15);
    const long rb = K / 2;
    const int cpg = g >= 64 ? g / 64 : 1;              // chunks a scale covers (g = 32: a chunk holds two groups)
    const int steps = g >= 64 ? G : C;
    // the block's RB rows of W (row, scales sc) against MB rows of x from m0: the sums out[m][r], offsets not yet
    // added (a group's partial sums p and the running sums acc, 16 vectors each at four rows of x, fill the
    // registers and spill a little; two rows of W at a time measured no faster)
    auto block = [&]<int MB>(const uint8_t *const *row, const float *const *sc, int m0, float (*out)[RB]) {
        __m512 acc[MB][RB];
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < RB; r++) acc[m][r] = _mm512_setzero_ps();
        const uint16_t *xm = xs + (long)m0 * K;
        for (int s = 0; s < steps; s++) {
            __m512 p[MB][RB];
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < RB; r++) p[m][r] = _mm512_setzero_ps();
            for (int c = s * cpg; c < (s + 1) * cpg; c++)
                for (int r = 0; r < RB; r++) {
                    const uint8_t *a = row[r] + 32 * c;
                    _mm_prefetch((const char *)a + PF, _MM_HINT_T0);
                    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)a));
                    __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
                    __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
                    for (int m = 0; m < MB; m++) {
                        const uint16_t *xc = xm + (long)m * K + 64 * c;
                        p[m][r] = _mm512_dpbf16_ps(p[m][r], lo, (__m512bh)_mm512_load_si512(xc));
                        p[m][r] = _mm512_dpbf16_ps(p[m][r], hi, (__m512bh)_mm512_load_si512(xc + 32));
                    }
                }
            for (int r = 0; r < RB; r++) {
                // float32 lane i of p sums columns 4i..4i+3 of the chunk: lanes 0-7 the first 32, 8-15 the next
                __m512 sv = g >= 64 ? _mm512_set1_ps(sc[r][s])
                                    : _mm512_insertf32x8(_mm512_set1_ps(sc[r][2 * s]), _mm256_set1_ps(sc[r][2 * s + 1]), 1);
                for (int m = 0; m < MB; m++) acc[m][r] = _mm512_fmadd_ps(p[m][r], sv, acc[m][r]);
            }
        }
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < RB; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
    };
    const int blocks = (N + RB - 1) / RB;
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const uint8_t *row[RB];
        const float *sc[RB];
        int n0 = b * RB, rows = block_rows(packed, rb, b, N, row);
        for (int r = 0; r < RB; r++) sc[r] = scales + (row[r] - packed) / rb * G;
        over_rows(M, [&]<int MB>(int m0) {
            float out[MB][RB];
            block.template operator()<MB>(row, sc, m0, out);
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < rows; r++) {
                    float v = out[m][r];
                    const float *of = offsets + (long)(n0 + r) * G, *xg = xsum.data() + (long)(m0 + m) * G;
                    for (int i = 0; i < G; i++) v += of[i] * xg[i];
                    y[(long)(m0 + m) * N + n0 + r] = E::put(v);
                }
        });
    }
    return 0;
}
#endif
