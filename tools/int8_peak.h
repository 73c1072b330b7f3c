// The int8 multiply-add peak of this machine (the floor of index scoring):
// 512-bit vpdpbusd with eight register accumulators, the loop of
// kvc_bench's BM_Int8Peak.
#ifndef KVC_TOOLS_INT8_PEAK_H_
#define KVC_TOOLS_INT8_PEAK_H_

#include <cstdint>

#include "kvc/executor.h"

namespace kvc::tools {

// Whether this CPU has AVX512-VNNI (else the peak is not measured: 0).
bool HaveVnni512();

// Runs `iterations` of the peak loop (8 x 64 int8 multiply-adds each) and
// returns an opaque value (keep it alive against the optimizer).
int VnniLoop(int64_t iterations);

// Multiply-adds per second, all of the executor's threads together (one
// loop per thread, run concurrently, best of `repeats`), about
// `seconds_per_repeat` each. 0 without AVX512-VNNI.
double MeasureInt8Peak(Executor& executor, double seconds_per_repeat = 0.05, int repeats = 5);

}  // namespace kvc::tools

#endif  // KVC_TOOLS_INT8_PEAK_H_
