#include "src/compressor_state.h"

#include <cstring>

#include "src/snapshot_format.h"

namespace kvc {
namespace cache_internal {

CompressorState::CompressorState(PageStore& store, int s, const ModelSpec& spec, int32_t depth)
    : store_(store),
      stream_(s),
      g_(StateCompressor(s, spec.head_dim, spec.index_dim)),
      depth_(depth),
      capacity_(StateRows(g_, depth)) {}

void CompressorState::Encode(const Sequence& seq, int layer, snapshot_format::Encoder& e) const {
  e.PutBytes(Rows(seq, layer), static_cast<size_t>(floats()) * sizeof(float));
}

void CompressorState::Restore(Sequence& seq, int layer, const uint8_t* bytes) const {
  std::memcpy(Rows(seq, layer), bytes, static_cast<size_t>(floats()) * sizeof(float));
}

}  // namespace cache_internal
}  // namespace kvc
