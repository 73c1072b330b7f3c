// Internal to kvc (not installed): the compressor algorithm (spec §3,
// docs/compressor.md) as the cache runs it, behind a function interface that
// knows nothing of the cache: a compressor's state rows (the ring of the
// tokens of the windows still open) and a chunk's projections in, entries
// (bf16 rows the row kernels accept) out, and the state ring brought up to
// date. The cache (src/cache.cc) fills a CompressorRun from its
// CompressorState part; tests/compressor_test.cc calls these directly.
#ifndef KVC_SRC_COMPRESSOR_RUN_H_
#define KVC_SRC_COMPRESSOR_RUN_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvc/compressor.h"
#include "kvc/model_spec.h"
#include "kvc/number_formats.h"
#include "src/rope_rows.h"

namespace kvc {

// One compressor of one layer: its geometry, the engine's parameters, its
// state ring (token rows kv ‖ score + ape, slot = t mod capacity) and the
// chunk being appended.
struct CompressorRun {
  CompressorGeometry g;
  const CompressorParams* params;
  float* state;
  int64_t capacity;  // token rows in the state ring
  const float* kv;     // chunk projections, n x width
  const float* score;  // without ape
  int64_t first;       // position of the chunk's first token
  bool ape_has_tiny = true;  // ape holds a nonzero |value| < 2^-90 (pooling flushes it)
  int layer;           // for messages
  bool indexer;        // CSA's indexer (index keys) rather than the main compressor
  float norm_eps;      // the model's RMSNorm epsilon
};

// Refuses tokens [run.first + from, run.first + to) of the chunk if a score
// + ape overflows fp32: that sum is what the state ring keeps for the token
// (and what a snapshot stores), so it must be finite. kInvalidArgument naming
// the layer, position and channel.
absl::Status CheckScorePlusApe(const CompressorRun& run, int64_t from, int64_t to);

// The entries (main.g.dim bf16 values each) and, with an indexer, the index
// keys (indexer->g.dim each) of the windows that close with tokens
// [from, to) (absolute positions), written at their index relative to the
// chunk's first closed window (entry main.first / ratio goes to row 0).
// RoPE at each window's first position from `rope` (covering them). Reads the state rows and
// the projections; writes only `entries` and `keys`. Refuses an entry or key
// the row kernels would not store: kInvalidArgument naming the layer, the
// entry's tokens, the channel, the cause and the token that dominates it.
// Requires the projections checked finite and CheckScorePlusApe passed.
absl::Status ComputeEntries(const CompressorRun& main, const CompressorRun* indexer, const RopeRows& rope,
                            int64_t from, int64_t to, absl::Span<Bf16> entries, absl::Span<Bf16> keys);

// ComputeEntries for inputs not yet checked, fused with their checks: false
// if a kv or score read by the windows closing in [from, to) is not finite,
// a score + ape overflows, or an entry or key would be refused. Then nothing
// is said of why: the caller runs the checks and ComputeEntries in order for
// the message. The rows pooling does not read (the chunk's open windows:
// UnpooledTokens) are not checked here.
bool ComputeEntriesIfValid(const CompressorRun& main, const CompressorRun* indexer, const RopeRows& rope,
                           int64_t from, int64_t to, absl::Span<Bf16> entries, absl::Span<Bf16> keys);

// The first chunk token (relative to run.first) of the rows, up to the
// chunk's end n, that pooling the windows closed by tokens before
// run.first + n does not read in full: the open window's tokens, and with
// overlapping windows also the last closed window's (its first halves belong
// to the next entry).
int64_t UnpooledTokens(const CompressorRun& run, int64_t n);

// SIMD helpers (src/compressor_kernels.cc), without a subnormal operation;
// n a multiple of 16. The first i with fl(score[i] + ape[i]) = ±inf, or -1;
// and out[i] = fl(score[i] + ape[i]) bit for bit.
int64_t FindScorePlusApeOverflow(const float* score, const float* ape, int64_t n);
void AddScoreAndApe(const float* score, const float* ape, float* out, int64_t n);
// The largest |x| of n bf16 values (n a multiple of 64) as bits without the
// sign: 0x7F80 is infinity, above it NaN.
uint16_t MaxMagnitudeBits(const Bf16* v, int64_t n);

// Memory to prefetch while pooling (the next window's chunk rows): the
// 64-byte lines of up to kMaxRuns runs of floats, one software prefetch per
// line, spread evenly over the pooling's slots. (Issued all at once, most
// were dropped on the machines measured: the core's miss buffers fill.)
// A hint: results do not depend on it; runs past kMaxRuns are ignored.
struct ReadAhead {
  static constexpr int kMaxRuns = 4;
  const float* run[kMaxRuns] = {};
  int64_t lines[kMaxRuns] = {};  // lines of run i (its floats / 16)
  int count = 0;
  int64_t total_lines = 0;
  void Add(const float* p, int64_t floats) {
    if (count == kMaxRuns || floats < 16) return;
    run[count] = p;
    lines[count++] = floats / 16;
    total_lines += floats / 16;
  }
};

// PoolChannels, returning false (out partly written) if a slot's kv or score
// + ape is not finite in some channel. ape_has_tiny = false promises that no
// slot's ape holds a nonzero value below 2^-90 (its flush is then skipped).
// `ahead`, if given, is prefetched meanwhile.
bool PoolChannelsIfFinite(const PoolSlot* slots, int n, int64_t channels, float* out, bool ape_has_tiny = true,
                          const ReadAhead* ahead = nullptr);

// Keeps the chunk's last n tokens (as many as the ring holds) in the state
// ring: kv, then score + ape. Call after every ComputeEntries of the chunk.
void WriteState(const CompressorRun& run, int64_t n);

}  // namespace kvc

#endif  // KVC_SRC_COMPRESSOR_RUN_H_
