#pragma once
// A portable stand-in for the six AMX intrinsics tiles.h uses, so the tile kernels' own logic (the tile layout,
// the loops over blocks and chunks, int8 and int4 turned into bfloat16 tiles, the int4 group scaling, the threads)
// runs, and is tested, on a CPU without AMX: built only with -DMINILLM_TILES_EMULATE (MINILLM_TILES=emulate), under
// op names of its own, never chosen for speed (a scalar loop where the hardware does 16 x 16 x 32 products at once).
// The registers are per thread, as the hardware's are; the arithmetic is Intel's pseudo-code for TDPBF16PS:
//     for m < rows(dst), k < colsb(a) / 4, n < colsb(dst) / 4:
//         dst[m][n] += f32(a[m][2k]) * f32(b[k][2n]) + f32(a[m][2k + 1]) * f32(b[k][2n + 1])
// (each bfloat16 product is exact in float32; the hardware may round the two-term sum once where this rounds
// twice, so emulated and real tiles may differ in the last bit, never in the rule that row m depends on row m alone).
#include <stdint.h>
#include <string.h>

struct EmulatedTiles {
    uint16_t colsb[8];
    uint8_t rows[8];
    alignas(64) uint8_t data[8][16][64];
};
static thread_local EmulatedTiles emulated_tiles;

static inline float emulated_bf16(const uint8_t *p) {
    uint32_t bits = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// LDTILECFG's 64 bytes: palette, start row, 14 reserved, then 16 x colsb (uint16), then 16 x rows (uint8)
static inline void emulated_loadconfig(const void *config) {
    const uint8_t *c = (const uint8_t *)config;
    for (int t = 0; t < 8; t++) {
        emulated_tiles.colsb[t] = (uint16_t)(c[16 + 2 * t] | (c[17 + 2 * t] << 8));
        emulated_tiles.rows[t] = c[48 + t];
    }
    memset(emulated_tiles.data, 0, sizeof emulated_tiles.data);
}

static inline void emulated_zero(int t) { memset(emulated_tiles.data[t], 0, sizeof emulated_tiles.data[t]); }

static inline void emulated_loadd(int t, const void *base, long stride) {
    for (int r = 0; r < emulated_tiles.rows[t]; r++)
        memcpy(emulated_tiles.data[t][r], (const uint8_t *)base + r * stride, emulated_tiles.colsb[t]);
}

static inline void emulated_stored(int t, void *base, long stride) {
    for (int r = 0; r < emulated_tiles.rows[t]; r++)
        memcpy((uint8_t *)base + r * stride, emulated_tiles.data[t][r], emulated_tiles.colsb[t]);
}

static inline void emulated_dpbf16ps(int dst, int a, int b) {
    EmulatedTiles &e = emulated_tiles;
    for (int m = 0; m < e.rows[dst]; m++) {
        float *d = (float *)e.data[dst][m];
        for (int k = 0; k < e.colsb[a] / 4; k++)
            for (int n = 0; n < e.colsb[dst] / 4; n++) {
                const uint8_t *x = e.data[a][m] + 4 * k, *w = e.data[b][k] + 4 * n;
                d[n] += emulated_bf16(x) * emulated_bf16(w);
                d[n] += emulated_bf16(x + 2) * emulated_bf16(w + 2);
            }
    }
}

#define _tile_loadconfig(config) emulated_loadconfig(config)
#define _tile_zero(t) emulated_zero(t)
#define _tile_loadd(t, base, stride) emulated_loadd(t, base, stride)
#define _tile_stored(t, base, stride) emulated_stored(t, base, stride)
#define _tile_dpbf16ps(dst, a, b) emulated_dpbf16ps(dst, a, b)
#define _tile_release() ((void)0)
