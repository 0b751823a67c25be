#pragma once
// The attention kernel itself (attend<E>, for a head_dim HD fixed at build time): included by attention.cpp, which
// exports it to attention.py, and by step.cpp, whose native step calls it for every block.
// Attention for a few query rows over a KV cache, on the CPU: the kernel behind minillm/native/attention.py
// (read its docstring first). Built there at first use with the machine's own compiler:
//     g++ -O3 -march=native -fopenmp -shared -fPIC -DHD=<head_dim> attention.cpp
// Plain C++ with GCC/Clang vector extensions: a `vf` is 16 floats, one AVX-512 register (two AVX2 ones);
// the compiler picks the instructions for the CPU it builds on.
//
// The math is attention_ref's (model/llama.py): softmax(q k^T / sqrt(d), masked) v, with q's query heads
// grouped by the kv head they share (grouped-query attention: R = group x T rows per kv head).
// What makes it faster than PyTorch's matmul + softmax + matmul for T = 1..16 rows:
//   - one pass, no intermediate tensors, no calls between steps;
//   - keys past the last one any row may see (the unwritten end of a static cache) are never read;
//   - the work is split into (batch, kv head, 64-key chunk) items dealt to the threads in turn (a short
//     last chunk per head does not pile up on one thread), each item's rows scored in registers (8 or 4
//     rows x 16 keys, the keys transposed in registers), then merged per row as flash-decoding does.
// Chunk boundaries are multiples of 64 whatever the mask, so a query row's result depends only on its
// own inputs and mask row, not on which other rows share the call (plain and speculative decoding
// through one graph stay bit-equal). A row that may see no key gets zeros (attention_ref: NaN).
#include <float.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "vec.h"

#ifndef HD
#define HD 64
#endif
#define NC (HD / W)       // vectors in a head_dim row
#define RR 4              // query rows held in registers at a time (values)
#define RQ 8              // query rows scored at a time where more than RR remain: 8 sums in flight hide the FMA latency
#define CHUNK 64          // keys per work item
#define NB (CHUNK / W)    // key blocks in a chunk
#define MAXR 128          // query rows per kv head at most (group x T)

static_assert(HD % W == 0, "head_dim must be a multiple of 16");

// Scores of the N query rows from i0 against the W keys of block b (kt[d]: the keys' d-th values).
template <int N>
static inline void score_rows(const float *qf, const vf *kt, vf keep[][NB], vf sc[][NB], int i0, int R, int T, int b) {
    vf acc[N] = {};
    for (int d = 0; d < HD; d++)
        for (int ii = 0; ii < N; ii++) acc[ii] += qf[(i0 + ii) * HD + d] * kt[d];
    for (int ii = 0; ii < N && i0 + ii < R; ii++)
        sc[i0 + ii][b] = keep[(i0 + ii) % T][b] > 0.0f ? acc[ii] : (vf){} - FLT_MAX;
}

// One work item: the R rows `qf` (scaled, float32, padded with zero rows to a multiple of RQ) against keys
// [k0, k1) of one kv head. Writes each row's max score `pm`, sum of exp(score - max) `pl` and sum of exp(...) v `pacc`.
template <class E>
static void chunk(const float *qf, const typename E::T *kh, const typename E::T *vh_, const uint8_t *mask,
                  int R, int T, int S, int k0, int k1, float *pm, float *pl, float *pacc) {
    int nb = (k1 - k0 + W - 1) / W, nq = (R + RR - 1) / RR * RR;
    vf sc[MAXR + RQ][NB];                      // scores, then exp(score - max); -FLT_MAX where masked
    vf keep[16][NB];                           // 1 where query offset t may see the key (T <= 16)
    for (int t = 0; t < T; t++)
        for (int b = 0; b < nb; b++) {
            int s0 = k0 + b * W;
            if (s0 + W <= k1) {
                vb m; memcpy(&m, mask + (long)t * S + s0, W);
                keep[t][b] = __builtin_convertvector(m, vf);
            } else {
                for (int j = 0; j < W; j++) keep[t][b][j] = s0 + j < k1 ? mask[(long)t * S + s0 + j] : 0;
            }
        }
    for (int b = 0; b < nb; b++) {             // scores, W keys at a time: kt[d] holds the W keys' d-th values
        vf kt[HD];
        for (int c = 0; c < NC; c++) {         // W keys x W of their values, transposed in registers
            vf *block = kt + c * W;
            for (int j = 0; j < W; j++) {
                int s = k0 + b * W + j;
                block[j] = s < k1 ? E::load(kh + (long)s * HD + c * W) : (vf){};
            }
            transpose16(block);
        }
        for (int i0 = 0; i0 < R;) {            // each row's sum over d in one order, whichever group it falls in
            if (R - i0 > RR) { score_rows<RQ>(qf, kt, keep, sc, i0, R, T, b); i0 += RQ; }
            else { score_rows<RR>(qf, kt, keep, sc, i0, R, T, b); i0 += RR; }
        }
    }
    for (int i = 0; i < nq; i++) {             // softmax numerators against this chunk's max
        if (i >= R) { for (int b = 0; b < nb; b++) sc[i][b] = (vf){}; continue; }
        vf mx = (vf){} - FLT_MAX, sum = {};
        for (int b = 0; b < nb; b++) mx = sc[i][b] > mx ? sc[i][b] : mx;
        float m1 = -FLT_MAX, s1 = 0.0f;
        for (int j = 0; j < W; j++) m1 = mx[j] > m1 ? mx[j] : m1;
        for (int b = 0; b < nb; b++) {
            vf x = sc[i][b];
            sc[i][b] = x == -FLT_MAX ? (vf){} : vexp(x - m1);
            sum += sc[i][b];
        }
        for (int j = 0; j < W; j++) s1 += sum[j];
        pm[i] = m1; pl[i] = s1;
    }
    vf vals[CHUNK][NC];                        // the chunk's values as float32, converted once for all rows
    for (int s = k0; s < k1; s++)
        for (int c = 0; c < NC; c++) vals[s - k0][c] = E::load(vh_ + (long)s * HD + c * W);
    for (int i0 = 0; i0 < nq; i0 += RR) {      // numerators times values, RR rows in registers
        vf acc[RR][NC] = {};
        for (int s = k0; s < k1; s++) {
            const vf *val = vals[s - k0];
            for (int ii = 0; ii < RR; ii++) {
                float p = sc[i0 + ii][(s - k0) / W][(s - k0) % W];
                for (int c = 0; c < NC; c++) acc[ii][c] += p * val[c];
            }
        }
        for (int ii = 0; ii < RR && i0 + ii < R; ii++) memcpy(pacc + (long)(i0 + ii) * HD, acc[ii], sizeof(float) * HD);
    }
}

// q, out (B, H, R, HD) contiguous; k, v (B, H, S, HD) with the given batch and head strides (rows contiguous);
// mask (B or 1, 1, T, S) bool, mask_bstride 0 when shared. Returns 0, or 1 for shapes it does not take.
template <class E>
static int attend(const typename E::T *q, const typename E::T *k, const typename E::T *v, const uint8_t *mask,
                  typename E::T *out, int B, int H, int R, int T, int S, long k_bs, long k_hs, long v_bs,
                  long v_hs, long mask_bs, float scale) {
    if (R > MAXR || T > 16 || T < 1 || R % T) return 1;
    std::vector<int> spans(B);
    int used = 0;                              // chunks holding a key some row of some batch may see
    for (int b = 0; b < B; b++) {
        int span = 0;
        for (int t = 0; t < T; t++)
            for (int s = S - 1; s >= span; s--) if (mask[b * mask_bs + (long)t * S + s]) { span = s + 1; break; }
        spans[b] = span;
        int c = (span + CHUNK - 1) / CHUNK;
        used = c > used ? c : used;
    }
    if (used == 0) used = 1;
    long stride = (long)R * (HD + 2);          // one item's partial results
    float *part = (float *)malloc(sizeof(float) * (long)B * H * used * stride);
    if (!part) return 2;
    #pragma omp parallel
    {
        #pragma omp for schedule(static, 1)
        for (long item = 0; item < (long)B * H * used; item++) {
            int c = item % used, h = (item / used) % H, b = item / ((long)used * H);
            int k0 = c * CHUNK, k1 = k0 + CHUNK < spans[b] ? k0 + CHUNK : spans[b];
            float *p = part + item * stride;
            if (k1 <= k0) {                    // nothing this batch's rows may see here
                for (int i = 0; i < R; i++) { p[i] = -FLT_MAX; p[R + i] = 0.0f; }
                continue;
            }
            float qf[MAXR + RQ][HD];
            const typename E::T *qh = q + ((long)b * H + h) * R * HD;
            for (int i = 0; i < (R + RQ - 1) / RQ * RQ; i++)
                for (int d = 0; d < HD; d++) qf[i][d] = i < R ? E::get(qh + (long)i * HD + d) * scale : 0.0f;
            chunk<E>(&qf[0][0], k + b * k_bs + h * k_hs, v + b * v_bs + h * v_hs, mask + b * mask_bs, R, T, S,
                     k0, k1, p, p + R, p + 2 * R);
        }
        #pragma omp for schedule(static)
        for (long row = 0; row < (long)B * H * R; row++) {   // merge each row's chunks, in chunk order
            long bh = row / R;
            int i = row % R;
            float m = -FLT_MAX, l = 0.0f, acc[HD] = {};
            for (int c = 0; c < used; c++) {
                float pm = part[(bh * used + c) * stride + i];
                m = pm > m ? pm : m;
            }
            for (int c = 0; c < used; c++) {
                const float *p = part + (bh * used + c) * stride;
                if (p[R + i] == 0.0f) continue;
                float w = vexp((vf){} + (p[i] - m))[0];
                l += w * p[R + i];
                for (int d = 0; d < HD; d++) acc[d] += w * p[2 * R + (long)i * HD + d];
            }
            float inv = l > 0.0f ? 1.0f / l : 0.0f;
            for (int d = 0; d < HD; d++) out[row * HD + d] = E::put(acc[d] * inv);
        }
    }
    free(part);
    return 0;
}

