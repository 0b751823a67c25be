// The top k entries of rows of logits (k = 1: argmax) and, if asked, each row's logsumexp, on the CPU:
// the kernel behind minillm/native/logits.py (read its docstring first). Built there at first use:
//     g++ -O3 -march=native -fopenmp -shared -fPIC rows.cpp
// PyTorch's CPU argmax and topk walk a 49,152-entry row one scalar at a time; here a row is read in
// vectors of 16 (vec.h) in two passes:
//   1. the maximum of every block of BLOCK entries (and whether the row holds a NaN: then the caller
//      asks PyTorch instead, so NaN keeps PyTorch's meaning);
//   2. tau = the k-th largest block maximum. The k block maxima >= tau are k entries >= tau, so the k
//      largest entries are all >= tau and lie in blocks whose maximum is >= tau: only those blocks are
//      read again, their entries >= tau collected and sorted (larger first, then lower index first,
//      so k = 1 returns the first maximum, as torch.argmax does).
// The logsumexp is m + log(sum exp(x - m)) with m the row's maximum, the exp a polynomial (vec.h).
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "vec.h"

#define BLOCK 256         // entries per block of pass 1 (16 vectors)
#define MAXK 64           // entries per row at most

struct Hit {
    float value;
    int64_t index;
};

static inline float hmax(vf m) {
    float r = m[0];
    for (int j = 1; j < W; j++) r = m[j] > r ? m[j] : r;
    return r;
}

// One row: 0, or 1 if it holds a NaN (nothing written).
template <class E>
static int top_row(const typename E::T *x, long V, int k, float *values, int64_t *indices, float *lse) {
    long nb = (V + BLOCK - 1) / BLOCK;
    std::vector<float> bmax(nb);
    vi nan = {};
    for (long b = 0; b < nb; b++) {
        long s = b * BLOCK, e = std::min(s + BLOCK, V);
        float m = -INFINITY;
        if (e - s == BLOCK) {
            vf mv = E::load(x + s);
            nan |= mv != mv;
            for (long j = s + W; j < e; j += W) {
                vf v = E::load(x + j);
                nan |= v != v;
                mv = v > mv ? v : mv;
            }
            m = hmax(mv);
        } else {
            for (long j = s; j < e; j++) {
                float v = E::get(x + j);
                if (v != v) return 1;
                m = v > m ? v : m;
            }
        }
        bmax[b] = m;
    }
    for (int j = 0; j < W; j++)
        if (nan[j]) return 1;
    std::vector<float> order(bmax);
    long kk = std::min<long>(k, nb);
    std::nth_element(order.begin(), order.begin() + (kk - 1), order.end(), std::greater<float>());
    float tau = kk < k ? -INFINITY : order[kk - 1];   // fewer blocks than k: every entry is a candidate
    std::vector<Hit> hits;
    for (long b = 0; b < nb; b++) {
        if (bmax[b] < tau) continue;
        long s = b * BLOCK, e = std::min(s + BLOCK, V);
        for (long j = s; j < e; j++) {
            float v = E::get(x + j);
            if (v >= tau) hits.push_back({v, j});
        }
    }
    std::partial_sort(hits.begin(), hits.begin() + k, hits.end(), [](const Hit &a, const Hit &b) {
        return a.value > b.value || (a.value == b.value && a.index < b.index);
    });
    for (int i = 0; i < k; i++) values[i] = hits[i].value, indices[i] = hits[i].index;
    if (lse) {
        float m = hits[0].value;
        if (m == INFINITY || m == -INFINITY) {     // a +inf entry, or every entry -inf: torch gives +-inf
            *lse = m;
            return 0;
        }
        vf acc = {};
        long j = 0;
        for (; j + W <= V; j += W) acc += vexp(E::load(x + j) - m);
        float sum = 0.0f;
        for (int l = 0; l < W; l++) sum += acc[l];
        for (; j < V; j++) sum += vexp((vf){} + (E::get(x + j) - m))[0];
        *lse = m + logf(sum);
    }
    return 0;
}

template <class E>
static int top_rows(const void *x, int rows, long V, long stride, int k, float *values, int64_t *indices,
                    float *lse) {
    if (rows < 1 || V < 1 || k < 1 || k > MAXK || k > V) return 2;
    int status = 0;
#pragma omp parallel for schedule(static, 1) reduction(| : status) if (rows > 1)
    for (int r = 0; r < rows; r++)
        status |= top_row<E>((const typename E::T *)x + (long)r * stride, V, k, values + (long)r * k,
                             indices + (long)r * k, lse ? lse + r : nullptr);
    return status;
}

extern "C" {
// x: rows of V logits, `stride` elements apart; values (rows, k) float32, indices (rows, k) int64 written;
// lse (rows,) float32, or NULL for none. Returns 0; 1 if some row holds a NaN; 2 for bad sizes.
int minillm_top_rows_bf16(const void *x, int rows, long V, long stride, int k, float *values, int64_t *indices,
                          float *lse) {
    return top_rows<BF16>(x, rows, V, stride, k, values, indices, lse);
}
int minillm_top_rows_f32(const void *x, int rows, long V, long stride, int k, float *values, int64_t *indices,
                         float *lse) {
    return top_rows<F32>(x, rows, V, stride, k, values, indices, lse);
}
int minillm_top_rows_max_k() { return MAXK; }
}
