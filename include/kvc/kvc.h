/* kvc C API: the cache behind opaque handles, for engines not written in C++.
 *
 * Every function returns KVC_OK (0) or a negative KVC_ERR_* code; after an
 * error, kvc_last_error() gives a message naming what was wrong (per thread,
 * valid until the next failing call on that thread). A failed call leaves
 * the cache as it was. Numbers of codes and components are stable.
 * Each function's comment lists the codes it returns besides these two,
 * which any function with a code can return:
 *   KVC_ERR_RESOURCE_EXHAUSTED  memory ran out inside the call
 *   KVC_ERR_INTERNAL            a bug in kvc (the message says where)
 * and KVC_ERR_INVALID_ARGUMENT for a NULL pointer argument. No C++
 * exception ever leaves a function of this API.
 * Thread safety: as kvc::Cache (calls on different sequences run in
 * parallel). Bulk data is bf16 as uint16_t bit patterns, row-major. */
#ifndef KVC_KVC_H_
#define KVC_KVC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KVC_OK = 0,
  KVC_ERR_INVALID_ARGUMENT = -1,
  KVC_ERR_NOT_FOUND = -2,
  KVC_ERR_OUT_OF_RANGE = -3,
  KVC_ERR_FAILED_PRECONDITION = -4,
  KVC_ERR_RESOURCE_EXHAUSTED = -5,
  KVC_ERR_INTERNAL = -6,
  KVC_ERR_DATA_LOSS = -7, /* a damaged or truncated snapshot file */
  KVC_ERR_IO = -8         /* any failing file-system call (missing file, a directory, permissions,
                             no space, a file-size limit, ...): the message names the path and
                             the system's reason */
};

enum { KVC_HEAD_DIM = 512, KVC_INDEX_DIM = 128, KVC_NUM_COMPONENTS = 4 };

typedef struct kvc_cache kvc_cache;
typedef int64_t kvc_seq;

/* Engine memory for one (layer, stream) page array: page b at
 * base + b x page_bytes, bytes / page_bytes pages (kvc_page_geometry gives
 * page_bytes before any cache exists). 64-byte aligned, no two arrays
 * overlapping; must outlive the cache. `stream` is a KVC_STREAM_* number. */
typedef struct kvc_engine_array {
  int32_t layer;
  int32_t stream;
  void* base;
  int64_t bytes;
} kvc_engine_array;

typedef struct kvc_options {
  int64_t history_bytes;  /* byte limit of compressed rows + index keys */
  int64_t state_bytes;    /* byte limit of window rings, rollback rows, compressor state */
  int32_t rollback_depth; /* tokens a sequence can always be rolled back by */
  int32_t rows_per_page;  /* 584-byte rows per page */
  int32_t keys_per_page;  /* 68-byte index keys per page */
  /* Engine memory for the page arrays, all or none per class: every layer's
   * KVC_STREAM_WINDOW array, and/or every layer's CSA rows, CSA keys and HCA
   * rows arrays (docs/layout.md). NULL / 0 (the default): kvc maps its own. */
  const kvc_engine_array* engine_arrays;
  int64_t num_engine_arrays;
  /* Extra window ring slots, 0..4096 (kvc::CacheOptions::draft_slots): the
   * ring holds window + draft_slots rows (slot = position mod that), so a
   * step appending k <= draft_slots + 1 tokens finds the window rows of all
   * k positions in it (kvc_seq_select_positions). 0 (the default): the
   * official 128-slot ring. */
  int32_t draft_slots;
  /* Nonzero: page-manager mode (kvc::CacheOptions::page_manager): kvc keeps
   * page ids, block tables, refcounts, copy-on-write, rollback and
   * accounting and never reads or writes a page byte; the engine writes
   * rows through kvc_step_plan_slots and makes the page copies kvc lists.
   * engine_arrays may then be device memory (never dereferenced) or absent.
   * Requires draft_slots >= rollback_depth. */
  int32_t page_manager;
  /* Prefix caching (docs/prefix-cache.md): the byte budget of cached
   * prefixes (pages only the prefix cache references), separate from the two
   * above; and the tokens per prefix block, a multiple of 128 (default 256). */
  int64_t prefix_bytes;
  int32_t prefix_block_tokens;
} kvc_options;

typedef struct kvc_usage {
  int64_t used_bytes[KVC_NUM_COMPONENTS];     /* by component, see kvc_component_name */
  int64_t reserved_bytes[KVC_NUM_COMPONENTS];
  int64_t history_limit_bytes;
  int64_t state_limit_bytes;
  int64_t sequences;
  int64_t open_steps;      /* planned, neither committed nor aborted */
  int64_t deferred_pages;  /* page-manager mode: freed pages (ids x layers) waiting for kvc_steps_complete */
  uint64_t epoch;          /* the last step planned */
  uint64_t completed_epoch;
} kvc_usage;

/* The defaults of kvc::CacheOptions. */
void kvc_options_default(kvc_options* options);

/* A cache for a preset model: "v4-flash" or "v4-pro". options may be NULL.
 * KVC_ERR_NOT_FOUND: unknown preset. KVC_ERR_INVALID_ARGUMENT: options out of range. */
int kvc_cache_create(const char* preset, const kvc_options* options, kvc_cache** out);
/* A cache for the model of a Hugging Face config.json (its text, `length` bytes).
 * KVC_ERR_INVALID_ARGUMENT: a config kvc cannot read, or options out of range. */
int kvc_cache_create_from_config(const char* config_json, size_t length, const kvc_options* options,
                                 kvc_cache** out);

/* The engine's learned weights of one compressor (kvc::CompressorParams),
 * fp32, row-major. Sizes (kvc requires head_dim 512 and index_dim 128):
 *                    ape_count              norm_weight_count
 *   CSA compressor   4 x 1024 = 4096        512
 *   HCA compressor   128 x 512 = 65536      512
 *   CSA indexer      4 x 256 = 1024         128
 * ape is [ratio][width_factor x dim] (width_factor 2 on CSA, 1 on HCA);
 * norm_weight is [dim]. All values finite. Both pointers NULL with counts 0:
 * no parameters (the engine appends that layer's compressed entries). */
typedef struct kvc_compressor_params {
  const float* ape;
  int64_t ape_count;
  const float* norm_weight;
  int64_t norm_weight_count;
} kvc_compressor_params;

/* One layer's parameters: compressor on CSA and HCA layers, indexer on CSA
 * layers (a CSA layer has both or neither); the others stay zero. */
typedef struct kvc_layer_params {
  kvc_compressor_params compressor;
  kvc_compressor_params indexer;
} kvc_layer_params;

/* What kvc_cache_create_with_params adds to a model. Every buffer is COPIED
 * into memory the cache owns: the caller may free or overwrite it as soon as
 * the call returns. A zeroed struct adds nothing.
 *   layers: num_layers entries (the model's layer count), or NULL with
 *     num_layers 0 (no layer has parameters).
 *   *_rope_table: the engine's RoPE table (kvc::RopeSpec::engine_table), or
 *     NULL with count 0 (kvc computes its own): (cos, sin) of position p and
 *     pair j at [(p x 32 + j) x 2 + {0, 1}], so count = positions x 64, with
 *     positions >= the model's max_context (2^20 for the presets: 256 MiB).
 *     kvc rotates with the compressed-layer table only (compressed entries,
 *     index keys, index queries); the window table is recorded in the model
 *     fingerprint of snapshots. */
typedef struct kvc_model_params {
  const kvc_layer_params* layers;
  int32_t num_layers;
  const float* compressed_rope_table;
  int64_t compressed_rope_table_count;
  const float* window_rope_table;
  int64_t window_rope_table_count;
} kvc_model_params;

/* kvc_cache_create and kvc_cache_create_from_config with the engine's
 * parameters (params may be NULL: none). Their codes, and
 * KVC_ERR_INVALID_ARGUMENT for parameters that do not fit the model, with a
 * message naming the layer and field ("layer 3: indexer.norm_weight has 64
 * values, expected 128"): a wrong count, a NULL pointer with a count > 0, a
 * negative count, non-finite values, parameters on a layer without that
 * compressor, a CSA layer with only one of compressor and indexer,
 * num_layers other than the model's, a RoPE table too short or not a
 * multiple of 64. */
int kvc_cache_create_with_params(const char* preset, const kvc_options* options, const kvc_model_params* params,
                                 kvc_cache** out);
int kvc_cache_create_from_config_with_params(const char* config_json, size_t length, const kvc_options* options,
                                             const kvc_model_params* params, kvc_cache** out);
void kvc_cache_destroy(kvc_cache* cache); /* NULL is fine */
int kvc_cache_num_layers(const kvc_cache* cache, int32_t* out);
/* Layer kinds (kvc::LayerKind; stable numbers). */
enum { KVC_LAYER_WINDOW = 0, KVC_LAYER_CSA = 1, KVC_LAYER_HCA = 2 };
/* *kind = the KVC_LAYER_* of `layer`. KVC_ERR_INVALID_ARGUMENT: layer out of range. */
int kvc_cache_layer_kind(const kvc_cache* cache, int32_t layer, int32_t* kind);
int kvc_cache_usage(const kvc_cache* cache, kvc_usage* out);

/* KVC_ERR_RESOURCE_EXHAUSTED: also when the cache's byte limits leave no room. */
int kvc_seq_create(kvc_cache* cache, kvc_seq* out);
/* Appends `count` tokens at `position` of `layer`: window_rows holds count x 512 bf16.
 * KVC_ERR_NOT_FOUND: unknown sequence. KVC_ERR_INVALID_ARGUMENT: layer, position
 * (a gap or a repeat) or count out of range, non-finite values. KVC_ERR_OUT_OF_RANGE:
 * past max_context. KVC_ERR_RESOURCE_EXHAUSTED: also when the byte limits leave no room.
 * kvc_seq_append_tokens as kvc_seq_append, and KVC_ERR_INVALID_ARGUMENT for projections
 * missing, unexpected or non-finite. */
int kvc_seq_append(kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t position,
                   const uint16_t* window_rows, int64_t count);
/* All of a layer's inputs for `count` tokens (kvc::LayerTokens): the
 * projections are required on compressed layers whose model carries
 * compressor parameters and must be NULL otherwise. Widths: compressor_*
 * count x 1024 (CSA) or x 512 (HCA) fp32; indexer_* count x 256 fp32 (CSA). */
typedef struct kvc_layer_tokens {
  const uint16_t* window_rows;
  const float* compressor_kv;
  const float* compressor_score;
  const float* indexer_kv;
  const float* indexer_score;
  int64_t count;
} kvc_layer_tokens;
int kvc_seq_append_tokens(kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t position,
                          const kvc_layer_tokens* tokens);
/* A copy of `seq` sharing its history pages. KVC_ERR_NOT_FOUND: unknown sequence.
 * KVC_ERR_FAILED_PRECONDITION: its layers hold different lengths (mid-step),
 * it is in an open step, or the cache is in page-manager mode (use kvc_seq_fork_pages).
 * KVC_ERR_RESOURCE_EXHAUSTED: also when the byte limits leave no room. */
int kvc_seq_fork(kvc_cache* cache, kvc_seq seq, kvc_seq* out);
/* Rolls `seq` back to `length` tokens. KVC_ERR_NOT_FOUND: unknown sequence.
 * KVC_ERR_INVALID_ARGUMENT: length < 0 or above the current length.
 * KVC_ERR_FAILED_PRECONDITION: below the rollback floor, or mid-step. */
int kvc_seq_truncate(kvc_cache* cache, kvc_seq seq, int64_t length);
/* KVC_ERR_NOT_FOUND: unknown (or already freed) sequence. */
int kvc_seq_free(kvc_cache* cache, kvc_seq seq);
/* KVC_ERR_NOT_FOUND: unknown sequence. KVC_ERR_INVALID_ARGUMENT: layer out of range. */
int kvc_seq_length(const kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t* out);
/* KVC_ERR_NOT_FOUND: unknown sequence. */
int kvc_seq_rollback_floor(const kvc_cache* cache, kvc_seq seq, int64_t* out);
/* The window of `layer`, dequantized: out holds out_values = window x 512 bf16, the last
 * `window` positions each at official slot position mod window (zero below position 0).
 * KVC_ERR_NOT_FOUND: unknown sequence. KVC_ERR_INVALID_ARGUMENT: layer or out_values wrong. */
int kvc_seq_read_window(const kvc_cache* cache, kvc_seq seq, int32_t layer, uint16_t* out,
                        int64_t out_values);

/* Index queries (kvc::IndexQuery): one token's lightning-indexer query,
 * rotated with the compressed-layer RoPE at `position`, Hadamard, FP4. It
 * serves every CSA layer of that token. q_raw: heads x 128 bf16 (wq_b's
 * output, before RoPE, |x| <= 2^120); weights: `heads` finite fp32 head
 * weights (already scaled by 128^-0.5 x heads^-0.5); heads in 1..4096.
 * KVC_ERR_OUT_OF_RANGE: position outside [0, max_context).
 * KVC_ERR_INVALID_ARGUMENT: heads out of range, non-finite or too large
 * values (the message names the head). */
typedef struct kvc_index_query kvc_index_query;
int kvc_index_query_prepare(const kvc_cache* cache, int64_t position, const uint16_t* q_raw, const float* weights,
                            int32_t heads, kvc_index_query** out);
void kvc_index_query_destroy(kvc_index_query* query); /* NULL is fine */
/* The index scores of the CSA `layer`'s visible compressed entries for
 * `query` (kvc::Cache::SelectAttentionSet's index_scores): entry j's score at
 * out[j], for the entries j < (length / 4) that hold an index key, where
 * length is the layer's token count; the query should be prepared at the
 * layer's last position (length - 1). *count = the number of scores;
 * min(*count, capacity) are written (out may be NULL when capacity is 0).
 * KVC_ERR_NOT_FOUND: unknown sequence. KVC_ERR_INVALID_ARGUMENT: layer out of
 * range or not CSA, capacity < 0, a key the query cannot score without fp32
 * overflow (the message names the layer and entry).
 * KVC_ERR_FAILED_PRECONDITION: the layer holds no tokens. */
int kvc_index_scores(const kvc_cache* cache, kvc_seq seq, int32_t layer, const kvc_index_query* query, float* out,
                     int64_t capacity, int64_t* count);

/* --- Pages as an engine kernel addresses them (docs/layout.md) ----------
 * Each (layer, stream) is ONE array of equal pages: page b at
 * base + b x page_bytes. A sequence has ONE block table of page ids per
 * stream, the same for every layer of the stream. Row r of a stream: page
 * ids[r / rows_per_page]; its data at (r % rows_per_page) x row_data_bytes
 * and its scales at rows_per_page x row_data_bytes +
 * (r % rows_per_page) x row_scale_bytes from the page start. Window rows
 * are ring slots: slot s = position mod (window + draft_slots) is row s. */
enum {
  KVC_STREAM_WINDOW = 0,
  KVC_STREAM_CSA_ROWS = 1,
  KVC_STREAM_CSA_KEYS = 2,
  KVC_STREAM_HCA_ROWS = 3,
  /* Compressor state rings (one page per sequence; a row is one token's kv
   * then score + ape, 2 x width fp32; slot = position mod rows_per_page):
   * what an engine compressing on its own device writes in page-manager mode. */
  KVC_STREAM_CSA_STATE = 4,
  KVC_STREAM_CSA_INDEXER_STATE = 5,
  KVC_STREAM_HCA_STATE = 6
};
typedef struct kvc_page_array {
  void* base; int64_t page_bytes; int64_t num_pages;
  int32_t rows_per_page; int32_t row_data_bytes; int32_t row_scale_bytes;  /* 576 + 8, or 64 + 4 */
} kvc_page_array;
/* KVC_ERR_NOT_FOUND when the layer has no such stream; KVC_ERR_INVALID_ARGUMENT
 * for a layer or stream number out of range. The array is fixed for the
 * cache's lifetime. */
int kvc_layer_pages(const kvc_cache* cache, int32_t layer, int32_t stream, kvc_page_array* out);
/* A stream's page geometry before any cache exists, for allocating
 * kvc_engine_arrays: the model is a preset name, or (preset NULL) the text
 * of a config.json. Sets out's page_bytes, rows_per_page, row_data_bytes and
 * row_scale_bytes (base NULL, num_pages 0); *count = the layers that have the
 * stream, min(*count, capacity) of them written to `layers` (ascending; may
 * be NULL when capacity is 0). KVC_ERR_INVALID_ARGUMENT: options or a model
 * kvc_cache_create would refuse (its engine_arrays are checked by the create
 * calls, not here), a stream number out of range, capacity < 0;
 * KVC_ERR_NOT_FOUND: an unknown preset. */
int kvc_page_geometry(const char* preset, const char* config_json, size_t config_length, const kvc_options* options,
                      int32_t stream, kvc_page_array* out, int32_t* layers, int32_t capacity, int32_t* count);
/* Page ids of the stream in row order, the same for every layer of the stream; writes
 * min(count, capacity) ids. Row r: page ids[r / rows_per_page]; its data at
 * (r % rows_per_page) x row_data_bytes and its scales at rows_per_page x row_data_bytes +
 * (r % rows_per_page) x row_scale_bytes from the page start. *count = the
 * sequence's pages of the stream (ids may be NULL when capacity is 0).
 * KVC_ERR_NOT_FOUND: unknown sequence, or no layer has the stream.
 * KVC_ERR_INVALID_ARGUMENT: stream out of range, capacity < 0. */
int kvc_seq_block_table(const kvc_cache* cache, kvc_seq seq, int32_t stream, int32_t* ids,
                        int64_t capacity, int64_t* count);
/* Block tables of `batch` sequences, dense: ids[b x max_blocks + k] is page k
 * of seqs[b], -1 past its blocks[b] pages; rows[b] the rows it stores (its
 * longest layer's). *max_blocks is always set; the table is written only when
 * capacity >= batch x *max_blocks (else KVC_ERR_OUT_OF_RANGE and nothing
 * written: call again with a larger buffer). blocks and rows may be NULL.
 * On any other error *max_blocks is left as it was.
 * KVC_ERR_NOT_FOUND / KVC_ERR_INVALID_ARGUMENT as kvc_seq_block_table. */
int kvc_batch_block_tables(const kvc_cache* cache, const kvc_seq* seqs, int64_t batch, int32_t stream,
                           int32_t* ids, int64_t capacity, int64_t* max_blocks, int32_t* blocks, int64_t* rows);
/* The same as FlashInfer's paged layout (CSR): the pages of seqs[b] are
 * indices[indptr[b] .. indptr[b + 1]), the last holding last_page_len[b] rows
 * (0 for a sequence without pages). indptr holds batch + 1 values,
 * last_page_len batch; *count = the total pages, indices written only when
 * capacity >= *count (else KVC_ERR_OUT_OF_RANGE and nothing written).
 * KVC_STREAM_WINDOW is KVC_ERR_INVALID_ARGUMENT: ring slots are not a paged
 * sequence (use kvc_seq_block_table or kvc_seq_select's window_indices). */
int kvc_batch_block_tables_csr(const kvc_cache* cache, const kvc_seq* seqs, int64_t batch, int32_t stream,
                               int32_t* indptr, int32_t* indices, int64_t capacity, int64_t* count,
                               int32_t* last_page_len);
/* Ready-made rows (584 B) or keys (68 B), contiguous, for a layer whose compressor runs in the
 * engine; `first` must equal the rows already stored. Validated like a snapshot's rows.
 * KVC_ERR_INVALID_ARGUMENT: a row kvc could not have written (named),
 * KVC_STREAM_WINDOW (window rows go through kvc_seq_append), `first` not the
 * rows stored, count < 0. KVC_ERR_NOT_FOUND: the layer has no such stream.
 * KVC_ERR_OUT_OF_RANGE: more rows than the windows closed so far.
 * KVC_ERR_FAILED_PRECONDITION: kvc runs this layer's compressor.
 * KVC_ERR_NOT_FOUND: unknown sequence. KVC_ERR_RESOURCE_EXHAUSTED: no pages
 * (the message names the stream). */
int kvc_seq_append_rows(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t stream, int64_t first,
                        const uint8_t* rows, int64_t count);
/* Rows `layer` stores in `stream`: for KVC_STREAM_WINDOW the ring's valid
 * slots (min(length, window + draft_slots); in page-manager mode fewer after a
 * truncation, until the sequence grows back), else the rows appended. KVC_ERR_NOT_FOUND:
 * unknown sequence, or the layer has no such stream. */
int kvc_seq_stream_rows(const kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t stream, int64_t* out);
/* What the query at `layer`'s last position attends to, as row indices into
 * the layer's page arrays (what a sparse attention kernel takes:
 * page_id x rows_per_page + offset): window_indices into the
 * KVC_STREAM_WINDOW array (window positions, oldest first), then
 * compressed_indices into the layer's KVC_STREAM_CSA_ROWS or
 * KVC_STREAM_HCA_ROWS array (ascending entries: the top index_topk by the
 * query's index scores on CSA layers, ties to the lower entry; every visible
 * entry on HCA layers; none on window-only layers). `query` is required on
 * CSA layers (prepared at the layer's last position) and ignored elsewhere.
 * The counts are always set; min(count, capacity) indices of each are
 * written; the rest of each buffer (up to its capacity) is padded with -1.
 * KVC_ERR_NOT_FOUND: unknown sequence. KVC_ERR_INVALID_ARGUMENT: layer out
 * of range, a CSA layer without a query, a negative capacity, a key the
 * query cannot score. KVC_ERR_FAILED_PRECONDITION: the layer holds no tokens. */
int kvc_seq_select(const kvc_cache* cache, kvc_seq seq, int32_t layer, const kvc_index_query* query,
                   int32_t* window_indices, int64_t window_capacity, int64_t* window_count,
                   int32_t* compressed_indices, int64_t compressed_capacity, int64_t* compressed_count);

/* --- Selecting for several positions (kvc::Cache::SelectAttentionSets) -----
 * The caller's buffers for kvc_seq_select_positions, and the totals it
 * reports. Query i (position first + i) of a call with `count` positions:
 *   its window rows      window_indices[window_offsets[i] .. window_offsets[i + 1])
 *   its compressed rows  compressed_indices[compressed_offsets[i] .. compressed_offsets[i + 1])
 * window_indices are rows of the layer's KVC_STREAM_WINDOW array (ring slot
 * position mod (window + draft_slots), as page_id x rows_per_page + offset),
 * or -1 for a window position the ring no longer holds (position <
 * length - window - draft_slots; in page-manager mode after a truncation or
 * an aborted step, the furthest length written instead of length): the
 * engine takes that row from its own activations. window_positions (optional) says which position each is,
 * oldest first: max(0, t - window + 1) .. t. compressed_indices are rows of
 * the layer's KVC_STREAM_CSA_ROWS or KVC_STREAM_HCA_ROWS array; entries
 * (optional) the entry numbers, ascending. */
typedef struct kvc_position_sets {
  int64_t* window_offsets;      /* count + 1 values, required */
  int64_t* window_positions;    /* window_capacity values, or NULL */
  int32_t* window_indices;      /* window_capacity values (NULL only when 0) */
  int64_t window_capacity;
  int64_t* compressed_offsets;  /* count + 1 values, required */
  int64_t* entries;             /* compressed_capacity values, or NULL */
  int32_t* compressed_indices;  /* compressed_capacity values (NULL only when 0) */
  int64_t compressed_capacity;
  /* Set by the call: the rows the selection has (-1 until a selection was made). */
  int64_t window_total;
  int64_t compressed_total;
} kvc_position_sets;
/* What positions [first, first + count) of `layer` attend to, each with its
 * own causal set (window positions t - window + 1 .. t; compressed entries
 * visible at t, the top index_topk by its own query on CSA layers, all on
 * HCA layers), in one call: a verify step's drafts after appending them, or
 * a prefill chunk's positions. `queries`: count queries, queries[i]
 * prepared at position first + i; required on CSA layers, NULL elsewhere
 * (or count queries, unused). Writes the offsets, indices and (if given)
 * positions and entries only when both totals fit their capacities.
 * KVC_ERR_OUT_OF_RANGE: a capacity below its total (the totals are set, nothing
 * else is written: call again with larger buffers), or a position >= the
 * layer's length (totals -1; the message names the position).
 * KVC_ERR_NOT_FOUND: unknown sequence. KVC_ERR_INVALID_ARGUMENT: layer out of
 * range, first or count negative, a negative capacity, a NULL offsets or
 * (capacity > 0) index buffer, a CSA layer without queries or with a NULL
 * one (named), a key a query cannot score. KVC_ERR_FAILED_PRECONDITION: a
 * CSA layer in page-manager mode (its selection reads index keys). In
 * page-manager mode the tokens of the sequence's open step count as held. */
int kvc_seq_select_positions(const kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t first, int64_t count,
                             const kvc_index_query* const* queries, kvc_position_sets* out);

/* Snapshots (kvc/snapshot.h). Saves `count` sequences to the file at `path`;
 * incremental != 0 appends only what is new to an existing snapshot of them
 * (after checking it as a restore would: a damaged file is rewritten whole).
 * The previous file stays usable, unchanged, if the save fails or the process
 * dies. KVC_OK also when everything was written and renamed into place but
 * flushing the directory failed (SaveStats::durable in C++): the new file is
 * at `path`, but a system crash may bring the previous one back.
 * KVC_ERR_NOT_FOUND: unknown sequence (nothing written). KVC_ERR_IO: a failing
 * file-system call. */
int kvc_snapshot_save(const kvc_cache* cache, const kvc_seq* seqs, size_t count, const char* path,
                      int incremental);
/* Restores every sequence of the snapshot at `path` as new sequences: their
 * ids go to out[0 .. *count). If `capacity` is too small nothing is restored:
 * KVC_ERR_OUT_OF_RANGE, with *count set to the number needed. A damaged file
 * is KVC_ERR_DATA_LOSS, another model's KVC_ERR_FAILED_PRECONDITION, a file
 * that is not a snapshot (or of another format version) KVC_ERR_INVALID_ARGUMENT,
 * pages that do not fit KVC_ERR_RESOURCE_EXHAUSTED, a failing file-system call
 * (a missing file, a directory, ...) KVC_ERR_IO; the cache is unchanged after
 * any error. */
int kvc_snapshot_restore(kvc_cache* cache, const char* path, kvc_seq* out, size_t capacity, size_t* count);

/* --- Planned batch steps (kvc::Cache::PlanStep; docs/embedding.md) -----
 * kvc_step_plan_create reserves every page a step of `batch` sequences
 * needs -- new_tokens[b] >= 1 tokens appended to every layer of seqs[b] --
 * all or nothing, and returns the plan: its epoch, per stream the slot
 * (page id x rows_per_page + offset; -1: skip) of every row the step
 * writes (vLLM's slot_mapping, by sequence), and in page-manager mode the
 * page copies to make before writing and those that undo the writes on
 * abort. Then the rows are written (kvc_seq_append* per layer, or the
 * engine through the slots), then kvc_step_commit or kvc_step_abort. In
 * page-manager mode freed pages are reused only after
 * kvc_steps_complete(epoch) says the device finished that step.
 * kvc_step_plan_create: KVC_ERR_NOT_FOUND unknown sequence;
 * KVC_ERR_INVALID_ARGUMENT new_tokens < 1, a sequence twice, batch < 0;
 * KVC_ERR_OUT_OF_RANGE past max_context, or more than 2^31 - 1 slots in a
 * stream; KVC_ERR_FAILED_PRECONDITION a
 * sequence already in a step or with layers of different lengths;
 * KVC_ERR_RESOURCE_EXHAUSTED not enough pages (the message names the stream). */
typedef struct kvc_step_plan kvc_step_plan;
/* Copy page src onto page dst of `stream` in every layer's array of it. */
typedef struct kvc_page_copy {
  int32_t stream;
  int32_t src;
  int32_t dst;
} kvc_page_copy;
int kvc_step_plan_create(kvc_cache* cache, const kvc_seq* seqs, const int64_t* new_tokens, int64_t batch,
                         kvc_step_plan** out);
void kvc_step_plan_destroy(kvc_step_plan* plan); /* NULL is fine; the step itself stays open */
int kvc_step_plan_epoch(const kvc_step_plan* plan, uint64_t* epoch);
/* The slots of `stream`: request b's rows are slots[indptr[b] .. indptr[b + 1]);
 * *indptr holds batch + 1 values, *slots *num_slots. Views into the plan,
 * valid until kvc_step_plan_destroy. A stream the model lacks: *num_slots = 0
 * and *indptr NULL. KVC_ERR_INVALID_ARGUMENT: not a KVC_STREAM_* number. */
int kvc_step_plan_slots(const kvc_step_plan* plan, int32_t stream, const int32_t** indptr, const int64_t** slots,
                        int64_t* num_slots);
/* Page-manager mode: the copies to make before writing (*copies views the
 * plan), and those that undo the writes of an aborted step. Empty otherwise. */
int kvc_step_plan_copies(const kvc_step_plan* plan, const kvc_page_copy** copies, int64_t* count);
int kvc_step_plan_abort_copies(const kvc_step_plan* plan, const kvc_page_copy** copies, int64_t* count);
/* KVC_ERR_NOT_FOUND: no open step `epoch`. kvc_step_commit, kvc's mode:
 * KVC_ERR_FAILED_PRECONDITION when a layer was not appended (the step stays open). */
int kvc_step_commit(kvc_cache* cache, uint64_t epoch);
int kvc_step_abort(kvc_cache* cache, uint64_t epoch);
/* The device finished every step up to `epoch`: their deferred page frees
 * become reusable (*released of them; released may be NULL).
 * KVC_ERR_INVALID_ARGUMENT: an epoch never planned. */
int kvc_steps_complete(kvc_cache* cache, uint64_t epoch, int64_t* released);
/* kvc_seq_fork for page-manager mode (works in both): the page copies the
 * engine must make before it uses the child go to copies[0 .. *count). If
 * `capacity` is too small nothing is forked: KVC_ERR_OUT_OF_RANGE with
 * *count the number needed. Otherwise kvc_seq_fork's codes. */
int kvc_seq_fork_pages(kvc_cache* cache, kvc_seq seq, kvc_seq* out, kvc_page_copy* copies, int64_t capacity,
                       int64_t* count);

/* --- Prefix caching (docs/prefix-cache.md) ---------------------------------
 * A prefix of n blocks is tokens [0, n x B), B = kvc_prefix_block_tokens,
 * named by the engine's 64-bit chain hashes: hash i names tokens
 * [0, (i + 1) x B) (the engine decides what goes into it). A published prefix
 * shares its history pages copy-on-write and restores the window ring and
 * compressor state exactly: a sequence created from it continues byte for
 * byte as one that appended the tokens itself (its rollback floor is the
 * prefix's length). It stays reusable after its publisher is freed, until
 * evicted (kvc_options.prefix_bytes bounds what only the cache holds). */
int kvc_prefix_block_tokens(const kvc_cache* cache, int64_t* out); /* B */
/* The first `count` blocks of seq become reusable under these chain hashes
 * (always possible when the sequence's length is count x B; also when it
 * has passed count x B by no more than it could roll back). Publishing a
 * prefix already published refreshes it.
 * KVC_ERR_FAILED_PRECONDITION (nothing changes): kvc no longer has what they
 * need (passed beyond the rollback floor), fewer than count x B tokens,
 * layers at different lengths (mid-step), an engine-compressed layer
 * missing rows or keys of the prefix. KVC_ERR_INVALID_ARGUMENT: count < 1,
 * count x B past max_context, a hash naming a different block of a
 * published chain (or twice in this one). KVC_ERR_NOT_FOUND: unknown
 * sequence. KVC_ERR_RESOURCE_EXHAUSTED: the ring and compressor-state
 * checkpoint does not fit prefix_bytes even with nothing cached, or no pages. */
int kvc_prefix_publish(kvc_cache* cache, kvc_seq seq, const uint64_t* block_hashes, int64_t count);
/* A new sequence holding the longest published prefix of `block_hashes`;
 * *tokens = its length (0 if none matched: an empty sequence). block_hashes
 * may be NULL when count is 0. KVC_ERR_INVALID_ARGUMENT: count < 0 or past
 * max_context. KVC_ERR_RESOURCE_EXHAUSTED: the state budget cannot supply
 * the sequence, or the history budget the shared pages only the cache held. */
int kvc_seq_create_from_prefix(kvc_cache* cache, const uint64_t* block_hashes, int64_t count, kvc_seq* out,
                               int64_t* tokens);
/* What kvc_seq_create_from_prefix would restore now (*tokens), creating and
 * counting nothing, and *shared_tokens: the tokens of the longest run of
 * leading blocks whose history the cache holds (>= *tokens). A sequence
 * that publishes at *shared_tokens gives later requests a prefix to branch
 * from (the end of a shared system prompt, say). shared_tokens may be NULL.
 * KVC_ERR_INVALID_ARGUMENT: count < 0. */
int kvc_prefix_lookup(const kvc_cache* cache, const uint64_t* block_hashes, int64_t count, int64_t* tokens,
                      int64_t* shared_tokens);
typedef struct kvc_prefix_usage {
  int64_t limit_bytes;      /* kvc_options.prefix_bytes */
  int64_t cached_bytes;     /* pages only the prefix cache references: history_bytes + checkpoint_bytes */
  int64_t history_bytes;
  int64_t checkpoint_bytes; /* ring and compressor-state checkpoints */
  int64_t shared_bytes;     /* its pages that live sequences reference too (their budgets) */
  int64_t prefixes;         /* published prefixes held */
  int64_t cached_tokens;    /* tokens their distinct blocks cover */
  int64_t hits;             /* kvc_seq_create_from_prefix calls that restored a prefix */
  int64_t misses;
  int64_t tokens_reused;    /* restored tokens, summed over hits */
  int64_t published;        /* kvc_prefix_publish calls that added a prefix */
  int64_t evictions;
} kvc_prefix_usage;
int kvc_cache_prefix_usage(const kvc_cache* cache, kvc_prefix_usage* out);
/* kvc_prefix_publish and kvc_seq_create_from_prefix for page-manager mode
 * (which refuses the plain calls with KVC_ERR_FAILED_PRECONDITION; these
 * work in both modes): the page copies the engine must make go to
 * copies[0 .. *copy_count) -- a publish's (the sequence's ring and CSA
 * state pages onto the prefix's checkpoint) before the sequence's next step
 * writes, a restore's (the checkpoint onto the new sequence's pages) before
 * the engine uses the sequence. They are at most ceil((window +
 * draft_slots) / rows_per_page) + 2. If `capacity` is too small nothing
 * happens: KVC_ERR_OUT_OF_RANGE with *copy_count the number needed.
 * Otherwise the plain calls' codes. In page-manager mode a sequence that has
 * passed count x B is accepted while its ring and state rows still hold
 * what count x B needs (furthest write - count x B <= rollback_depth). */
int kvc_prefix_publish_pages(kvc_cache* cache, kvc_seq seq, const uint64_t* block_hashes, int64_t count,
                             kvc_page_copy* copies, int64_t capacity, int64_t* copy_count);
int kvc_seq_create_from_prefix_pages(kvc_cache* cache, const uint64_t* block_hashes, int64_t count, kvc_seq* out,
                                     int64_t* tokens, kvc_page_copy* copies, int64_t capacity, int64_t* copy_count);

const char* kvc_last_error(void);
const char* kvc_component_name(int component); /* "?" for unknown numbers */

#ifdef __cplusplus
}
#endif

#endif /* KVC_KVC_H_ */
