// libFuzzer: random sequences of C API calls on one small cache, created with
// or without compressor parameters. Every call returns KVC_OK or a documented
// error code with a message; lengths follow a shadow model of what succeeded;
// index scores number the CSA entries closed; planned steps list a window
// slot per token and end as a whole (committed once every layer was
// appended, else aborted back to the planned lengths); used bytes never
// exceed reserved ones; prefixes restore at most what the lookup said;
// freeing everything leaves only the cached prefixes' bytes, within their
// budget.
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "kvc/kvc.h"

namespace {

// Three layers (window-only, CSA, HCA), window 4. Without parameters the
// compressed entries are the engine's, which the C API cannot append yet:
// those layers hold window rows only.
constexpr char kConfig[] =
    R"({"num_hidden_layers": 3, "compress_ratios": [0, 4, 128], "sliding_window": 4, "head_dim": 512,
        "qk_rope_head_dim": 64, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 8,
        "max_position_embeddings": 4096, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rms_norm_eps": 1e-06})";
constexpr int kLayers = 3;
constexpr int kWindow = 4;
constexpr int32_t kKinds[kLayers] = {KVC_LAYER_WINDOW, KVC_LAYER_CSA, KVC_LAYER_HCA};
// Projection widths (main, indexer) per layer.
constexpr int64_t kMainWidth[kLayers] = {0, 1024, 512};
constexpr int64_t kIndexWidth[kLayers] = {0, 256, 0};

// Parameters for the model: ape zeros, norm weights ones (copied at creation).
kvc_model_params Params(kvc_layer_params* layers) {
  static const std::vector<float> zeros(128 * 512, 0.0f), ones(512, 1.0f);
  layers[0] = kvc_layer_params{};
  layers[1] = {{zeros.data(), 4 * 1024, ones.data(), 512}, {zeros.data(), 4 * 256, ones.data(), 128}};
  layers[2] = {{zeros.data(), 128 * 512, ones.data(), 512}, {}};
  kvc_model_params params{};
  params.layers = layers;
  params.num_layers = kLayers;
  return params;
}

// Consumes the fuzzer's bytes; zeros once they run out.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return at_ >= size_; }
  uint8_t Byte() { return at_ < size_ ? data_[at_++] : 0; }
  int64_t Int64() {
    int64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | Byte();
    return v;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

// The result of a call: a known code, and a message after an error.
void CheckCode(int rc) {
  Check(rc <= KVC_OK && rc >= KVC_ERR_IO);
  if (rc != KVC_OK) Check(std::strlen(kvc_last_error()) > 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in(data, size);
  kvc_options options;
  kvc_options_default(&options);
  options.rollback_depth = in.Byte() % 6;  // 5 > window: creation must refuse it
  const uint8_t layout = in.Byte();
  options.rows_per_page = 1 + layout % 8;
  options.draft_slots = (layout >> 3) % 4;  // the ring holds kWindow + draft_slots rows
  const bool with_params = layout >= 128;  // kvc compresses
  options.keys_per_page = 1 + in.Byte() % 8;
  options.history_bytes = 1 << 20;
  options.prefix_block_tokens = 128;
  options.prefix_bytes = int64_t{in.Byte()} << 14;  // 0 to 4 MiB: from none to a few checkpoints
  // Small: creation can run out (with parameters an HCA layer's compressor
  // state alone is 512 KiB a sequence).
  const uint8_t state = in.Byte();
  options.state_bytes = with_params ? int64_t{1 + state % 8} << 19 : int64_t{64 + state % 256} << 10;
  kvc_cache* cache = nullptr;
  kvc_layer_params layers[kLayers];
  const kvc_model_params params = Params(layers);
  const int created =
      kvc_cache_create_from_config_with_params(kConfig, sizeof(kConfig) - 1, &options, with_params ? &params : nullptr,
                                               &cache);
  CheckCode(created);
  if (created != KVC_OK) {
    Check(options.rollback_depth > kWindow && cache == nullptr);
    return 0;
  }
  static const std::string path = "/tmp/kvc_fuzz_c_api_" + std::to_string(::getpid()) + ".kvcsnap";
  std::remove(path.c_str());

  std::map<kvc_seq, std::vector<int64_t>> lengths;  // shadow: per layer
  std::vector<uint16_t> rows(8 * KVC_HEAD_DIM);
  std::vector<uint16_t> window(kWindow * KVC_HEAD_DIM);
  std::vector<float> projections(8 * 1024);
  auto pick = [&](uint8_t b) -> kvc_seq {
    if (lengths.empty() || b % 16 == 15) return static_cast<kvc_seq>(b) * 1000 - 7;  // unknown ids
    auto it = lengths.begin();
    std::advance(it, b % lengths.size());
    return it->first;
  };
  for (int step = 0; step < 200 && !in.empty(); ++step) {
    const uint8_t op = in.Byte() % 16;
    const kvc_seq seq = pick(in.Byte());
    const auto known = lengths.find(seq);
    switch (op) {
      case 0: {
        kvc_seq id = 0;
        const int rc = kvc_seq_create(cache, &id);
        CheckCode(rc);
        if (rc == KVC_OK) lengths[id] = std::vector<int64_t>(kLayers, 0);
        break;
      }
      case 1:
      case 2: {
        const int32_t layer = static_cast<int32_t>(in.Byte() % (kLayers + 1)) - (op == 2 ? 1 : 0);
        const int64_t count = in.Byte() % 9;
        const uint8_t pattern = in.Byte();
        for (size_t i = 0; i < static_cast<size_t>(count) * KVC_HEAD_DIM; ++i) {
          rows[i] = static_cast<uint16_t>(0x3F80 + (i * pattern) % 512);
        }
        if (pattern == 0xFF && count > 0) rows[7] = 0x7FC0;  // NaN
        int64_t position = known != lengths.end() && layer >= 0 && layer < kLayers
                               ? known->second[static_cast<size_t>(layer)] : 0;
        if (pattern % 17 == 0) position += 1;  // a gap
        // With parameters, the compressed layers need projections; leave them
        // out now and then (a refusal).
        const bool compressed = layer == 1 || layer == 2;
        const bool omit = compressed && with_params && pattern % 7 == 0;
        int rc;
        if (with_params && compressed && !omit) {
          for (size_t i = 0; i < projections.size(); ++i) {
            projections[i] = static_cast<float>((i * pattern) % 64) / 32.0f - 1.0f;
          }
          const float* p = projections.data();
          const kvc_layer_tokens tokens{rows.data(), p, p, kIndexWidth[layer] > 0 ? p : nullptr,
                                        kIndexWidth[layer] > 0 ? p : nullptr, count};
          static_assert(8 * 1024 >= 8 * kMainWidth[1], "projections hold 8 tokens");
          rc = kvc_seq_append_tokens(cache, seq, layer, position, &tokens);
        } else {
          rc = kvc_seq_append(cache, seq, layer, position, rows.data(), count);
        }
        CheckCode(rc);
        if (rc == KVC_OK) {
          Check(known != lengths.end() && pattern % 17 != 0 && !(pattern == 0xFF && count > 0) && !(omit && count > 0));
          known->second[static_cast<size_t>(layer)] += count;
        }
        break;
      }
      case 3: {
        kvc_seq child = 0;
        const int rc = kvc_seq_fork(cache, seq, &child);
        CheckCode(rc);
        if (rc == KVC_OK) lengths[child] = known->second;
        break;
      }
      case 4: {
        const int64_t target = known != lengths.end() ? known->second[0] - in.Byte() % 8 : in.Int64();
        const int rc = kvc_seq_truncate(cache, seq, target);
        CheckCode(rc);
        if (rc == KVC_OK) known->second.assign(kLayers, target);
        break;
      }
      case 5: {
        const int rc = kvc_seq_free(cache, seq);
        CheckCode(rc);
        Check((rc == KVC_OK) == (known != lengths.end()));
        if (rc == KVC_OK) lengths.erase(known);
        break;
      }
      case 6: {
        const int32_t layer = static_cast<int32_t>(in.Byte() % 5) - 1;
        int64_t length = -1, floor = -1;
        const int rc = kvc_seq_length(cache, seq, layer, &length);
        CheckCode(rc);
        if (rc == KVC_OK) Check(known != lengths.end() && length == known->second[static_cast<size_t>(layer)]);
        CheckCode(kvc_seq_rollback_floor(cache, seq, &floor));
        const int64_t values = in.Byte() % 2 ? kWindow * KVC_HEAD_DIM : in.Byte();
        CheckCode(kvc_seq_read_window(cache, seq, layer, window.data(), std::min<int64_t>(values, kWindow * KVC_HEAD_DIM)));
        break;
      }
      case 7: {
        std::vector<kvc_seq> ids;
        for (const auto& entry : lengths) ids.push_back(entry.first);
        if (in.Byte() % 4 == 0) ids.push_back(seq);  // maybe unknown, maybe twice
        CheckCode(kvc_snapshot_save(cache, ids.data(), ids.size(), path.c_str(), in.Byte() % 2));
        break;
      }
      case 8: {
        std::vector<kvc_seq> out(in.Byte() % 6);
        size_t count = 0;
        const int rc = kvc_snapshot_restore(cache, path.c_str(), out.data(), out.size(), &count);
        CheckCode(rc);
        if (rc == KVC_OK) {
          for (size_t i = 0; i < count; ++i) {
            std::vector<int64_t>& l = lengths[out[i]];
            l.resize(kLayers);
            for (int32_t layer = 0; layer < kLayers; ++layer) {
              Check(kvc_seq_length(cache, out[i], layer, &l[static_cast<size_t>(layer)]) == KVC_OK);
            }
          }
        }
        break;
      }
      case 9: {
        const int32_t layer = static_cast<int32_t>(in.Byte() % 5) - 1;
        int32_t kind = -1;
        const int rc = kvc_cache_layer_kind(cache, layer, &kind);
        CheckCode(rc);
        Check((rc == KVC_OK) == (layer >= 0 && layer < kLayers));
        if (rc == KVC_OK) Check(kind == kKinds[layer]);
        break;
      }
      case 10: {
        const int32_t heads = in.Byte() % 9;  // 0: refused
        const uint8_t pattern = in.Byte();
        const int64_t position = pattern % 5 == 0 ? in.Int64() : known != lengths.end() ? known->second[1] - 1 : 0;
        std::vector<uint16_t> q(static_cast<size_t>(heads) * KVC_INDEX_DIM);
        for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint16_t>(0x3F80 + (i * pattern) % 512);
        std::vector<float> weights(static_cast<size_t>(heads), pattern / 256.0f);
        kvc_index_query* query = nullptr;
        const int rc = kvc_index_query_prepare(cache, position, q.data(), weights.data(), heads, &query);
        CheckCode(rc);
        Check((rc == KVC_OK) == (query != nullptr));
        if (rc != KVC_OK) break;
        const int32_t layer = static_cast<int32_t>(in.Byte() % 5) - 1;
        std::vector<float> scores(in.Byte() % 40);
        int64_t count = -1;
        const int scored = kvc_index_scores(cache, seq, layer, query, scores.data(), static_cast<int64_t>(scores.size()),
                                            &count);
        CheckCode(scored);
        if (scored == KVC_OK) {
          Check(known != lengths.end() && layer == 1);
          Check(count == (with_params ? known->second[1] / 4 : 0));
        }
        kvc_index_query_destroy(query);
        break;
      }
      case 11: {  // a verify step's or a chunk's selection
        const int32_t layer = static_cast<int32_t>(in.Byte() % 5) - 1;
        const uint8_t shape = in.Byte();
        const int64_t held = known != lengths.end() && layer >= 0 && layer < kLayers ? known->second[static_cast<size_t>(layer)] : 0;
        const int64_t count = shape % 7 - 1;  // -1: refused
        const int64_t first = shape % 11 == 0 ? in.Int64() : held - count + (shape % 13 == 0 ? 1 : 0);
        std::vector<kvc_index_query*> queries;
        if (layer == 1 && count > 0 && shape % 5 != 0) {  // CSA queries, or none (refused)
          std::vector<uint16_t> q(2 * KVC_INDEX_DIM, 0x3F80);
          const float weights[2] = {0.5f, 0.25f};
          for (int64_t i = 0; i < count; ++i) {
            kvc_index_query* query = nullptr;
            if (kvc_index_query_prepare(cache, std::max<int64_t>(0, first + i), q.data(), weights, 2, &query) == KVC_OK) {
              queries.push_back(query);
            }
          }
        }
        const int64_t capacity = in.Byte() % 32;
        std::vector<int64_t> window_offsets(8), compressed_offsets(8), positions(static_cast<size_t>(capacity)),
            entries(static_cast<size_t>(capacity));
        std::vector<int32_t> window_indices(static_cast<size_t>(capacity)), compressed_indices(static_cast<size_t>(capacity));
        kvc_position_sets sets{window_offsets.data(), positions.data(), window_indices.data(), capacity,
                               compressed_offsets.data(), entries.data(), compressed_indices.data(), capacity, 0, 0};
        const bool all_queries = static_cast<int64_t>(queries.size()) == count;
        const int rc = kvc_seq_select_positions(cache, seq, layer, first, count,
                                                all_queries && !queries.empty() ? queries.data() : nullptr, &sets);
        CheckCode(rc);
        if (rc == KVC_OK) {
          Check(known != lengths.end() && first >= 0 && count >= 0 && first + count <= held);
          Check(sets.window_total <= capacity && sets.compressed_total <= capacity);
          Check(window_offsets[0] == 0 && window_offsets[static_cast<size_t>(count)] == sets.window_total);
          const int64_t ring = kWindow + options.draft_slots;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t t = first + i;
            Check(window_offsets[static_cast<size_t>(i) + 1] - window_offsets[static_cast<size_t>(i)] == std::min<int64_t>(t + 1, kWindow));
            for (int64_t k = window_offsets[static_cast<size_t>(i)]; k < window_offsets[static_cast<size_t>(i) + 1]; ++k) {
              const int64_t p = positions[static_cast<size_t>(k)];
              Check(p <= t && p > t - kWindow && (window_indices[static_cast<size_t>(k)] == -1) == (p < held - ring));
            }
          }
        } else if (rc == KVC_ERR_OUT_OF_RANGE && sets.window_total >= 0) {
          Check(sets.window_total > capacity || sets.compressed_total > capacity);
        }
        for (kvc_index_query* query : queries) kvc_index_query_destroy(query);
        break;
      }
      case 14: {  // a planned step over 1..3 sequences, appended and committed, or aborted part-way
        const uint8_t shape = in.Byte();
        std::vector<kvc_seq> seqs = {seq};
        for (int i = 0; i < shape % 3; ++i) seqs.push_back(pick(in.Byte()));  // maybe unknown, maybe twice
        std::vector<int64_t> tokens;
        for (size_t i = 0; i < seqs.size(); ++i) tokens.push_back(static_cast<int64_t>(in.Byte() % 10) - 1);  // < 1: refused
        kvc_step_plan* plan = nullptr;
        const int rc = kvc_step_plan_create(cache, seqs.data(), tokens.data(), static_cast<int64_t>(seqs.size()), &plan);
        CheckCode(rc);
        Check((rc == KVC_OK) == (plan != nullptr));
        if (rc != KVC_OK) break;
        int64_t total = 0;
        for (size_t b = 0; b < seqs.size(); ++b) {
          const auto it = lengths.find(seqs[b]);
          Check(it != lengths.end() && tokens[b] >= 1 && std::count(seqs.begin(), seqs.end(), seqs[b]) == 1);
          Check(std::count(it->second.begin(), it->second.end(), it->second[0]) == kLayers);  // one length
          total += tokens[b];
        }
        uint64_t epoch = 0;
        Check(kvc_step_plan_epoch(plan, &epoch) == KVC_OK);
        const int32_t* indptr = nullptr;
        const int64_t* slots = nullptr;
        int64_t n = -1;
        Check(kvc_step_plan_slots(plan, KVC_STREAM_WINDOW, &indptr, &slots, &n) == KVC_OK);
        Check(n == total && indptr[0] == 0 && indptr[seqs.size()] == n);
        const kvc_page_copy* copies = nullptr;
        Check(kvc_step_plan_copies(plan, &copies, &n) == KVC_OK && n == 0);  // kvc's mode copies itself
        // Every layer of the first `written` sequences; the others not at all.
        const size_t written = in.Byte() % (seqs.size() + 1);
        for (size_t b = 0; b < written; ++b) {
          const std::vector<int64_t>& l = lengths[seqs[b]];
          for (int32_t layer = 0; layer < kLayers; ++layer) {
            for (size_t i = 0; i < static_cast<size_t>(tokens[b]) * KVC_HEAD_DIM; ++i) {
              rows[i] = static_cast<uint16_t>(0x3F80 + (i * shape) % 512);
            }
            int appended;
            if (with_params && layer > 0) {
              for (size_t i = 0; i < projections.size(); ++i) projections[i] = static_cast<float>((i * shape) % 64) / 32.0f - 1.0f;
              const float* p = projections.data();
              const kvc_layer_tokens t{rows.data(), p, p, kIndexWidth[layer] > 0 ? p : nullptr,
                                       kIndexWidth[layer] > 0 ? p : nullptr, tokens[b]};
              appended = kvc_seq_append_tokens(cache, seqs[b], layer, l[static_cast<size_t>(layer)], &t);
            } else {
              appended = kvc_seq_append(cache, seqs[b], layer, l[static_cast<size_t>(layer)], rows.data(), tokens[b]);
            }
            Check(appended == KVC_OK);
          }
        }
        const bool complete = written == seqs.size();
        const bool commit = in.Byte() % 2 == 0;
        if (commit) {
          const int committed = kvc_step_commit(cache, epoch);
          CheckCode(committed);
          Check((committed == KVC_OK) == complete);
          if (committed == KVC_OK) {
            for (size_t b = 0; b < seqs.size(); ++b) {
              for (int64_t& length : lengths[seqs[b]]) length += tokens[b];
            }
          }
        }
        if (!commit || !complete) Check(kvc_step_abort(cache, epoch) == KVC_OK);
        Check(kvc_step_commit(cache, epoch) == KVC_ERR_NOT_FOUND && kvc_step_abort(cache, epoch) == KVC_ERR_NOT_FOUND);
        kvc_step_plan_destroy(plan);
        for (const kvc_seq s : seqs) {
          for (int32_t layer = 0; layer < kLayers; ++layer) {
            int64_t length = -1;
            Check(kvc_seq_length(cache, s, layer, &length) == KVC_OK && length == lengths[s][static_cast<size_t>(layer)]);
          }
        }
        kvc_usage usage;
        Check(kvc_cache_usage(cache, &usage) == KVC_OK && usage.open_steps == 0 && usage.deferred_pages == 0);
        break;
      }
      case 12:
      case 13: {  // prefix caching: chains share their first block by chain % 4, and reuse hashes now and then
        const uint8_t chain = in.Byte();
        const int64_t count = in.Byte() % 4;
        std::vector<uint64_t> hashes;
        for (int64_t i = 0; i < count; ++i) {
          hashes.push_back(i == 0 ? 1000u + chain % 4 : chain % 8 == 7 ? 1000u + static_cast<uint64_t>(i) : chain * 100u + static_cast<uint64_t>(i));
        }
        if (op == 12) {
          const int rc = kvc_prefix_publish(cache, seq, hashes.data(), count);
          CheckCode(rc);
          if (rc == KVC_OK) {
            Check(known != lengths.end() && count > 0);
            for (const int64_t l : known->second) Check(l == known->second[0] && l >= count * 128);
          }
        } else {
          kvc_seq id = 0;
          int64_t tokens = -1, looked = -1, shared = -1;
          CheckCode(kvc_prefix_lookup(cache, hashes.data(), count, &looked, &shared));
          const int rc = kvc_seq_create_from_prefix(cache, hashes.data(), count, &id, &tokens);
          CheckCode(rc);
          if (rc == KVC_OK) {
            Check(tokens == looked && tokens % 128 == 0 && tokens <= shared && shared <= count * 128);
            std::vector<int64_t>& l = lengths[id];
            l.resize(kLayers);
            for (int32_t layer = 0; layer < kLayers; ++layer) {
              Check(kvc_seq_length(cache, id, layer, &l[static_cast<size_t>(layer)]) == KVC_OK);
              Check(l[static_cast<size_t>(layer)] == tokens);
            }
          }
        }
        break;
      }
      default: {
        kvc_usage usage;
        Check(kvc_cache_usage(cache, &usage) == KVC_OK);
        Check(usage.sequences == static_cast<int64_t>(lengths.size()));
        for (int c = 0; c < KVC_NUM_COMPONENTS; ++c) Check(usage.used_bytes[c] <= usage.reserved_bytes[c]);
        kvc_prefix_usage prefix;
        Check(kvc_cache_prefix_usage(cache, &prefix) == KVC_OK);
        Check(prefix.cached_bytes <= prefix.limit_bytes && prefix.cached_bytes >= 0);
        break;
      }
    }
  }
  for (const auto& entry : lengths) Check(kvc_seq_free(cache, entry.first) == KVC_OK);
  kvc_usage usage;
  Check(kvc_cache_usage(cache, &usage) == KVC_OK && usage.sequences == 0);
  // What is left is the cached prefixes', all of it within their budget.
  kvc_prefix_usage prefix;
  Check(kvc_cache_prefix_usage(cache, &prefix) == KVC_OK);
  int64_t used = 0;
  for (int c = 0; c < KVC_NUM_COMPONENTS; ++c) used += usage.used_bytes[c];
  Check(used == prefix.cached_bytes && prefix.cached_bytes <= prefix.limit_bytes && prefix.shared_bytes == 0);
  kvc_cache_destroy(cache);
  std::remove(path.c_str());
  return 0;
}
