// The compressor algorithm (spec §3) over a cache's state rows and a chunk's
// projections: pooling slots, entries, the checks of what the row kernels
// accept, and the state ring's update. See src/compressor_run.h.
#include "src/compressor_run.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvc/row_kernels.h"
#include "src/status.h"

namespace kvc {
namespace {

// Token t's `half` (0 or 1) as a pooling slot: from the state ring if it
// was appended before this chunk (its score already holds ape), else from
// the chunk (ape added on the fly).
PoolSlot Slot(const CompressorRun& run, int64_t t, int half) {
  const int64_t width = run.g.width();
  const int64_t offset = half * run.g.dim;
  if (t < run.first) {
    const float* row = run.state + (t % run.capacity) * 2 * width;
    return {row + offset, row + width + offset, nullptr};
  }
  const int64_t i = t - run.first;
  return {run.kv + i * width + offset, run.score + i * width + offset,
          run.params->ape.data() + (t % run.g.ratio) * width + offset};
}

// The pooling slots of entry i (at most 256), with each slot's token.
int EntrySlots(const CompressorRun& run, int64_t i, PoolSlot* slots, int64_t* tokens) {
  const CompressorGeometry& g = run.g;
  int count = 0;
  auto add = [&](int64_t t, int half) {
    tokens[count] = t;
    slots[count++] = Slot(run, t, half);
  };
  if (g.overlap && i > 0) {  // the previous window's first halves (none for entry 0)
    for (int j = 0; j < g.ratio; ++j) add((i - 1) * g.ratio + j, 0);
  }
  for (int j = 0; j < g.ratio; ++j) add(i * g.ratio + j, g.overlap ? 1 : 0);
  return count;
}

// Entry i of a compressor: pools its window's slots, then norm + RoPE with
// the given (cos, sin) pairs into `out` (dim bf16 values). kCheckInputs:
// false if a slot's kv or score + ape is not finite (out not written).
template <bool kCheckInputs = false>
bool ComputeEntry(const CompressorRun& run, int64_t i, const float* cos_sin, float* pooled, Bf16* out,
                  const ReadAhead* ahead = nullptr) {
  PoolSlot slots[256];
  int64_t tokens[256];
  const int count = EntrySlots(run, i, slots, tokens);
  if (kCheckInputs) {
    if (!PoolChannelsIfFinite(slots, count, run.g.dim, pooled, run.ape_has_tiny, ahead)) return false;
  } else {
    PoolChannels(slots, count, run.g.dim, pooled);
  }
  NormRope(pooled, run.g.dim, run.params->norm_weight.data(), run.norm_eps, cos_sin, out);
  return true;
}

// The largest bf16 magnitudes (bits without the sign) the row kernels
// store (row_kernels.cc): any finite value in a KV row; up to 2^120 in an
// index key (its Hadamard must not overflow).
constexpr uint16_t kMaxKeyBits = 0x7B80;  // 2^120

// OK if QuantizeKvRows (main) or QuantizeIndexKeys (indexer) accepts the
// computed row `out` of entry i; else kInvalidArgument naming the layer,
// the entry's tokens, the channel, the cause and the token that dominates it.
absl::Status RefusedEntry(const CompressorRun& run, int64_t i, const Bf16* out, uint16_t max_bits, bool non_finite);

// Whether the row kernels accept entry row `out`: entries' NoPE dims up to
// kMaxKvNopeBf16Bits, RoPE dims any finite value; keys up to kMaxKeyBits.
bool EntryStorable(const CompressorRun& run, const Bf16* out, uint16_t* largest_bits) {
  const uint16_t max_bits = run.indexer ? kMaxKeyBits : kMaxKvNopeBf16Bits;
  const int limited_dims = run.indexer ? run.g.dim : kNopeDim;
  const uint16_t largest = MaxMagnitudeBits(out, limited_dims);
  const uint16_t largest_rest = MaxMagnitudeBits(out + limited_dims, run.g.dim - limited_dims);
  *largest_bits = std::max(largest, largest_rest);
  return largest <= max_bits && largest_rest <= kMaxFiniteBf16Bits;
}

absl::Status CheckEntry(const CompressorRun& run, int64_t i, const Bf16* out) {
  uint16_t largest;
  if (EntryStorable(run, out, &largest)) return absl::OkStatus();
  return RefusedEntry(run, i, out, run.indexer ? kMaxKeyBits : kMaxKvNopeBf16Bits, largest >= 0x7F80);
}

absl::Status RefusedEntry(const CompressorRun& run, int64_t i, const Bf16* out, uint16_t max_bits,
                          bool non_finite) {
  const CompressorGeometry& g = run.g;
  PoolSlot slots[256];
  int64_t tokens[256];
  const int count = EntrySlots(run, i, slots, tokens);
  std::vector<float> pooled(static_cast<size_t>(g.dim));
  PoolChannels(slots, count, g.dim, pooled.data());
  const char* kv_name = run.indexer ? "indexer_kv" : "compressor_kv";
  // The cause: a pooled value bf16 cannot hold, else RMSNorm and RoPE.
  int channel = -1;
  std::string cause;
  for (int c = 0; c < g.dim && channel < 0; ++c) {
    const float x = pooled[static_cast<size_t>(c)];
    if (std::isfinite(RoundToBf16(x))) continue;
    channel = c;
    cause = absl::StrCat("the pooled ", kv_name, " there, ", x, std::isfinite(x) ? ", exceeds bf16's range" : ", overflows fp32");
  }
  for (int c = 0; c < g.dim && channel < 0; ++c) {
    if ((out[c].bits & 0x7FFF) <= (run.indexer || c < kNopeDim ? max_bits : kMaxFiniteBf16Bits)) continue;
    channel = c;
    cause = absl::StrCat("RMSNorm (norm_weight ", run.params->norm_weight[static_cast<size_t>(c)],
                         ") and RoPE make it ", ToF32(out[c]));
  }
  if (channel < 0) return absl::InternalError(absl::StrCat("Append: layer ", run.layer, ": entry ", i, " refused without cause"));
  // The token that dominates that channel: the largest softmax weight x |kv|.
  int top = 0;
  {
    float s[256], max = -INFINITY, best = -1.0f;
    for (int j = 0; j < count; ++j) {
      s[j] = slots[j].ape != nullptr ? slots[j].score[channel] + slots[j].ape[channel] : slots[j].score[channel];
      max = std::max(max, s[j]);
    }
    for (int j = 0; j < count; ++j) {
      const float weight = SoftmaxExp(s[j] - max) * std::fabs(slots[j].kv[channel]);
      if (weight > best) best = weight, top = j;
    }
  }
  const int64_t column = (g.overlap && tokens[top] >= i * g.ratio ? g.dim : 0) + channel;
  const int64_t first_token = g.overlap && i > 0 ? (i - 1) * g.ratio : i * g.ratio;
  return absl::InvalidArgumentError(absl::StrCat(
      "Append: layer ", run.layer, ": ", run.indexer ? "index key " : "compressed entry ", i, " (tokens [",
      first_token, ", ", (i + 1) * g.ratio, ")) would ",
      non_finite     ? "not be finite"
      : run.indexer  ? "exceed 2^120 (the index key limit)"
                     : "read back as infinity (|x| >= 248 x 2^120 rounds to the FP8 code of 2^128)",
      " at channel ", channel, ": ",
      cause, "; it comes mostly from position ", tokens[top], "'s ", kv_name, " column ", column, " (",
      slots[top].kv[channel], ")"));
}

}  // namespace

// Refuses tokens [first + from, first + to) of the chunk if a score + ape
// overflows fp32: that sum is what the state ring keeps for the token (and
// what a snapshot stores), so it must be finite.
absl::Status CheckScorePlusApe(const CompressorRun& run, int64_t from, int64_t to) {
  const int64_t width = run.g.width();
  for (int64_t i = from; i < to; ++i) {
    const float* score = run.score + i * width;
    const float* ape = run.params->ape.data() + ((run.first + i) % run.g.ratio) * width;
    const int64_t c = FindScorePlusApeOverflow(score, ape, width);  // a SIMD pass, no subnormal arithmetic
    if (c >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Append: layer ", run.layer, " ", run.indexer ? "indexer_score" : "compressor_score", " at position ",
          run.first + i, " channel ", c, ": score ", score[c], " + ape ", ape[c],
          " overflows fp32 (the compressor state keeps that sum)"));
    }
  }
  return absl::OkStatus();
}

// The entries (and, with an indexer, keys) of the windows that close with
// tokens [from, to) of the chunk, written at their index relative to the
// chunk's first closed window; changes nothing in the cache. Refuses an
// entry or key the row kernels would not store (CheckEntry).
absl::Status ComputeEntries(const CompressorRun& main, const CompressorRun* indexer, const RopeRows& rope,
                            int64_t from, int64_t to, absl::Span<Bf16> entries, absl::Span<Bf16> keys) {
  const int m = main.g.ratio;
  const int64_t first_entry = main.first / m;
  std::vector<float> pooled(static_cast<size_t>(main.g.dim));
  for (int64_t i = from / m; i < to / m; ++i) {
    const float* cos_sin = rope.At(i * m);  // shared by the entry and its index key
    const size_t at = static_cast<size_t>(i - first_entry);
    Bf16* entry = &entries[at * static_cast<size_t>(main.g.dim)];
    ComputeEntry(main, i, cos_sin, pooled.data(), entry);
    KVC_RETURN_IF_ERROR(CheckEntry(main, i, entry));
    if (indexer != nullptr) {
      Bf16* key = &keys[at * static_cast<size_t>(indexer->g.dim)];
      ComputeEntry(*indexer, i, cos_sin, pooled.data(), key);
      KVC_RETURN_IF_ERROR(CheckEntry(*indexer, i, key));
    }
  }
  return absl::OkStatus();
}

// Adds the chunk rows of window w's tokens before position `end` to
// *ahead: kv and score, each one contiguous run.
void AddWindowRows(const CompressorRun& run, int64_t w, int64_t end, ReadAhead* ahead) {
  const int64_t width = run.g.width();
  const int64_t begin = std::max(w * run.g.ratio, run.first), stop = std::min((w + 1) * run.g.ratio, end);
  if (begin >= stop) return;
  ahead->Add(run.kv + (begin - run.first) * width, (stop - begin) * width);
  ahead->Add(run.score + (begin - run.first) * width, (stop - begin) * width);
}

bool ComputeEntriesIfValid(const CompressorRun& main, const CompressorRun* indexer, const RopeRows& rope,
                           int64_t from, int64_t to, absl::Span<Bf16> entries, absl::Span<Bf16> keys) {
  const int m = main.g.ratio;
  const int64_t first_entry = main.first / m;
  std::vector<float> pooled(static_cast<size_t>(main.g.dim));
  uint16_t largest;
  for (int64_t i = from / m; i < to / m; ++i) {
    const float* cos_sin = rope.At(i * m);
    const size_t at = static_cast<size_t>(i - first_entry);
    Bf16* entry = &entries[at * static_cast<size_t>(main.g.dim)];
    // The next window's rows (main and indexer), prefetched while the main
    // compressor pools this one. Pooling reads a window's rows column block
    // by column block across its tokens, which the hardware prefetchers do
    // not follow. Measured on one CSA layer (BM_Append_Csa, 1 / 2 threads):
    // nothing 1.34 / 0.76 s; a plain load of every line a window ahead
    // (which stalls the pooling behind them) 1.15-1.21 / 0.68-0.73 s; the
    // same lines as software prefetches issued together (most dropped: the
    // core's miss buffers fill) no better; spread over the pooling's slots
    // 0.92-0.99 / 0.55-0.60 s. CSA only: an HCA window's rows (0.5 MiB) prefetched so
    // appended slower (0.40 vs 0.34-0.35 s).
    ReadAhead ahead;
    if (main.g.ratio <= 8) {
      AddWindowRows(main, i + 1, to, &ahead);
      if (indexer != nullptr) AddWindowRows(*indexer, i + 1, to, &ahead);
    }
    if (!ComputeEntry<true>(main, i, cos_sin, pooled.data(), entry, &ahead) || !EntryStorable(main, entry, &largest)) return false;
    if (indexer != nullptr) {
      Bf16* key = &keys[at * static_cast<size_t>(indexer->g.dim)];
      if (!ComputeEntry<true>(*indexer, i, cos_sin, pooled.data(), key) || !EntryStorable(*indexer, key, &largest)) return false;
    }
  }
  return true;
}

int64_t UnpooledTokens(const CompressorRun& run, int64_t n) {
  const int64_t closed_end = (run.first + n) / run.g.ratio * run.g.ratio;  // tokens before it are in closed windows
  const int64_t pooled_end = run.g.overlap ? closed_end - run.g.ratio : closed_end;
  return std::clamp<int64_t>(pooled_end - run.first, 0, n);
}

// Keeps the chunk's last tokens (as many as the ring holds) in the state
// ring: kv, then score + ape.
void WriteState(const CompressorRun& run, int64_t n) {
  const int64_t width = run.g.width();
  for (int64_t t = std::max(run.first, run.first + n - run.capacity); t < run.first + n; ++t) {
    const PoolSlot src = Slot(run, t, 0);
    float* row = run.state + (t % run.capacity) * 2 * width;
    std::memcpy(row, src.kv, static_cast<size_t>(width) * sizeof(float));
    AddScoreAndApe(src.score, src.ape, row + width, width);  // bit for bit, no subnormal arithmetic
  }
}

}  // namespace kvc
