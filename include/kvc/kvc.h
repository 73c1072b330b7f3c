/* kvc C API: the cache behind opaque handles, for engines not written in C++.
 *
 * Every function returns KVC_OK (0) or a negative KVC_ERR_* code; after an
 * error, kvc_last_error() gives a message naming what was wrong (per thread,
 * valid until the next failing call on that thread). A failed call leaves
 * the cache as it was. Numbers of codes and components are stable.
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
  KVC_ERR_IO = -8         /* the file system refused (permissions, no space, ...) */
};

enum { KVC_HEAD_DIM = 512, KVC_NUM_COMPONENTS = 4 };

typedef struct kvc_cache kvc_cache;
typedef int64_t kvc_seq;

typedef struct kvc_options {
  int64_t history_bytes;  /* byte limit of compressed rows + index keys */
  int64_t state_bytes;    /* byte limit of window rings, rollback rows, compressor state */
  int32_t rollback_depth; /* tokens a sequence can always be rolled back by */
  int32_t rows_per_page;  /* 584-byte rows per page */
  int32_t keys_per_page;  /* 68-byte index keys per page */
} kvc_options;

typedef struct kvc_usage {
  int64_t used_bytes[KVC_NUM_COMPONENTS];     /* by component, see kvc_component_name */
  int64_t reserved_bytes[KVC_NUM_COMPONENTS];
  int64_t history_limit_bytes;
  int64_t state_limit_bytes;
  int64_t sequences;
} kvc_usage;

/* The defaults of kvc::CacheOptions. */
void kvc_options_default(kvc_options* options);

/* A cache for a preset model: "v4-flash" or "v4-pro". options may be NULL. */
int kvc_cache_create(const char* preset, const kvc_options* options, kvc_cache** out);
/* A cache for the model of a Hugging Face config.json (its text, `length` bytes). */
int kvc_cache_create_from_config(const char* config_json, size_t length, const kvc_options* options,
                                 kvc_cache** out);
void kvc_cache_destroy(kvc_cache* cache); /* NULL is fine */
int kvc_cache_num_layers(const kvc_cache* cache, int32_t* out);
int kvc_cache_usage(const kvc_cache* cache, kvc_usage* out);

int kvc_seq_create(kvc_cache* cache, kvc_seq* out);
/* Appends `count` tokens at `position` of `layer`: window_rows holds count x 512 bf16. */
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
int kvc_seq_fork(kvc_cache* cache, kvc_seq seq, kvc_seq* out);
int kvc_seq_truncate(kvc_cache* cache, kvc_seq seq, int64_t length);
int kvc_seq_free(kvc_cache* cache, kvc_seq seq);
int kvc_seq_length(const kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t* out);
int kvc_seq_rollback_floor(const kvc_cache* cache, kvc_seq seq, int64_t* out);
/* The window ring of `layer`, dequantized: out holds out_values = window x 512 bf16, by slot. */
int kvc_seq_read_window(const kvc_cache* cache, kvc_seq seq, int32_t layer, uint16_t* out,
                        int64_t out_values);

/* Snapshots (kvc/snapshot.h). Saves `count` sequences to the file at `path`;
 * incremental != 0 appends only what is new to an existing snapshot of them.
 * The previous file stays usable if the save fails or the process dies. */
int kvc_snapshot_save(const kvc_cache* cache, const kvc_seq* seqs, size_t count, const char* path,
                      int incremental);
/* Restores every sequence of the snapshot at `path` as new sequences: their
 * ids go to out[0 .. *count). If `capacity` is too small nothing is restored:
 * KVC_ERR_OUT_OF_RANGE, with *count set to the number needed. A damaged file
 * is KVC_ERR_DATA_LOSS, another model's KVC_ERR_FAILED_PRECONDITION; the cache
 * is unchanged after any error. */
int kvc_snapshot_restore(kvc_cache* cache, const char* path, kvc_seq* out, size_t capacity, size_t* count);

const char* kvc_last_error(void);
const char* kvc_component_name(int component); /* "?" for unknown numbers */

#ifdef __cplusplus
}
#endif

#endif /* KVC_KVC_H_ */
