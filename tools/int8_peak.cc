#include "tools/int8_peak.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>

namespace kvc::tools {

bool HaveVnni512() { return __builtin_cpu_supports("avx512vnni"); }

#define KVC_DPBUSD(r) r = _mm512_dpbusd_epi32(r, a, b);
// 8 independent accumulators kept in registers (an array would put them on
// the stack and measure store-to-load latency instead).
__attribute__((target("avx512f,avx512vnni"))) int VnniLoop(int64_t iterations) {
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  asm volatile("" : "+v"(a), "+v"(b));  // opaque inputs
  __m512i r0 = a, r1 = a, r2 = a, r3 = a, r4 = a, r5 = a, r6 = a, r7 = a;
  for (int64_t n = 0; n < iterations; ++n) {
    KVC_DPBUSD(r0) KVC_DPBUSD(r1) KVC_DPBUSD(r2) KVC_DPBUSD(r3) KVC_DPBUSD(r4) KVC_DPBUSD(r5) KVC_DPBUSD(r6) KVC_DPBUSD(r7)
    asm volatile("" : "+v"(r0), "+v"(r1), "+v"(r2), "+v"(r3), "+v"(r4), "+v"(r5), "+v"(r6), "+v"(r7));
  }
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(r0, r1), _mm512_add_epi32(r2, r3)),
                                             _mm512_add_epi32(_mm512_add_epi32(r4, r5), _mm512_add_epi32(r6, r7))));
  return lanes[0];
}
#undef KVC_DPBUSD

double MeasureInt8Peak(Executor& executor, double seconds_per_repeat, int repeats) {
  if (!HaveVnni512()) return 0;
  // Calibrate the iterations to about seconds_per_repeat on one thread.
  int64_t iterations = 1 << 16;
  for (;;) {
    const auto start = std::chrono::steady_clock::now();
    static std::atomic<int> sink{0};
    sink += VnniLoop(iterations);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (s > seconds_per_repeat / 4 || iterations > (int64_t{1} << 40)) {
      iterations = static_cast<int64_t>(static_cast<double>(iterations) * seconds_per_repeat / std::max(s, 1e-6));
      break;
    }
    iterations *= 4;
  }
  const int threads = executor.concurrency();
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    std::atomic<int> sink{0};
    const auto start = std::chrono::steady_clock::now();
    executor.ParallelFor(threads, [&](int64_t) { sink += VnniLoop(iterations); });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(iterations) * 8 * 64 * threads / s);
  }
  return best;
}

}  // namespace kvc::tools
