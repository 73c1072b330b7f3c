#include "tools/conformance/golden_layer.h"

#include <memory>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvc/compressor.h"
#include "kvc/number_formats.h"
#include "src/status.h"

namespace kvc::conformance {

absl::StatusOr<GoldenLayer> GoldenLayer::Load(const GoldenCase& golden) {
  GoldenLayer c;
  KVC_ASSIGN_OR_RETURN(c.ratio, golden.MetaInt("ratio"));
  KVC_ASSIGN_OR_RETURN(c.prefill, golden.MetaInt("prefill"));
  KVC_ASSIGN_OR_RETURN(c.window, golden.MetaInt("window"));
  KVC_ASSIGN_OR_RETURN(c.norm_eps, golden.MetaNumber("norm_eps"));
  if (c.ratio != 0 && c.ratio != 4 && c.ratio != 128) return absl::InvalidArgumentError(absl::StrCat("ratio ", c.ratio));
  c.kind = c.ratio == 4 ? LayerKind::kCsa : c.ratio == 128 ? LayerKind::kHca : LayerKind::kWindow;
  const SafetensorsFile& f = golden.file();
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(c.window_rows, f.Get<uint16_t>("win_kv_in", DType::kBF16, {-1, kHeadDim}, &info));
  c.tokens = info->shape[0];
  if (c.prefill < 0 || c.prefill > c.tokens) return absl::InvalidArgumentError("metadata prefill out of range");
  KVC_ASSIGN_OR_RETURN(c.rope, f.Get<float>("rope_freqs", DType::kF32, {c.tokens, 32, 2}));
  if (c.kind == LayerKind::kWindow) return c;
  const int64_t width = MainCompressor(c.kind, kHeadDim).width();
  KVC_ASSIGN_OR_RETURN(c.kv, f.Get<float>("comp_kv_in", DType::kF32, {c.tokens, width}));
  KVC_ASSIGN_OR_RETURN(c.score, f.Get<float>("comp_score_in", DType::kF32, {c.tokens, width}));
  KVC_ASSIGN_OR_RETURN(c.ape, f.Get<float>("comp_ape", DType::kF32, {c.ratio, width}));
  KVC_ASSIGN_OR_RETURN(c.norm_w, f.Get<float>("comp_norm_w", DType::kF32, {kHeadDim}));
  if (c.kind == LayerKind::kCsa) {
    KVC_ASSIGN_OR_RETURN(c.index_topk, golden.MetaInt("index_topk"));
    if (c.index_topk < 1 || c.index_topk > (int64_t{1} << 20)) {
      return absl::InvalidArgumentError(absl::StrCat("metadata index_topk ", c.index_topk));
    }
    const int64_t iw = IndexerCompressor(kIndexDim).width();
    KVC_ASSIGN_OR_RETURN(c.idx_kv, f.Get<float>("idx_kv_in", DType::kF32, {c.tokens, iw}));
    KVC_ASSIGN_OR_RETURN(c.idx_score, f.Get<float>("idx_score_in", DType::kF32, {c.tokens, iw}));
    KVC_ASSIGN_OR_RETURN(c.idx_ape, f.Get<float>("idx_ape", DType::kF32, {4, iw}));
    KVC_ASSIGN_OR_RETURN(c.idx_norm_w, f.Get<float>("idx_norm_w", DType::kF32, {kIndexDim}));
  }
  return c;
}

absl::StatusOr<std::unique_ptr<Cache>> GoldenLayer::MakeCache(int32_t draft_slots) const {
  ModelSpec spec = ModelSpec::V4Flash();
  spec.name = "conformance";
  spec.layers.assign(1, LayerSpec{});
  spec.layers[0].kind = kind;
  if (kind != LayerKind::kWindow) spec.layers[0].compressor = {ape, norm_w};
  if (kind == LayerKind::kCsa) spec.layers[0].indexer = {idx_ape, idx_norm_w};
  spec.window = static_cast<int32_t>(window);
  if (kind == LayerKind::kCsa) spec.index_topk = static_cast<int32_t>(index_topk);  // selections as official
  spec.max_context = tokens;
  spec.norm_eps = norm_eps;
  spec.compressed_rope.engine_table = rope;
  CacheOptions options;
  options.state_bytes = int64_t{64} << 20;
  options.history_bytes = int64_t{64} << 20;
  options.rollback_depth = static_cast<int32_t>(std::min<int64_t>(16, window));
  options.draft_slots = draft_slots;
  return Cache::Create(spec, options);
}

absl::Status GoldenLayer::Append(Cache& cache, SequenceId seq, int64_t at, int64_t n) const {
  LayerTokens t;
  t.window_rows = absl::MakeConstSpan(reinterpret_cast<const Bf16*>(window_rows.data()) + at * kHeadDim,
                                      static_cast<size_t>(n * kHeadDim));
  auto rows = [&](const std::vector<float>& v, int64_t w) {
    return absl::MakeConstSpan(v).subspan(static_cast<size_t>(at * w), static_cast<size_t>(n * w));
  };
  if (kind != LayerKind::kWindow) {
    const int64_t width = MainCompressor(kind, kHeadDim).width();
    t.compressor_kv = rows(kv, width);
    t.compressor_score = rows(score, width);
  }
  if (kind == LayerKind::kCsa) {
    const int64_t iw = IndexerCompressor(kIndexDim).width();
    t.indexer_kv = rows(idx_kv, iw);
    t.indexer_score = rows(idx_score, iw);
  }
  return cache.Append(seq, 0, at, t);
}


absl::StatusOr<GoldenSelection> GoldenSelection::Load(const GoldenCase& golden, const GoldenLayer& layer) {
  GoldenSelection s;
  const SafetensorsFile& f = golden.file();
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(s.attn_idx, f.Get<int32_t>("attn_idx", DType::kI32, {layer.tokens, -1}, &info));
  s.width = info->shape[1];
  if (layer.kind != LayerKind::kCsa) return s;
  KVC_ASSIGN_OR_RETURN(s.q_raw, f.Get<uint16_t>("idx_q_raw", DType::kBF16, {layer.tokens, -1, kIndexDim}, &info));
  s.index_heads = info->shape[1];
  KVC_ASSIGN_OR_RETURN(s.w, f.Get<uint16_t>("idx_w", DType::kBF16, {layer.tokens, s.index_heads}));
  return s;
}

std::set<int32_t> GoldenSelection::Official(int64_t t) const {
  std::set<int32_t> set;
  for (int64_t i = 0; i < width; ++i) {
    const int32_t x = attn_idx[static_cast<size_t>(t * width + i)];
    if (x >= 0) set.insert(x);
  }
  return set;
}

absl::StatusOr<IndexQuery> GoldenSelection::Query(const Cache& cache, int64_t t) const {
  std::vector<float> weights(static_cast<size_t>(index_heads));
  for (int64_t h = 0; h < index_heads; ++h) {
    weights[static_cast<size_t>(h)] = F32FromBf16Bits(w[static_cast<size_t>(t * index_heads + h)]);
  }
  const auto* q = reinterpret_cast<const Bf16*>(q_raw.data()) + t * index_heads * kIndexDim;
  return cache.PrepareIndexQuery(t, absl::MakeConstSpan(q, static_cast<size_t>(index_heads * kIndexDim)), weights);
}

}  // namespace kvc::conformance
