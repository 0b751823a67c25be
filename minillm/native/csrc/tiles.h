#pragma once
// The tile kernels themselves, as templates over the activations' storage (F32 or BF16 of vec.h): included by
// tiles.cpp, which registers them as ops, and by step.cpp, whose native decode step calls them directly.
// HAVE_TILES says whether this build has them; tiles_permitted() asks Linux for the tile registers.
// A few rows times a weight matrix on AMX tiles (Intel's matrix unit: TDPBF16PS multiplies a tile of up to 16
// rows x 32 bfloat16 by one of 32 x 16, summing into 16 x 16 float32), for bfloat16, int8 and packed int4
// weights: the kernels behind gemv.py's tile variant (read its docstring first). Built there at first use:
//     g++ -O3 -march=native -fopenmp -shared -fPIC tiles.cpp
// gemv.cpp's kernels spend one vdpbf16ps per row of x per 32 weights, so at 8 rows they wait on their
// instructions, not the memory. One TDPBF16PS does 16 x 16 x 32 products whatever the rows (up to 16) of x,
// so here a weight read once serves up to 16 rows at about the cost of one, and a verify step of 8 or 16 rows
// costs about what a decode step does.
//   - weights in the tile layout (cpu_gemv.pack_tiles_*, plain reshapes): per block of 16 outputs and chunk of
//     32 inputs, 16 tile rows, row kk holding for each output n its inputs 2kk and 2kk + 1 (the pairs the
//     instruction multiplies); a block's chunks follow each other, so each block is one stream in memory;
//   - int8 and int4 chunks are turned into bfloat16 (exact: int8 and 0..15 are exact in bfloat16) in a 1 KB
//     tile in L1, then multiplied; int4 tile row kk is 16 bytes, byte n holding inputs 2kk and 2kk + 1 of
//     output n (low nibble, high), looked up in a table of bfloat16 0..15 (vpermw);
//   - int4: each group's sums are scaled in float32 (scale * sum + offset * sum of x over the group), so the
//     weights stay exact as in gemv.cpp;
//   - two blocks of outputs at a time (two accumulator tiles, one x tile loaded for both), a software
//     prefetch PF bytes ahead in each stream.
// Each element of the result is one row of x against one column of W, summed by the same instructions in the same
// order whatever the rows of x, so row m of an M-row call is bit-equal to a one-row call (tested).
// Needs AMX-BF16 and AVX512-BF16 from the compiler and, on Linux, the kernel's permission to use the tiles
// (arch_prctl): minillm_tiles_available() returns 0 where either is missing and the ops refuse to run.
// -DMINILLM_TILES_EMULATE builds the same kernels on amx_emulate.h's plain C++ tiles (AVX512-BF16 still needed).
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "ops.h"
#include "vec.h"

#if defined(MINILLM_TILES_EMULATE) && defined(__AVX512BF16__) && defined(__AVX512BW__)
// the tile instructions in plain C++ (amx_emulate.h), the rest as below: tests the kernels where there is no AMX
#include <immintrin.h>
#include "amx_emulate.h"
#define HAVE_TILES 1
#define TILES_EMULATED 1
#elif !defined(MINILLM_TILES_EMULATE) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_TILES 1
#define TILES_EMULATED 0
#else
#define HAVE_TILES 0
#define TILES_EMULATED 0
#endif

// The ops' names: an emulated build registers its own (tiles_emulated_bf16, ...), so it can sit beside a real one.
#if TILES_EMULATED
#define TILES_NAME(kind) "tiles_emulated_" kind
#else
#define TILES_NAME(kind) "tiles_" kind
#endif

#define PF 4096           // bytes prefetched ahead in each stream
#define MAXM 16           // rows of x a call takes: the rows of a tile

static inline int tiles_permitted(void) {
#if TILES_EMULATED
    return 1;
#elif HAVE_TILES
    // Linux hands out the tile registers' state only to a process that asks (ARCH_REQ_XCOMP_PERM for
    // XFEATURE_XTILEDATA); asking again is harmless. It says no where the CPU or the hypervisor has no AMX.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

#if HAVE_TILES
struct TileConfig {                 // what LDTILECFG reads: palette 1, then each tile's bytes per row and rows
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// tiles 0, 1: the sums of two blocks (M x 16 float32); 2: a chunk of x (M x 32 bfloat16); 3, 4: two chunks of W
static void configure(int M) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 5; t++) {
        c.colsb[t] = 64;
        c.rows[t] = t < 3 ? M : 16;
    }
    // GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of the 64, so the stores to the rest could be
    // dropped as dead, and LDTILECFG then faults on whatever the stack held (seen here: a segfault that came and
    // went with unrelated edits). The empty asm with a memory clobber says all of `c` is read.
    __asm__ __volatile__("" : : "r"(&c) : "memory");
    _tile_loadconfig(&c);
}

static inline void prefetch_tile(const void *p, int bytes) {
    for (int i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + PF + i, _MM_HINT_T0);
}

// x (M, K) in bfloat16, 64-byte aligned rows of K (a multiple of 32)
template <class E>
static uint16_t *bf16_rows(const typename E::T *x, long n, std::vector<uint16_t> &buf) {
    buf.resize(n + 32);
    uint16_t *xa = buf.data() + ((64 - ((uintptr_t)buf.data() & 63)) & 63) / 2;
    to_bf16<E>(x, xa, n);
    return xa;
}

// Per row of xa (M x K bfloat16) and group of g columns (g a multiple of 32): the sum of its values, 16 lanes then across.
static void group_sums(const uint16_t *xa, int M, int K, int g, float *out) {
    for (int m = 0; m < M; m++)
        for (int s = 0; s < K / g; s++) {
            __m512 acc = _mm512_setzero_ps();
            for (int k = s * g; k < (s + 1) * g; k += 16)
                acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xa + (long)m * K + k))), 16)));
            out[(long)m * (K / g) + s] = _mm512_reduce_add_ps(acc);
        }
}

// Run body(task, c) over the pairs of 16-output blocks, in parallel, each thread with its tiles configured for M
// rows and a 64-byte aligned scratch of `scratch` floats.
template <class F>
static void over_pairs(int NB, int M, int scratch, F &&body) {
    const int tasks = (NB + 1) / 2;
    #pragma omp parallel
    {
        configure(M);
        std::vector<float> buf(scratch + 16);
        float *s = buf.data() + ((64 - ((uintptr_t)buf.data() & 63)) & 63) / 4;
        #pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) body(2 * t, NB - 2 * t < 2 ? 1 : 2, s);
        _tile_release();
    }
}

// y (M, N) = x W^T; W bfloat16 in the tile layout (N / 16, K / 32, 16, 32).
template <class E>
static void tiles_bf16(const typename E::T *x, int M, const uint16_t *w, typename E::T *y, int N, int K) {
    std::vector<uint16_t> xb;
    const uint16_t *xa = bf16_rows<E>(x, (long)M * K, xb);
    const int NB = N / 16, KC = K / 32;
    over_pairs(NB, M, 2 * 256, [&](int nb, int blocks, float *c) {
        const uint16_t *w0 = w + (long)nb * KC * 512, *w1 = w0 + (long)KC * 512;
        _tile_zero(0);
        _tile_zero(1);
        for (int kc = 0; kc < KC; kc++) {
            _tile_loadd(2, xa + 32 * kc, 2 * K);
            prefetch_tile(w0 + 512 * kc, 1024);
            _tile_loadd(3, w0 + 512 * kc, 64);
            _tile_dpbf16ps(0, 2, 3);
            if (blocks == 2) {
                prefetch_tile(w1 + 512 * kc, 1024);
                _tile_loadd(4, w1 + 512 * kc, 64);
                _tile_dpbf16ps(1, 2, 4);
            }
        }
        _tile_stored(0, c, 64);
        _tile_stored(1, c + 256, 64);
        for (int j = 0; j < blocks; j++)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < 16; n++) y[(long)m * N + 16 * (nb + j) + n] = E::put(c[256 * j + 16 * m + n]);
    });
}

// One int8 chunk (16 tile rows of 32 bytes) as a bfloat16 tile (16 rows of 32): int8 -> float32 -> bfloat16, exact.
static inline void int8_tile(const int8_t *q, uint16_t *t) {
    for (int kk = 0; kk < 16; kk++) {
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * kk))));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * kk + 16))));
        _mm512_store_si512(t + 32 * kk, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

// y (M, N) = scales[n] * (x W^T); W int8 in the tile layout (N / 16, K / 32, 16, 32), scales float32 (N,).
template <class E>
static void tiles_int8(const typename E::T *x, int M, const int8_t *w, const float *scales, typename E::T *y, int N, int K) {
    std::vector<uint16_t> xb;
    const uint16_t *xa = bf16_rows<E>(x, (long)M * K, xb);
    const int NB = N / 16, KC = K / 32;
    over_pairs(NB, M, 2 * 256 + 2 * 256, [&](int nb, int blocks, float *c) {
        uint16_t *t0 = (uint16_t *)(c + 512), *t1 = t0 + 512;       // the two chunks, as bfloat16 tiles
        const int8_t *w0 = w + (long)nb * KC * 512, *w1 = w0 + (long)KC * 512;
        _tile_zero(0);
        _tile_zero(1);
        for (int kc = 0; kc < KC; kc++) {
            _tile_loadd(2, xa + 32 * kc, 2 * K);
            prefetch_tile(w0 + 512 * kc, 512);
            int8_tile(w0 + 512 * kc, t0);
            _tile_loadd(3, t0, 64);
            _tile_dpbf16ps(0, 2, 3);
            if (blocks == 2) {
                prefetch_tile(w1 + 512 * kc, 512);
                int8_tile(w1 + 512 * kc, t1);
                _tile_loadd(4, t1, 64);
                _tile_dpbf16ps(1, 2, 4);
            }
        }
        _tile_stored(0, c, 64);
        _tile_stored(1, c + 256, 64);
        for (int j = 0; j < blocks; j++)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < 16; n++) {
                    int o = 16 * (nb + j) + n;
                    y[(long)m * N + o] = E::put(scales[o] * c[256 * j + 16 * m + n]);
                }
    });
}

// One int4 chunk as a bfloat16 tile. The chunk's 256 bytes come as four 64-byte groups of four tile rows: 32-bit
// lane n of group a holds output n's bytes of tile rows 4a .. 4a + 3, one a byte, each byte inputs 2kk (low
// nibble) and 2kk + 1 (high). Tile row kk = 4a + r is, in each lane, the table's value at the low nibble of byte
// r (low 16 bits) and at its high nibble (high 16 bits): two shifts bring those nibbles to bits 0-3 and 16-19 and
// a blend takes the low 16 bits of one, the high of the other; vpermw looks each 16-bit index up in a table of
// bfloat16 0..15 by its low 5 bits (the table repeats 0..15 twice, so the fifth bit, a neighbour's, is ignored).
static inline void int4_tile(const uint8_t *q, uint16_t *t, __m512i table) {
    for (int a = 0; a < 4; a++) {
        __m512i v = _mm512_loadu_si512(q + 64 * a);
        __m512i r0 = _mm512_mask_blend_epi16(0xAAAAAAAA, v, _mm512_slli_epi32(v, 12));
        __m512i r1 = _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_srli_epi32(v, 8), _mm512_slli_epi32(v, 4));
        __m512i r2 = _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_srli_epi32(v, 16), _mm512_srli_epi32(v, 4));
        __m512i r3 = _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_srli_epi32(v, 24), _mm512_srli_epi32(v, 12));
        uint16_t *o = t + 128 * a;
        _mm512_store_si512(o, _mm512_permutexvar_epi16(r0, table));
        _mm512_store_si512(o + 32, _mm512_permutexvar_epi16(r1, table));
        _mm512_store_si512(o + 64, _mm512_permutexvar_epi16(r2, table));
        _mm512_store_si512(o + 96, _mm512_permutexvar_epi16(r3, table));
    }
}

// y (M, N) = x W^T with W[n, k] = scales[n, k / g] * q[n, k] + offsets[n, k / g]; q in the tile layout
// (N / 16, K / 32, 4, 16, 4) bytes (int4_tile), scales and offsets float32 in blocks (N / 16, K / g, 16). g % 32 == 0.
template <class E>
static void tiles_int4(const typename E::T *x, int M, const uint8_t *w, const float *scales, const float *offsets,
                       typename E::T *y, int N, int K, int g) {
    std::vector<uint16_t> xb;
    const uint16_t *xa = bf16_rows<E>(x, (long)M * K, xb);
    const int NB = N / 16, KC = K / 32, G = K / g, cpg = g / 32;
    std::vector<float> xsum((long)M * G);           // per row of x and group: the sum of its bfloat16 values
    group_sums(xa, M, K, g, xsum.data());
    uint16_t tab[32];
    for (int i = 0; i < 32; i++) {
        float f = (float)(i & 15);
        tab[i] = BF16::put(f);
    }
    const __m512i table = _mm512_loadu_si512(tab);
    // scratch: two blocks' group sums (2 x 256), their running results (2 x 256), two bfloat16 tiles (2 x 256)
    over_pairs(NB, M, 6 * 256, [&](int nb, int blocks, float *c) {
        float *acc = c + 512;
        uint16_t *t0 = (uint16_t *)(c + 1024), *t1 = t0 + 512;
        const uint8_t *w0 = w + (long)nb * KC * 256, *w1 = w0 + (long)KC * 256;
        memset(acc, 0, 512 * sizeof(float));
        for (int s = 0; s < G; s++) {
            _tile_zero(0);
            _tile_zero(1);
            for (int kc = s * cpg; kc < (s + 1) * cpg; kc++) {
                _tile_loadd(2, xa + 32 * kc, 2 * K);
                prefetch_tile(w0 + 256 * kc, 256);
                int4_tile(w0 + 256 * kc, t0, table);
                _tile_loadd(3, t0, 64);
                _tile_dpbf16ps(0, 2, 3);
                if (blocks == 2) {
                    prefetch_tile(w1 + 256 * kc, 256);
                    int4_tile(w1 + 256 * kc, t1, table);
                    _tile_loadd(4, t1, 64);
                    _tile_dpbf16ps(1, 2, 4);
                }
            }
            _tile_stored(0, c, 64);
            _tile_stored(1, c + 256, 64);
            for (int j = 0; j < blocks; j++) {
                __m512 sc = _mm512_loadu_ps(scales + ((long)(nb + j) * G + s) * 16);
                __m512 of = _mm512_loadu_ps(offsets + ((long)(nb + j) * G + s) * 16);
                for (int m = 0; m < M; m++) {
                    float *a = acc + 256 * j + 16 * m;
                    __m512 v = _mm512_fmadd_ps(_mm512_load_ps(c + 256 * j + 16 * m), sc, _mm512_load_ps(a));
                    _mm512_store_ps(a, _mm512_fmadd_ps(of, _mm512_set1_ps(xsum[(long)m * G + s]), v));
                }
            }
        }
        for (int j = 0; j < blocks; j++)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < 16; n++) y[(long)m * N + 16 * (nb + j) + n] = E::put(acc[256 * j + 16 * m + n]);
    });
}
#endif
