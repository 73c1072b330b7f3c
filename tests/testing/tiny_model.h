// A three-layer model (window-only, CSA, HCA; window 16) with deterministic
// parameters and token inputs, for tests that need every stream of a
// sequence: snapshots, the sample snapshot, the stress test. Values come
// from splitmix64, not from <random>'s distributions, so they are the same
// on every platform and standard library (the checked-in sample depends on
// them).
#ifndef KVC_TESTS_TESTING_TINY_MODEL_H_
#define KVC_TESTS_TESTING_TINY_MODEL_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kvc/cache.h"
#include "src/status.h"

namespace kvc::testing {

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A value in [-scale, scale) that depends only on (stream, index).
inline float DetValue(uint64_t stream, uint64_t index, float scale) {
  const uint64_t bits = SplitMix64(SplitMix64(stream) ^ index);
  return scale * (static_cast<float>(bits >> 40) / static_cast<float>(1 << 23) - 1.0f);
}

inline std::vector<float> DetValues(uint64_t stream, size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = DetValue(stream, i, scale);
  return v;
}

class TinyModel {
 public:
  static constexpr int kWindowLayer = 0, kCsaLayer = 1, kHcaLayer = 2;

  // hca_by_kvc: kvc computes the HCA layer's entries (else the engine
  // brings them, AppendCompressedRows).
  explicit TinyModel(bool hca_by_kvc = true)
      : csa_ape_(DetValues(1, 4 * 1024, 0.5f)), csa_norm_(DetValues(2, 512, 1.0f)),
        idx_ape_(DetValues(3, 4 * 256, 0.5f)), idx_norm_(DetValues(4, 128, 1.0f)),
        hca_ape_(DetValues(5, 128 * 512, 0.5f)), hca_norm_(DetValues(6, 512, 1.0f)) {
    spec_ = ModelSpec::V4Flash();
    spec_.name = "tiny-w16";
    spec_.layers.assign(3, LayerSpec{});
    spec_.layers[kWindowLayer].kind = LayerKind::kWindow;
    spec_.layers[kCsaLayer] = {LayerKind::kCsa, {csa_ape_, csa_norm_}, {idx_ape_, idx_norm_}};
    spec_.layers[kHcaLayer].kind = LayerKind::kHca;
    if (hca_by_kvc) spec_.layers[kHcaLayer].compressor = {hca_ape_, hca_norm_};
    spec_.window = 16;
    spec_.index_topk = 8;
    spec_.max_context = 1 << 16;
  }
  TinyModel(const TinyModel&) = delete;
  TinyModel& operator=(const TinyModel&) = delete;

  const ModelSpec& spec() const { return spec_; }

  // Appends tokens [Length, to) to every layer in chunks of `chunk`; inputs
  // depend only on (seed, layer, position), so two sequences grown with the
  // same seed hold the same bytes however they were chunked. On an
  // engine-compressed HCA layer the newly closed entries are appended too.
  absl::Status Grow(Cache& cache, SequenceId seq, int64_t to, uint64_t seed, int64_t chunk = 37) const {
    for (int layer = 0; layer < 3; ++layer) {
      KVC_ASSIGN_OR_RETURN(int64_t at, cache.Length(seq, layer));
      while (at < to) {
        const int64_t n = std::min(chunk, to - at);
        KVC_RETURN_IF_ERROR(AppendLayer(cache, seq, layer, at, n, seed));
        at += n;
      }
    }
    return absl::OkStatus();
  }

  // The inputs of tokens [first, first + n) of `layer`: the window rows and
  // the compressor projections (on layers kvc compresses).
  struct Inputs {
    std::vector<Bf16> window;
    std::vector<float> kv, score, ikv, iscore;
    LayerTokens tokens() const {
      LayerTokens t;
      t.window_rows = window;
      t.compressor_kv = kv;
      t.compressor_score = score;
      t.indexer_kv = ikv;
      t.indexer_score = iscore;
      return t;
    }
  };
  Inputs InputsFor(int layer, int64_t first, int64_t n, uint64_t seed) const {
    const LayerSpec& l = spec_.layers[static_cast<size_t>(layer)];
    const uint64_t base = seed * 1000003u + static_cast<uint64_t>(layer) * 7919u;
    auto rows = [&](uint64_t stream, int64_t width, float scale) {
      std::vector<float> v(static_cast<size_t>(n * width));
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t c = 0; c < width; ++c) {
          v[static_cast<size_t>(t * width + c)] =
              DetValue(base + stream, static_cast<uint64_t>((first + t) * width + c), scale);
        }
      }
      return v;
    };
    Inputs in;
    const std::vector<float> window_f = rows(11, kHeadDim, 3.0f);
    in.window.resize(window_f.size());
    std::transform(window_f.begin(), window_f.end(), in.window.begin(), [](float x) { return ToBf16(x); });
    if (l.kind != LayerKind::kWindow && !l.compressor.ape.empty()) {
      const int64_t width = l.kind == LayerKind::kCsa ? 1024 : 512;
      in.kv = rows(12, width, 1.0f);
      in.score = rows(13, width, 2.0f);
      if (l.kind == LayerKind::kCsa) {
        in.ikv = rows(14, 256, 1.0f);
        in.iscore = rows(15, 256, 2.0f);
      }
    }
    return in;
  }

  absl::Status AppendLayer(Cache& cache, SequenceId seq, int layer, int64_t first, int64_t n, uint64_t seed) const {
    const LayerSpec& l = spec_.layers[static_cast<size_t>(layer)];
    const uint64_t base = seed * 1000003u + static_cast<uint64_t>(layer) * 7919u;
    const Inputs in = InputsFor(layer, first, n, seed);
    KVC_RETURN_IF_ERROR(cache.Append(seq, layer, first, in.tokens()));
    if (l.kind == LayerKind::kHca && l.compressor.ape.empty()) {  // the engine's own entries
      KVC_ASSIGN_OR_RETURN(const HistoryView have, cache.CompressedRows(seq, layer));
      const int64_t closed = (first + n) / 128;
      std::vector<Bf16> entries;
      for (int64_t e = have.rows; e < closed; ++e) {
        for (int c = 0; c < kHeadDim; ++c) {
          entries.push_back(ToBf16(DetValue(base + 16, static_cast<uint64_t>(e * kHeadDim + c), 2.0f)));
        }
      }
      KVC_RETURN_IF_ERROR(cache.AppendCompressedRows(seq, layer, have.rows, entries));
    }
    return absl::OkStatus();
  }

 private:
  std::vector<float> csa_ape_, csa_norm_, idx_ape_, idx_norm_, hca_ape_, hca_norm_;
  ModelSpec spec_;
};

// Every byte of `seq` a caller can observe: per layer its length, rollback
// floor, window ring rows (all window + draft_slots slots, in slot order),
// compressed rows and index keys.
inline std::string ObservableBytes(const Cache& cache, SequenceId seq) {
  std::string out;
  auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  const int64_t floor = cache.RollbackFloor(seq).value_or(-1);
  put(&floor, sizeof(floor));
  for (int layer = 0; layer < static_cast<int>(cache.spec().layers.size()); ++layer) {
    const int64_t length = cache.Length(seq, layer).value_or(-1);
    put(&length, sizeof(length));
    const absl::StatusOr<WindowRingView> ring = cache.Window(seq, layer);
    if (!ring.ok()) return "error";
    for (int64_t s = 0; s < ring->ring_slots; ++s) {
      const ConstPackedRows& page = ring->pages[static_cast<size_t>(s / ring->rows_per_page)];
      put(page.row_data(s % ring->rows_per_page), 576);
      put(page.row_scales(s % ring->rows_per_page), 8);
    }
    for (const auto& view : {cache.CompressedRows(seq, layer), cache.IndexKeys(seq, layer)}) {
      if (!view.ok()) return "error";
      for (int64_t i = 0; i < view->rows; ++i) {
        const ConstPackedRows& page = view->pages[static_cast<size_t>(i / view->rows_per_page)];
        put(page.row_data(i % view->rows_per_page), static_cast<size_t>(page.data_stride));
        put(page.row_scales(i % view->rows_per_page), static_cast<size_t>(page.scale_stride));
      }
    }
  }
  return out;
}

}  // namespace kvc::testing

#endif  // KVC_TESTS_TESTING_TINY_MODEL_H_
