/* Issue 18 point 5: the in-register peak of an AVX2 int8 dot product (vpmaddubsw u8 x s8 ->
 * i16 pairs, vpmaddwd by ones -> i32, vpaddd) against f32 FMA, on one core. No memory
 * traffic: an upper bound for any int8 GEMM kernel on AVX2 without VNNI.
 *   gcc -O2 -mavx2 -mfma tools/precision-probe/int8_peak.c -o /tmp/int8_peak && /tmp/int8_peak */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* The empty asm makes each value opaque, so nothing is hoisted or folded; few enough live
 * values that nothing spills to the stack (check with objdump). */
#define OPAQUE(x) __asm__ volatile("" : "+x"(x))

static double f32_gmacs(long iters) {
    __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
    __m256 a0 = _mm256_set1_ps(0.f), a1 = _mm256_set1_ps(1.f), a2 = _mm256_set1_ps(2.f), a3 = _mm256_set1_ps(3.f),
           a4 = _mm256_set1_ps(4.f), a5 = _mm256_set1_ps(5.f), a6 = _mm256_set1_ps(6.f), a7 = _mm256_set1_ps(7.f),
           a8 = _mm256_set1_ps(8.f), a9 = _mm256_set1_ps(9.f);
    double t0 = now();
    for (long i = 0; i < iters; i++) {
        a0 = _mm256_fmadd_ps(a0, b, c); a1 = _mm256_fmadd_ps(a1, b, c);
        a2 = _mm256_fmadd_ps(a2, b, c); a3 = _mm256_fmadd_ps(a3, b, c);
        a4 = _mm256_fmadd_ps(a4, b, c); a5 = _mm256_fmadd_ps(a5, b, c);
        a6 = _mm256_fmadd_ps(a6, b, c); a7 = _mm256_fmadd_ps(a7, b, c);
        a8 = _mm256_fmadd_ps(a8, b, c); a9 = _mm256_fmadd_ps(a9, b, c);
        OPAQUE(b);
    }
    double t = now() - t0;
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(_mm256_add_ps(a6, a7), _mm256_add_ps(a8, a9))));
    OPAQUE(s);
    return iters * 10.0 * 8 / t * 1e-9;
}

static double i8_gmacs(long iters) {
    __m256i ones = _mm256_set1_epi16(1), w = _mm256_set1_epi8(-77);
    __m256i x0 = _mm256_set1_epi8(100), x1 = _mm256_set1_epi8(101), x2 = _mm256_set1_epi8(102);
    __m256i x3 = _mm256_set1_epi8(103);
    __m256i a0 = _mm256_set1_epi32(0), a1 = _mm256_set1_epi32(1), a2 = _mm256_set1_epi32(2),
            a3 = _mm256_set1_epi32(3);
    double t0 = now();
    for (long i = 0; i < iters; i++) {
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(x0, w), ones));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(x1, w), ones));
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_maddubs_epi16(x2, w), ones));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_maddubs_epi16(x3, w), ones));
        OPAQUE(w); OPAQUE(x0); OPAQUE(x1); OPAQUE(x2); OPAQUE(x3);
    }
    double t = now() - t0;
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
    OPAQUE(s);
    return iters * 4.0 * 32 / t * 1e-9;
}

int main(void) {
    double f = 0, q = 0;
    for (int rep = 0; rep < 3; rep++) {
        double a = f32_gmacs(200000000), b = i8_gmacs(200000000);
        if (a > f) f = a;
        if (b > q) q = b;
    }
    printf("f32 FMA %.1f GMAC/s; int8 vpmaddubsw+vpmaddwd+vpaddd %.1f GMAC/s; int8 / f32 = %.2fx\n",
           f, q, q / f);
    return 0;
}
