// Internal to kvc (not installed): a compressor-state part of the cache:
// one page per sequence and layer holding a compressor's ring of token rows
// (kv, then score + ape, `width` floats each; slot t mod capacity, capacity
// = span + rollback_depth) for the windows still open. One part per state
// stream: CSA main, CSA indexer, HCA main.
#ifndef KVC_SRC_COMPRESSOR_STATE_H_
#define KVC_SRC_COMPRESSOR_STATE_H_

#include <cstdint>
#include <vector>

#include "kvc/compressor.h"
#include "src/stream_part.h"

namespace kvc {
namespace snapshot_format {
class Encoder;
}  // namespace snapshot_format

namespace cache_internal {

class CompressorState final : public StreamPart {
 public:
  // Stream s: kCsaStateStream, kCsaIndexerStateStream or kHcaStateStream.
  CompressorState(PageStore& store, int s, const ModelSpec& spec, int32_t depth);

  int stream() const { return stream_; }
  const CompressorGeometry& geometry() const { return g_; }
  int64_t capacity() const { return capacity_; }  // token rows in the ring
  int64_t floats() const { return StateFloats(g_, depth_); }  // what a snapshot stores

  void Reserve(Sequence& seq, std::vector<PageStore::Request>* requests) const override {
    requests->push_back({stream_, 1, &seq.tables[static_cast<size_t>(stream_)]});
  }
  void Fork(const Sequence& parent, Sequence& child, std::vector<PageCopy>* engine_copies) const override {
    store_.CopyPage(stream_, parent.tables[static_cast<size_t>(stream_)][0], child.tables[static_cast<size_t>(stream_)][0],
                    engine_copies);
  }
  // Nothing to undo: the ring keeps `depth` rows beyond the open windows.
  void Truncate(Sequence&, int64_t, int64_t) const override {}
  void Release(Sequence& seq) const override { ReleaseTable(store_, seq, stream_); }

  float* Rows(const Sequence& seq, int layer) const {
    return reinterpret_cast<float*>(store_.Page(stream_, layer, seq.tables[static_cast<size_t>(stream_)][0]));
  }

  // Snapshot: the layer's `floats()` fp32 values, as the ring holds them.
  void Encode(const Sequence& seq, int layer, snapshot_format::Encoder& e) const;
  void Restore(Sequence& seq, int layer, const uint8_t* bytes) const;

 private:
  PageStore& store_;
  int stream_;
  CompressorGeometry g_;
  int32_t depth_;
  int64_t capacity_;
};

}  // namespace cache_internal
}  // namespace kvc

#endif  // KVC_SRC_COMPRESSOR_STATE_H_
