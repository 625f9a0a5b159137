/* Quantized matrix products for CPUs: y = x @ W^T with W stored as int8 (one scale per row) or
 * int4 (groups along the row, a float16 scale and zero each), the way llama.cpp's Q8_0 / Q4_1
 * dot products work: the activations are quantized to int8 in blocks of 32 (a float scale and
 * the block's float sum each), and each block's dot product is one integer multiply-add of 32
 * byte pairs (AVX2: vpmaddubsw + vpmaddwd; with VNNI vpdpbusd), converted to float once per block.
 *
 * Built by cpu_kernels.py with the system C compiler for this CPU (-march=native) and loaded
 * through ctypes; threads come from the OpenMP runtime torch already loaded (same soname), so
 * torch.set_num_threads sets them. Without AVX2 the portable loops below run (slower, same
 * results up to float summation order).
 *
 * Layouts (what quant.py stores, unchanged):
 *   int8: w int8 (rows, cols), scales float32 (rows)
 *   int4: w uint8 (rows, cols/2), byte j = column 2j in the high nibble, 2j+1 in the low;
 *         scales, zeros float16 (rows, cols/group); w ~ (q - 8) * scale + zero.
 * Activations: xq int8 (B, cols) in blocks of 32; for int4 products each block holds its even
 * columns first, then its odd ones (so the nibbles need no shuffle); xd float (B, cols/32) the block
 * scales, xs float (B, cols/32) the blocks' float sums (for the int4 zero term).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QK_AVX2 1
#endif

#define QK 32
#define TILE_B 4     /* activation rows per pass over a weight row (the row stays in L1) */
#define CHUNK_B 64   /* activation rows per sweep over all weights (their int8 copy stays in L2) */
/* A decode step's int8 / int4 products read each weight row once, in order; asking for the bytes
 * this far ahead of the loads keeps more of them in flight than the hardware prefetcher does
 * (measured on the AVX2 machine: the model's int8 products 10-20% faster, flat from 1.5 to 4 KB,
 * less at 256-512 bytes; the float32 kernel, fewer instructions a byte, was slower with it). */
#define PREFETCH_BYTES 2048

static float f16_to_f32(uint16_t h) {
#ifdef QK_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, bits;
    if (e == 0) {  /* zero or subnormal */
        float f = ldexpf((float)m, -24);
        return s ? -f : f;
    }
    bits = e == 31 ? s | 0x7f800000u | (m << 13) : s | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#ifdef QK_AVX2
/* The sum and the largest of a register's 8 floats (halves, then pairs, then the last two). */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#endif

/* Quantize B rows of x (B, cols) to int8 blocks of 32: symmetric, scale max|x|/127; xs gets each
 * block's sum as quantized (scale * sum of its integers), so the int4 zero term sees the same
 * rounded activations as the rest of the product (llama.cpp's Q8_1 does the same).
 * nibble_order (for int4 weights): blocks go in pairs (2j, 2j+1) of 64 bytes: both blocks' even
 * columns (16 + 16 bytes), then both blocks' odd columns; a last unpaired block holds its even
 * columns, then its odd ones. That is where one 32-byte load of int4 weights puts them. */
void qk_quantize_x(const float *x, int64_t B, int64_t cols, int nibble_order, int8_t *xq, float *xd, float *xs) {
    const int64_t nblk = cols / QK;
#pragma omp parallel for schedule(static) if (B * cols >= 65536)
    for (int64_t i = 0; i < B * nblk; i++) {
        const int64_t b = i / nblk, k = i % nblk;
        const float *v = x + b * cols + k * QK;
        int8_t *row = xq + b * cols;
        int8_t q[QK];
        int32_t sum = 0;
        float d;
#ifdef QK_AVX2
        {  /* the loop below in vectors: a decode step quantizes ~100k activations */
            const __m256 sign = _mm256_set1_ps(-0.f);
            __m256 f[4], m = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, f[j] = _mm256_loadu_ps(v + 8 * j)));
            const float amax = hmax8(m);
            d = amax / 127.f;
            const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
            __m256i n[4];  /* rounded to nearest, ties to even, as lrintf */
            for (int j = 0; j < 4; j++) n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(f[j], inv));
            const __m256i s = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
            /* packs interleave 128-bit lanes; the permute puts the 32 bytes back in order */
            const __m256i p16 = _mm256_packs_epi32(n[0], n[1]), p16b = _mm256_packs_epi32(n[2], n[3]);
            const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)q, p8);
        }
#else
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
        d = amax / 127.f;
        const float inv = d > 0.f ? 1.f / d : 0.f;
        for (int j = 0; j < QK; j++) {
            q[j] = (int8_t)lrintf(v[j] * inv);
            sum += q[j];
        }
#endif
        if (!nibble_order) {
            memcpy(row + k * QK, q, QK);
        } else {
            const int paired = (k ^ 1) < nblk;
            int8_t *ev = row + (k & ~1) * QK + (paired ? (k & 1) * (QK / 2) : 0);
            int8_t *od = ev + (paired ? QK : QK / 2);
            for (int j = 0; j < QK / 2; j++) {
                ev[j] = q[2 * j];
                od[j] = q[2 * j + 1];
            }
        }
        xd[i] = d;
        xs[i] = d * (float)sum;
    }
}

#ifdef QK_AVX2

/* 8 int32 partial sums of 32 products u8 * s8 (u <= 15 or |s8| <= 127 products: no saturation) */
/* u8 x s8 byte products summed in fours into 8 int32 lanes, added to acc. With VNNI one instruction
 * (vpdpbusd, AVX512-VNNI with VL or AVX-VNNI); without it vpmaddubsw + vpmaddwd. The sums are the
 * same integers both ways: every caller's pairs stay below int16 saturation (u <= 15, or |u|, |s|
 * <= 127), so a VNNI build's results are bit-identical to an AVX2 build's. */
static inline __m256i dot_u8s8_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
    return dot_u8s8_acc(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Two blocks of int4 nibbles (hi: even columns, lo: odd) against their activations: int32 sums,
 * lanes 0-3 for the first block, 4-7 for the second. */
static inline __m256i dot_nibbles(__m256i hi, __m256i lo, __m256i x1, __m256i x2) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
    return dot_u8s8_acc(dot_u8s8_acc(_mm256_setzero_si256(), hi, x1), lo, x2);
#else
    /* 16-bit sums stay below 2 * 2 * 15 * 127: no saturation */
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(hi, x1), _mm256_maddubs_epi16(lo, x2)),
                             _mm256_set1_epi16(1));
#endif
}
#endif

#ifdef QK_AVX2
/* Two blocks of int4 weights (32 bytes) against their activations (64 bytes, nibble order): 8 float
 * partial sums, lanes 0-3 for block k, 4-7 for block k+1. (Group sizes other than 32.) */
static inline __m256 q4_pair(const uint8_t *wp, const int8_t *xp) {
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)wp);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m15);  /* even columns */
    const __m256i lo = _mm256_and_si256(raw, m15);                        /* odd columns */
    const __m256i x1 = _mm256_loadu_si256((const __m256i *)xp), x2 = _mm256_loadu_si256((const __m256i *)(xp + QK));
    return _mm256_cvtepi32_ps(dot_nibbles(hi, lo, x1, x2));
}

/* Group size 32 (one scale per block): 8 blocks' scales convert and multiply as one vector; the
 * weights of a pair of blocks are unpacked once for NB activation rows. */
static inline __attribute__((always_inline)) void q4_row_g32_tile(const uint8_t *wr, const uint16_t *sr, const uint16_t *zr, int64_t cols,
                                   const int8_t *xq, const float *xd, const float *xs, const int NB, float *y,
                                   int64_t ldy) {
    const int64_t nblk = cols / QK, n8 = nblk / 8 * 8;
    const __m256i idx0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), two = _mm256_set1_epi32(2);
    const __m256i m15 = _mm256_set1_epi8(15);
    __m256 acc[TILE_B], zacc[TILE_B];
    for (int b = 0; b < NB; b++) acc[b] = zacc[b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < n8; k += 8) {
        const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + k)));
        const __m256 m8 = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zr + k))));
        __m256 d8[TILE_B];
        for (int b = 0; b < NB; b++) {
            zacc[b] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xs + b * nblk + k), zacc[b]);  /* zero term */
            d8[b] = _mm256_mul_ps(s8, _mm256_loadu_ps(xd + b * nblk + k));
        }
        __m256i idx = idx0;
        for (int p = 0; p < 4; p++, idx = _mm256_add_epi32(idx, two)) {
            const int64_t kp = k + 2 * p;
            if (NB == 1) _mm_prefetch((const char *)(wr + kp * (QK / 2) + PREFETCH_BYTES), _MM_HINT_T0);
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(wr + kp * (QK / 2)));
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m15);  /* even columns */
            const __m256i lo = _mm256_and_si256(raw, m15);                        /* odd columns */
            for (int b = 0; b < NB; b++) {
                const int8_t *xp = xq + b * cols + kp * QK;
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)xp);
                const __m256i x2 = _mm256_loadu_si256((const __m256i *)(xp + QK));
                acc[b] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(d8[b], idx),
                                         _mm256_cvtepi32_ps(dot_nibbles(hi, lo, x1, x2)), acc[b]);
            }
        }
    }
    float tail[TILE_B] = {0};
    for (; k + 1 < nblk; k += 2) {  /* the last pairs of blocks (nblk % 8) */
        const float sa = _cvtsh_ss(sr[k]), sb = _cvtsh_ss(sr[k + 1]);
        const float ma = _cvtsh_ss(zr[k]) - 8.f * sa, mb = _cvtsh_ss(zr[k + 1]) - 8.f * sb;
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(wr + k * (QK / 2)));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m15), lo = _mm256_and_si256(raw, m15);
        for (int b = 0; b < NB; b++) {
            const int8_t *xp = xq + b * cols + k * QK;
            const float *xdb = xd + b * nblk, *xsb = xs + b * nblk;
            const __m256i p32 = dot_nibbles(hi, lo, _mm256_loadu_si256((const __m256i *)xp),
                                            _mm256_loadu_si256((const __m256i *)(xp + QK)));
            const __m256 d = _mm256_set_m128(_mm_set1_ps(sb * xdb[k + 1]), _mm_set1_ps(sa * xdb[k]));
            acc[b] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p32), acc[b]);
            tail[b] += ma * xsb[k] + mb * xsb[k + 1];
        }
    }
    for (int b = 0; b < NB; b++) {
        const int8_t *xb = xq + b * cols;
        if (k < nblk) {  /* an unpaired last block */
            const float s = _cvtsh_ss(sr[k]), m = _cvtsh_ss(zr[k]) - 8.f * s;
            const uint8_t *wb = wr + k * (QK / 2);
            const int8_t *ev = xb + k * QK, *od = ev + QK / 2;
            int32_t dot = 0;
            for (int i = 0; i < QK / 2; i++) dot += (wb[i] >> 4) * ev[i] + (wb[i] & 15) * od[i];
            tail[b] += s * xd[b * nblk + k] * (float)dot + m * xs[b * nblk + k];
        }
        y[b * ldy] = hsum8(acc[b]) + hsum8(zacc[b]) + tail[b];
    }
}

static inline void q4_rows_g32(const uint8_t *w, const uint16_t *sc, const uint16_t *ze, int64_t r0, int64_t r1,
                               int64_t cols, const int8_t *xq, const float *xd, const float *xs, int nb, float *y,
                               int64_t ldy) {
    const int64_t nblk = cols / QK;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * (cols / 2);
        const uint16_t *sr = sc + r * nblk, *zr = ze + r * nblk;
        for (int b = 0; b < nb; b += TILE_B) {
            const int8_t *xp = xq + b * cols;
            const float *xdp = xd + b * nblk, *xsp = xs + b * nblk;
            float *yp = y + b * ldy + r;
            switch (nb - b < TILE_B ? nb - b : TILE_B) {  /* constant tile sizes: accumulators in registers */
            case 1: q4_row_g32_tile(wr, sr, zr, cols, xp, xdp, xsp, 1, yp, ldy); break;
            case 2: q4_row_g32_tile(wr, sr, zr, cols, xp, xdp, xsp, 2, yp, ldy); break;
            case 3: q4_row_g32_tile(wr, sr, zr, cols, xp, xdp, xsp, 3, yp, ldy); break;
            default: q4_row_g32_tile(wr, sr, zr, cols, xp, xdp, xsp, 4, yp, ldy); break;
            }
        }
    }
}
#endif

/* y[b, r] for rows [r0, r1) of an int4 matrix and nb activation rows (each row of weights stays in L1 while they pass). `tmp`: per-thread
 * scratch of 6 * nblk floats. */
static inline void q4_rows(const uint8_t *w, const uint16_t *sc, const uint16_t *ze, int64_t r0, int64_t r1,
                           int64_t cols, int64_t group, const int8_t *xq, const float *xd, const float *xs,
                           int nb, float *y, int64_t ldy, float *tmp) {
    const int64_t nblk = cols / QK, gblk = group / QK, ngrp = cols / group;
    float *sf = tmp, *mf = tmp + nblk, *d4 = tmp + 2 * nblk;  /* per block: scale, zero term; scale x4 */
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * (cols / 2);
        /* this row's group parameters, per block: w = q * s + m with m = zero - 8 s */
        for (int64_t g = 0; g < ngrp; g++) {
            const float s = f16_to_f32(sc[r * ngrp + g]), m = f16_to_f32(ze[r * ngrp + g]) - 8.f * s;
            for (int64_t k = g * gblk; k < (g + 1) * gblk; k++) {
                sf[k] = s;
                mf[k] = m;
            }
        }
        for (int b = 0; b < nb; b++) {
            const int8_t *xb = xq + b * cols;
            const float *xdb = xd + b * nblk, *xsb = xs + b * nblk;
            float zsum = 0.f, acc_s = 0.f;
            for (int64_t k = 0; k < nblk; k++) {
                zsum += mf[k] * xsb[k];
                d4[4 * k] = d4[4 * k + 1] = d4[4 * k + 2] = d4[4 * k + 3] = sf[k] * xdb[k];
            }
            int64_t k = 0;
#ifdef QK_AVX2
            __m256 acc = _mm256_setzero_ps();
            for (; k + 1 < nblk; k += 2)  /* two blocks: 32 bytes of weights, 64 of activations */
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(d4 + 4 * k), q4_pair(wr + k * (QK / 2), xb + k * QK), acc);
            acc_s = hsum8(acc);
#endif
            for (; k < nblk; k++) {  /* portable loop; with AVX2 only a last unpaired block */
                const uint8_t *wb = wr + k * (QK / 2);
                const int paired = (k ^ 1) < nblk;
                const int8_t *ev = xb + (k & ~1) * QK + (paired ? (k & 1) * (QK / 2) : 0);
                const int8_t *od = ev + (paired ? QK : QK / 2);
                int32_t dot = 0;
                for (int j = 0; j < QK / 2; j++) dot += (wb[j] >> 4) * ev[j] + (wb[j] & 15) * od[j];
                acc_s += d4[4 * k] * (float)dot;
            }
            y[b * ldy + r] = acc_s + zsum;
        }
    }
}

#ifdef QK_AVX2
/* q8_rows for one activation row (a decode step), its accumulators in registers: with the tile
 * loop's runtime row count the compiler kept them in memory, and each block's FMA waited on the
 * last one's store (measured: the model's int8 products at ~half of memory speed). Two
 * accumulators, alternate blocks, halve the FMA chain. */
static inline __m256 q8_block(const int8_t *wp, const int8_t *xp) {
    /* one block's 32 weight bytes times its 32 activation bytes: 8 int32 partial sums, as floats */
    const __m256i w = _mm256_loadu_si256((const __m256i *)wp), x = _mm256_loadu_si256((const __m256i *)xp);
    return _mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)));
}

static inline void q8_rows_b1(const int8_t *w, const float *sc, int64_t r0, int64_t r1, int64_t cols,
                              const int8_t *xq, const float *xd, float *y) {
    const int64_t nblk = cols / QK;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * cols;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 1 < nblk; k += 2) {
            _mm_prefetch((const char *)(wr + k * QK + PREFETCH_BYTES), _MM_HINT_T0);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(xd[k]), q8_block(wr + k * QK, xq + k * QK), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(xd[k + 1]), q8_block(wr + (k + 1) * QK, xq + (k + 1) * QK), acc1);
        }
        if (k < nblk) acc0 = _mm256_fmadd_ps(_mm256_set1_ps(xd[k]), q8_block(wr + k * QK, xq + k * QK), acc0);
        y[r] = hsum8(_mm256_add_ps(acc0, acc1)) * sc[r];
    }
}
#endif

/* y[b, r] for rows [r0, r1) of an int8 matrix with per-row scales. */
static inline __attribute__((always_inline)) void q8_rows(const int8_t *w, const float *sc, int64_t r0, int64_t r1,
                                                          int64_t cols, const int8_t *xq, const float *xd, const int nb,
                                                          float *y, int64_t ldy) {
    const int64_t nblk = cols / QK;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * cols;
        float acc_s[TILE_B] = {0};
#ifdef QK_AVX2
        __m256 acc[TILE_B];
        for (int b = 0; b < nb; b++) acc[b] = _mm256_setzero_ps();
        for (int64_t k = 0; k < nblk; k++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + k * QK));
            const __m256i aw = _mm256_sign_epi8(wv, wv);  /* |w|: vpmaddubsw wants one unsigned side */
            for (int b = 0; b < nb; b++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * cols + k * QK));
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(aw, _mm256_sign_epi8(xv, wv)));
                acc[b] = _mm256_fmadd_ps(_mm256_set1_ps(xd[b * nblk + k]), p, acc[b]);
            }
        }
        for (int b = 0; b < nb; b++) acc_s[b] = hsum8(acc[b]);
#else
        for (int64_t k = 0; k < nblk; k++) {
            const int8_t *wb = wr + k * QK;
            for (int b = 0; b < nb; b++) {
                const int8_t *xb = xq + b * cols + k * QK;
                int32_t dot = 0;
                for (int j = 0; j < QK; j++) dot += wb[j] * xb[j];
                acc_s[b] += xd[b * nblk + k] * (float)dot;
            }
        }
#endif
        for (int b = 0; b < nb; b++) y[b * ldy + r] = acc_s[b] * sc[r];
    }
}

/* Rows are split between threads in runs of 16 (a thread reads whole cache lines of weights);
 * activation rows go in chunks of CHUNK_B, so a large prefill re-reads the weights once per
 * chunk while its int8 activations stay in cache. */
#define ROW_RUN 16


/* Returns nonzero when a thread could not have the scratch its rows need (their output is then
 * not written: the caller must not use y). */
int qk_mm_q4(const uint8_t *w, const uint16_t *sc, const uint16_t *ze, int64_t rows, int64_t cols, int64_t group,
             const int8_t *xq, const float *xd, const float *xs, int64_t B, float *y) {
    const int64_t nblk = cols / QK;
    int failed = 0;
    for (int64_t c0 = 0; c0 < B; c0 += CHUNK_B) {
        const int64_t c1 = c0 + CHUNK_B < B ? c0 + CHUNK_B : B;
#pragma omp parallel
        {
            float *tmp = malloc(6 * nblk * sizeof(float));
#pragma omp for schedule(static)
            for (int64_t r0 = 0; r0 < rows; r0 += ROW_RUN) {
                const int64_t r1 = r0 + ROW_RUN < rows ? r0 + ROW_RUN : rows;
#ifdef QK_AVX2
                if (group == QK)
                    q4_rows_g32(w, sc, ze, r0, r1, cols, xq + c0 * cols, xd + c0 * nblk, xs + c0 * nblk,
                                (int)(c1 - c0), y + c0 * rows, rows);
                else
#endif
                if (tmp)
                    q4_rows(w, sc, ze, r0, r1, cols, group, xq + c0 * cols, xd + c0 * nblk, xs + c0 * nblk,
                            (int)(c1 - c0), y + c0 * rows, rows, tmp);
                else {
#pragma omp atomic write
                    failed = 1;
                }
            }
            free(tmp);
        }
    }
    return failed;
}

void qk_mm_q8(const int8_t *w, const float *sc, int64_t rows, int64_t cols, const int8_t *xq, const float *xd,
              int64_t B, float *y) {
    const int64_t nblk = cols / QK;
    for (int64_t c0 = 0; c0 < B; c0 += CHUNK_B) {
        const int64_t c1 = c0 + CHUNK_B < B ? c0 + CHUNK_B : B;
#pragma omp parallel for schedule(static)
        for (int64_t r0 = 0; r0 < rows; r0 += ROW_RUN) {
            const int64_t r1 = r0 + ROW_RUN < rows ? r0 + ROW_RUN : rows;
            for (int64_t b = c0; b < c1; b += TILE_B) {
                const int nb = (int)(c1 - b < TILE_B ? c1 - b : TILE_B);
                const int8_t *xb = xq + b * cols;
                const float *db = xd + b * nblk;
                float *yb = y + b * rows;
                switch (nb) {  /* constant tile sizes: the accumulators stay in registers */
#ifdef QK_AVX2
                case 1: q8_rows_b1(w, sc, r0, r1, cols, xb, db, yb); break;
#else
                case 1: q8_rows(w, sc, r0, r1, cols, xb, db, 1, yb, rows); break;
#endif
                case 2: q8_rows(w, sc, r0, r1, cols, xb, db, 2, yb, rows); break;
                case 3: q8_rows(w, sc, r0, r1, cols, xb, db, 3, yb, rows); break;
                default: q8_rows(w, sc, r0, r1, cols, xb, db, TILE_B, yb, rows); break;
                }
            }
        }
    }
}

/* One product with its own activation quantization: y (B, rows) = x (B, cols) @ W^T. Returns
 * nonzero when scratch memory could not be had. */
int qk_linear_q4(const float *x, int64_t B, const uint8_t *w, const uint16_t *sc, const uint16_t *ze, int64_t rows,
                 int64_t cols, int64_t group, float *y) {
    const int64_t nblk = cols / QK;
    int8_t *xq = malloc(B * cols + 2 * B * nblk * sizeof(float));
    if (!xq) return 1;
    float *xd = (float *)(xq + B * cols), *xs = xd + B * nblk;
    qk_quantize_x(x, B, cols, 1, xq, xd, xs);
    const int err = qk_mm_q4(w, sc, ze, rows, cols, group, xq, xd, xs, B, y);
    free(xq);
    return err;
}

int qk_linear_q8(const float *x, int64_t B, const int8_t *w, const float *sc, int64_t rows, int64_t cols, float *y) {
    const int64_t nblk = cols / QK;
    int8_t *xq = malloc(B * cols + 2 * B * nblk * sizeof(float));
    if (!xq) return 1;
    float *xd = (float *)(xq + B * cols), *xs = xd + B * nblk;
    qk_quantize_x(x, B, cols, 0, xq, xd, xs);
    qk_mm_q8(w, sc, rows, cols, xq, xd, B, y);
    free(xq);
    return 0;
}

/* ------------------------------------------------------------------ decode steps' small ops
 * A decode step (one new token per sequence) of a small model spends more time in the ~40 small
 * torch ops per layer around the matrix products (norms, rotary, cache writes, attention over the
 * cache, SiLU) than in the products: each costs microseconds of dispatch for a few hundred
 * floats. These do the same arithmetic in three calls per layer (model/transformer.py's decode
 * path); results match torch's up to float summation order. */

#ifdef QK_AVX2
/* e^x for 8 floats: Cephes' expf polynomial (relative error ~1e-7), as in avx_mathfun */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365478515625f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static float dot_f32(const float *a, const float *b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out = x / sqrt(mean(x^2) + eps) * w for B rows of dim; with `h` non-null, first h += x and the
 * norm is of the new h (a residual add and the next norm in one pass). */
void qk_rmsnorm(float *h, const float *x, const float *w, int64_t B, int64_t dim, float eps, float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * dim;
        float *src = (float *)xb;
        if (h) {
            src = h + b * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) src[i] += xb[i];
        }
        const float r = 1.f / sqrtf(dot_f32(src, src, dim) / (float)dim + eps);
        float *ob = out + b * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) ob[i] = src[i] * r * w[i];
    }
}

/* out (B, hidden) = silu(gu[:, :hidden]) * gu[:, hidden:], gu (B, 2 * hidden): w1 and w3 side by side */
void qk_silu_mul(const float *gu, int64_t B, int64_t hidden, float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *g = gu + b * 2 * hidden, *u = g + hidden;
        float *o = out + b * hidden;
        int64_t i = 0;
#ifdef QK_AVX2
        for (; i + 8 <= hidden; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < hidden; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* Rotate n_heads heads of hd floats in place by the complex angles rope (hd/2 (cos, sin) pairs):
 * interleaved pairs (x0, x1), as Meta's apply_rotary_emb. */
static void rope_heads(float *x, int64_t n_heads, int64_t hd, const float *rope) {
    for (int64_t j = 0; j < n_heads; j++) {
        float *v = x + j * hd;
        for (int64_t i = 0; i < hd / 2; i++) {
            const float c = rope[2 * i], s = rope[2 * i + 1], a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * c - b * s;
            v[2 * i + 1] = a * s + b * c;
        }
    }
}

/* exp(p[t] - m) for t < n, in place; returns their sum. */
static float exp_shifted(float *p, int64_t n, float m) {
    float sum = 0.f;
    int64_t t = 0;
#ifdef QK_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(m)));
        _mm256_storeu_ps(p + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; t < n; t++) {
        p[t] = expf(p[t] - m);
        sum += p[t];
    }
    return sum;
}

#define ATT_BLOCK 64  /* positions scored at a time: their k and v rows stay in L1 while used */

#ifdef QK_AVX2
/* q (hd floats) against 8 consecutive rows of k: the 8 dot products in one register. One
 * accumulator per row, so the FMAs do not wait on each other (a single dot product of 64 floats
 * is a chain of 8 dependent FMAs: that chain was most of the attention's time). */
static inline __m256 dot_8_rows(const float *q, const float *k, int64_t hd) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < hd; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + hd + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * hd + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * hd + d), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * hd + d), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * hd + d), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * hd + d), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * hd + d), a7);
    }
    /* three rounds of pairwise sums leave row j's total in lane j of each 128-bit half */
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

/* Attention of the g query heads q (g, hd) that share KV head j, over positions [t0, t1) of one
 * sequence, as an online softmax (a run of positions at a time, rescaling what came before when the
 * running maximum grows). The sequence's keys and values are in the pool cache_k, cache_v (blocks,
 * kvh, bs, hd): position t is row t % bs of block table[t / bs]. Leaves m[i] the largest score of
 * head i, s[i] the sum of exp(score - m[i]) and o (g, hd) the sum of exp(score - m[i]) v, not yet
 * divided by s[i]. p: scratch, g * ATT_BLOCK floats. */
static void attend_range(const float *q, int64_t g, int64_t hd, const float *cache_k, const float *cache_v,
                         const int64_t *table, int64_t kvh, int64_t j, int64_t bs, int64_t t0, int64_t t1,
                         float scale, float *m, float *s, float *o, float *p) {
    for (int64_t i = 0; i < g; i++) m[i] = -INFINITY, s[i] = 0.f;
    memset(o, 0, g * hd * sizeof(float));
    for (int64_t b0 = t0, n; b0 < t1; b0 += n) {
        const int64_t off = b0 % bs;  /* a run: up to ATT_BLOCK positions, within one cache block */
        n = t1 - b0 < ATT_BLOCK ? t1 - b0 : ATT_BLOCK;
        n = n < bs - off ? n : bs - off;
        const int64_t at = ((table[b0 / bs] * kvh + j) * bs + off) * hd;
        const float *kb = cache_k + at, *vb = cache_v + at;
        for (int64_t i = 0; i < g; i++) {
            float *pi = p + i * ATT_BLOCK, *oi = o + i * hd, top = m[i];
            const float *qi = q + i * hd;
            int64_t t = 0;
#ifdef QK_AVX2
            if (hd % 8 == 0)
                for (; t + 8 <= n; t += 8)
                    _mm256_storeu_ps(pi + t, _mm256_mul_ps(dot_8_rows(qi, kb + t * hd, hd), _mm256_set1_ps(scale)));
#endif
            for (; t < n; t++) pi[t] = dot_f32(qi, kb + t * hd, hd) * scale;
            for (t = 0; t < n; t++) top = pi[t] > top ? pi[t] : top;
            const float alpha = m[i] == -INFINITY ? 0.f : expf(m[i] - top);  /* rescales the earlier blocks */
            s[i] = s[i] * alpha + exp_shifted(pi, n, top);
            m[i] = top;
            int64_t d = 0;
#ifdef QK_AVX2
            for (; d + 64 <= hd; d += 64) {  /* 64 of the output's floats in 8 registers, 8 FMA chains */
                __m256 acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm256_mul_ps(_mm256_loadu_ps(oi + d + 8 * j), _mm256_set1_ps(alpha));
                for (t = 0; t < n; t++) {
                    const __m256 pt = _mm256_set1_ps(pi[t]);
                    const float *vt = vb + t * hd + d;
                    for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vt + 8 * j), acc[j]);
                }
                for (int j = 0; j < 8; j++) _mm256_storeu_ps(oi + d + 8 * j, acc[j]);
            }
#endif
            for (; d < hd; d++) {
                float acc = oi[d] * alpha;
                for (t = 0; t < n; t++) acc += pi[t] * vb[t * hd + d];
                oi[d] = acc;
            }
        }
    }
}

/* Attention of B tokens, each of one sequence at its own position. qkv (B, (h + 2 kvh) hd): the
 * fused q, k, v product of the tokens, rotated here in place; tables (B, width): each token's
 * sequence's block table, pos[b]: the token's position; rope (max_seq, hd/2, 2): cos, sin per
 * position; cache_k, cache_v (blocks, kvh, bs, hd), the paged pool. Writes every token's k and v at
 * its position first, then out[b] (h hd) = softmax(q k^T / sqrt(hd)) v over positions 0..pos, query
 * head i reading KV head i / (h / kvh) (tokens of one prompt chunk: causal, as the torch mask). Returns nonzero when scratch memory could not be had.
 * Work goes to threads as (token, KV head, span of positions): with fewer (token, KV head) pairs
 * than threads can share evenly (batch 1, 3 KV heads, 2 threads) each pair's positions are split
 * into spans, whose partial softmaxes are merged at the end (flash-decoding). Measured on the AVX2
 * machine, SmolLM2's shape (9 heads, 3 KV heads, 64 floats), one token: 28.6 -> 15.6 us a layer
 * at 170 positions, 72 -> 38 at 1000, against one dot product per (head, position) before; the
 * gain is the 8-row scores and 8 output registers (dependent FMA chains were the cost), not the
 * split, which alone changed nothing measurable. */
static int attend_tokens(const float *q, int64_t q_stride, int64_t B, int64_t h, int64_t kvh, int64_t hd,
                         const int64_t *tables, int64_t table_width, const int64_t *pos, const float *cache_k,
                         const float *cache_v, int64_t bs, float *out);

int qk_attend_decode(float *qkv, int64_t B, int64_t h, int64_t kvh, int64_t hd, const int64_t *tables,
                     int64_t table_width, const int64_t *pos, const float *rope, float *cache_k, float *cache_v,
                     int64_t bs, float *out) {
    const int64_t width = (h + 2 * kvh) * hd;
    for (int64_t b = 0; b < B; b++) {
        float *t = qkv + b * width;
        const int64_t block = tables[b * table_width + pos[b] / bs], off = pos[b] % bs;
        rope_heads(t, h + kvh, hd, rope + pos[b] * hd);  /* q heads, then k heads: same angles */
        for (int64_t j = 0; j < kvh; j++) {
            const int64_t at = ((block * kvh + j) * bs + off) * hd;
            memcpy(cache_k + at, t + (h + j) * hd, hd * sizeof(float));
            memcpy(cache_v + at, t + (h + kvh + j) * hd, hd * sizeof(float));
        }
    }
    return attend_tokens(qkv, width, B, h, kvh, hd, tables, table_width, pos, cache_k, cache_v, bs, out);
}

/* The attention alone, for the torch path's decode rows (their keys and values already in the
 * pool): q (B, h, hd) rotated; the rest as qk_attend_decode. It reads each sequence's blocks in
 * place, where the torch ops would first gather them into one tensor (a copy of every key and
 * value of the batch, per layer). */
int qk_attend_paged(const float *q, int64_t B, int64_t h, int64_t kvh, int64_t hd, const int64_t *tables,
                    int64_t table_width, const int64_t *pos, const float *cache_k, const float *cache_v, int64_t bs,
                    float *out) {
    return attend_tokens(q, h * hd, B, h, kvh, hd, tables, table_width, pos, cache_k, cache_v, bs, out);
}

/* out[b] (h hd) = softmax(q k^T / sqrt(hd)) v over positions 0..pos[b] of token b's sequence; q of
 * token b at q + b q_stride. */
static int attend_tokens(const float *q, int64_t q_stride, int64_t B, int64_t h, int64_t kvh, int64_t hd,
                         const int64_t *tables, int64_t table_width, const int64_t *pos, const float *cache_k,
                         const float *cache_v, int64_t bs, float *out) {
    const int64_t g = h / kvh;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    const int parallel = B * h * longest * hd >= (1 << 15);
    int64_t spans = 1;
#ifdef _OPENMP
    const int64_t want = 4 * (int64_t)omp_get_max_threads();  /* items, for an even share */
    if (parallel && B * kvh < want) {
        spans = (want + B * kvh - 1) / (B * kvh);
        const int64_t blocks = (longest + ATT_BLOCK - 1) / ATT_BLOCK;  /* a span is at least a block */
        spans = spans < blocks ? spans : blocks;
    }
#endif
    /* per work item i = (token b, KV head j, span c) and each of its g query heads: the span's max
     * score, sum of exps and unnormalised output (attend_range's m, s, o), item after item */
    const int64_t items = B * kvh * spans;
    float *ms = malloc(items * g * (hd + 2) * sizeof(float));
    if (!ms) return 1;
    float *ss = ms + items * g, *os = ss + items * g;
    int failed = 0;
    const float scale = 1.f / sqrtf((float)hd);
#pragma omp parallel if (parallel) reduction(| : failed)
    {
        float *p = malloc(g * ATT_BLOCK * sizeof(float));
        if (!p) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; i++) {
            if (!p) continue;
            const int64_t b = i / (kvh * spans), j = i / spans % kvh, c = i % spans, n = pos[b] + 1;
            const int64_t per = (n + spans - 1) / spans, t0 = c * per < n ? c * per : n;
            const int64_t t1 = t0 + per < n ? t0 + per : n;
            attend_range(q + b * q_stride + j * g * hd, g, hd, cache_k, cache_v, tables + b * table_width, kvh, j,
                         bs, t0, t1, scale, ms + i * g, ss + i * g, os + i * g * hd, p);
        }
        free(p);
    }
    if (!failed) {
        for (int64_t r = 0; r < B * h; r++) {  /* merge each head's spans */
            const int64_t b = r / h, j = r % h / g, e = r % g;
            const int64_t first = (b * kvh + j) * spans * g + e;  /* span c of this head: first + c g */
            float top = -INFINITY, total = 0.f, *y = out + r * hd;
            for (int64_t c = 0; c < spans; c++) top = ms[first + c * g] > top ? ms[first + c * g] : top;
            memset(y, 0, hd * sizeof(float));
            for (int64_t c = 0; c < spans; c++) {
                const int64_t at = first + c * g;
                if (ms[at] == -INFINITY) continue;  /* an empty span */
                const float w = expf(ms[at] - top);
                const float *o = os + at * hd;
                total += w * ss[at];
#pragma omp simd
                for (int64_t d = 0; d < hd; d++) y[d] += w * o[d];
            }
            const float inv = 1.f / total;
#pragma omp simd
            for (int64_t d = 0; d < hd; d++) y[d] *= inv;
        }
    }
    free(ms);
    return failed;
}

/* ------------------------------------------------------------------ float32 products of few rows
 * y (B, rows) = x (B, cols) @ W^T for float32 W and a few activation rows (decode steps). Reading
 * W is the whole cost: each pass streams four weight rows at once, each with its own accumulator,
 * so the loads keep the memory bus busy instead of waiting on one FMA chain; on the AVX2 machine
 * we measured, OpenBLAS's gemv read W at ~12 GB/s on two threads where this reads ~20. */
#define F32_ROWS 4

#ifdef QK_AVX2
/* y[b * ldy] = <weight row wr, activation row b> for NB activation rows (x, stride cols): the
 * weight row streamed once from memory, two cache lines a step (measured ~5% over one), each
 * activation row with four accumulators of its own. The sum order is the same for every NB (four
 * chains over 64 columns, an 8-wide tail into the first, the chains added pairwise, a scalar
 * tail), so a row's result does not depend on how many rows share its step: a verified proposal
 * or a batched decode gives a sequence what it gets alone. Register tiles of several weight rows
 * (4x2, 3x3, 2x4) read the same bytes but, streaming 2-4 weight rows at once, ran 2-row products
 * of a memory-resident 212 MB matrix at ~11 GB/s on one thread of the AVX2 VM, where this one
 * weight row at a time runs ~30. */
#define F32_STREAM(NB)                                                                           \
    static inline void f32_stream_##NB(const float *wr, int64_t cols, const float *x, float *y,  \
                                       int64_t ldy) {                                            \
        __m256 a[NB][4];                                                                         \
        for (int b = 0; b < NB; b++) a[b][0] = a[b][1] = a[b][2] = a[b][3] = _mm256_setzero_ps(); \
        int64_t c = 0;                                                                           \
        for (; c + 64 <= cols; c += 64) {                                                        \
            for (int k = 0; k < 8; k++) {                                                        \
                const __m256 w = _mm256_loadu_ps(wr + c + 8 * k);                                \
                for (int b = 0; b < NB; b++)                                                     \
                    a[b][k & 3] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * cols + c + 8 * k), a[b][k & 3]); \
            }                                                                                    \
        }                                                                                        \
        for (; c + 8 <= cols; c += 8) {                                                          \
            const __m256 w = _mm256_loadu_ps(wr + c);                                            \
            for (int b = 0; b < NB; b++) a[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * cols + c), a[b][0]); \
        }                                                                                        \
        for (int b = 0; b < NB; b++) {                                                           \
            float s = hsum8(_mm256_add_ps(_mm256_add_ps(a[b][0], a[b][1]), _mm256_add_ps(a[b][2], a[b][3]))); \
            for (int64_t t = c; t < cols; t++) s += wr[t] * x[b * cols + t];                     \
            y[b * ldy] = s;                                                                      \
        }                                                                                        \
    }
F32_STREAM(1)
F32_STREAM(2)
F32_STREAM(3)
#undef F32_STREAM
#endif

static inline void f32_rows(const float *w, int64_t r0, int64_t r1, int64_t cols, const float *x, int nb, float *y,
                            int64_t ldy) {
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = w + r * cols;
#ifdef QK_AVX2
        /* 1-3 activation rows in one stream of the weight row (12 accumulators at most: AVX2 has
         * 16 registers); 4 as two passes of 2, the second reading the row from L1 */
        if (nb == 1) { f32_stream_1(wr, cols, x, y + r, ldy); continue; }
        if (nb == 2) { f32_stream_2(wr, cols, x, y + r, ldy); continue; }
        if (nb == 3) { f32_stream_3(wr, cols, x, y + r, ldy); continue; }
        if (nb == 4) {
            f32_stream_2(wr, cols, x, y + r, ldy);
            f32_stream_2(wr, cols, x + 2 * cols, y + 2 * ldy + r, ldy);
            continue;
        }
#endif
        for (int b = 0; b < nb; b++) y[b * ldy + r] = dot_f32(wr, x + b * cols, cols);
    }
}

void qk_linear_f32(const float *x, int64_t B, const float *w, int64_t rows, int64_t cols, float *y) {
    /* W is read from memory once: each run of 16 weight rows (in L1/L2) meets every activation
     * row, TILE_B at a time, before the next run (a sweep over W per tile made a 16-row step
     * read W four times: memory-bound at 4x the bytes) */
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_RUN) {
        const int64_t r1 = r0 + ROW_RUN < rows ? r0 + ROW_RUN : rows;
        for (int64_t c0 = 0; c0 < B; c0 += TILE_B) {
            const int nb = (int)(B - c0 < TILE_B ? B - c0 : TILE_B);
            f32_rows(w, r0, r1, cols, x + c0 * cols, nb, y + c0 * rows, rows);
        }
    }
}

/* ------------------------------------------------------------------ a decode layer in two calls
 * The products of a layer described once (model/native_decode.py builds these from the model's
 * layers), so that a decode step crosses from Python into C twice per layer, at the points where
 * model-parallel ranks must all-reduce (after wo and after w2), instead of ~10 times. */
typedef struct {
    int64_t kind;  /* 0 float32 (w), 1 int8 (w, scales), 2 int4 (w, scales, zeros, group) */
    const void *w, *scales, *zeros;
    int64_t rows, cols, group;
} qk_product;

/* A BLAS sgemm (the Fortran interface: column-major, arguments by reference) for float32 products
 * of many rows: prompt chunks, where a GEMM's cache blocking beats the streaming kernel above. It
 * is torch's own (MKL in x86 builds), found by cpu_kernels.py, so a step's products are the ones
 * F.linear would run, while its norms, rotary, attention and SiLU stay here, fused and in cache
 * (in torch they are ~25 separate passes over the step's activations a layer). Unset (NULL) where
 * torch has no BLAS to lend: then every product is qk_linear_f32. */
typedef void (*qk_sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                            const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                            const float *beta, float *c, const int *ldc);
static qk_sgemm_fn blas_sgemm;
static int64_t blas_min_rows = INT64_MAX;

/* Products of at least min_rows activation rows go to sgemm (NULL: none do). */
void qk_set_sgemm(void *sgemm, int64_t min_rows) {
    blas_sgemm = (qk_sgemm_fn)sgemm;
    blas_min_rows = sgemm ? min_rows : INT64_MAX;
}

/* y (B, rows) = x (B, cols) W^T through sgemm; in column-major terms y^T = W x^T, W being
 * (cols, rows) column-major as stored. */
static void blas_linear_f32(const float *x, int64_t B, const float *w, int64_t rows, int64_t cols, float *y) {
    const int m = (int)rows, n = (int)B, k = (int)cols;
    const float one = 1.f, zero = 0.f;
    blas_sgemm("T", "N", &m, &n, &k, &one, w, &k, x, &k, &zero, y, &m);
}

static int product(const qk_product *p, const float *x, int64_t B, float *y) {
    switch (p->kind) {
    case 0:
        if (B >= blas_min_rows && p->rows < INT32_MAX && p->cols < INT32_MAX && B < INT32_MAX)
            blas_linear_f32(x, B, p->w, p->rows, p->cols, y);
        else
            qk_linear_f32(x, B, p->w, p->rows, p->cols, y);
        return 0;
    case 1: return qk_linear_q8(x, B, p->w, p->scales, p->rows, p->cols, y);
    case 2: return qk_linear_q4(x, B, p->w, p->scales, p->zeros, p->rows, p->cols, p->group, y);
    }
    return 1;
}

/* One decode layer's weights and KV cache (native_decode.py builds one per layer, once). */
typedef struct {
    const qk_product *qkv, *wo, *w13, *w2;
    const float *attention_norm, *ffn_norm;
    float *cache_k, *cache_v;  /* the paged pool: (blocks, kv_heads, block_size, head_dim) */
} qk_layer;

/* What every layer of one step shares: B tokens, token b of the sequence whose block table is
 * tables (B, table_width) row b, at position pos[b]; this rank's heads; rope (max_seq,
 * head_dim/2, 2): cos, sin per position. */
typedef struct {
    int64_t B, dim, heads, kv_heads, head_dim, block_size, table_width;
    const int64_t *tables, *pos;
    const float *rope;
    float eps;
} qk_step;

/* h (B, dim) += delta (if non-null: the last layer's all-reduced FFN output); then
 * out (B, dim) = wo(attention(qkv(rmsnorm(h)))) for this rank's heads, before the all-reduce. */
int qk_decode_attention(float *h, const float *delta, const qk_layer *L, const qk_step *s, float *out) {
    const int64_t B = s->B, dim = s->dim;
    float *x = malloc(B * (dim + L->qkv->rows + s->heads * s->head_dim) * sizeof(float));
    if (!x) return 1;
    float *t = x + B * dim, *a = t + B * L->qkv->rows;
    qk_rmsnorm(delta ? h : NULL, delta ? delta : h, L->attention_norm, B, dim, s->eps, x);
    int err = product(L->qkv, x, B, t);
    if (!err)
        err = qk_attend_decode(t, B, s->heads, s->kv_heads, s->head_dim, s->tables, s->table_width, s->pos,
                               s->rope, L->cache_k, L->cache_v, s->block_size, a);
    if (!err) err = product(L->wo, a, B, out);
    free(x);
    return err;
}

/* h (B, dim) += attn (the all-reduced attention output); out (B, dim) = w2(silu(w1 x) * w3 x) with
 * x = rmsnorm(h), before the all-reduce. w13: w1 and w3 as one product. */
int qk_decode_ffn(float *h, const float *attn, const qk_layer *L, const qk_step *s, float *out) {
    const int64_t B = s->B, dim = s->dim, hidden = L->w13->rows / 2;
    float *x = malloc(B * (dim + 3 * hidden) * sizeof(float));
    if (!x) return 1;
    float *gu = x + B * dim, *act = gu + B * 2 * hidden;
    qk_rmsnorm(h, attn, L->ffn_norm, B, dim, s->eps, x);
    int err = product(L->w13, x, B, gu);
    if (!err) {
        qk_silu_mul(gu, B, hidden, act);
        err = product(L->w2, act, B, out);
    }
    free(x);
    return err;
}

/* Every layer of a decode step on a single rank (no all-reduce between layers): one call a step,
 * so Python's ~15 us a layer between calls (and the OpenMP threads' naps there) are gone. out
 * (B, dim): the last layer's FFN output, not yet added to h (as qk_decode_ffn leaves it). */
int qk_decode_layers(float *h, const qk_layer *layers, int64_t n_layers, const qk_step *s, float *out) {
    float *attn = malloc(s->B * s->dim * sizeof(float));
    if (!attn) return 1;
    int err = 0;
    for (int64_t i = 0; i < n_layers && !err; i++) {
        err = qk_decode_attention(h, i ? out : NULL, &layers[i], s, attn);
        if (!err) err = qk_decode_ffn(h, attn, &layers[i], s, out);
    }
    free(attn);
    return err;
}
