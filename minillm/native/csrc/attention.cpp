// The attention kernel of attention.h, exported for minillm/native/attention.py (ctypes). Built there at first use:
//     g++ -O3 -march=native -fopenmp -shared -fPIC -DHD=<head_dim> attention.cpp
#include "attention.h"

extern "C" {
int minillm_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                           int B, int H, int R, int T, int S, long k_bs, long k_hs, long v_bs, long v_hs, long mask_bs,
                           float scale) {
    return attend<BF16>(q, k, v, mask, out, B, H, R, T, S, k_bs, k_hs, v_bs, v_hs, mask_bs, scale);
}
int minillm_attention_f32(const float *q, const float *k, const float *v, const uint8_t *mask, float *out,
                          int B, int H, int R, int T, int S, long k_bs, long k_hs, long v_bs, long v_hs, long mask_bs,
                          float scale) {
    return attend<F32>(q, k, v, mask, out, B, H, R, T, S, k_bs, k_hs, v_bs, v_hs, mask_bs, scale);
}
int minillm_attention_head_dim(void) { return HD; }
}
