// Proves, rather than times, that a kernel gives no fp32/fp64 operation a
// subnormal operand or result: such operations cost Intel cores a microcode
// assist each (~100x a normal operation; Zen 4 barely notices, so timing
// there finds nothing).
//
// ExpectNoSubnormalOperations(fn) runs fn in a forked child (a gtest death
// test) with the SSE/AVX denormal-operand and underflow exceptions unmasked
// in MXCSR: a subnormal operand, or a result that is tiny (below 2^-126,
// exact or not, before it is stored), raises SIGFPE and the child dies; the
// test fails naming `what`. Lanes computed and then discarded count too, as
// they do for the assists. x86 only; elsewhere it just runs fn.
#ifndef KVC_TESTS_TESTING_SUBNORMAL_TRAPS_H_
#define KVC_TESTS_TESTING_SUBNORMAL_TRAPS_H_

#include <cstdlib>
#include <functional>
#include <string>

#include "gtest/gtest.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define KVC_HAVE_SUBNORMAL_TRAPS 1
#endif

namespace kvc::testing {

// Runs fn with the denormal-operand (DM, bit 8) and underflow (UM, bit 11)
// exceptions unmasked and the sticky flags cleared; restores MXCSR after.
inline void RunWithSubnormalTraps(const std::function<void()>& fn) {
#ifdef KVC_HAVE_SUBNORMAL_TRAPS
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr & ~(0x0100u | 0x0800u | 0x3Fu));
  fn();
  _mm_setcsr(csr);
#else
  fn();
#endif
}

inline void ExpectNoSubnormalOperations(const std::string& what, const std::function<void()>& fn) {
#ifdef KVC_HAVE_SUBNORMAL_TRAPS
  EXPECT_EXIT(
      {
        RunWithSubnormalTraps(fn);
        std::_Exit(0);
      },
      ::testing::ExitedWithCode(0), "")
      << what << ": an fp operation met a subnormal operand or result (SIGFPE in the child)";
#else
  fn();
  (void)what;
#endif
}

}  // namespace kvc::testing

#endif  // KVC_TESTS_TESTING_SUBNORMAL_TRAPS_H_
