/* Peak arithmetic rate of one core: float32 FMA (vfmadd, 16 lanes x 2 FLOPs) against the AVX512-BF16
 * dot product (vdpbf16ps, 16 lanes x 2 products x 2 FLOPs), each with 12 independent accumulators so
 * that latency does not limit throughput.
 *
 * It tells whether bfloat16 can be faster than float32 for convolutions on a CPU: with AVX512-BF16 but
 * no AMX, a vdpbf16ps does twice the FLOPs of an FMA, so bfloat16 is only faster if the core issues as
 * many of them per cycle as it issues FMAs.
 *
 *   gcc -O2 -mavx512f -mavx512bf16 bench/cpu_peak.c -o /tmp/cpu_peak && /tmp/cpu_peak
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define ACCUMULATORS 12
#define ITERATIONS 20000000L

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float total(const __m512 *acc) {
  float sum = 0;
  for (int i = 0; i < ACCUMULATORS; i++) sum += _mm512_reduce_add_ps(acc[i]);
  return sum;
}

int main(void) {
  __m512 acc[ACCUMULATORS];
  const __m512 x = _mm512_set1_ps(0.5f), y = _mm512_set1_ps(0.25f);
  const __m512bh xb = (__m512bh)_mm512_set1_epi16(0x3f00), yb = (__m512bh)_mm512_set1_epi16(0x3e80);
  const double ops = (double)ITERATIONS * ACCUMULATORS;

  for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_setzero_ps();
  double begin = seconds();
  for (long n = 0; n < ITERATIONS; n++) {
#pragma GCC unroll 12
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_fmadd_ps(x, y, acc[i]);
  }
  double fma = ops * 16 * 2 / (seconds() - begin) / 1e9;
  float check = total(acc);

  for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_setzero_ps();
  begin = seconds();
  for (long n = 0; n < ITERATIONS; n++) {
#pragma GCC unroll 12
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], xb, yb);
  }
  double dot = ops * 32 * 2 / (seconds() - begin) / 1e9;
  check += total(acc);

  printf("float32 FMA           %7.1f GFLOP/s per core\n", fma);
  printf("bfloat16 vdpbf16ps    %7.1f GFLOP/s per core\n", dot);
  printf("bfloat16 / float32    %7.2f   (checksum %g)\n", dot / fma, check);
  return 0;
}
