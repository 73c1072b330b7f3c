// kvc::Cache: the one object an engine embeds. Built from a ModelSpec, it
// holds any number of sequences; each sequence has, per layer, the streams of
// its layer kind (spec §1), stored in pages whose bytes are the engines'
// layout (docs/layout.md):
//
//   window ring        R = W + draft_slots rows of 584 B,
//                      slot = position mod R                        (state)
//   rollback rows      the last D ring rows overwritten, to undo    (state)
//   compressor state   projections of the open windows, fp32        (state)
//   compressed rows    one 584-byte row per m tokens (CSA, HCA)     (history)
//   index keys         one 68-byte key per 4 tokens (CSA)           (history)
//
// Pages an engine can address: each (layer, stream) is ONE array of equal
// pages, page b at base + b x page_bytes (LayerPages), and a sequence has ONE
// block table of int32 page ids per stream, shared by every layer of the
// stream (BlockTable): id b names page b of every such layer's array. Row r
// of a stream lives in page ids[r / rows_per_page] at offset
// (r % rows_per_page) x row_data_bytes, its scales at
// rows_per_page x row_data_bytes + (r % rows_per_page) x row_scale_bytes.
//
// History pages are append-only and shared between forks; state pages are
// private. The two lifetime classes have separate byte budgets. Compressed
// rows and index keys are written by Append, which runs the compressors on
// layers whose ModelSpec has their parameters, or by AppendCompressedRows /
// AppendIndexKeys / AppendRows for an engine with its own compressor; either
// way a page shared with a fork is copied (in every layer of the stream)
// before it is written.
//
// Every mutation validates its arguments and plans its allocations before it
// changes anything: a failed call leaves the cache exactly as it was
// (contents, lengths and used bytes). No exceptions.
//
// Thread safety: all methods may be called concurrently. Calls on different
// sequences run in parallel; calls on the same sequence are serialised by a
// per-sequence lock. Zero-copy views (Window, CompressedRows, IndexKeys, the
// RowRefs of an AttentionSet) stay valid until the next mutation of that
// sequence or its Free(); page arrays (LayerPages) for the cache's lifetime.
#ifndef KVC_CACHE_H_
#define KVC_CACHE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvc/executor.h"
#include "kvc/indexer.h"
#include "kvc/model_spec.h"
#include "kvc/number_formats.h"
#include "kvc/row_formats.h"

namespace kvc {

// The page streams an engine addresses. Stable numbering (the C API's
// KVC_STREAM_*). Every layer has kWindow; CSA layers kCsaRows, kCsaKeys,
// kCsaState and kCsaIndexerState; HCA layers kHcaRows and kHcaState.
// (Rollback records are internal, and absent in page-manager mode.)
enum class Stream : int32_t {
  kWindow = 0,   // the window ring: 584-byte rows, slot = position mod (window + draft_slots)
  kCsaRows = 1,  // CSA compressed entries: 584-byte rows
  kCsaKeys = 2,  // CSA index keys: 68-byte FP4 keys
  kHcaRows = 3,  // HCA compressed entries: 584-byte rows
  // Compressor state: one page per sequence, a ring of token rows (slot =
  // position mod rows_per_page = the compressor's span + rollback_depth),
  // each 2 x width fp32: the token's kv projection, then score + ape
  // (width 1024 CSA main, 256 CSA indexer, 512 HCA). What the open windows
  // need; an engine that compresses on its own device writes them.
  kCsaState = 4,
  kCsaIndexerState = 5,
  kHcaState = 6,
};
constexpr int kNumStreams = 7;

using SequenceId = int64_t;
const char* StreamName(Stream stream);

// One (layer, stream) array of equal pages, non-owning: page b at
// base + b x page_bytes for b in [0, num_pages). Inside a page, row i's data
// at i x row_data_bytes and its scales at
// rows_per_page x row_data_bytes + i x row_scale_bytes.
struct PageArray {
  uint8_t* base = nullptr;
  int64_t page_bytes = 0;
  int64_t num_pages = 0;
  int32_t rows_per_page = 0;
  int32_t row_data_bytes = 0;   // 576 (584-byte rows) or 64 (68-byte keys)
  int32_t row_scale_bytes = 0;  // 8 or 4
};

// A stream's page geometry, known before any cache exists (PageGeometry), so
// an engine can size its own arrays.
struct StreamGeometry {
  Stream stream = Stream::kWindow;
  int64_t page_bytes = 0;       // rows_per_page x row bytes, rounded up to 576 (rows) or 64 (keys)
  int32_t rows_per_page = 0;
  int32_t row_data_bytes = 0;
  int32_t row_scale_bytes = 0;
  std::vector<int32_t> layers;  // the layers that have the stream, ascending; empty: none
  // kWindow: the rows of one sequence's ring, window + draft_slots, held in
  // ceil(ring_slots / rows_per_page) pages per sequence. 0 for the others.
  int64_t ring_slots = 0;
};

// The most draft slots a cache may have (CacheOptions::draft_slots): with
// them a step of up to 4097 tokens (a verify step, a prefill chunk) finds
// every window row of its positions in the ring. Each slot costs 584 B per
// layer per sequence (4096: 2.3 MiB per layer).
constexpr int32_t kMaxDraftSlots = 4096;

// Engine memory for one (layer, stream) array: page b at
// bytes.data() + b x page_bytes; num_pages = bytes.size() / page_bytes.
struct EngineArray {
  int32_t layer = 0;
  Stream stream = Stream::kWindow;
  absl::Span<uint8_t> bytes;  // 64-byte aligned; must outlive the cache
};

struct CacheOptions {
  // Byte budgets of the two lifetime classes: bytes of page ids in use x
  // page_bytes x the layers of their stream. kvc reserves address space for
  // its page arrays (no memory until a page is written) and its bookkeeping
  // grows with the pages in use, so a huge limit (INT64_MAX: no limit) or
  // small pages cost nothing until used.
  int64_t history_bytes = int64_t{8} << 30;  // compressed rows + index keys
  int64_t state_bytes = int64_t{1} << 30;    // window rings, rollback rows, compressor state
  // Engine memory for the page arrays instead of kvc's, all or none per
  // group: every (layer, kWindow) array, and/or every (layer, kCsaRows /
  // kCsaKeys / kHcaRows) array, and/or every compressor state array of the
  // model. All arrays of a stream must hold the same number of pages; the
  // budgets above still apply. Rollback records are always kvc's.
  std::vector<EngineArray> engine_arrays;
  // Page-manager mode: kvc keeps page ids, block tables, refcounts,
  // fork/copy-on-write, rollback and accounting, and never reads or writes a
  // page byte: the engine writes every row through the slots a StepPlan
  // returns and makes the page copies kvc lists (PlanStep, Fork). The
  // arrays may be device memory (engine_arrays: kvc records the addresses
  // and never dereferences them) or absent (LayerPages then has a null
  // base). Rollback needs no records: requires draft_slots >=
  // rollback_depth, so the ring still holds what a truncation needs. Calls
  // that would touch bytes (Append*, AppendRows, Window, ReadWindow,
  // CompressedRows, IndexKeys, SelectAttentionSet, CSA selection, snapshots)
  // are refused with kFailedPrecondition; SelectAttentionSets returns
  // indices for window and HCA layers.
  // Page frees wait for CompleteSteps (see PlanStep).
  bool page_manager = false;
  // Tokens a sequence can always be rolled back by (speculative decoding
  // needs <= 16). Costs per layer: D * 592 B of rollback records (a 584-byte
  // row and an 8-byte position each, rounded up to 64 B), plus D token
  // rows of compressor state (8 KiB CSA + 2 KiB CSA indexer, 4 KiB HCA).
  int32_t rollback_depth = 16;
  // Extra window ring slots, in [0, kMaxDraftSlots]: the ring holds
  // R = window + draft_slots rows, slot = position mod R, so the window rows
  // of the last R positions stay in it. A step that appends k tokens and
  // then selects for all k positions (SelectAttentionSets: an MTP verify
  // step, a prefill chunk) finds every window row it needs in the ring when
  // k <= draft_slots + 1. 0: the official 128-slot ring, byte for byte.
  // Costs draft_slots x 584 B per layer per sequence (state class).
  int32_t draft_slots = 0;
  int32_t rows_per_page = 64;  // 584-byte rows per page (window ring and compressed rows)
  int32_t keys_per_page = 64;  // 68-byte index keys per page
  // Where a call runs its independent work (include/kvc/executor.h): the
  // index scoring of SelectAttentionSet (keys split across tasks) and the
  // compressors of Append (a chunk's 512-token slices, then the mapping of
  // the fresh pages its entries need, by layer). Not owned; must
  // outlive the cache. nullptr: every call runs on its caller's thread.
  // Results are identical whatever the executor.
  Executor* executor = nullptr;

  // Prefix caching (docs/prefix-cache.md). Tokens per prefix block, B: a
  // positive multiple of 128 (every stream's boundary), at most 2^20. The
  // default, 256, is one page of CSA rows and index keys at the default page
  // sizes (64 x 4 tokens) and vLLM's V4 block size.
  int32_t prefix_block_tokens = 256;
  // Byte budget of cached prefixes: pages only the prefix cache references
  // (history no live sequence shares, ring and compressor-state
  // checkpoints), separate from history_bytes and state_bytes, which count
  // live pages only. kvc's page arrays get room for it in both classes
  // (address space only). 0: nothing can be published.
  int64_t prefix_bytes = int64_t{1} << 30;
};

// A page copy the engine must make in page-manager mode: page `src` onto
// page `dst` of `stream`, in every layer's array of the stream.
struct PageCopy {
  Stream stream = Stream::kWindow;
  int32_t src = 0;
  int32_t dst = 0;
  bool operator==(const PageCopy& o) const { return stream == o.stream && src == o.src && dst == o.dst; }
};

// --- Planned batch steps ---------------------------------------------------

// One sequence of a step: `new_tokens` (>= 1) tokens appended to every
// layer, at positions [Length, Length + new_tokens).
struct StepRequest {
  SequenceId seq = 0;
  int64_t new_tokens = 0;
};

// Rows a step writes in one stream, by sequence (vLLM's slot_mapping): the
// rows of request b are slots[indptr[b] .. indptr[b + 1]), each a row index
// into every layer's array of the stream: page id x rows_per_page + offset
// (docs/layout.md). -1: nothing to write (a later row of the same step
// takes that slot, so only the last write of a slot is listed). Per stream:
//   kWindow            one per new token (position p at ring slot p mod ring)
//   kCsaRows, kHcaRows one per compressed entry the step closes, ascending
//   kCsaKeys           one per index key the step closes
//   state streams      one per new token (position p at p mod capacity)
struct StepSlots {
  std::vector<int32_t> indptr;  // batch + 1 (empty when the model lacks the stream)
  std::vector<int64_t> slots;
};

struct StepPlan {
  uint64_t epoch = 0;                 // the step's id: increasing, never reused
  std::vector<SequenceId> seqs;       // the requests' sequences, in order
  std::vector<int64_t> first_position;  // each sequence's length when planned
  std::vector<int64_t> new_tokens;
  StepSlots slots[kNumStreams];       // indexed by Stream
  // Page-manager mode: copies to make before any write of the step (copy-
  // on-write of a shared page the step writes into, and checkpoints of a
  // long step's ring and state pages); and the copies that undo the writes
  // if the step is aborted after the engine wrote (the checkpoints back).
  // Empty in kvc's own mode, where kvc copies.
  std::vector<PageCopy> copies;
  std::vector<PageCopy> abort_copies;
};

// What memory is for. Stable numbering.
enum class Component : uint8_t {
  kWindowRing = 0,        // ring pages and rollback rows
  kCompressedRows = 1,    // 584-byte compressed entries (history)
  kIndexKeys = 2,         // 68-byte index keys (history)
  kCompressorState = 3,   // fp32 projections of open windows (state)
};
constexpr int kNumComponents = 4;
const char* ComponentName(Component component);

struct ComponentUsage {
  // Page ids in use x page_bytes x the layers of their stream, counted once
  // however many sequences share them (ids waiting for CompleteSteps
  // included: their pages may still be read).
  int64_t used_bytes = 0;
  int64_t reserved_bytes = 0;  // the same for every id ever handed out (in use + free lists)
  int64_t pages = 0;           // pages in use: ids x layers
};

// The prefix cache (docs/prefix-cache.md): what it holds and how it served.
struct PrefixUsage {
  int64_t limit_bytes = 0;       // CacheOptions::prefix_bytes
  // Pages only the prefix cache references, counted against limit_bytes
  // (and not in the history / state budgets): history + checkpoint bytes.
  int64_t cached_bytes = 0;
  int64_t history_bytes = 0;     // of which history pages (shared by the prefixes of a chain)
  int64_t checkpoint_bytes = 0;  // of which ring and compressor-state checkpoints (one per prefix)
  // Pages the prefix cache references that live sequences reference too
  // (counted in the live budgets, never evicted while they are referenced).
  int64_t shared_bytes = 0;
  int64_t prefixes = 0;          // published prefixes held
  int64_t cached_tokens = 0;     // tokens their distinct blocks cover
  int64_t hits = 0;              // CreateSequenceFromPrefix calls that restored a prefix
  int64_t misses = 0;            // ... that found none
  int64_t tokens_reused = 0;     // the restored prefixes' tokens, summed over hits
  int64_t published = 0;         // PublishPrefix calls that added a prefix
  int64_t evictions = 0;         // prefixes evicted
};

struct CacheUsage {
  ComponentUsage components[kNumComponents];  // every page in use, cached prefixes' included
  PrefixUsage prefix;
  int64_t history_limit_bytes = 0;
  int64_t state_limit_bytes = 0;
  int64_t sequences = 0;
  int64_t open_steps = 0;       // planned, neither committed nor aborted
  int64_t deferred_pages = 0;   // pages (ids x their stream's layers) waiting for CompleteSteps (page-manager mode)
  uint64_t epoch = 0;           // the last step planned
  uint64_t completed_epoch = 0; // the last epoch CompleteSteps was given
  int64_t used_bytes() const;
  int64_t reserved_bytes() const;
};

struct SequenceUsage {
  int64_t bytes[kNumComponents] = {};  // pages this sequence references
  int64_t shared_bytes = 0;            // of which also referenced by another sequence
  int64_t total_bytes() const;
};

// What the engine hands in for `n` consecutive tokens of one layer (spec §2).
// The projections are required on CSA and HCA layers whose ModelSpec carries
// compressor parameters (kvc then computes their compressed entries and index
// keys), and must be empty otherwise.
struct LayerTokens {
  // n x 512 bf16: the layer's KV after its RMSNorm and RoPE.
  absl::Span<const Bf16> window_rows;
  // n x (c * 512) fp32 each (c = 2 on CSA, 1 on HCA): wkv(x) and wgate(x) of
  // the main compressor; the score without ape.
  absl::Span<const float> compressor_kv;
  absl::Span<const float> compressor_score;
  // CSA only: n x 256 fp32 each, the indexer's own compressor projections.
  absl::Span<const float> indexer_kv;
  absl::Span<const float> indexer_score;
};

// Zero-copy view of a history stream (compressed rows or index keys): row i
// is row i % rows_per_page of pages[i / rows_per_page], in the footer layout.
struct HistoryView {
  std::vector<ConstPackedRows> pages;
  int32_t rows_per_page = 0;
  int64_t rows = 0;
};

// Zero-copy view of one layer's window ring: slot s (= position mod
// ring_slots) is row s % rows_per_page of pages[s / rows_per_page]; pages
// are in the engines' footer layout. The ring holds positions
// [max(0, length - ring_slots), length); slots never written read as zero.
// With draft_slots = 0, ring_slots == window: the official ring.
struct WindowRingView {
  std::vector<ConstPackedRows> pages;
  int32_t rows_per_page = 0;
  int32_t window = 0;
  int64_t length = 0;      // tokens appended to this layer
  int64_t ring_slots = 0;  // window + draft_slots
};

// One stored 584-byte row, zero-copy: its 576 data bytes and 8 scale bytes
// (valid until the next mutation of its sequence).
struct RowRef {
  const uint8_t* data;
  const uint8_t* scales;
};

// What the query at a layer's last position attends to (spec §3, Selection).
struct AttentionSet {
  int64_t position = 0;  // the query's position: the layer's last token
  // Official index space: window slots [0, window) (position p at p mod
  // window, whatever draft_slots is), then window + j for compressed entry
  // j. Window positions first (oldest first), then entries in ascending
  // order.
  std::vector<int32_t> indices;
  std::vector<RowRef> rows;  // the stored rows, in the same order
  // The same rows as indices into the layer's page arrays (what a sparse
  // kernel takes: block_id x rows_per_page + offset):
  // window_indices[i] = ids[s / B] x B + s % B for the i-th window position
  // p (oldest first), s = p mod ring_slots (the real ring slot: p mod
  // (window + draft_slots)), ids = BlockTable(seq, kWindow),
  // B = its rows_per_page; compressed_indices[k] = ids[j / B] x B + j % B
  // for the k-th selected entry j, ids = BlockTable(seq, kCsaRows or
  // kHcaRows). So row window_indices[i] of the window array is rows[i], and
  // row compressed_indices[k] of the rows array is rows[window count + k].
  std::vector<int32_t> window_indices;
  std::vector<int32_t> compressed_indices;
};

// What SelectAttentionSet works in, kept by the engine across decode steps
// (one per thread): with it, and the AttentionSet of the previous step as
// `out`, a selection allocates nothing once the buffers have grown to the
// layer's sizes (they grow with the sequence, geometrically).
struct SelectionScratch {
  std::vector<float> scores;     // after a CSA selection: the index score of every visible entry
  std::vector<int64_t> entries;  // after a CSA selection: the selected entries, ascending
  TopKScratch topk;
};

// --- Selecting for several positions (SelectAttentionSets) ----------------

// What the queries at several consecutive positions of one layer of one
// sequence attend to: a verify step's draft positions, a prefill chunk's.
// Query i is at position t = first + i and sees its own causal set (spec
// §3): the window positions max(0, t - window + 1) .. t and the compressed
// entries visible at t (j < (t + 1) / ratio; on CSA layers the top
// min(index_topk, visible) by query i's index scores, ties to the lower
// entry; on HCA layers all of them). Its rows are two CSR slices:
//   window:      [window_offsets[i], window_offsets[i + 1])
//   compressed:  [compressed_offsets[i], compressed_offsets[i + 1])
// Which window rows the ring holds: positions p >= length - ring_slots
// (ring_slots = window + draft_slots, length = the layer's tokens; in
// page-manager mode, after a truncation or an aborted step, the furthest
// length written instead of `length`). So after appending k tokens every
// one of the k positions finds all its window rows when
// k <= draft_slots + 1; a position further back gets -1 for rows the ring
// has overwritten, which the engine takes from its own activations of this
// step (the chunk's K rows it just appended).
struct PositionSets {
  int64_t first = 0;  // the position of query 0
  std::vector<int64_t> window_offsets;  // count + 1, from 0
  // Per query, its window positions, oldest first, and the row of the
  // layer's window page array holding each: ids[s / B] x B + s % B for ring
  // slot s = p mod ring_slots (ids = BlockTable(seq, kWindow), B its
  // rows_per_page), or -1 for a position the ring no longer holds: p <
  // length - ring_slots (in page-manager mode, after a truncation or abort,
  // p < the furthest length written - ring_slots).
  std::vector<int64_t> window_positions;
  std::vector<int32_t> window_indices;
  std::vector<int64_t> compressed_offsets;  // count + 1, from 0
  // Per query, its compressed entries j, ascending, and the row of the
  // layer's kCsaRows / kHcaRows page array holding each (ids[j / B] x B +
  // j % B, ids = BlockTable(seq, that stream)).
  std::vector<int64_t> entries;
  std::vector<int32_t> compressed_indices;

  int64_t count() const { return window_offsets.empty() ? 0 : static_cast<int64_t>(window_offsets.size()) - 1; }
};

// Block tables of a batch, dense: ids[b x max_blocks + k] is page k of
// sequence b (-1 past its blocks[b] pages); rows[b] the rows it stores.
struct DenseBlockTables {
  int64_t max_blocks = 0;
  std::vector<int32_t> ids;     // batch x max_blocks
  std::vector<int32_t> blocks;  // pages per sequence
  std::vector<int64_t> rows;    // rows per sequence (StreamRows of its longest layer)
};

// Block tables of a batch as FlashInfer's paged layout: the pages of
// sequence b are indices[indptr[b] .. indptr[b + 1]), the last one holding
// last_page_len[b] rows (0 for a sequence without pages).
struct CsrBlockTables {
  std::vector<int32_t> indptr;  // batch + 1
  std::vector<int32_t> indices;
  std::vector<int32_t> last_page_len;  // batch
};

// Dequantizes the set's rows into `out` (rows.size() x 512, in order), in
// blocks of 512 rows through `executor` (nullptr: on the calling thread).
// Every row is checked first: a refusal (out's size; a row with a null
// pointer) writes nothing. The bytes are the same whatever the executor.
absl::Status GatherAttentionRows(const AttentionSet& set, absl::Span<float> out, Executor* executor = nullptr);
absl::Status GatherAttentionRows(const AttentionSet& set, absl::Span<Bf16> out, Executor* executor = nullptr);

class Cache {
 public:
  // kInvalidArgument if the spec or options are inconsistent. Allocates no
  // pages: memory grows with the sequences and tokens held.
  static absl::StatusOr<std::unique_ptr<Cache>> Create(ModelSpec spec, CacheOptions options = {});

  // The page geometry of each public stream (indexed by Stream) for this
  // model and options: what an engine needs to allocate engine_arrays.
  // kInvalidArgument for a spec or options Create would refuse (engine_arrays
  // themselves are checked by Create). Allocates nothing else.
  static absl::StatusOr<std::vector<StreamGeometry>> PageGeometry(const ModelSpec& spec, const CacheOptions& options);
  ~Cache();
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  // A new, empty sequence. Allocates its state pages (ring, rollback rows,
  // compressor state, in every layer): kResourceExhausted naming the stream
  // when the state budget (or the stream's pages) cannot supply them.
  absl::StatusOr<SequenceId> CreateSequence();

  // Appends tokens [position, position + n) to `layer` of `seq`. Requires
  // position == Length(seq, layer) (no gaps, no repeats) and
  // position + n <= max_context. Validates every row (shapes, finite values)
  // before writing. On a compressed layer with parameters, also refuses
  // (kInvalidArgument naming layer, position and channel) finite projections
  // that would store a non-finite value: a score + ape that overflows fp32
  // (the compressor state keeps it), or an entry or index key that pooling,
  // bf16 rounding, RMSNorm and RoPE make non-finite (or, for a key, larger
  // than 2^120, which the key format refuses). On a refusal nothing changes,
  // whatever part of the chunk was fine. Every window the
  // chunk closes yields its entry (and index key), computed from the state and
  // the chunk, and the state keeps the open window(s). Appending a chunk gives
  // exactly the bytes that appending its tokens one by one gives.
  absl::Status Append(SequenceId seq, int layer, int64_t position, const LayerTokens& tokens);

  // Bring-your-own-compressor path, for compressed layers whose ModelSpec has
  // no compressor parameters (kvc's compressor writes through the same code):
  // appends compressed entries [first, first + n) of a CSA or HCA layer, given as n x 512 bf16 (after RMSNorm and RoPE; stored as 584-byte
  // rows). Requires first == the entries already stored and
  // first + n <= Length(seq, layer) / ratio (an entry exists once its window
  // has closed). Allocates history pages (and copies a partial page shared
  // with a fork before writing it, in every layer of the stream):
  // kResourceExhausted naming the stream.
  absl::Status AppendCompressedRows(SequenceId seq, int layer, int64_t first, absl::Span<const Bf16> rows);
  // The same for the index keys of a CSA layer: n x 128 bf16 (after RoPE,
  // before the Hadamard; stored as 68-byte FP4 keys).
  absl::Status AppendIndexKeys(SequenceId seq, int layer, int64_t first, absl::Span<const Bf16> keys);

  // A new sequence equal to `seq`: history page ids shared (the same block
  // tables), ring, rollback and state pages new ids with the bytes copied.
  // Requires every layer of `seq` at the same length (kFailedPrecondition).
  absl::StatusOr<SequenceId> Fork(SequenceId seq);

  // Rolls `seq` back to `length` tokens in every layer; afterwards it equals
  // a sequence that never saw the later tokens (ring contents included).
  // Requires every layer at the same length and length >= RollbackFloor(seq)
  // (kFailedPrecondition otherwise, with the floor).
  absl::Status Truncate(SequenceId seq, int64_t length);

  // The same; in page-manager mode *engine_copies receives the page copies
  // the engine must make (the child's ring and state pages from the
  // parent's) before it reads or writes the child.
  absl::StatusOr<SequenceId> Fork(SequenceId seq, std::vector<PageCopy>* engine_copies);

  // Releases the sequence's pages. Its id is never reused. Refused
  // (kFailedPrecondition) while the sequence is in an open step.
  absl::Status Free(SequenceId seq);

  // --- Planned batch steps (docs/embedding.md) -----------------------------
  //
  // PlanStep reserves, for every sequence of the batch and every layer,
  // every page the step writes: new history pages, a private copy of a
  // shared page it writes into, and for a step longer than rollback_depth a
  // checkpoint of the sequence's ring and state pages (so an abort can undo
  // it). All or nothing: kResourceExhausted naming the stream, and nothing
  // changes. Each sequence must exist, be in no open step, hold the same
  // length in every layer and stay within max_context (kOutOfRange); each at
  // most once. A batch lists at most 2^31 - 1 slots per stream (kOutOfRange).
  // The block tables then already cover the step's rows.
  //
  // Then the step's rows are written: by Append (kvc's mode; layer by layer,
  // each within the planned tokens; Append allocates nothing), or by the
  // engine through plan.slots (page-manager mode, after plan.copies). Then
  // CommitStep (every layer of every sequence advanced by its new_tokens;
  // kvc's mode checks it) or AbortStep (every sequence back to its planned
  // length, every row and byte as it was -- in page-manager mode after the
  // engine made plan.abort_copies, if it wrote; the rollback floor may rise
  // as after an append and truncate). Truncate, Fork and Free of a sequence
  // in an open step are refused.
  //
  // Epochs: plan.epoch numbers steps. In page-manager mode a page whose last
  // reference goes (Free, Truncate, a replaced copy-on-write page, a
  // checkpoint) while a step up to the current epoch may still run on the
  // device is not reused until CompleteSteps(epoch) says the device
  // finished every step up to `epoch` (it stays counted as used); call it
  // when the step's kernels are done (e.g. after its CUDA event). In kvc's
  // mode pages are reusable at once and CompleteSteps is a no-op.
  absl::StatusOr<StepPlan> PlanStep(absl::Span<const StepRequest> batch);
  absl::Status CommitStep(uint64_t epoch);
  absl::Status AbortStep(uint64_t epoch);
  // Returns the number of page ids that became reusable.
  absl::StatusOr<int64_t> CompleteSteps(uint64_t epoch);

  absl::StatusOr<int64_t> Length(SequenceId seq, int layer) const;
  // The smallest length Truncate(seq, ...) accepts.
  absl::StatusOr<int64_t> RollbackFloor(SequenceId seq) const;

  // The official window of `layer` dequantized into `out` (window x 512
  // bf16): the last `window` positions p, each in official slot p mod window
  // (whatever draft_slots is); slots of positions < 0 are zero. With
  // draft_slots = 0 this is the ring itself, in slot order. Window() views
  // the whole ring (window + draft_slots slots).
  absl::Status ReadWindow(SequenceId seq, int layer, absl::Span<Bf16> out) const;
  absl::StatusOr<WindowRingView> Window(SequenceId seq, int layer) const;

  // The index query of the token at `position` for the CSA layers: the
  // compressed-layer RoPE at that position (kvc's table or the engine's),
  // Hadamard, FP4 (IndexQuery::Prepare). q_raw: heads x 128 bf16; weights:
  // heads fp32.
  absl::StatusOr<IndexQuery> PrepareIndexQuery(int64_t position, absl::Span<const Bf16> q_raw,
                                               absl::Span<const float> weights) const;
  // The same into *out, reusing its buffers (IndexQuery::Prepare): allocates
  // nothing when *out held a query with as many heads.
  absl::Status PrepareIndexQuery(int64_t position, absl::Span<const Bf16> q_raw, absl::Span<const float> weights,
                                 IndexQuery* out) const;

  // The rows the query at `layer`'s last position t attends to: the window
  // positions max(0, t - window + 1) .. t, then on CSA layers the top
  // min(index_topk, visible) compressed entries by `query`'s index scores
  // (required there; ties to the lower entry), on HCA layers all visible
  // entries (visible: j < (t + 1) / ratio). If `index_scores` is given, it
  // receives the scores of every visible entry (CSA). kFailedPrecondition
  // for an empty layer.
  absl::StatusOr<AttentionSet> SelectAttentionSet(SequenceId seq, int layer, const IndexQuery* query,
                                                  std::vector<float>* index_scores = nullptr) const;
  // The same selection into *out (its vectors cleared and refilled, their
  // storage reused), working in *scratch (scratch->scores then holds the
  // index scores of a CSA layer): the decode path's form, which allocates
  // nothing once *out and *scratch have grown to the layer's sizes. On a
  // refusal *out is unspecified.
  absl::Status SelectAttentionSet(SequenceId seq, int layer, const IndexQuery* query, SelectionScratch* scratch,
                                  AttentionSet* out) const;

  // --- Selecting for several positions (PositionSets) ---------------------

  // The attention sets of positions [first, first + count) of `layer`, in
  // one call (an MTP verify step after appending its draft tokens, a
  // prefill chunk after appending it): each position with its own causal
  // set, as PositionSets describes. Requires 0 <= first, 0 <= count and
  // first + count <= the layer's length (kOutOfRange naming the position
  // and the length otherwise). `queries`: one per position (queries[i] for
  // first + i, each prepared at its position), required on CSA layers
  // (kInvalidArgument for a wrong count or a null query, naming which);
  // other layers do not use them, but a non-empty span must still hold
  // `count`. A key a query cannot score is kInvalidArgument naming the
  // position and entry. The form with *out and *scratch reuses their
  // storage and allocates nothing once they have grown to the call's sizes;
  // a refusal of the arguments leaves *out unchanged (after a scoring
  // refusal it is unspecified). Reads only; changes nothing in the cache.
  // Page-manager mode: window and HCA layers get indices only (no byte is
  // read), and the tokens of the sequence's open step count as held (the
  // engine writes their rows through the plan's slots before its attention
  // reads them); CSA layers are refused (kFailedPrecondition): their
  // selection reads index keys, which the engine scores itself.
  absl::Status SelectAttentionSets(SequenceId seq, int layer, int64_t first, int64_t count,
                                   absl::Span<const IndexQuery* const> queries, SelectionScratch* scratch,
                                   PositionSets* out) const;
  absl::StatusOr<PositionSets> SelectAttentionSets(SequenceId seq, int layer, int64_t first, int64_t count,
                                                   absl::Span<const IndexQuery* const> queries = {}) const;

  absl::StatusOr<HistoryView> CompressedRows(SequenceId seq, int layer) const;
  absl::StatusOr<HistoryView> IndexKeys(SequenceId seq, int layer) const;

  // --- Pages as an engine kernel addresses them (docs/layout.md) ---------

  // Layer `layer`'s array of `stream`: fixed for the cache's lifetime.
  // kNotFound when the layer has no such stream. Allocates nothing.
  absl::StatusOr<PageArray> LayerPages(int layer, Stream stream) const;

  // The sequence's page ids of `stream` in row order, the same for every
  // layer of the stream. kWindow: the ring's
  // ceil(ring_slots / rows_per_page) pages (ring_slots = window +
  // draft_slots; slot s in page ids[s / B]). History streams: the pages
  // covering the longest layer's rows (layers may differ mid-step).
  // kNotFound when no layer has the stream, or for an unknown sequence.
  absl::StatusOr<std::vector<int32_t>> BlockTable(SequenceId seq, Stream stream) const;
  // The same for a batch: dense [batch, max_blocks] (-1 padded) and CSR.
  // CSR refuses kWindow (kInvalidArgument): ring slots are not a prefix of
  // the pages, so FlashInfer's last_page_len cannot describe them.
  absl::StatusOr<DenseBlockTables> BatchBlockTables(absl::Span<const SequenceId> seqs, Stream stream) const;
  absl::StatusOr<CsrBlockTables> BatchBlockTablesCsr(absl::Span<const SequenceId> seqs, Stream stream) const;

  // Rows `layer` of `seq` stores in `stream`: kWindow, the ring's valid
  // slots, min(length, window + draft_slots) -- in page-manager mode fewer
  // after a truncation, whose later rows stay in their slots until the
  // sequence grows past them; history streams, the rows appended (row r
  // at BlockTable[r / B], offset r % B). kNotFound when the layer has no
  // such stream.
  absl::StatusOr<int64_t> StreamRows(SequenceId seq, int layer, Stream stream) const;

  // Ready-made rows for a layer whose compressor runs in the engine:
  // `rows` holds n contiguous 584-byte rows (kCsaRows, kHcaRows) or 68-byte
  // keys (kCsaKeys), byte for byte as they are stored. Requires
  // first == StreamRows(seq, layer, stream) and first + n <= the windows
  // closed so far; validated like a snapshot's rows (no NaN E4M3 codes or
  // UE8M0 scales, finite bf16 RoPE dims, zero padding): kInvalidArgument
  // naming the row. kWindow rows go through Append. Allocates history pages
  // (copying a page shared with a fork first) or kResourceExhausted.
  absl::Status AppendRows(SequenceId seq, int layer, Stream stream, int64_t first, absl::Span<const uint8_t> rows);

  // --- Prefix caching (docs/prefix-cache.md) -------------------------------
  // A prefix of n blocks is tokens [0, n x B) (B = PrefixBlockTokens()), named
  // by the engine's 64-bit chain hashes: hash i names tokens [0, (i + 1) x B)
  // (the engine decides what goes into it: token ids, the hash of block
  // i - 1, a model or LoRA id, ...). A published prefix holds its history
  // pages (shared copy-on-write with every sequence that uses them) and a
  // checkpoint of the window ring and the CSA compressor states at n x B.

  int64_t PrefixBlockTokens() const;

  // The first n = block_hashes.size() blocks of `seq` become reusable under
  // these hashes; it stays reusable after `seq` is freed, until evicted.
  // Always possible when Length(seq) is n x B (every layer); for a sequence
  // that has passed n x B, possible as long as it could Truncate to n x B
  // (n x B >= RollbackFloor(seq)). Publishing a prefix already published
  // only refreshes it. Copies the ring and CSA compressor-state pages
  // (the checkpoint) into pages of the prefix budget, evicting other
  // prefixes to make room (evictions stay made if the call then fails).
  // kInvalidArgument: no hashes, or a hash that names a different block of
  // a published chain (its position or its parent differ).
  // kFailedPrecondition (nothing changes): the sequence holds fewer than
  // n x B tokens, has passed n x B beyond its rollback floor, holds layers
  // of different lengths (mid-step), or an engine-compressed layer lacks
  // compressed rows or keys of the prefix. kResourceExhausted: the
  // checkpoint does not fit the prefix budget even when empty, or pages ran
  // out. kNotFound: unknown sequence.
  // kFailedPrecondition in page-manager mode (use the next form) and while
  // the sequence is in an open step.
  absl::Status PublishPrefix(SequenceId seq, absl::Span<const uint64_t> block_hashes);
  // The same in either mode; in page-manager mode *engine_copies receives
  // the checkpoint's page copies (the sequence's ring and CSA state pages
  // onto the prefix's), which the engine makes before the sequence's next
  // step writes (and before any copy a later restore of this prefix lists).
  // There, a sequence that passed n x B is accepted while its ring and state
  // rows still hold what n x B needs: ring_end - n x B <= rollback_depth.
  absl::Status PublishPrefix(SequenceId seq, absl::Span<const uint64_t> block_hashes,
                             std::vector<PageCopy>* engine_copies);

  struct PrefixMatch {
    SequenceId seq = 0;
    int64_t tokens = 0;         // the restored prefix's length, a multiple of B (0: none matched)
    // The tokens of the longest run of leading blocks whose history the cache
    // holds (>= tokens): a sequence that publishes there gives later requests
    // a prefix to branch from (e.g. the end of a shared system prompt).
    int64_t shared_tokens = 0;
  };
  // A new sequence holding the longest published prefix whose hashes are the
  // first blocks of `block_hashes` (empty: none). It shares the prefix's
  // history pages (copy-on-write) and gets the checkpoint's ring and
  // compressor state, so it continues byte for byte as a sequence that
  // appended those tokens itself; its rollback floor is the prefix's length.
  // Without a match, a new empty sequence. Counts a hit or a miss.
  // kResourceExhausted: the state budget cannot supply the new sequence's
  // pages, or the history budget the shared pages that only the cache held.
  // kFailedPrecondition in page-manager mode (use the next form).
  absl::StatusOr<PrefixMatch> CreateSequenceFromPrefix(absl::Span<const uint64_t> block_hashes);
  // The same in either mode; in page-manager mode *engine_copies receives the
  // page copies that restore the checkpoint (the prefix's ring and CSA state
  // pages onto the new sequence's), which the engine makes before it uses
  // the sequence.
  absl::StatusOr<PrefixMatch> CreateSequenceFromPrefix(absl::Span<const uint64_t> block_hashes,
                                                       std::vector<PageCopy>* engine_copies);
  // What CreateSequenceFromPrefix would restore now (seq stays 0), without
  // creating or counting anything: for a scheduler.
  PrefixMatch LookupPrefix(absl::Span<const uint64_t> block_hashes) const;

  CacheUsage Usage() const;
  absl::StatusOr<SequenceUsage> Usage(SequenceId seq) const;

  const ModelSpec& spec() const;
  const CacheOptions& options() const;

 private:
  friend class SnapshotAccess;  // snapshot.cc stores and restores the streams
  friend class PrefixAccess;    // tests inspect the prefix cache's pages (src/prefix_cache.h)
  struct Impl;
  explicit Cache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvc

#endif  // KVC_CACHE_H_
