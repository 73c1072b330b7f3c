#include "kvc/model_spec.h"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

TEST(ModelSpec, PresetsMatchTheSpecSchedules) {
  const ModelSpec flash = ModelSpec::V4Flash();
  ASSERT_EQ(flash.layers.size(), 43u);
  EXPECT_EQ(flash.CountLayers(LayerKind::kWindow), 2);
  EXPECT_EQ(flash.CountLayers(LayerKind::kCsa), 21);
  EXPECT_EQ(flash.CountLayers(LayerKind::kHca), 20);
  EXPECT_EQ(flash.layers[2].kind, LayerKind::kCsa);
  EXPECT_EQ(flash.layers[42].kind, LayerKind::kCsa);
  EXPECT_EQ(flash.index_topk, 512);
  EXPECT_TRUE(flash.Validate().ok());

  const ModelSpec pro = ModelSpec::V4Pro();
  ASSERT_EQ(pro.layers.size(), 61u);
  EXPECT_EQ(pro.CountLayers(LayerKind::kWindow), 0);
  EXPECT_EQ(pro.CountLayers(LayerKind::kCsa), 30);
  EXPECT_EQ(pro.CountLayers(LayerKind::kHca), 31);
  EXPECT_EQ(pro.index_topk, 1024);
  EXPECT_EQ(pro.compressed_rope.theta, 160000.0);
  EXPECT_EQ(pro.compressed_rope.yarn.factor, 16.0);
  EXPECT_EQ(pro.compressed_rope.yarn.original_max_positions, 65536);
  EXPECT_EQ(pro.window_rope.yarn.factor, 1.0);
  EXPECT_TRUE(pro.Validate().ok());
  EXPECT_EQ(ModelSpec::Preset("v4-typo").status().code(), absl::StatusCode::kNotFound);
}

// A V4-Flash-shaped config.json: 43 layers plus one MTP entry.
std::string FlashConfig(const std::string& override_key = "", const std::string& override_value = "") {
  std::string ratios = "[0, 0";
  for (int i = 0; i < 20; ++i) ratios += ", 4, 128";
  ratios += ", 4, 0]";
  std::vector<std::pair<std::string, std::string>> keys = {
      {"model_type", "\"deepseek_v4\""},   {"num_hidden_layers", "43"},
      {"num_nextn_predict_layers", "1"},    {"compress_ratios", ratios},
      {"sliding_window", "128"},            {"head_dim", "512"},
      {"qk_rope_head_dim", "64"},           {"index_n_heads", "64"},
      {"index_head_dim", "128"},            {"index_topk", "512"},
      {"max_position_embeddings", "1048576"}, {"rope_theta", "10000"},
      {"compress_rope_theta", "160000"},    {"rms_norm_eps", "1e-06"},
      {"rope_scaling", R"({"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536, "type": "yarn"})"},
  };
  std::string json = "{";
  for (auto& [k, v] : keys) {
    if (k == override_key) {
      if (override_value.empty()) continue;  // drop the key
      v = override_value;
    }
    if (json.size() > 1) json += ", ";
    json += "\"" + k + "\": " + v;
  }
  return json + "}";
}

TEST(ModelSpec, LoadsAHuggingFaceConfigLikeThePreset) {
  auto spec = ModelSpec::FromHuggingFaceConfig(FlashConfig());
  ASSERT_TRUE(spec.ok()) << spec.status();
  const ModelSpec preset = ModelSpec::V4Flash();
  ASSERT_EQ(spec->layers.size(), preset.layers.size());
  for (size_t i = 0; i < preset.layers.size(); ++i) EXPECT_EQ(spec->layers[i].kind, preset.layers[i].kind) << i;
  EXPECT_EQ(spec->name, "deepseek_v4");
  EXPECT_EQ(spec->index_topk, 512);
  EXPECT_EQ(spec->window_rope.theta, 10000.0);
  EXPECT_EQ(spec->compressed_rope.theta, 160000.0);
  EXPECT_EQ(spec->compressed_rope.yarn.factor, 16.0);
  EXPECT_EQ(spec->compressed_rope.yarn.original_max_positions, 65536);
  EXPECT_EQ(spec->window_rope.yarn.factor, 1.0);

  auto with_mtp = ModelSpec::FromHuggingFaceConfig(FlashConfig(), /*include_mtp=*/true);
  ASSERT_TRUE(with_mtp.ok());
  ASSERT_EQ(with_mtp->layers.size(), 44u);
  EXPECT_EQ(with_mtp->layers[43].kind, LayerKind::kWindow);
}

TEST(ModelSpec, MalformedOrInconsistentConfigsNameTheProblem) {
  const struct {
    std::string key, value, message;
  } cases[] = {
      {"num_hidden_layers", "", "missing \"num_hidden_layers\""},
      {"num_hidden_layers", "\"43\"", "\"num_hidden_layers\" must be an integer"},
      {"num_hidden_layers", "50", "fewer than num_hidden_layers"},
      {"num_hidden_layers", "40", "expected num_hidden_layers (40)"},
      {"compress_ratios", "[0, 8, 4]", "fewer than"},
      {"compress_ratios", "{}", "must be an array"},
      {"head_dim", "576", "kvc's 584-byte rows"},
      {"index_head_dim", "64", "index keys are 128-dim"},
      {"index_topk", "0", "\"index_topk\" must be an integer in [1"},
      {"rope_theta", "-1", "\"rope_theta\" must be a positive number"},
      {"rope_scaling", R"({"type": "linear", "factor": 4})", "must be \"yarn\""},
      {"rope_scaling", R"({"type": "yarn", "factor": 16})", "missing \"original_max_position_embeddings\""},
      {"sliding_window", "0", "\"sliding_window\" must be an integer in [1"},
      // More heads than kvc scores, and an epsilon that is 0 in fp32.
      {"index_n_heads", "4097", "\"index_n_heads\" must be an integer in [1, 4096]"},
      {"rms_norm_eps", "1e-50", "norm_eps 1e-50 must be > 0 and finite in fp32"},
  };
  for (const auto& c : cases) {
    auto spec = ModelSpec::FromHuggingFaceConfig(FlashConfig(c.key, c.value));
    ASSERT_FALSE(spec.ok()) << c.key << "=" << c.value;
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(spec.status().message()), HasSubstr(c.message)) << c.key << "=" << c.value;
  }
  // A ratio kvc does not know.
  std::string bad_ratio = FlashConfig();
  bad_ratio.replace(bad_ratio.find("[0, 0"), 5, "[0, 8");
  EXPECT_THAT(std::string(ModelSpec::FromHuggingFaceConfig(bad_ratio).status().message()),
              HasSubstr("compress_ratios[1] = 8"));
  EXPECT_THAT(std::string(ModelSpec::FromHuggingFaceConfig("{\"a\": ").status().message()), HasSubstr("JSON"));
  EXPECT_EQ(ModelSpec::FromHuggingFaceConfigFile("/nonexistent/config.json").status().code(),
            absl::StatusCode::kNotFound);
}

// HF config.json files are a few KB; anything over the 1 MiB cap is refused
// before it is parsed, from text and from a file, naming the cap.
TEST(ModelSpec, RefusesAConfigOverTheSizeCapNamingIt) {
  std::string at_cap = FlashConfig();
  at_cap.resize(ModelSpec::kMaxConfigBytes, ' ');
  ASSERT_TRUE(ModelSpec::FromHuggingFaceConfig(at_cap).ok()) << ModelSpec::FromHuggingFaceConfig(at_cap).status();
  const std::string over_cap = at_cap + " ";
  auto spec = ModelSpec::FromHuggingFaceConfig(over_cap);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("1048576-byte cap"));

  const std::string path = testing::TempDir() + "/model_spec_test_big_config.json";
  {
    std::ofstream out(path, std::ios::binary);
    out << over_cap;
  }
  auto from_file = ModelSpec::FromHuggingFaceConfigFile(path);
  std::remove(path.c_str());
  ASSERT_FALSE(from_file.ok());
  EXPECT_THAT(std::string(from_file.status().message()), HasSubstr("1048576-byte cap"));
  EXPECT_THAT(std::string(from_file.status().message()), HasSubstr(path));
}

TEST(ModelSpec, ValidatesCompressorParameterViews) {
  ModelSpec spec = ModelSpec::V4Flash();
  std::vector<float> ape(4 * 2 * 512, 0.5f), norm(512, 1.0f), idx_ape(4 * 2 * 128), idx_norm(128, 1.0f);
  spec.layers[2].compressor = {ape, norm};
  spec.layers[2].indexer = {idx_ape, idx_norm};
  EXPECT_TRUE(spec.Validate().ok()) << spec.Validate();

  spec.layers[2].compressor.ape = absl::MakeConstSpan(ape).first(100);
  EXPECT_THAT(std::string(spec.Validate().message()), HasSubstr("layer 2: compressor.ape has 100 values"));
  spec.layers[2].compressor.ape = ape;
  ape[7] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(std::string(spec.Validate().message()), HasSubstr("compressor.ape is not finite"));
  ape[7] = 0;
  spec.layers[0].compressor = {ape, norm};  // window-only layer
  EXPECT_THAT(std::string(spec.Validate().message()), HasSubstr("layer 0: a window-only layer has no compressor"));
  spec.layers[0].compressor = {};

  // A lone norm weight is a parameter too: refused where that compressor does not exist.
  spec.layers[0].compressor = {{}, norm};
  EXPECT_THAT(std::string(spec.Validate().message()), HasSubstr("layer 0: a window-only layer has no compressor"));
  spec.layers[0].compressor = {};
  spec.layers[0].indexer = {{}, idx_norm};
  EXPECT_THAT(std::string(spec.Validate().message()), HasSubstr("layer 0: a window-only layer has no compressor"));
  spec.layers[0].indexer = {};
  ASSERT_EQ(spec.layers[3].kind, LayerKind::kHca);
  spec.layers[3].indexer = {{}, idx_norm};
  EXPECT_THAT(std::string(spec.Validate().message()), HasSubstr("layer 3: an HCA layer has no indexer"));
  spec.layers[3].indexer = {};
  EXPECT_TRUE(spec.Validate().ok()) << spec.Validate();

  std::vector<float> table(64 * 10);
  spec.compressed_rope.engine_table = table;  // covers 10 positions, not 2^20
  EXPECT_THAT(std::string(spec.Validate().message()), HasSubstr("covers 10 positions"));

  // An engine RoPE table must be finite: kvc would rotate with it.
  spec.max_context = 10;
  EXPECT_TRUE(spec.Validate().ok()) << spec.Validate();
  table[64 * 7 + 2 * 5 + 1] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(std::string(spec.Validate().message()),
              HasSubstr("compressed_rope.engine_table is not finite at position 7, pair 5"));
}

}  // namespace
}  // namespace kvc
