// The C API's compressor parameters and index queries against the C++ API:
// a cache created through kvc_cache_create_from_config_with_params stores the
// bytes a kvc::Cache built from the same spec stores (compared after a
// snapshot of the C cache is restored into a C++ one), its parameters are
// copies, and kvc_index_scores gives SelectAttentionSet's scores.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/kvc.h"
#include "kvc/snapshot.h"
#include "tests/testing/tiny_model.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;
using testing::DetValue;
using testing::DetValues;

// Window-only, CSA, HCA; window 16, top-k 8, 4096 positions.
constexpr char kConfig[] =
    R"({"num_hidden_layers": 3, "compress_ratios": [0, 4, 128], "sliding_window": 16, "head_dim": 512,
        "qk_rope_head_dim": 64, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 8,
        "max_position_embeddings": 4096, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rms_norm_eps": 1e-06})";
constexpr int kCsa = 1, kHca = 2;

// Parameters for kConfig's model, drawn from `seed`.
struct Params {
  explicit Params(uint64_t seed)
      : csa_ape(DetValues(seed + 1, 4 * 1024, 0.5f)), csa_norm(DetValues(seed + 2, 512, 1.0f)),
        idx_ape(DetValues(seed + 3, 4 * 256, 0.5f)), idx_norm(DetValues(seed + 4, 128, 1.0f)),
        hca_ape(DetValues(seed + 5, 128 * 512, 0.5f)), hca_norm(DetValues(seed + 6, 512, 1.0f)),
        rope(DetValues(seed + 7, 4096 * 64, 1.0f)) {}

  std::vector<float> csa_ape, csa_norm, idx_ape, idx_norm, hca_ape, hca_norm, rope;

  ModelSpec Spec() const {
    ModelSpec spec = *ModelSpec::FromHuggingFaceConfig(kConfig);
    spec.layers[kCsa].compressor = {csa_ape, csa_norm};
    spec.layers[kCsa].indexer = {idx_ape, idx_norm};
    spec.layers[kHca].compressor = {hca_ape, hca_norm};
    spec.compressed_rope.engine_table = rope;
    return spec;
  }

  // The C description; `layers` holds 3 entries.
  kvc_model_params C(kvc_layer_params* layers) const {
    auto c = [](const std::vector<float>& ape, const std::vector<float>& norm) {
      return kvc_compressor_params{ape.data(), static_cast<int64_t>(ape.size()), norm.data(),
                                   static_cast<int64_t>(norm.size())};
    };
    layers[0] = kvc_layer_params{};
    layers[kCsa] = {c(csa_ape, csa_norm), c(idx_ape, idx_norm)};
    layers[kHca] = {c(hca_ape, hca_norm), {}};
    kvc_model_params params{};
    params.layers = layers;
    params.num_layers = 3;
    params.compressed_rope_table = rope.data();
    params.compressed_rope_table_count = static_cast<int64_t>(rope.size());
    return params;
  }
};

struct CacheDeleter {
  void operator()(kvc_cache* c) const { kvc_cache_destroy(c); }
};
using CCache = std::unique_ptr<kvc_cache, CacheDeleter>;

CCache CreateC(const Params& p) {
  kvc_layer_params layers[3];
  const kvc_model_params params = p.C(layers);
  kvc_cache* cache = nullptr;
  EXPECT_EQ(kvc_cache_create_from_config_with_params(kConfig, sizeof(kConfig) - 1, nullptr, &params, &cache), KVC_OK)
      << kvc_last_error();
  return CCache(cache);
}

// The inputs of tokens [0, n) of `layer`, depending only on (layer, position).
struct Tokens {
  std::vector<Bf16> window;
  std::vector<float> kv, score, ikv, iscore;
};
Tokens MakeTokens(int layer, int64_t n) {
  Tokens t;
  const uint64_t base = 1000u + static_cast<uint64_t>(layer) * 100u;
  for (size_t i = 0; i < static_cast<size_t>(n) * 512; ++i) t.window.push_back(ToBf16(DetValue(base, i, 3.0f)));
  if (layer == 0) return t;
  const size_t width = layer == kCsa ? 1024 : 512;
  t.kv = DetValues(base + 1, static_cast<size_t>(n) * width, 1.0f);
  t.score = DetValues(base + 2, static_cast<size_t>(n) * width, 2.0f);
  if (layer == kCsa) {
    t.ikv = DetValues(base + 3, static_cast<size_t>(n) * 256, 1.0f);
    t.iscore = DetValues(base + 4, static_cast<size_t>(n) * 256, 2.0f);
  }
  return t;
}

constexpr int64_t kTokens = 300;  // 75 CSA entries, 2 HCA entries

// A new sequence of `cache` (C) holding kTokens tokens in every layer.
kvc_seq GrownC(kvc_cache* cache) {
  kvc_seq seq = 0;
  EXPECT_EQ(kvc_seq_create(cache, &seq), KVC_OK) << kvc_last_error();
  for (int layer = 0; layer < 3; ++layer) {
    const Tokens t = MakeTokens(layer, kTokens);
    auto p = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
    const kvc_layer_tokens c{reinterpret_cast<const uint16_t*>(t.window.data()), p(t.kv), p(t.score), p(t.ikv),
                             p(t.iscore), kTokens};
    EXPECT_EQ(kvc_seq_append_tokens(cache, seq, layer, 0, &c), KVC_OK) << kvc_last_error();
  }
  return seq;
}

// The same in a C++ cache of `spec`.
struct GrownCpp {
  std::unique_ptr<Cache> cache;
  SequenceId seq = 0;
};
GrownCpp MakeGrownCpp(const ModelSpec& spec) {
  GrownCpp g{*Cache::Create(spec), 0};
  g.seq = *g.cache->CreateSequence();
  for (int layer = 0; layer < 3; ++layer) {
    const Tokens t = MakeTokens(layer, kTokens);
    EXPECT_TRUE(g.cache->Append(g.seq, layer, 0, {t.window, t.kv, t.score, t.ikv, t.iscore}).ok());
  }
  return g;
}

// Every observable byte of the C cache's sequence, read through a snapshot
// restored into `reader` (which refuses a snapshot of another model: its
// fingerprint covers the parameters).
std::string BytesOfC(kvc_cache* cache, kvc_seq seq, Cache& reader) {
  const std::string path = ::testing::TempDir() + "c_api_params_" + std::to_string(::getpid()) + ".kvcsnap";
  EXPECT_EQ(kvc_snapshot_save(cache, &seq, 1, path.c_str(), 0), KVC_OK) << kvc_last_error();
  absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(reader, path);
  std::remove(path.c_str());
  if (!ids.ok() || ids->size() != 1) return "restore failed: " + std::string(ids.status().message());
  return testing::ObservableBytes(reader, (*ids)[0]);
}

// a == b, else where they first differ (the strings are megabytes).
::testing::AssertionResult SameBytes(const std::string& a, const std::string& b) {
  if (a == b) return ::testing::AssertionSuccess();
  size_t at = 0;
  while (at < a.size() && at < b.size() && a[at] == b[at]) ++at;
  return ::testing::AssertionFailure() << "sizes " << a.size() << " and " << b.size() << ", first difference at byte "
                                       << at << (a.rfind("restore failed", 0) == 0 ? ": " + a : std::string());
}

TEST(CApiParams, StoresTheBytesOfTheCppCache) {
  const Params params(10);
  CCache c = CreateC(params);
  ASSERT_NE(c, nullptr);
  const kvc_seq seq = GrownC(c.get());
  const GrownCpp cpp = MakeGrownCpp(params.Spec());
  ASSERT_EQ(cpp.cache->CompressedRows(cpp.seq, kHca)->rows, 2);
  ASSERT_EQ(cpp.cache->IndexKeys(cpp.seq, kCsa)->rows, 75);
  EXPECT_TRUE(SameBytes(BytesOfC(c.get(), seq, *cpp.cache), testing::ObservableBytes(*cpp.cache, cpp.seq)));
}

TEST(CApiParams, ParametersAreCopied) {
  auto params = std::make_unique<Params>(10);
  CCache c = CreateC(*params);
  ASSERT_NE(c, nullptr);
  *params = Params(20);  // other values in the caller's buffers, then freed
  params.reset();
  const kvc_seq seq = GrownC(c.get());
  const Params same(10);
  const GrownCpp cpp = MakeGrownCpp(same.Spec());
  EXPECT_TRUE(SameBytes(BytesOfC(c.get(), seq, *cpp.cache), testing::ObservableBytes(*cpp.cache, cpp.seq)));
}

TEST(CApiParams, IndexScoresAreSelectAttentionSetsScores) {
  const Params params(10);
  CCache c = CreateC(params);
  ASSERT_NE(c, nullptr);
  const kvc_seq seq = GrownC(c.get());
  const GrownCpp grown = MakeGrownCpp(params.Spec());
  Cache* cpp = grown.cache.get();
  const SequenceId ref = grown.seq;

  constexpr int kHeads = 64;
  std::vector<Bf16> q(kHeads * 128);
  for (size_t i = 0; i < q.size(); ++i) q[i] = ToBf16(DetValue(77, i, 4.0f));
  const std::vector<float> weights = DetValues(78, kHeads, 0.1f);
  kvc_index_query* query = nullptr;
  ASSERT_EQ(kvc_index_query_prepare(c.get(), kTokens - 1, reinterpret_cast<const uint16_t*>(q.data()), weights.data(),
                                    kHeads, &query),
            KVC_OK)
      << kvc_last_error();
  std::vector<float> scores(100, -1.0f);
  int64_t count = -1;
  EXPECT_EQ(kvc_index_scores(c.get(), seq, kCsa, query, scores.data(), static_cast<int64_t>(scores.size()), &count),
            KVC_OK)
      << kvc_last_error();
  kvc_index_query_destroy(query);

  const IndexQuery cpp_query = *cpp->PrepareIndexQuery(kTokens - 1, q, weights);
  std::vector<float> expected;
  ASSERT_TRUE(cpp->SelectAttentionSet(ref, kCsa, &cpp_query, &expected).ok());
  ASSERT_EQ(expected.size(), 75u);  // entries j < 300 / 4
  ASSERT_EQ(count, 75);
  EXPECT_EQ(std::memcmp(scores.data(), expected.data(), expected.size() * sizeof(float)), 0);
  EXPECT_EQ(scores[75], -1.0f);  // nothing written past the scores
  bool varied = false;
  for (const float s : expected) varied |= s != expected[0];
  EXPECT_TRUE(varied);  // the comparison is not between constants
}

TEST(CApiParams, TheRopeTableIsUsed) {
  // The same weights without the engine's table store other index keys: the
  // table given in C reaches the compressor.
  const Params params(10);
  CCache c = CreateC(params);
  ASSERT_NE(c, nullptr);
  const kvc_seq seq = GrownC(c.get());
  ModelSpec spec = params.Spec();
  spec.compressed_rope.engine_table = {};
  const GrownCpp kvc_rope = MakeGrownCpp(spec);
  std::unique_ptr<Cache> reader = *Cache::Create(params.Spec());
  const std::string bytes = BytesOfC(c.get(), seq, *reader);
  ASSERT_NE(bytes.rfind("restore failed", 0), 0u) << bytes;
  EXPECT_FALSE(SameBytes(bytes, testing::ObservableBytes(*kvc_rope.cache, kvc_rope.seq)));
}

TEST(CApiParams, WrongSizesAreRefusedNamingLayerAndField) {
  const Params params(10);
  kvc_layer_params layers[3];
  kvc_cache* cache = nullptr;
  auto create = [&](const kvc_model_params& p) {
    return kvc_cache_create_from_config_with_params(kConfig, sizeof(kConfig) - 1, nullptr, &p, &cache);
  };
  struct Case {
    const char* what;
    void (*spoil)(kvc_model_params&, kvc_layer_params*);
    const char* message;
  };
  const Case cases[] = {
      {"short ape", [](kvc_model_params&, kvc_layer_params* l) { l[kCsa].compressor.ape_count -= 1; },
       "layer 1: compressor.ape has 4095 values, expected 4 x 1024"},
      {"indexer norm", [](kvc_model_params&, kvc_layer_params* l) { l[kCsa].indexer.norm_weight_count = 64; },
       "layer 1: indexer.norm_weight has 64 values, expected 128"},
      {"hca norm", [](kvc_model_params&, kvc_layer_params* l) { l[kHca].compressor.norm_weight_count = 128; },
       "layer 2: compressor.norm_weight has 128 values, expected 512"},
      {"null ape", [](kvc_model_params&, kvc_layer_params* l) { l[kHca].compressor.ape = nullptr; },
       "layer 2: compressor.ape is NULL with compressor.ape_count 65536"},
      {"negative", [](kvc_model_params&, kvc_layer_params* l) { l[kCsa].indexer.ape_count = -5; },
       "layer 1: indexer.ape_count -5 is negative"},
      {"window layer", [](kvc_model_params&, kvc_layer_params* l) { l[0].compressor = l[kHca].compressor; },
       "layer 0: a window-only layer has no compressor"},
      {"window norm only",
       [](kvc_model_params&, kvc_layer_params* l) {
         l[0].indexer.norm_weight = l[kCsa].indexer.norm_weight;
         l[0].indexer.norm_weight_count = 128;
       },
       "layer 0: a window-only layer"},
      {"hca indexer", [](kvc_model_params&, kvc_layer_params* l) { l[kHca].indexer = l[kCsa].indexer; },
       "layer 2: an HCA layer has no indexer"},
      {"csa half", [](kvc_model_params&, kvc_layer_params* l) { l[kCsa].indexer = {}; },
       "layer 1: a CSA layer needs both compressor and indexer parameters"},
      {"layer count", [](kvc_model_params& p, kvc_layer_params*) { p.num_layers = 2; },
       "num_layers 2 with layers given; the model has 3 layers"},
      {"rope short", [](kvc_model_params& p, kvc_layer_params*) { p.compressed_rope_table_count -= 64; },
       "compressed_rope.engine_table covers 4095 positions, fewer than max_context 4096"},
      {"rope ragged", [](kvc_model_params& p, kvc_layer_params*) { p.compressed_rope_table_count -= 1; },
       "not a multiple of 64"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    kvc_model_params p = params.C(layers);
    c.spoil(p, layers);
    EXPECT_EQ(create(p), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_THAT(kvc_last_error(), HasSubstr(c.message));
    EXPECT_EQ(cache, nullptr);
  }
  std::vector<float> nan_ape = params.csa_ape;
  nan_ape[7] = NAN;
  kvc_model_params p = params.C(layers);
  layers[kCsa].compressor.ape = nan_ape.data();
  EXPECT_EQ(create(p), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_THAT(kvc_last_error(), HasSubstr("layer 1: compressor.ape is not finite"));
  // A zeroed struct, or none, adds nothing.
  const kvc_model_params none{};
  EXPECT_EQ(create(none), KVC_OK) << kvc_last_error();
  kvc_cache_destroy(cache);
}

}  // namespace
}  // namespace kvc
