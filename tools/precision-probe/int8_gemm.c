/* Issue 18 point 5, the step after int8_peak.c: does an int8 GEMM on AVX2 (no VNNI) keep its
 * in-register advantage over f32 once it has memory traffic, packing, the quantisation of its
 * activations and the dequantisation of its output? One core, the whole-human-shaped
 * projections (K = 512; N = 1536 for q/k/v, 512 for the others), M = 8 cells × S tokens.
 *
 *   gcc -O3 -mavx2 -mfma tools/precision-probe/int8_gemm.c -o /tmp/int8_gemm -lm && /tmp/int8_gemm
 *
 * The scheme of probe.py's accepted variant: weights per column in 7 bits (|w| ≤ 63, so that
 * vpmaddubsw's i16 pair sums cannot saturate: 2 · 255 · 63 < 32767), activations per row in
 * 8 bits, stored offset by 128 as u8 (vpmaddubsw multiplies unsigned by signed bytes); the
 * offset comes back out through the weights' column sums. Kernel: 6 rows × 16 columns of i32
 * accumulators, weights packed [column panel][K/4][16][4] so each k-quad is two loads.
 * Printed: GMAC/s of the whole product (quantise + kernel + dequantise) and of the kernel
 * alone, against the same binary's f32 FMA in-register peak and an f32 GEMM of the same
 * blocking (6 × 16, packed panels) on the same shape; and the error against f64. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define MR 6
#define NR 16
#define OPAQUE(x) __asm__ volatile("" : "+x"(x))

static uint64_t rng = 88172645463325252ull;
static float uniform(void) { /* xorshift64, [-1, 1) */
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f;
}

/* ---- int8 ---------------------------------------------------------------------------- */

typedef struct { int k, n; int8_t *panels; float *scale; int32_t *colsum128; } QWeights;

static QWeights pack_weights(const float *w, int k, int n) { /* w: [k][n] */
    QWeights q = {k, n, aligned_alloc(64, (size_t)k * n), malloc(n * sizeof(float)), malloc(n * sizeof(int32_t))};
    for (int c = 0; c < n; c++) {
        float m = 0;
        for (int i = 0; i < k; i++) m = fmaxf(m, fabsf(w[(size_t)i * n + c]));
        q.scale[c] = m > 0 ? m / 63.f : 1.f;
        int32_t sum = 0;
        for (int i = 0; i < k; i++) {
            int v = (int)lrintf(w[(size_t)i * n + c] / q.scale[c]);
            int8_t *dst = q.panels + (size_t)(c / NR) * k * NR + (size_t)(i / 4) * NR * 4 + (c % NR) * 4 + i % 4;
            *dst = (int8_t)v;
            sum += v;
        }
        q.colsum128[c] = 128 * sum;
    }
    return q;
}

/* One row of activations into u8 (offset 128) and its scale. */
static void quantise_row(const float *a, int k, uint8_t *out, float *scale) {
    __m256 m = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.f);
    for (int i = 0; i < k; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(a + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float mx = _mm_cvtss_f32(h);
    *scale = mx > 0 ? mx / 127.f : 1.f;
    __m256 inv = _mm256_set1_ps(1.f / *scale);
    __m256i off = _mm256_set1_epi32(128);
    for (int i = 0; i < k; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; j++)
            v[j] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(a + i + 8 * j), inv)), off);
        __m256i p01 = _mm256_packs_epi32(v[0], v[1]), p23 = _mm256_packs_epi32(v[2], v[3]);
        __m256i b = _mm256_packus_epi16(p01, p23); /* lanes interleaved: fix the order */
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(out + i), b);
    }
}

/* acc[r] (two vectors each) over all of K for rows a[0..MR) and one column panel. */
static inline void kernel_i8(const uint8_t *a, int lda, const int8_t *panel, int k, __m256i acc[MR][2]) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int kq = 0; kq < k / 4; kq++) {
        __m256i b0 = _mm256_load_si256((const __m256i *)(panel + kq * 64));
        __m256i b1 = _mm256_load_si256((const __m256i *)(panel + kq * 64 + 32));
        for (int r = 0; r < MR; r++) {
            __m256i x = _mm256_set1_epi32(*(const int32_t *)(a + (size_t)r * lda + kq * 4));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b0), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b1), ones));
        }
    }
}

/* c[m][n] = a[m][k] · w, through int8. m a multiple of MR, n of NR, k of 32. */
static void gemm_i8(const float *a, int m, const QWeights *w, float *c, uint8_t *aq, float *ascale, int quantise,
                    int dequantise) {
    int k = w->k, n = w->n;
    if (quantise)
        for (int r = 0; r < m; r++) quantise_row(a + (size_t)r * k, k, aq + (size_t)r * k, ascale + r);
    const int RB = 96; /* rows per block: 48 KiB of activations stay in L2 across panels */
    for (int r0 = 0; r0 < m; r0 += RB) {
        int r1 = r0 + RB < m ? r0 + RB : m;
        for (int p = 0; p < n / NR; p++) {
            const int8_t *panel = w->panels + (size_t)p * k * NR;
            __m256 s0 = _mm256_loadu_ps(w->scale + p * NR), s1 = _mm256_loadu_ps(w->scale + p * NR + 8);
            __m256i o0 = _mm256_loadu_si256((const __m256i *)(w->colsum128 + p * NR));
            __m256i o1 = _mm256_loadu_si256((const __m256i *)(w->colsum128 + p * NR + 8));
            for (int r = r0; r < r1; r += MR) {
                __m256i acc[MR][2];
                kernel_i8(aq + (size_t)r * k, k, panel, k, acc);
                for (int i = 0; i < MR; i++) {
                    float *dst = c + (size_t)(r + i) * n + p * NR;
                    if (!dequantise) { /* the kernel alone: keep the accumulators, no arithmetic */
                        _mm256_storeu_si256((__m256i *)dst, acc[i][0]);
                        _mm256_storeu_si256((__m256i *)(dst + 8), acc[i][1]);
                        continue;
                    }
                    __m256 rs = _mm256_set1_ps(ascale[r + i]);
                    __m256 v0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][0], o0));
                    __m256 v1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][1], o1));
                    _mm256_storeu_ps(dst, _mm256_mul_ps(v0, _mm256_mul_ps(rs, s0)));
                    _mm256_storeu_ps(dst + 8, _mm256_mul_ps(v1, _mm256_mul_ps(rs, s1)));
                }
            }
        }
    }
}

/* ---- f32, the same blocking ------------------------------------------------------------ */

static float *pack_f32(const float *w, int k, int n) { /* [panel][k][16] */
    float *p = aligned_alloc(64, (size_t)k * n * sizeof(float));
    for (int c = 0; c < n; c++)
        for (int i = 0; i < k; i++) p[(size_t)(c / NR) * k * NR + (size_t)i * NR + c % NR] = w[(size_t)i * n + c];
    return p;
}

static void gemm_f32(const float *a, int m, int k, const float *packed, int n, float *c) {
    const int RB = 96;
    for (int r0 = 0; r0 < m; r0 += RB) {
        int r1 = r0 + RB < m ? r0 + RB : m;
        for (int p = 0; p < n / NR; p++) {
            const float *panel = packed + (size_t)p * k * NR;
            for (int r = r0; r < r1; r += MR) {
                __m256 acc[MR][2];
                for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
                for (int kk = 0; kk < k; kk++) {
                    __m256 b0 = _mm256_load_ps(panel + kk * NR), b1 = _mm256_load_ps(panel + kk * NR + 8);
                    for (int i = 0; i < MR; i++) {
                        __m256 x = _mm256_broadcast_ss(a + (size_t)(r + i) * k + kk);
                        acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
                    }
                }
                for (int i = 0; i < MR; i++) {
                    _mm256_storeu_ps(c + (size_t)(r + i) * n + p * NR, acc[i][0]);
                    _mm256_storeu_ps(c + (size_t)(r + i) * n + p * NR + 8, acc[i][1]);
                }
            }
        }
    }
}

static double f32_peak_gmacs(long iters) { /* as int8_peak.c */
    __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
    __m256 a[10];
    for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps((float)i);
    double t0 = now();
    for (long it = 0; it < iters; it++) {
        for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
        OPAQUE(b);
    }
    double t = now() - t0;
    for (int i = 1; i < 10; i++) a[0] = _mm256_add_ps(a[0], a[i]);
    OPAQUE(a[0]);
    return iters * 10.0 * 8 / t * 1e-9;
}

static double best_of(int reps, void (*f)(void *), void *ctx) {
    double best = 1e30;
    for (int i = 0; i < reps; i++) {
        double t0 = now();
        f(ctx);
        double t = now() - t0;
        if (t < best) best = t;
    }
    return best;
}

typedef struct { const float *a; int m, k, n; const QWeights *q; const float *pf; float *c; uint8_t *aq; float *as; } Ctx;
static void run_i8_full(void *p) { Ctx *x = p; gemm_i8(x->a, x->m, x->q, x->c, x->aq, x->as, 1, 1); }
static void run_i8_kernel(void *p) { Ctx *x = p; gemm_i8(x->a, x->m, x->q, x->c, x->aq, x->as, 0, 0); }
static void run_f32(void *p) { Ctx *x = p; gemm_f32(x->a, x->m, x->k, x->pf, x->n, x->c); }

int main(void) {
    double peak = 0;
    for (int i = 0; i < 3; i++) {
        double g = f32_peak_gmacs(100000000);
        if (g > peak) peak = g;
    }
    printf("f32 FMA in-register peak: %.1f GMAC/s (one core)\n", peak);
    printf("%6s %5s %5s | %9s %9s %9s | %7s %7s | %s\n", "M", "K", "N", "f32 GMAC/s", "i8 all", "i8 kernel",
           "all/f32", "all/pk", "max rel err i8 (vs f64) | f32");
    int shapes[][3] = {{2046, 512, 1536}, {2046, 512, 512}, {8190, 512, 1536}, {8190, 512, 512}};
    for (int s = 0; s < 4; s++) {
        int m = shapes[s][0], k = shapes[s][1], n = shapes[s][2];
        float *a = malloc((size_t)m * k * sizeof(float)), *w = malloc((size_t)k * n * sizeof(float));
        for (size_t i = 0; i < (size_t)m * k; i++) a[i] = uniform() * (1.f + (i % 7));
        for (size_t i = 0; i < (size_t)k * n; i++) w[i] = uniform() * 0.05f;
        QWeights q = pack_weights(w, k, n);
        float *pf = pack_f32(w, k, n), *c = malloc((size_t)m * n * sizeof(float)),
              *c32 = malloc((size_t)m * n * sizeof(float)), *as = malloc(m * sizeof(float));
        uint8_t *aq = aligned_alloc(64, (size_t)m * k);
        Ctx x = {a, m, k, n, &q, pf, c, aq, as};
        double macs = (double)m * k * n;
        double t32 = best_of(5, run_f32, &x);
        memcpy(c32, c, (size_t)m * n * sizeof(float));
        double tall = best_of(5, run_i8_full, &x);
        /* error on a sample of outputs, against f64 */
        double e8 = 0, e32 = 0;
        for (int r = 0; r < m; r += 97)
            for (int col = 0; col < n; col += 13) {
                double ref = 0, norm = 0;
                for (int i = 0; i < k; i++) {
                    ref += (double)a[(size_t)r * k + i] * w[(size_t)i * n + col];
                    norm += fabs((double)a[(size_t)r * k + i] * w[(size_t)i * n + col]);
                }
                e8 = fmax(e8, fabs(c[(size_t)r * n + col] - ref) / norm);
                e32 = fmax(e32, fabs(c32[(size_t)r * n + col] - ref) / norm);
            }
        double tk = best_of(5, run_i8_kernel, &x);
        printf("%6d %5d %5d | %9.1f %9.1f %9.1f | %6.2fx %6.2fx | %.2e | %.2e\n", m, k, n, macs / t32 * 1e-9,
               macs / tall * 1e-9, macs / tk * 1e-9, t32 / tall, macs / tall * 1e-9 / peak, e8, e32);
        free(a); free(w); free(q.panels); free(q.scale); free(q.colsum128); free(pf); free(c); free(c32); free(as);
        free(aq);
    }
    printf("(M = 8 cells x S, rounded down to whole 6-row blocks; all = quantise + kernel + dequantise;\n"
           " all/f32 = speed of the whole int8 product over the f32 GEMM of the same blocking; all/pk = its\n"
           " GMAC/s over the f32 in-register peak; error = |c - exact| / sum |a_i w_i|, sampled)\n");
    return 0;
}
