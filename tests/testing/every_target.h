// Runs a parameterised test once per SIMD target that kvc was compiled for
// and this CPU supports: the kernels dispatch to the target under test.
//
//   class MyKernelsTest : public kvc::testing::EveryTargetTest {};
//   KVC_INSTANTIATE_EVERY_TARGET(MyKernelsTest);
//   TEST_P(MyKernelsTest, Something) { ... }
#ifndef KVC_TESTS_TESTING_EVERY_TARGET_H_
#define KVC_TESTS_TESTING_EVERY_TARGET_H_

#include <cstdint>
#include <string>

#include "gtest/gtest.h"
#include "hwy/targets.h"
#include "kvc/row_kernels.h"

namespace kvc::testing {

class EveryTargetTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { hwy::SetSupportedTargetsForTest(GetParam()); }
  void TearDown() override { hwy::SetSupportedTargetsForTest(0); }
};

inline std::string TargetTestName(const ::testing::TestParamInfo<int64_t>& param) {
  return SimdTargetName(param.param);
}

}  // namespace kvc::testing

#define KVC_INSTANTIATE_EVERY_TARGET(suite)                                                  \
  INSTANTIATE_TEST_SUITE_P(EveryTarget, suite, ::testing::ValuesIn(::kvc::SimdTargets()), \
                           ::kvc::testing::TargetTestName)

#endif  // KVC_TESTS_TESTING_EVERY_TARGET_H_
