#include "src/prefix_cache.h"

#include <cinttypes>
#include <cstdio>
#include <unordered_set>

#include "absl/strings/str_cat.h"

namespace kvc {
namespace cache_internal {
namespace {

std::string Hex(uint64_t hash) {
  char text[19];
  std::snprintf(text, sizeof(text), "0x%016" PRIx64, hash);
  return text;
}

}  // namespace

std::vector<PrefixCache::CheckpointStream> PrefixCache::CheckpointStreams(const PageStore& store, int64_t ring_pages) {
  std::vector<CheckpointStream> out = {{kWindowStream, ring_pages}};
  for (const int s : {kCsaStateStream, kCsaIndexerStateStream}) {
    if (store.present(s)) out.push_back({s, 1});
  }
  return out;
}

PrefixCache::PrefixCache(PageStore& store, int64_t block_tokens, std::vector<CheckpointStream> checkpoint)
    : store_(store), block_tokens_(block_tokens), checkpoint_(std::move(checkpoint)) {
  for (const CheckpointStream& c : checkpoint_) checkpoint_bytes_ += c.pages * store_.id_bytes(c.stream);
}

absl::Status PrefixCache::CheckChain(absl::Span<const uint64_t> hashes) const {
  std::unordered_set<uint64_t> fresh;
  for (size_t j = 0; j < hashes.size(); ++j) {
    const auto it = blocks_.find(hashes[j]);
    if (it == blocks_.end()) {
      if (!fresh.insert(hashes[j]).second) {
        return absl::InvalidArgumentError(absl::StrCat("prefix: hash ", Hex(hashes[j]), " names two blocks of the chain (",
                                                       "block ", j, " and an earlier one)"));
      }
      continue;
    }
    const Block& b = it->second;
    if (b.depth != static_cast<int64_t>(j) || (j > 0 && b.parent != hashes[j - 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prefix: hash ", Hex(hashes[j]), " of block ", j, " already names block ", b.depth,
          b.depth == static_cast<int64_t>(j) ? " of another chain (its parent's hash differs)" : " of a published chain"));
    }
  }
  return absl::OkStatus();
}

PrefixCache::Found PrefixCache::Find(absl::Span<const uint64_t> hashes) {
  Found found;
  for (size_t j = 0; j < hashes.size(); ++j) {
    const auto it = blocks_.find(hashes[j]);
    if (it == blocks_.end() || it->second.depth != static_cast<int64_t>(j) ||
        (j > 0 && it->second.parent != hashes[j - 1])) {
      break;
    }
    found.shared_blocks = static_cast<int64_t>(j) + 1;
  }
  for (int64_t i = found.shared_blocks - 1; i >= 0; --i) {
    const auto it = entries_.find(hashes[static_cast<size_t>(i)]);
    if (it != entries_.end()) {
      found.entry = &it->second;
      break;
    }
  }
  return found;
}

PrefixCache::Entry* PrefixCache::Exact(absl::Span<const uint64_t> hashes) {
  if (hashes.empty()) return nullptr;
  const auto it = entries_.find(hashes.back());
  return it == entries_.end() || it->second.blocks != static_cast<int64_t>(hashes.size()) ? nullptr : &it->second;
}

absl::Status PrefixCache::MakeRoom(int64_t bytes) {
  const int64_t limit = store_.prefix_limit();
  if (bytes > limit) {
    return absl::ResourceExhaustedError(absl::StrCat("prefix cache: ", bytes, " B do not fit its budget of ", limit,
                                                     " B (CacheOptions::prefix_bytes) even with nothing cached"));
  }
  while (!order_.empty() && store_.prefix_used() > limit - bytes) Evict(entries_.at(order_.begin()->second));
  return absl::OkStatus();
}

void PrefixCache::Trim() {
  while (!order_.empty() && store_.prefix_used() > store_.prefix_limit()) Evict(entries_.at(order_.begin()->second));
}

void PrefixCache::SetPriority(Entry& entry) {
  order_.erase({entry.priority, entry.stamp});
  // Tokens saved per MiB kept; bytes > 0 (every entry holds a checkpoint).
  entry.priority = inflation_ + static_cast<double>(entry.tokens) * 1048576.0 / static_cast<double>(entry.bytes);
  entry.stamp = ++clock_;
  order_.emplace(std::make_pair(entry.priority, entry.stamp), entry.last_hash);
}

void PrefixCache::Insert(absl::Span<const uint64_t> hashes, std::array<std::vector<PageId>, kStreamCount> tables,
                         std::vector<int64_t> ring_ends) {
  Entry entry;
  entry.ring_ends = std::move(ring_ends);
  entry.last_hash = hashes.back();
  entry.blocks = static_cast<int64_t>(hashes.size());
  entry.tokens = entry.blocks * block_tokens_;
  entry.tables = std::move(tables);
  std::vector<bool> checkpoint_stream(kStreamCount, false);
  for (const CheckpointStream& c : checkpoint_) checkpoint_stream[static_cast<size_t>(c.stream)] = true;
  for (int s = 0; s < kStreamCount; ++s) {
    for (const PageId id : entry.tables[static_cast<size_t>(s)]) {
      if (!checkpoint_stream[static_cast<size_t>(s)]) store_.Pin(s, id);
      entry.bytes += store_.id_bytes(s);
    }
  }
  for (size_t j = 0; j < hashes.size(); ++j) {
    Block& b = blocks_.try_emplace(hashes[j], Block{static_cast<int64_t>(j), j > 0 ? hashes[j - 1] : 0, 0}).first->second;
    ++b.refs;
  }
  ++published_;
  Entry& held = entries_.emplace(entry.last_hash, std::move(entry)).first->second;
  held.priority = inflation_;  // not in order_ yet: SetPriority's erase finds nothing
  held.stamp = 0;
  SetPriority(held);
}

void PrefixCache::Hit(Entry& entry) {
  ++hits_;
  tokens_reused_ += entry.tokens;
  SetPriority(entry);
}

void PrefixCache::Refresh(Entry& entry) { SetPriority(entry); }

void PrefixCache::Evict(Entry& entry) {
  inflation_ = entry.priority;
  order_.erase({entry.priority, entry.stamp});
  for (int s = 0; s < kStreamCount; ++s) {
    for (const PageId id : entry.tables[static_cast<size_t>(s)]) store_.Unpin(s, id);
  }
  uint64_t hash = entry.last_hash;
  for (int64_t depth = entry.blocks - 1; depth >= 0; --depth) {
    const auto it = blocks_.find(hash);
    hash = it->second.parent;
    if (--it->second.refs == 0) blocks_.erase(it);
  }
  ++evictions_;
  entries_.erase(entry.last_hash);
}

PrefixUsage PrefixCache::Usage() const {
  PrefixUsage u;
  u.limit_bytes = store_.prefix_limit();
  u.history_bytes = store_.prefix_used(StreamClass::kHistory);
  u.checkpoint_bytes = store_.prefix_used(StreamClass::kState);
  u.cached_bytes = u.history_bytes + u.checkpoint_bytes;
  for (int s = 0; s < kStreamCount; ++s) {
    if (!store_.present(s)) continue;
    const PageStore::Stats stats = store_.StreamStats(s);
    u.shared_bytes += (stats.pinned_ids - stats.cached_ids) * store_.id_bytes(s);
  }
  u.prefixes = static_cast<int64_t>(entries_.size());
  u.cached_tokens = static_cast<int64_t>(blocks_.size()) * block_tokens_;
  u.hits = hits_;
  u.misses = misses_;
  u.tokens_reused = tokens_reused_;
  u.published = published_;
  u.evictions = evictions_;
  return u;
}

std::vector<const PrefixCache::Entry*> PrefixCache::Entries() const {
  std::vector<const Entry*> out;
  for (const auto& [key, hash] : order_) out.push_back(&entries_.at(hash));
  return out;
}

}  // namespace cache_internal
}  // namespace kvc
