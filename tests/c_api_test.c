/* The C API from C: every operation, and errors as codes plus messages. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/kvc.h"

static int passed = 0, failed = 0;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (cond) {                                                                       \
      ++passed;                                                                       \
    } else {                                                                          \
      ++failed;                                                                       \
      fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__, __LINE__, #cond, \
              kvc_last_error());                                                      \
    }                                                                                 \
  } while (0)

/* bf16 bit pattern of a small float (exact for these values). */
static uint16_t Bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return (uint16_t)(u >> 16);
}

/* Window-only, CSA, HCA; window 16, top-k 8, 4096 positions. */
static const char kConfig[] =
    "{\"num_hidden_layers\": 3, \"compress_ratios\": [0, 4, 128], \"sliding_window\": 16, \"head_dim\": 512,"
    " \"qk_rope_head_dim\": 64, \"index_n_heads\": 64, \"index_head_dim\": 128, \"index_topk\": 8,"
    " \"max_position_embeddings\": 4096, \"rope_theta\": 10000, \"compress_rope_theta\": 160000,"
    " \"rms_norm_eps\": 1e-06}";

/* Deterministic values in [-scale, scale). */
static void Fill(float* v, int64_t n, uint32_t seed, float scale) {
  uint32_t x = seed * 2654435761u + 1u;
  for (int64_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    v[i] = scale * ((float)(x >> 8) / (float)(1 << 23) - 1.0f);
  }
}

/* The parameters of kConfig's model, in malloc'd buffers. */
typedef struct Params {
  float *csa_ape, *csa_norm, *idx_ape, *idx_norm, *hca_ape, *hca_norm;
  kvc_layer_params layers[3];
  kvc_model_params model;
} Params;

static void ParamsFill(Params* p, uint32_t seed) {
  Fill(p->csa_ape, 4 * 1024, seed + 1, 0.5f);
  Fill(p->csa_norm, 512, seed + 2, 1.0f);
  Fill(p->idx_ape, 4 * 256, seed + 3, 0.5f);
  Fill(p->idx_norm, 128, seed + 4, 1.0f);
  Fill(p->hca_ape, 128 * 512, seed + 5, 0.5f);
  Fill(p->hca_norm, 512, seed + 6, 1.0f);
}

static void ParamsInit(Params* p, uint32_t seed) {
  p->csa_ape = malloc(4 * 1024 * sizeof(float));
  p->csa_norm = malloc(512 * sizeof(float));
  p->idx_ape = malloc(4 * 256 * sizeof(float));
  p->idx_norm = malloc(128 * sizeof(float));
  p->hca_ape = malloc(128 * 512 * sizeof(float));
  p->hca_norm = malloc(512 * sizeof(float));
  ParamsFill(p, seed);
  memset(p->layers, 0, sizeof(p->layers));
  p->layers[1].compressor = (kvc_compressor_params){p->csa_ape, 4 * 1024, p->csa_norm, 512};
  p->layers[1].indexer = (kvc_compressor_params){p->idx_ape, 4 * 256, p->idx_norm, 128};
  p->layers[2].compressor = (kvc_compressor_params){p->hca_ape, 128 * 512, p->hca_norm, 512};
  memset(&p->model, 0, sizeof(p->model));
  p->model.layers = p->layers;
  p->model.num_layers = 3;
}

static void ParamsFree(Params* p) {
  free(p->csa_ape);
  free(p->csa_norm);
  free(p->idx_ape);
  free(p->idx_norm);
  free(p->hca_ape);
  free(p->hca_norm);
}

static kvc_cache* CreateWith(const Params* p) {
  kvc_cache* cache = NULL;
  CHECK(kvc_cache_create_from_config_with_params(kConfig, strlen(kConfig), NULL, &p->model, &cache) == KVC_OK);
  return cache;
}

enum { kParamTokens = 100, kHeads = 64 }; /* 25 CSA entries */

/* A sequence of kParamTokens tokens in every layer of kConfig's model, with
 * projections on the compressed layers; the same inputs for every cache. */
static kvc_seq Grow(kvc_cache* cache) {
  kvc_seq seq = -1;
  CHECK(kvc_seq_create(cache, &seq) == KVC_OK);
  uint16_t* window = malloc(kParamTokens * KVC_HEAD_DIM * sizeof(uint16_t));
  float* values = malloc(kParamTokens * 1024 * sizeof(float));
  float* kv = malloc(kParamTokens * 1024 * sizeof(float));
  float* score = malloc(kParamTokens * 1024 * sizeof(float));
  float* ikv = malloc(kParamTokens * 256 * sizeof(float));
  float* iscore = malloc(kParamTokens * 256 * sizeof(float));
  for (int32_t layer = 0; layer < 3; ++layer) {
    Fill(values, kParamTokens * KVC_HEAD_DIM, 100 + (uint32_t)layer, 3.0f);
    for (int i = 0; i < kParamTokens * KVC_HEAD_DIM; ++i) window[i] = Bf16(values[i]);
    Fill(kv, kParamTokens * 1024, 200 + (uint32_t)layer, 1.0f);
    Fill(score, kParamTokens * 1024, 300 + (uint32_t)layer, 2.0f);
    Fill(ikv, kParamTokens * 256, 400, 1.0f);
    Fill(iscore, kParamTokens * 256, 500, 2.0f);
    kvc_layer_tokens t = {window, NULL, NULL, NULL, NULL, kParamTokens};
    if (layer > 0) t.compressor_kv = kv, t.compressor_score = score;
    if (layer == 1) t.indexer_kv = ikv, t.indexer_score = iscore;
    CHECK(kvc_seq_append_tokens(cache, seq, layer, 0, &t) == KVC_OK);
  }
  free(window);
  free(values);
  free(kv);
  free(score);
  free(ikv);
  free(iscore);
  return seq;
}

/* The CSA layer's index scores (25) for a fixed query at the last position. */
static void Scores(kvc_cache* cache, kvc_seq seq, float* out) {
  uint16_t q[kHeads * KVC_INDEX_DIM];
  float values[kHeads * KVC_INDEX_DIM], weights[kHeads];
  Fill(values, kHeads * KVC_INDEX_DIM, 600, 4.0f);
  for (int i = 0; i < kHeads * KVC_INDEX_DIM; ++i) q[i] = Bf16(values[i]);
  Fill(weights, kHeads, 700, 0.1f);
  kvc_index_query* query = NULL;
  CHECK(kvc_index_query_prepare(cache, kParamTokens - 1, q, weights, kHeads, &query) == KVC_OK);
  int64_t count = -1;
  CHECK(kvc_index_scores(cache, seq, 1, query, out, 25, &count) == KVC_OK && count == 25);
  kvc_index_query_destroy(query);
}

/* Compressor parameters are copies; index queries and scores; layer kinds. */
static void TestParams(void) {
  kvc_cache* flash = NULL;
  CHECK(kvc_cache_create("v4-flash", NULL, &flash) == KVC_OK);
  int32_t kind = -1;
  CHECK(kvc_cache_layer_kind(flash, 0, &kind) == KVC_OK && kind == KVC_LAYER_WINDOW);
  CHECK(kvc_cache_layer_kind(flash, 2, &kind) == KVC_OK && kind == KVC_LAYER_CSA);
  CHECK(kvc_cache_layer_kind(flash, 3, &kind) == KVC_OK && kind == KVC_LAYER_HCA);
  CHECK(kvc_cache_layer_kind(flash, 42, &kind) == KVC_OK && kind == KVC_LAYER_CSA);
  CHECK(kvc_cache_layer_kind(flash, 43, &kind) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "layer 43") != NULL);
  CHECK(kvc_cache_layer_kind(flash, -1, &kind) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_cache_layer_kind(flash, 0, NULL) == KVC_ERR_INVALID_ARGUMENT);
  kvc_cache_destroy(flash);

  /* `copied` is created from buffers that are then overwritten (they become
   * `other`'s parameters) and freed; `same` from fresh buffers of the first
   * values. Index scores depend on every CSA parameter (the indexer's through
   * the keys): copied == same != other. */
  Params p;
  ParamsInit(&p, 1);
  kvc_cache* copied = CreateWith(&p);
  ParamsFill(&p, 2);
  kvc_cache* other = CreateWith(&p);
  ParamsFree(&p);
  ParamsInit(&p, 1);
  kvc_cache* same = CreateWith(&p);
  if (copied == NULL || other == NULL || same == NULL) return;
  float a[25], b[25], c[25];
  Scores(copied, Grow(copied), a);
  Scores(same, Grow(same), b);
  Scores(other, Grow(other), c);
  CHECK(memcmp(a, b, sizeof(a)) == 0);
  CHECK(memcmp(a, c, sizeof(a)) != 0);

  /* kvc_index_scores: count, partial writes, refusals. */
  const kvc_seq seq = Grow(same);
  uint16_t q[kHeads * KVC_INDEX_DIM];
  float weights[kHeads];
  for (int i = 0; i < kHeads * KVC_INDEX_DIM; ++i) q[i] = Bf16(1.0f);
  for (int i = 0; i < kHeads; ++i) weights[i] = 0.01f;
  kvc_index_query* query = NULL;
  CHECK(kvc_index_query_prepare(same, kParamTokens - 1, q, weights, kHeads, &query) == KVC_OK);
  int64_t count = -1;
  CHECK(kvc_index_scores(same, seq, 1, query, NULL, 0, &count) == KVC_OK && count == 25);
  float few[4] = {-7.0f, -7.0f, -7.0f, -7.0f};
  CHECK(kvc_index_scores(same, seq, 1, query, few, 3, &count) == KVC_OK && count == 25);
  CHECK(few[0] != -7.0f && few[2] != -7.0f && few[3] == -7.0f);
  CHECK(kvc_index_scores(same, seq, 2, query, few, 3, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "layer 2 is HCA") != NULL);
  CHECK(kvc_index_scores(same, seq, 3, query, few, 3, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_index_scores(same, seq, 1, NULL, few, 3, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_index_scores(same, seq, 1, query, NULL, 3, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_index_scores(same, seq, 1, query, few, -1, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_index_scores(same, 999, 1, query, few, 3, &count) == KVC_ERR_NOT_FOUND);
  kvc_seq empty = -1;
  CHECK(kvc_seq_create(same, &empty) == KVC_OK);
  CHECK(kvc_index_scores(same, empty, 1, query, few, 3, &count) == KVC_ERR_FAILED_PRECONDITION);
  kvc_index_query_destroy(query);
  kvc_index_query_destroy(NULL);
  query = NULL;
  CHECK(kvc_index_query_prepare(same, 4096, q, weights, kHeads, &query) == KVC_ERR_OUT_OF_RANGE && query == NULL);
  CHECK(kvc_index_query_prepare(same, 0, q, weights, 0, &query) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_index_query_prepare(same, 0, q, weights, 5000, &query) == KVC_ERR_INVALID_ARGUMENT);
  weights[3] = NAN;
  CHECK(kvc_index_query_prepare(same, 0, q, weights, kHeads, &query) == KVC_ERR_INVALID_ARGUMENT && query == NULL);

  /* Parameters that do not fit: refused naming layer and field, no cache. */
  kvc_cache* bad = NULL;
  p.layers[1].indexer.norm_weight_count = 64;
  CHECK(kvc_cache_create_from_config_with_params(kConfig, strlen(kConfig), NULL, &p.model, &bad) ==
        KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "layer 1: indexer.norm_weight has 64 values, expected 128") != NULL && bad == NULL);
  p.layers[1].indexer.norm_weight_count = 128;
  p.layers[2].compressor.ape_count = 4 * 1024;
  CHECK(kvc_cache_create_from_config_with_params(kConfig, strlen(kConfig), NULL, &p.model, &bad) ==
        KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "layer 2: compressor.ape has 4096 values") != NULL && bad == NULL);
  p.layers[2].compressor.ape_count = 128 * 512;
  p.layers[0].compressor = p.layers[2].compressor;
  CHECK(kvc_cache_create_from_config_with_params(kConfig, strlen(kConfig), NULL, &p.model, &bad) ==
        KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "layer 0: a window-only layer") != NULL && bad == NULL);
  memset(&p.layers[0], 0, sizeof(p.layers[0]));
  /* A preset: 43 layers, not 3. */
  CHECK(kvc_cache_create_with_params("v4-flash", NULL, &p.model, &bad) == KVC_ERR_INVALID_ARGUMENT && bad == NULL);
  CHECK(strstr(kvc_last_error(), "the model has 43 layers") != NULL);
  CHECK(kvc_cache_create_with_params(NULL, NULL, &p.model, &bad) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_cache_create_with_params("v4-flash", NULL, NULL, &bad) == KVC_OK && bad != NULL);
  kvc_cache_destroy(bad);

  ParamsFree(&p);
  kvc_cache_destroy(copied);
  kvc_cache_destroy(other);
  kvc_cache_destroy(same);
}

/* A ready-made 584-byte row kvc could have written: codes below 256 at
 * small scales, finite bf16 RoPE dims, zero padding; distinct per seed. */
static void MakeRow(uint8_t* row, uint32_t seed) {
  for (int i = 0; i < 448; ++i) row[i] = (uint8_t)((seed * 31u + (uint32_t)i * 7u) % 0x70u);
  for (int j = 0; j < 64; ++j) {
    const uint16_t bits = Bf16((float)((int)(seed % 50u) - 25 + j));
    memcpy(row + 448 + 2 * j, &bits, 2);
  }
  for (int b = 0; b < 7; ++b) row[576 + b] = (uint8_t)(120 + (seed + (uint32_t)b) % 8u);
  row[583] = 0;
}

/* Page arrays, block tables, ready-made rows and selection from C: every row
 * read back through base + id x page_bytes + offsets equals what was appended. */
static void TestPages(void) {
  kvc_options options;
  kvc_options_default(&options);
  options.rows_per_page = 8;
  options.keys_per_page = 8;
  options.state_bytes = (int64_t)64 << 20;
  options.history_bytes = (int64_t)64 << 20;
  kvc_cache* cache = NULL;
  CHECK(kvc_cache_create_from_config(kConfig, sizeof(kConfig) - 1, &options, &cache) == KVC_OK);
  if (cache == NULL) return;

  kvc_page_array window, csa_rows, csa_keys, hca_rows, none;
  CHECK(kvc_layer_pages(cache, 0, KVC_STREAM_WINDOW, &window) == KVC_OK);
  CHECK(window.page_bytes % 576 == 0 && window.page_bytes >= 8 * 584 && window.rows_per_page == 8);
  CHECK(window.row_data_bytes == 576 && window.row_scale_bytes == 8 && window.num_pages > 0);
  CHECK(kvc_layer_pages(cache, 1, KVC_STREAM_CSA_ROWS, &csa_rows) == KVC_OK && csa_rows.page_bytes % 576 == 0);
  CHECK(kvc_layer_pages(cache, 1, KVC_STREAM_CSA_KEYS, &csa_keys) == KVC_OK);
  CHECK(csa_keys.row_data_bytes == 64 && csa_keys.row_scale_bytes == 4 && csa_keys.page_bytes >= 8 * 68);
  CHECK(kvc_layer_pages(cache, 2, KVC_STREAM_HCA_ROWS, &hca_rows) == KVC_OK);
  CHECK(kvc_layer_pages(cache, 0, KVC_STREAM_CSA_ROWS, &none) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_layer_pages(cache, 2, KVC_STREAM_CSA_KEYS, &none) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_layer_pages(cache, 0, KVC_STREAM_CSA_STATE, &none) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_layer_pages(cache, 0, 7, &none) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_layer_pages(cache, 3, KVC_STREAM_WINDOW, &none) == KVC_ERR_INVALID_ARGUMENT);

  /* 300 tokens in every layer; the engine brings the CSA and HCA entries. */
  enum { kTokens = 300, kCsaEntries = kTokens / 4, kHcaEntries = kTokens / 128 };
  kvc_seq seq = 0;
  CHECK(kvc_seq_create(cache, &seq) == KVC_OK);
  uint16_t* tokens = calloc(kTokens * KVC_HEAD_DIM, sizeof(uint16_t));
  for (int i = 0; i < kTokens * KVC_HEAD_DIM; ++i) tokens[i] = Bf16((float)(i % 13) - 6.0f);
  for (int32_t layer = 0; layer < 3; ++layer) CHECK(kvc_seq_append(cache, seq, layer, 0, tokens, kTokens) == KVC_OK);
  int64_t n = -1;
  uint8_t* rows = calloc(kCsaEntries, 584);
  uint8_t* keys = calloc(kCsaEntries, 68);
  for (int r = 0; r < kCsaEntries; ++r) {
    MakeRow(rows + 584 * r, (uint32_t)r);
    for (int i = 0; i < 64; ++i) keys[68 * r + i] = (uint8_t)(r * 5 + i);
    for (int i = 0; i < 4; ++i) keys[68 * r + 64 + i] = (uint8_t)(100 + (r + i) % 20);
  }
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, 0, rows, 40) == KVC_OK);
  /* Refusals change nothing: a NaN code, a block that reads back as
   * infinity (code 256 at scale 2^120), a gap, a negative count. */
  uint8_t bad[584];
  MakeRow(bad, 7);
  bad[10] = 0x7F;
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, 40, bad, 1) == KVC_ERR_INVALID_ARGUMENT);
  MakeRow(bad, 7);
  bad[10] = 0x78;
  bad[576] = 247;
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, 40, bad, 1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, 41, rows, 1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, 40, rows, -1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_stream_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, &n) == KVC_OK && n == 40);
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, 40, rows + 584 * 40, kCsaEntries - 40) == KVC_OK);
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_KEYS, 0, keys, kCsaEntries) == KVC_OK);
  CHECK(kvc_seq_append_rows(cache, seq, 2, KVC_STREAM_HCA_ROWS, 0, rows, kHcaEntries) == KVC_OK);
  CHECK(kvc_seq_stream_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, &n) == KVC_OK && n == kCsaEntries);
  CHECK(kvc_seq_stream_rows(cache, seq, 1, KVC_STREAM_CSA_KEYS, &n) == KVC_OK && n == kCsaEntries);
  CHECK(kvc_seq_stream_rows(cache, seq, 0, KVC_STREAM_WINDOW, &n) == KVC_OK && n == 16);
  CHECK(kvc_seq_stream_rows(cache, seq, 0, KVC_STREAM_HCA_ROWS, &n) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, kCsaEntries, rows, 1) == KVC_ERR_OUT_OF_RANGE);

  CHECK(kvc_seq_stream_rows(cache, seq, 2, KVC_STREAM_HCA_ROWS, &n) == KVC_OK && n == kHcaEntries);

  /* Every row read back through the block table. */
  int32_t ids[64];
  int64_t count = -1;
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, ids, 64, &count) == KVC_OK && count == (kCsaEntries + 7) / 8);
  int same = 1;
  for (int r = 0; r < kCsaEntries; ++r) {
    const uint8_t* page = (const uint8_t*)csa_rows.base + (int64_t)ids[r / 8] * csa_rows.page_bytes;
    CHECK(ids[r / 8] >= 0 && ids[r / 8] < csa_rows.num_pages);
    same &= memcmp(page + (r % 8) * 576, rows + 584 * r, 576) == 0;
    same &= memcmp(page + 8 * 576 + (r % 8) * 8, rows + 584 * r + 576, 8) == 0;
  }
  CHECK(same);
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_KEYS, ids, 64, &count) == KVC_OK && count == (kCsaEntries + 7) / 8);
  same = 1;
  for (int r = 0; r < kCsaEntries; ++r) {
    const uint8_t* page = (const uint8_t*)csa_keys.base + (int64_t)ids[r / 8] * csa_keys.page_bytes;
    same &= memcmp(page + (r % 8) * 64, keys + 68 * r, 64) == 0 && memcmp(page + 8 * 64 + (r % 8) * 4, keys + 68 * r + 64, 4) == 0;
  }
  CHECK(same);
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, ids, 2, &count) == KVC_OK && count == 10); /* capped */
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, NULL, 0, &count) == KVC_OK && count == 10);
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, ids, -1, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_block_table(cache, seq + 99, KVC_STREAM_CSA_ROWS, ids, 64, &count) == KVC_ERR_NOT_FOUND);

  /* Selection: HCA attends to every entry; the indices address its array. */
  int32_t window_idx[32], compressed_idx[8], hca_ids[8], ring_ids[8];
  int64_t window_count = -1, compressed_count = -1, ring_count = -1, hca_count = -1;
  CHECK(kvc_seq_select(cache, seq, 2, NULL, window_idx, 32, &window_count, compressed_idx, 8, &compressed_count) == KVC_OK);
  CHECK(window_count == 16 && compressed_count == kHcaEntries);
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_HCA_ROWS, hca_ids, 8, &hca_count) == KVC_OK && hca_count == 1);
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_WINDOW, ring_ids, 8, &ring_count) == KVC_OK && ring_count == 2);
  for (int j = 0; j < kHcaEntries; ++j) CHECK(compressed_idx[j] == hca_ids[j / 8] * 8 + j % 8);
  CHECK(compressed_idx[kHcaEntries] == -1 && window_idx[16] == -1); /* padded */
  for (int i = 0; i < 16; ++i) {
    const int slot = (kTokens - 16 + i) % 16; /* oldest first */
    CHECK(window_idx[i] == ring_ids[slot / 8] * 8 + slot % 8);
  }
  {
    const uint8_t* page = (const uint8_t*)hca_rows.base + (int64_t)(compressed_idx[1] / 8) * hca_rows.page_bytes;
    CHECK(memcmp(page + (compressed_idx[1] % 8) * 576, rows + 584, 576) == 0);
  }
  CHECK(kvc_seq_select(cache, seq, 1, NULL, window_idx, 32, &window_count, compressed_idx, 8, &compressed_count) ==
        KVC_ERR_INVALID_ARGUMENT); /* CSA needs a query */
  CHECK(kvc_seq_select(cache, seq, 0, NULL, window_idx, -1, &window_count, compressed_idx, 8, &compressed_count) ==
        KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_select(cache, seq, 0, NULL, window_idx, 4, &window_count, NULL, 0, &compressed_count) == KVC_OK &&
        window_count == 16 && compressed_count == 0);

  /* CSA: the top index_topk (8) entries by the query's scores, ascending,
   * each an index into the CSA rows array through the block table. */
  {
    uint16_t* q = calloc(64 * KVC_INDEX_DIM, sizeof(uint16_t));
    float weights[64];
    for (int i = 0; i < 64 * KVC_INDEX_DIM; ++i) q[i] = Bf16((float)((i * 7) % 11) - 5.0f);
    for (int h = 0; h < 64; ++h) weights[h] = 0.01f * (float)(h + 1);
    kvc_index_query* query = NULL;
    CHECK(kvc_index_query_prepare(cache, kTokens - 1, q, weights, 64, &query) == KVC_OK);
    float scores[kCsaEntries];
    CHECK(kvc_index_scores(cache, seq, 1, query, scores, kCsaEntries, &n) == KVC_OK && n == kCsaEntries);
    CHECK(kvc_seq_select(cache, seq, 1, query, window_idx, 32, &window_count, compressed_idx, 8, &compressed_count) == KVC_OK);
    CHECK(window_count == 16 && compressed_count == 8);
    CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, ids, 64, &count) == KVC_OK);
    /* The selected entries j are the 8 best scores: no unselected entry scores higher than a selected one. */
    int selected[kCsaEntries] = {0}, ok = 1;
    for (int k = 0; k < 8; ++k) {
      int found = -1;
      for (int j = 0; j < kCsaEntries; ++j) found = compressed_idx[k] == ids[j / 8] * 8 + j % 8 ? j : found;
      CHECK(found >= 0);
      if (found >= 0) selected[found] = 1;
      if (k > 0) ok &= compressed_idx[k] != compressed_idx[k - 1];
    }
    for (int j = 0; j < kCsaEntries; ++j) {
      for (int i = 0; i < kCsaEntries; ++i) ok &= !(selected[j] && !selected[i] && scores[i] > scores[j]);
    }
    CHECK(ok);
    kvc_index_query_destroy(query);
    free(q);
  }

  /* A fork shares the history pages: the same CSA ids; the batch tables. */
  kvc_seq fork = 0;
  CHECK(kvc_seq_fork(cache, seq, &fork) == KVC_OK);
  CHECK(kvc_seq_truncate(cache, fork, 290) == KVC_OK); /* 72 CSA entries: 9 pages */
  const kvc_seq batch[2] = {seq, fork};
  int32_t dense[32], blocks[2];
  int64_t max_blocks = -1, batch_rows[2];
  CHECK(kvc_batch_block_tables(cache, batch, 2, KVC_STREAM_CSA_ROWS, dense, 4, &max_blocks, blocks, batch_rows) ==
        KVC_ERR_OUT_OF_RANGE && max_blocks == 10);
  CHECK(kvc_batch_block_tables(cache, batch, 2, KVC_STREAM_CSA_ROWS, dense, 32, &max_blocks, blocks, batch_rows) == KVC_OK);
  CHECK(blocks[0] == 10 && blocks[1] == 9 && batch_rows[0] == kCsaEntries && batch_rows[1] == 72 && dense[10 + 9] == -1);
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, ids, 64, &count) == KVC_OK);
  CHECK(memcmp(dense, ids, 10 * sizeof(int32_t)) == 0 && memcmp(dense + 10, ids, 9 * sizeof(int32_t)) == 0);
  int32_t indptr[3], indices[32], last[2];
  CHECK(kvc_batch_block_tables_csr(cache, batch, 2, KVC_STREAM_CSA_ROWS, indptr, indices, 32, &count, last) == KVC_OK);
  CHECK(count == 19 && indptr[0] == 0 && indptr[1] == 10 && indptr[2] == 19);
  CHECK(last[0] == kCsaEntries - 9 * 8 && last[1] == 8 && memcmp(indices + 10, ids, 9 * sizeof(int32_t)) == 0);
  CHECK(kvc_batch_block_tables_csr(cache, batch, 2, KVC_STREAM_CSA_ROWS, indptr, indices, 3, &count, last) ==
        KVC_ERR_OUT_OF_RANGE && count == 19);
  CHECK(kvc_batch_block_tables_csr(cache, batch, 2, KVC_STREAM_WINDOW, indptr, indices, 32, &count, last) ==
        KVC_ERR_INVALID_ARGUMENT); /* ring slots are not a paged sequence */
  CHECK(kvc_batch_block_tables(cache, batch, -1, KVC_STREAM_CSA_ROWS, dense, 32, &max_blocks, NULL, NULL) ==
        KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_batch_block_tables(cache, batch, 2, 9, dense, 32, &max_blocks, NULL, NULL) == KVC_ERR_INVALID_ARGUMENT);

  free(rows);
  free(keys);
  free(tokens);
  kvc_cache_destroy(cache);
}

/* Page arrays in the engine's memory: sized from kvc_page_geometry, handed
 * in through kvc_options; kvc's pages are then exactly those bytes. */
static void TestEngineArrays(void) {
  kvc_options options;
  kvc_options_default(&options);
  CHECK(options.engine_arrays == NULL && options.num_engine_arrays == 0);
  options.rows_per_page = 8;
  options.keys_per_page = 8;
  enum { kPages = 16 };
  kvc_engine_array arrays[8];
  void* memory[8];
  int n = 0;
  for (int32_t stream = KVC_STREAM_WINDOW; stream <= KVC_STREAM_HCA_ROWS; ++stream) {
    kvc_page_array g;
    int32_t layers[4], count = 0;
    CHECK(kvc_page_geometry(NULL, kConfig, sizeof(kConfig) - 1, &options, stream, &g, layers, 4, &count) == KVC_OK);
    CHECK(g.base == NULL && g.num_pages == 0 && g.page_bytes > 0);
    CHECK(count == (stream == KVC_STREAM_WINDOW ? 3 : 1));
    for (int32_t i = 0; i < count; ++i) {
      const size_t bytes = (size_t)(kPages * g.page_bytes);
      memory[n] = aligned_alloc(64, (bytes + 63) / 64 * 64);
      memset(memory[n], 0xCD, bytes); /* kvc zeroes the pages it hands out */
      arrays[n] = (kvc_engine_array){layers[i], stream, memory[n], (int64_t)bytes};
      ++n;
    }
  }
  CHECK(n == 6);
  kvc_page_array g;
  int32_t count = 0;
  CHECK(kvc_page_geometry("v4-flash", NULL, 0, &options, KVC_STREAM_CSA_KEYS, &g, NULL, 0, &count) == KVC_OK && count == 21);
  CHECK(kvc_page_geometry("v4-flash", NULL, 0, &options, 7, &g, NULL, 0, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_page_geometry("v5", NULL, 0, &options, 0, &g, NULL, 0, &count) == KVC_ERR_NOT_FOUND);

  kvc_cache* cache = NULL;
  options.engine_arrays = arrays;
  options.num_engine_arrays = 5; /* one missing: all or none per class */
  CHECK(kvc_cache_create_from_config(kConfig, sizeof(kConfig) - 1, &options, &cache) == KVC_ERR_INVALID_ARGUMENT);
  options.num_engine_arrays = -1;
  CHECK(kvc_cache_create_from_config(kConfig, sizeof(kConfig) - 1, &options, &cache) == KVC_ERR_INVALID_ARGUMENT);
  options.num_engine_arrays = n;
  CHECK(kvc_cache_create_from_config(kConfig, sizeof(kConfig) - 1, &options, &cache) == KVC_OK);
  if (cache == NULL) return;
  for (int i = 0; i < n; ++i) {
    kvc_page_array p;
    CHECK(kvc_layer_pages(cache, arrays[i].layer, arrays[i].stream, &p) == KVC_OK && p.base == arrays[i].base &&
          p.num_pages == kPages);
  }
  kvc_seq seq = 0;
  CHECK(kvc_seq_create(cache, &seq) == KVC_OK);
  uint16_t* tokens = calloc(40 * KVC_HEAD_DIM, sizeof(uint16_t));
  for (int i = 0; i < 40 * KVC_HEAD_DIM; ++i) tokens[i] = Bf16((float)(i % 5));
  for (int32_t layer = 0; layer < 3; ++layer) CHECK(kvc_seq_append(cache, seq, layer, 0, tokens, 40) == KVC_OK);
  uint8_t rows[10 * 584];
  for (int r = 0; r < 10; ++r) MakeRow(rows + 584 * r, (uint32_t)(r + 3));
  CHECK(kvc_seq_append_rows(cache, seq, 1, KVC_STREAM_CSA_ROWS, 0, rows, 10) == KVC_OK);
  int32_t ids[4];
  int64_t pages = 0;
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, ids, 4, &pages) == KVC_OK && pages == 2);
  const kvc_engine_array* csa = &arrays[3]; /* window x3, then CSA rows */
  CHECK(csa->stream == KVC_STREAM_CSA_ROWS);
  kvc_page_array p;
  CHECK(kvc_layer_pages(cache, 1, KVC_STREAM_CSA_ROWS, &p) == KVC_OK);
  int same = 1;
  for (int r = 0; r < 10; ++r) {
    const uint8_t* page = (const uint8_t*)csa->base + (int64_t)ids[r / 8] * p.page_bytes;
    same &= memcmp(page + (r % 8) * 576, rows + 584 * r, 576) == 0 && memcmp(page + 8 * 576 + (r % 8) * 8, rows + 584 * r + 576, 8) == 0;
  }
  CHECK(same);
  /* Unwritten ring slots read as zero although the engine's memory held 0xCD. */
  uint16_t* ring = calloc(16 * KVC_HEAD_DIM, sizeof(uint16_t));
  kvc_seq fresh = 0;
  CHECK(kvc_seq_create(cache, &fresh) == KVC_OK);
  CHECK(kvc_seq_read_window(cache, fresh, 0, ring, 16 * KVC_HEAD_DIM) == KVC_OK);
  int zero = 1;
  for (int i = 0; i < 16 * KVC_HEAD_DIM; ++i) zero &= ring[i] == 0;
  CHECK(zero);
  free(ring);
  free(tokens);
  kvc_cache_destroy(cache);
  for (int i = 0; i < n; ++i) free(memory[i]);
}

/* Appends tokens [from, to) to every layer of kConfig's model with
 * projections; a token's inputs depend only on its layer and position. */
static void AppendRange(kvc_cache* cache, kvc_seq seq, int64_t from, int64_t to) {
  const int64_t n = to - from;
  uint16_t* window = malloc((size_t)n * KVC_HEAD_DIM * sizeof(uint16_t));
  float* values = malloc(KVC_HEAD_DIM * sizeof(float));
  float* kv = malloc((size_t)n * 1024 * sizeof(float));
  float* score = malloc((size_t)n * 1024 * sizeof(float));
  float* ikv = malloc((size_t)n * 256 * sizeof(float));
  float* iscore = malloc((size_t)n * 256 * sizeof(float));
  for (int32_t layer = 0; layer < 3; ++layer) {
    const int64_t width = layer == 1 ? 1024 : 512;
    for (int64_t t = 0; t < n; ++t) {
      const uint32_t seed = (uint32_t)((from + t) * 8 + layer);
      Fill(values, KVC_HEAD_DIM, seed, 3.0f);
      for (int i = 0; i < KVC_HEAD_DIM; ++i) window[t * KVC_HEAD_DIM + i] = Bf16(values[i]);
      Fill(kv + t * width, width, seed + 100000u, 1.0f);
      Fill(score + t * width, width, seed + 200000u, 2.0f);
      Fill(ikv + t * 256, 256, seed + 300000u, 1.0f);
      Fill(iscore + t * 256, 256, seed + 400000u, 2.0f);
    }
    kvc_layer_tokens tokens = {window, NULL, NULL, NULL, NULL, n};
    if (layer > 0) tokens.compressor_kv = kv, tokens.compressor_score = score;
    if (layer == 1) tokens.indexer_kv = ikv, tokens.indexer_score = iscore;
    CHECK(kvc_seq_append_tokens(cache, seq, layer, from, &tokens) == KVC_OK);
  }
  free(window);
  free(values);
  free(kv);
  free(score);
  free(ikv);
  free(iscore);
}

/* 1 if the two sequences' window rings and every stored row of `stream` on
 * `layer` are the same bytes. */
static int SameRows(kvc_cache* cache, kvc_seq a, kvc_seq b, int32_t layer, int32_t stream) {
  int64_t rows_a = -1, rows_b = -2;
  if (kvc_seq_stream_rows(cache, a, layer, stream, &rows_a) != KVC_OK ||
      kvc_seq_stream_rows(cache, b, layer, stream, &rows_b) != KVC_OK || rows_a != rows_b) {
    return 0;
  }
  kvc_page_array pages;
  int32_t ids_a[64], ids_b[64];
  int64_t count = 0;
  if (kvc_layer_pages(cache, layer, stream, &pages) != KVC_OK) return 0;
  if (kvc_seq_block_table(cache, a, stream, ids_a, 64, &count) != KVC_OK || count > 64) return 0;
  if (kvc_seq_block_table(cache, b, stream, ids_b, 64, &count) != KVC_OK || count > 64) return 0;
  const int64_t row_bytes = pages.row_data_bytes + pages.row_scale_bytes;
  for (int64_t r = 0; r < rows_a; ++r) {
    const int64_t in_page = r % pages.rows_per_page;
    for (int part = 0; part < 2; ++part) {
      const int64_t offset = part == 0 ? in_page * pages.row_data_bytes
                                       : pages.rows_per_page * pages.row_data_bytes + in_page * pages.row_scale_bytes;
      const int64_t size = part == 0 ? pages.row_data_bytes : pages.row_scale_bytes;
      const uint8_t* pa = (const uint8_t*)pages.base + ids_a[r / pages.rows_per_page] * pages.page_bytes + offset;
      const uint8_t* pb = (const uint8_t*)pages.base + ids_b[r / pages.rows_per_page] * pages.page_bytes + offset;
      if (memcmp(pa, pb, (size_t)size) != 0) return 0;
    }
  }
  return row_bytes > 0;
}

/* Prefix caching from C: publish, free the publisher, restore, continue
 * byte for byte as a sequence that appended everything; lookups, refusals,
 * counters. */
static void TestPrefix(void) {
  Params p;
  ParamsInit(&p, 7);
  kvc_options options;
  kvc_options_default(&options);
  CHECK(options.prefix_block_tokens == 256 && options.prefix_bytes > 0);
  options.prefix_block_tokens = 128;
  options.rows_per_page = 8;
  options.keys_per_page = 8;
  kvc_cache* cache = NULL;
  CHECK(kvc_cache_create_from_config_with_params(kConfig, strlen(kConfig), &options, &p.model, &cache) == KVC_OK);
  if (cache == NULL) return;
  int64_t block = 0;
  CHECK(kvc_prefix_block_tokens(cache, &block) == KVC_OK && block == 128);

  kvc_seq publisher = 0, fresh = 0, reused = 0;
  CHECK(kvc_seq_create(cache, &publisher) == KVC_OK);
  AppendRange(cache, publisher, 0, 256);
  const uint64_t hashes[] = {0x1111, 0x2222, 0x3333};
  CHECK(kvc_prefix_publish(cache, publisher, hashes, 2) == KVC_OK);
  CHECK(kvc_seq_free(cache, publisher) == KVC_OK);
  int64_t tokens = -1, shared = -1;
  CHECK(kvc_prefix_lookup(cache, hashes, 3, &tokens, &shared) == KVC_OK && tokens == 256 && shared == 256);
  CHECK(kvc_seq_create_from_prefix(cache, hashes, 3, &reused, &tokens) == KVC_OK && tokens == 256);
  CHECK(kvc_seq_create(cache, &fresh) == KVC_OK);
  AppendRange(cache, fresh, 0, 256);
  AppendRange(cache, reused, 256, 300);
  AppendRange(cache, fresh, 256, 300);
  for (int32_t layer = 0; layer < 3; ++layer) {
    uint16_t* ring_a = calloc(16 * KVC_HEAD_DIM, sizeof(uint16_t));
    uint16_t* ring_b = calloc(16 * KVC_HEAD_DIM, sizeof(uint16_t));
    CHECK(kvc_seq_read_window(cache, reused, layer, ring_a, 16 * KVC_HEAD_DIM) == KVC_OK);
    CHECK(kvc_seq_read_window(cache, fresh, layer, ring_b, 16 * KVC_HEAD_DIM) == KVC_OK);
    CHECK(memcmp(ring_a, ring_b, 16 * KVC_HEAD_DIM * sizeof(uint16_t)) == 0);
    free(ring_a);
    free(ring_b);
  }
  CHECK(SameRows(cache, reused, fresh, 1, KVC_STREAM_CSA_ROWS));
  CHECK(SameRows(cache, reused, fresh, 1, KVC_STREAM_CSA_KEYS));
  CHECK(SameRows(cache, reused, fresh, 2, KVC_STREAM_HCA_ROWS));

  /* A chain that leaves after block 0: its history is there, no prefix ends there. */
  const uint64_t other[] = {0x1111, 0x9999};
  CHECK(kvc_prefix_lookup(cache, other, 2, &tokens, NULL) == KVC_OK && tokens == 0);
  CHECK(kvc_prefix_lookup(cache, other, 2, &tokens, &shared) == KVC_OK && shared == 128);
  kvc_seq empty = 0;
  CHECK(kvc_seq_create_from_prefix(cache, NULL, 0, &empty, &tokens) == KVC_OK && tokens == 0);
  int64_t length = -1;
  CHECK(kvc_seq_length(cache, empty, 0, &length) == KVC_OK && length == 0);

  /* Refusals: codes and messages, nothing published. */
  CHECK(kvc_prefix_publish(cache, fresh, hashes, 2) == KVC_ERR_FAILED_PRECONDITION); /* passed by 44 > 16 */
  CHECK(strstr(kvc_last_error(), "has passed 256 tokens by 44") != NULL);
  CHECK(kvc_prefix_publish(cache, fresh, hashes, 3) == KVC_ERR_FAILED_PRECONDITION);
  CHECK(kvc_prefix_publish(cache, fresh, hashes, 0) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_prefix_publish(cache, fresh, NULL, 2) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_prefix_publish(cache, 12345, hashes, 1) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_prefix_publish(NULL, fresh, hashes, 1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_create_from_prefix(cache, hashes, -1, &empty, &tokens) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_create_from_prefix(cache, hashes, 1, NULL, &tokens) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_prefix_lookup(cache, NULL, 3, &tokens, &shared) == KVC_ERR_INVALID_ARGUMENT);

  kvc_prefix_usage u;
  CHECK(kvc_cache_prefix_usage(cache, &u) == KVC_OK);
  CHECK(u.hits == 1 && u.misses == 1 && u.tokens_reused == 256 && u.published == 1 && u.prefixes == 1);
  CHECK(u.cached_tokens == 256 && u.evictions == 0 && u.limit_bytes == options.prefix_bytes);
  CHECK(u.checkpoint_bytes > 0 && u.cached_bytes == u.history_bytes + u.checkpoint_bytes);
  CHECK(kvc_cache_prefix_usage(cache, NULL) == KVC_ERR_INVALID_ARGUMENT);
  kvc_cache_destroy(cache);
  ParamsFree(&p);
}

/* Draft ring slots and a verify step's selection (kvc_seq_select_positions):
 * the last four positions of kvc_config's 100-token sequence selected in one
 * call, each checked against what it must be: its window positions at ring
 * slot position mod (16 + 3) through the block table; its CSA entries the 8
 * best by its own query's index scores (kvc_index_scores) among the entries
 * visible at it; the last position equal to kvc_seq_select. */
static void TestSelectPositions(void) {
  kvc_options options;
  kvc_options_default(&options);
  CHECK(options.draft_slots == 0);
  kvc_cache* cache = NULL;
  options.draft_slots = 4097;
  CHECK(kvc_cache_create_from_config(kConfig, sizeof(kConfig) - 1, &options, &cache) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "draft_slots 4097 must be in [0, 4096]") != NULL);
  options.draft_slots = -1;
  CHECK(kvc_cache_create_from_config(kConfig, sizeof(kConfig) - 1, &options, &cache) == KVC_ERR_INVALID_ARGUMENT);
  options.draft_slots = 3;
  options.rows_per_page = 8;
  Params p;
  ParamsInit(&p, 5);
  CHECK(kvc_cache_create_from_config_with_params(kConfig, sizeof(kConfig) - 1, &options, &p.model, &cache) == KVC_OK);
  ParamsFree(&p);
  if (cache == NULL) return;
  const kvc_seq seq = Grow(cache); /* 100 tokens */
  int32_t ring_ids[4];
  int64_t count = -1;
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_WINDOW, ring_ids, 4, &count) == KVC_OK && count == 3); /* ceil(19 / 8) */
  CHECK(kvc_seq_stream_rows(cache, seq, 0, KVC_STREAM_WINDOW, &count) == KVC_OK && count == 19);

  enum { kFirst = kParamTokens - 4, kCount = 4, kW = 16, kR = 16 + 3 };
  kvc_index_query* queries[kCount];
  uint16_t* q = malloc(kHeads * KVC_INDEX_DIM * sizeof(uint16_t));
  float* values = malloc(kHeads * KVC_INDEX_DIM * sizeof(float));
  float weights[kHeads];
  for (int i = 0; i < kCount; ++i) {
    Fill(values, kHeads * KVC_INDEX_DIM, 800 + (uint32_t)i, 4.0f);
    for (int k = 0; k < kHeads * KVC_INDEX_DIM; ++k) q[k] = Bf16(values[k]);
    Fill(weights, kHeads, 900 + (uint32_t)i, i % 2 ? 0.2f : 0.05f);
    CHECK(kvc_index_query_prepare(cache, kFirst + i, q, weights, kHeads, &queries[i]) == KVC_OK);
  }
  int64_t window_offsets[kCount + 1], compressed_offsets[kCount + 1], positions[kCount * kW], entries[kCount * 8];
  int32_t window_idx[kCount * kW], compressed_idx[kCount * 8];
  kvc_position_sets sets = {window_offsets, positions, window_idx, kCount * kW,
                            compressed_offsets, entries, compressed_idx, kCount * 8, 0, 0};
  const kvc_index_query* const* const_queries = (const kvc_index_query* const*)queries;
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, kCount, const_queries, &sets) == KVC_OK);
  CHECK(sets.window_total == kCount * kW && sets.compressed_total == kCount * 8);
  int32_t csa_ids[16];
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_CSA_ROWS, csa_ids, 16, &count) == KVC_OK);
  for (int i = 0; i < kCount; ++i) {
    const int t = kFirst + i;
    CHECK(window_offsets[i] == i * kW && compressed_offsets[i] == i * 8);
    for (int k = 0; k < kW; ++k) {
      const int position = t - kW + 1 + k, slot = position % kR;
      CHECK(positions[i * kW + k] == position);
      CHECK(window_idx[i * kW + k] == ring_ids[slot / 8] * 8 + slot % 8);
    }
    /* The entries: the 8 best scores of this query among those visible at t (ties to the lower entry). */
    float scores[25];
    CHECK(kvc_index_scores(cache, seq, 1, queries[i], scores, 25, &count) == KVC_OK && count == 25);
    const int visible = (t + 1) / 4;
    int picked[25] = {0};
    for (int k = 0; k < 8; ++k) {
      int best = -1;
      for (int j = 0; j < visible; ++j) best = !picked[j] && (best < 0 || scores[j] > scores[best]) ? j : best;
      picked[best] = 1;
    }
    int k = 0;
    for (int j = 0; j < visible; ++j) {
      if (!picked[j]) continue;
      CHECK(entries[i * 8 + k] == j && compressed_idx[i * 8 + k] == csa_ids[j / 8] * 8 + j % 8);
      ++k;
    }
  }
  CHECK(window_offsets[kCount] == kCount * kW && compressed_offsets[kCount] == kCount * 8);
  /* The last position is what kvc_seq_select gives for it. */
  {
    int32_t w[kW], c[8];
    int64_t wn = -1, cn = -1;
    CHECK(kvc_seq_select(cache, seq, 1, queries[kCount - 1], w, kW, &wn, c, 8, &cn) == KVC_OK);
    CHECK(wn == kW && cn == 8);
    CHECK(memcmp(w, window_idx + (kCount - 1) * kW, sizeof(w)) == 0);
    CHECK(memcmp(c, compressed_idx + (kCount - 1) * 8, sizeof(c)) == 0);
  }
  /* HCA and window-only layers take no queries (NULL). 100 tokens close no HCA window. */
  CHECK(kvc_seq_select_positions(cache, seq, 2, kFirst, kCount, NULL, &sets) == KVC_OK && sets.compressed_total == 0);
  CHECK(kvc_seq_select_positions(cache, seq, 0, 0, 1, NULL, &sets) == KVC_OK && sets.window_total == 1);
  CHECK(positions[0] == 0 && window_offsets[1] == 1);
  /* A prefill-like run: positions 0..99 in one call; the early ones' window rows are no longer in the ring. */
  {
    enum { kAll = kParamTokens };
    int64_t* wo = malloc((kAll + 1) * sizeof(int64_t));
    int64_t* co = malloc((kAll + 1) * sizeof(int64_t));
    int32_t* wi = malloc(kAll * kW * sizeof(int32_t));
    kvc_position_sets all = {wo, NULL, wi, kAll * kW, co, NULL, NULL, 0, 0, 0};
    CHECK(kvc_seq_select_positions(cache, seq, 0, 0, kAll, NULL, &all) == KVC_OK);
    CHECK(all.compressed_total == 0 && wo[kAll] == all.window_total);
    int missing = 0, ok = 1;
    for (int t = 0; t < kAll; ++t) {
      for (int64_t k = wo[t]; k < wo[t + 1]; ++k) {
        const int position = t - (int)(wo[t + 1] - 1 - k);
        ok &= (position < kParamTokens - kR) == (wi[k] == -1); /* in the ring: the last 19 positions */
        missing += wi[k] == -1;
      }
    }
    CHECK(ok && missing > 0);
    free(wo);
    free(co);
    free(wi);
  }

  /* Refusals: named, and nothing written but the totals. */
  for (int i = 0; i <= kCount; ++i) window_offsets[i] = compressed_offsets[i] = -7;
  for (int i = 0; i < kCount * kW; ++i) window_idx[i] = -7;
  sets.window_capacity = kCount * kW - 1;
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, kCount, const_queries, &sets) == KVC_ERR_OUT_OF_RANGE);
  CHECK(sets.window_total == kCount * kW && sets.compressed_total == kCount * 8); /* what to allocate */
  CHECK(strstr(kvc_last_error(), "the sets hold 64 window and 32 compressed rows") != NULL);
  sets.window_capacity = kCount * kW;
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst + 1, kCount, const_queries, &sets) == KVC_ERR_OUT_OF_RANGE);
  CHECK(sets.window_total == -1 && strstr(kvc_last_error(), "position 100 is not in it") != NULL);
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, kCount, NULL, &sets) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "needs one index query per position, 4, not 0") != NULL);
  {
    const kvc_index_query* holey[kCount] = {queries[0], NULL, queries[2], queries[3]};
    CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, kCount, holey, &sets) == KVC_ERR_INVALID_ARGUMENT);
    CHECK(strstr(kvc_last_error(), "query 1 (position 97) is missing") != NULL);
  }
  CHECK(kvc_seq_select_positions(cache, seq, 1, -1, kCount, const_queries, &sets) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, -4, const_queries, &sets) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_select_positions(cache, seq, 3, kFirst, kCount, const_queries, &sets) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_select_positions(cache, seq + 99, 1, kFirst, kCount, const_queries, &sets) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, kCount, const_queries, NULL) == KVC_ERR_INVALID_ARGUMENT);
  sets.window_offsets = NULL;
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, kCount, const_queries, &sets) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "window_offsets is NULL") != NULL);
  sets.window_offsets = window_offsets;
  sets.compressed_capacity = -1;
  CHECK(kvc_seq_select_positions(cache, seq, 1, kFirst, kCount, const_queries, &sets) == KVC_ERR_INVALID_ARGUMENT);
  {
    int untouched = 1; /* never written on a refusal */
    for (int i = 0; i <= kCount; ++i) untouched &= window_offsets[i] == -7 && compressed_offsets[i] == -7;
    for (int i = 0; i < kCount * kW; ++i) untouched &= window_idx[i] == -7;
    CHECK(untouched);
  }
  CHECK(kvc_seq_length(cache, seq, 1, &count) == KVC_OK && count == kParamTokens);

  for (int i = 0; i < kCount; ++i) kvc_index_query_destroy(queries[i]);
  free(q);
  free(values);
  kvc_cache_destroy(cache);
}

/* Planned steps from C: page-manager mode over no memory at all (ids
 * only), then kvc's own mode with appends inside a step. */
static void TestSteps(void) {
  kvc_options options;
  kvc_options_default(&options);
  CHECK(options.page_manager == 0);
  options.page_manager = 1;
  kvc_cache* cache = NULL;
  CHECK(kvc_cache_create_from_config(kConfig, strlen(kConfig), &options, &cache) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "draft_slots >= rollback_depth") != NULL);
  options.draft_slots = 16;
  options.rows_per_page = 8;
  CHECK(kvc_cache_create_from_config(kConfig, strlen(kConfig), &options, &cache) == KVC_OK);
  kvc_seq seqs[2] = {0, 0};
  CHECK(kvc_seq_create(cache, &seqs[0]) == KVC_OK && kvc_seq_create(cache, &seqs[1]) == KVC_OK);
  const int64_t tokens[2] = {130, 1};
  kvc_step_plan* plan = NULL;
  CHECK(kvc_step_plan_create(cache, seqs, tokens, 2, &plan) == KVC_OK && plan != NULL);
  uint64_t epoch = 0;
  CHECK(kvc_step_plan_epoch(plan, &epoch) == KVC_OK && epoch == 1);
  const int32_t* indptr = NULL;
  const int64_t* slots = NULL;
  int64_t n = 0;
  /* Window: one slot per token (a ring of 16 + 16 slots keeps the last 32 of 130). */
  CHECK(kvc_step_plan_slots(plan, KVC_STREAM_WINDOW, &indptr, &slots, &n) == KVC_OK && n == 131);
  CHECK(indptr[0] == 0 && indptr[1] == 130 && indptr[2] == 131);
  CHECK(slots[97] == -1 && slots[98] >= 0 && slots[129] >= 0);
  /* CSA: 32 entries and keys close in 130 tokens, HCA one. */
  CHECK(kvc_step_plan_slots(plan, KVC_STREAM_CSA_ROWS, &indptr, &slots, &n) == KVC_OK && n == 32);
  CHECK(kvc_step_plan_slots(plan, KVC_STREAM_CSA_KEYS, &indptr, &slots, &n) == KVC_OK && n == 32);
  CHECK(kvc_step_plan_slots(plan, KVC_STREAM_HCA_ROWS, &indptr, &slots, &n) == KVC_OK && n == 1 && indptr[1] == 1);
  CHECK(kvc_step_plan_slots(plan, KVC_STREAM_HCA_STATE, &indptr, &slots, &n) == KVC_OK && n == 131);
  CHECK(kvc_step_plan_slots(plan, 9, &indptr, &slots, &n) == KVC_ERR_INVALID_ARGUMENT);
  /* 130 tokens > the rollback depth: checkpoint copies there and back. */
  const kvc_page_copy* copies = NULL;
  int64_t ncopies = 0, nback = 0;
  CHECK(kvc_step_plan_copies(plan, &copies, &ncopies) == KVC_OK && ncopies > 0);
  CHECK(kvc_step_plan_abort_copies(plan, &copies, &nback) == KVC_OK && nback == ncopies);
  CHECK(copies[0].stream == KVC_STREAM_WINDOW);
  /* Mid-step: the sequences refuse other changes; a second plan of them too. */
  CHECK(kvc_seq_truncate(cache, seqs[0], 0) == KVC_ERR_FAILED_PRECONDITION);
  kvc_step_plan* again = NULL;
  CHECK(kvc_step_plan_create(cache, seqs, tokens, 2, &again) == KVC_ERR_FAILED_PRECONDITION && again == NULL);
  CHECK(kvc_step_commit(cache, epoch) == KVC_OK);
  CHECK(kvc_step_commit(cache, epoch) == KVC_ERR_NOT_FOUND);
  kvc_step_plan_destroy(plan);
  int64_t length = 0;
  CHECK(kvc_seq_length(cache, seqs[0], 2, &length) == KVC_OK && length == 130);
  CHECK(kvc_seq_append(cache, seqs[0], 0, 130, NULL, 0) == KVC_ERR_FAILED_PRECONDITION); /* bytes are the engine's */

  /* A fork lists its copies; too small a buffer forks nothing. */
  kvc_page_copy fork_copies[16];
  int64_t needed = 0;
  kvc_seq child = 0;
  kvc_usage usage;
  CHECK(kvc_cache_usage(cache, &usage) == KVC_OK && usage.sequences == 2 && usage.open_steps == 0);
  CHECK(kvc_seq_fork(cache, seqs[0], &child) == KVC_ERR_FAILED_PRECONDITION);
  CHECK(kvc_seq_fork_pages(cache, seqs[0], &child, fork_copies, 1, &needed) == KVC_ERR_OUT_OF_RANGE);
  CHECK(needed == 4 + 1 + 1 + 1); /* 32 ring slots in pages of 8, and the three compressor states */
  CHECK(kvc_cache_usage(cache, &usage) == KVC_OK && usage.sequences == 2);
  CHECK(kvc_seq_fork_pages(cache, seqs[0], &child, fork_copies, 16, &needed) == KVC_OK && needed == 7);
  CHECK(fork_copies[0].stream == KVC_STREAM_WINDOW && fork_copies[0].src != fork_copies[0].dst);
  /* Freed under step 1: held until the device is done with it. */
  CHECK(kvc_seq_free(cache, seqs[1]) == KVC_OK);
  CHECK(kvc_cache_usage(cache, &usage) == KVC_OK && usage.deferred_pages > 0);
  int64_t released = 0;
  CHECK(kvc_steps_complete(cache, 5, &released) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_steps_complete(cache, epoch, &released) == KVC_OK && released > 0);
  CHECK(kvc_cache_usage(cache, &usage) == KVC_OK && usage.deferred_pages == 0 && usage.completed_epoch == 1);
  kvc_cache_destroy(cache);

  /* kvc's mode: the step's appends, then commit; a short layer is refused. */
  kvc_options_default(&options);
  CHECK(kvc_cache_create_from_config(kConfig, strlen(kConfig), &options, &cache) == KVC_OK);
  kvc_seq seq = 0;
  CHECK(kvc_seq_create(cache, &seq) == KVC_OK);
  const int64_t four = 4;
  CHECK(kvc_step_plan_create(cache, &seq, &four, 1, &plan) == KVC_OK);
  CHECK(kvc_step_plan_epoch(plan, &epoch) == KVC_OK);
  CHECK(kvc_step_plan_copies(plan, &copies, &ncopies) == KVC_OK && ncopies == 0);
  uint16_t rows[4 * KVC_HEAD_DIM];
  for (int i = 0; i < 4 * KVC_HEAD_DIM; ++i) rows[i] = Bf16(1.0f);
  CHECK(kvc_seq_append(cache, seq, 0, 0, rows, 4) == KVC_OK);
  CHECK(kvc_step_commit(cache, epoch) == KVC_ERR_FAILED_PRECONDITION);
  CHECK(strstr(kvc_last_error(), "layer 1 holds 0 tokens") != NULL);
  CHECK(kvc_seq_append(cache, seq, 1, 0, rows, 4) == KVC_OK && kvc_seq_append(cache, seq, 2, 0, rows, 4) == KVC_OK);
  CHECK(kvc_step_commit(cache, epoch) == KVC_OK);
  kvc_step_plan_destroy(plan);
  CHECK(kvc_step_plan_create(cache, &seq, &four, 1, &plan) == KVC_OK && kvc_step_plan_epoch(plan, &epoch) == KVC_OK);
  CHECK(kvc_seq_append(cache, seq, 0, 4, rows, 4) == KVC_OK);
  CHECK(kvc_step_abort(cache, epoch) == KVC_OK);
  CHECK(kvc_seq_length(cache, seq, 0, &length) == KVC_OK && length == 4);
  kvc_step_plan_destroy(plan);
  kvc_step_plan_destroy(NULL);
  kvc_cache_destroy(cache);
}

/* Prefix caching in page-manager mode from C (ids only, no memory): the
 * copies a publish and a restore list, and the buffer protocol. */
static void TestPrefixPages(void) {
  kvc_options options;
  kvc_options_default(&options);
  options.page_manager = 1;
  options.draft_slots = 16;
  options.rows_per_page = 8;
  options.prefix_block_tokens = 128;
  kvc_cache* cache = NULL;
  CHECK(kvc_cache_create_from_config(kConfig, strlen(kConfig), &options, &cache) == KVC_OK);
  if (cache == NULL) return;
  kvc_seq seq = 0;
  CHECK(kvc_seq_create(cache, &seq) == KVC_OK);
  const int64_t tokens = 128;
  kvc_step_plan* plan = NULL;
  uint64_t epoch = 0;
  CHECK(kvc_step_plan_create(cache, &seq, &tokens, 1, &plan) == KVC_OK && kvc_step_plan_epoch(plan, &epoch) == KVC_OK);
  CHECK(kvc_step_commit(cache, epoch) == KVC_OK); /* the engine wrote the rows */
  CHECK(kvc_steps_complete(cache, epoch, NULL) == KVC_OK);
  kvc_step_plan_destroy(plan);

  const uint64_t hashes[] = {0x51, 0x52};
  /* (16 + 16) / 8 = 4 ring pages, the CSA main and indexer states. */
  enum { kCopies = 6 };
  kvc_page_copy copies[kCopies];
  int64_t count = -1;
  CHECK(kvc_prefix_publish(cache, seq, hashes, 1) == KVC_ERR_FAILED_PRECONDITION);
  CHECK(kvc_prefix_publish_pages(cache, seq, hashes, 1, copies, 2, &count) == KVC_ERR_OUT_OF_RANGE && count == kCopies);
  CHECK(kvc_prefix_publish_pages(cache, seq, hashes, 1, NULL, 2, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_prefix_publish_pages(cache, seq, hashes, 1, copies, kCopies, &count) == KVC_OK && count == kCopies);
  int32_t ring[4];
  int64_t ring_count = 0;
  CHECK(kvc_seq_block_table(cache, seq, KVC_STREAM_WINDOW, ring, 4, &ring_count) == KVC_OK && ring_count == 4);
  for (int i = 0; i < 4; ++i) CHECK(copies[i].stream == KVC_STREAM_WINDOW && copies[i].src == ring[i] && copies[i].dst != ring[i]);
  CHECK(copies[4].stream == KVC_STREAM_CSA_STATE && copies[5].stream == KVC_STREAM_CSA_INDEXER_STATE);
  const int32_t checkpoint_ring0 = copies[0].dst;
  /* Published again: nothing to copy. */
  CHECK(kvc_prefix_publish_pages(cache, seq, hashes, 1, copies, kCopies, &count) == KVC_OK && count == 0);

  kvc_seq reused = 0;
  int64_t restored = -1;
  CHECK(kvc_seq_create_from_prefix(cache, hashes, 2, &reused, &restored) == KVC_ERR_FAILED_PRECONDITION);
  CHECK(kvc_seq_create_from_prefix_pages(cache, hashes, 2, &reused, &restored, copies, 1, &count) ==
        KVC_ERR_OUT_OF_RANGE && count == kCopies);
  CHECK(kvc_seq_create_from_prefix_pages(cache, hashes, 2, &reused, &restored, copies, kCopies, &count) == KVC_OK);
  CHECK(restored == 128 && count == kCopies && copies[0].src == checkpoint_ring0);
  CHECK(kvc_seq_block_table(cache, reused, KVC_STREAM_WINDOW, ring, 4, &ring_count) == KVC_OK);
  CHECK(copies[0].dst == ring[0] && copies[3].dst == ring[3]);
  int64_t length = -1;
  CHECK(kvc_seq_length(cache, reused, 2, &length) == KVC_OK && length == 128);
  /* A miss lists nothing. */
  const uint64_t other = 0x99;
  kvc_seq empty = 0;
  CHECK(kvc_seq_create_from_prefix_pages(cache, &other, 1, &empty, &restored, copies, kCopies, &count) == KVC_OK);
  CHECK(restored == 0 && count == 0);
  kvc_cache_destroy(cache);
}

int main(void) {
  TestParams();
  TestPrefix();
  TestPrefixPages();
  TestPages();
  TestEngineArrays();
  TestSelectPositions();
  TestSteps();
  kvc_options options;
  kvc_options_default(&options);
  CHECK(options.rollback_depth == 16);
  options.state_bytes = (int64_t)256 << 20;

  kvc_cache* cache = NULL;
  CHECK(kvc_cache_create("v4-flash", &options, &cache) == KVC_OK);
  CHECK(cache != NULL);
  int32_t layers = 0;
  CHECK(kvc_cache_num_layers(cache, &layers) == KVC_OK && layers == 43);

  kvc_seq seq = 0;
  CHECK(kvc_seq_create(cache, &seq) == KVC_OK);

  /* 3 tokens into layer 0; values that survive FP8 exactly (powers of two). */
  enum { kTokens = 3 };
  uint16_t* rows = calloc(kTokens * KVC_HEAD_DIM, sizeof(uint16_t));
  for (int t = 0; t < kTokens; ++t) {
    for (int i = 0; i < KVC_HEAD_DIM; ++i) rows[t * KVC_HEAD_DIM + i] = Bf16((float)(1 << (t + 1)));
  }
  CHECK(kvc_seq_append(cache, seq, 0, 0, rows, kTokens) == KVC_OK);
  int64_t length = -1;
  CHECK(kvc_seq_length(cache, seq, 0, &length) == KVC_OK && length == 3);

  uint16_t* ring = calloc(128 * KVC_HEAD_DIM, sizeof(uint16_t));
  CHECK(kvc_seq_read_window(cache, seq, 0, ring, 128 * KVC_HEAD_DIM) == KVC_OK);
  CHECK(ring[0] == Bf16(2.0f) && ring[1 * KVC_HEAD_DIM + 7] == Bf16(4.0f) && ring[2 * KVC_HEAD_DIM + 511] == Bf16(8.0f));
  CHECK(ring[3 * KVC_HEAD_DIM] == 0); /* never written */

  /* Errors: a code, a message, and nothing changed. */
  CHECK(kvc_seq_append(cache, seq, 0, 5, rows, 1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "would leave a gap") != NULL);
  CHECK(kvc_seq_append(cache, seq, 0, 3, NULL, 1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "window_rows is NULL") != NULL);
  CHECK(kvc_seq_append(cache, seq, 99, 0, rows, 1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_append(cache, 12345, 0, 0, rows, 1) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_seq_append(cache, seq, 0, 3, rows, -1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(kvc_seq_read_window(cache, seq, 0, ring, 10) == KVC_ERR_INVALID_ARGUMENT);
  rows[100] = 0x7FC0; /* NaN */
  CHECK(kvc_seq_append(cache, seq, 0, 3, rows, 1) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "is NaN") != NULL);
  CHECK(kvc_seq_length(cache, seq, 0, &length) == KVC_OK && length == 3);
  rows[100] = Bf16(2.0f);

  /* Mid-step (layer 0 ahead of the others): fork and truncate must wait. */
  kvc_seq child = 0;
  CHECK(kvc_seq_fork(cache, seq, &child) == KVC_ERR_FAILED_PRECONDITION);
  for (int32_t layer = 1; layer < layers; ++layer) CHECK(kvc_seq_append(cache, seq, layer, 0, rows, kTokens) == KVC_OK);
  CHECK(kvc_seq_fork(cache, seq, &child) == KVC_OK && child != seq);
  CHECK(kvc_seq_truncate(cache, child, 1) == KVC_OK);
  CHECK(kvc_seq_length(cache, child, 5, &length) == KVC_OK && length == 1);
  CHECK(kvc_seq_length(cache, seq, 5, &length) == KVC_OK && length == 3);
  int64_t floor = -1;
  CHECK(kvc_seq_rollback_floor(cache, seq, &floor) == KVC_OK && floor == 0);

  kvc_usage usage;
  CHECK(kvc_cache_usage(cache, &usage) == KVC_OK && usage.sequences == 2 && usage.used_bytes[0] > 0);
  CHECK(strcmp(kvc_component_name(0), "window ring") == 0);
  CHECK(strcmp(kvc_component_name(9), "?") == 0);

  /* Snapshots: save both, restore them as new sequences. */
  const char* path = "c_api_test.kvcsnap";
  const kvc_seq both[2] = {seq, child};
  CHECK(kvc_snapshot_save(cache, both, 2, path, 1) == KVC_OK);
  kvc_seq restored[2] = {0, 0};
  size_t count = 0;
  CHECK(kvc_snapshot_restore(cache, path, restored, 1, &count) == KVC_ERR_OUT_OF_RANGE && count == 2);
  CHECK(kvc_cache_usage(cache, &usage) == KVC_OK && usage.sequences == 2); /* nothing restored */
  CHECK(kvc_snapshot_restore(cache, path, restored, 2, &count) == KVC_OK && count == 2);
  CHECK(kvc_seq_length(cache, restored[0], 5, &length) == KVC_OK && length == 3);
  CHECK(kvc_seq_length(cache, restored[1], 5, &length) == KVC_OK && length == 1);
  uint16_t* copy = (uint16_t*)calloc(128 * KVC_HEAD_DIM, sizeof(uint16_t));
  CHECK(kvc_seq_read_window(cache, seq, 0, ring, 128 * KVC_HEAD_DIM) == KVC_OK);
  CHECK(kvc_seq_read_window(cache, restored[0], 0, copy, 128 * KVC_HEAD_DIM) == KVC_OK);
  CHECK(memcmp(ring, copy, 128 * KVC_HEAD_DIM * sizeof(uint16_t)) == 0);
  free(copy);
  CHECK(kvc_seq_free(cache, restored[0]) == KVC_OK && kvc_seq_free(cache, restored[1]) == KVC_OK);
  /* Every file-system failure is KVC_ERR_IO, whatever its errno. */
  CHECK(kvc_snapshot_restore(cache, "no-such-file.kvcsnap", restored, 2, &count) == KVC_ERR_IO);
  CHECK(strstr(kvc_last_error(), "no-such-file.kvcsnap") != NULL);
  CHECK(kvc_snapshot_save(cache, both, 2, "no-such-dir/x.kvcsnap", 1) == KVC_ERR_IO);
  CHECK(mkdir("c_api_test.dir", 0700) == 0);
  CHECK(kvc_snapshot_restore(cache, "c_api_test.dir", restored, 2, &count) == KVC_ERR_IO);
  CHECK(kvc_snapshot_save(cache, both, 2, "c_api_test.dir", 1) == KVC_ERR_IO);
  CHECK(kvc_snapshot_save(cache, both, 2, "c_api_test.dir", 0) == KVC_ERR_IO);
  CHECK(rmdir("c_api_test.dir") == 0);
  {
    /* A file-size limit (SIGXFSZ ignored: the write fails with EFBIG). */
    struct rlimit old_limit, limit;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    CHECK(getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    limit = old_limit;
    limit.rlim_cur = 100;
    CHECK(setrlimit(RLIMIT_FSIZE, &limit) == 0);
    CHECK(kvc_snapshot_save(cache, both, 2, "c_api_test_limit.kvcsnap", 0) == KVC_ERR_IO);
    CHECK(strstr(kvc_last_error(), "c_api_test_limit.kvcsnap") != NULL);
    CHECK(setrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    signal(SIGXFSZ, old_handler);
    CHECK(access("c_api_test_limit.kvcsnap", F_OK) != 0); /* nothing left behind */
  }
  FILE* junk = fopen(path, "wb");
  CHECK(junk != NULL && fputs("not a snapshot, but long enough to hold a header ......................", junk) >= 0);
  fclose(junk);
  CHECK(kvc_snapshot_restore(cache, path, restored, 2, &count) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "not a kvc snapshot") != NULL);
  CHECK(kvc_snapshot_save(cache, both, 2, NULL, 1) == KVC_ERR_INVALID_ARGUMENT);
  remove(path);

  CHECK(kvc_seq_free(cache, child) == KVC_OK);
  CHECK(kvc_seq_free(cache, seq) == KVC_OK);
  CHECK(kvc_seq_free(cache, seq) == KVC_ERR_NOT_FOUND);
  CHECK(kvc_cache_usage(cache, &usage) == KVC_OK && usage.sequences == 0);
  for (int c = 0; c < KVC_NUM_COMPONENTS; ++c) CHECK(usage.used_bytes[c] == 0);

  /* Creation errors. */
  kvc_cache* other = NULL;
  CHECK(kvc_cache_create("v9", NULL, &other) == KVC_ERR_NOT_FOUND && other == NULL);
  const char* bad_config = "{\"num_hidden_layers\": 2}";
  CHECK(kvc_cache_create_from_config(bad_config, strlen(bad_config), NULL, &other) == KVC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(kvc_last_error(), "compress_ratios") != NULL);
  CHECK(kvc_cache_create(NULL, NULL, &other) == KVC_ERR_INVALID_ARGUMENT);

  kvc_cache_destroy(cache);
  kvc_cache_destroy(NULL);
  free(rows);
  free(ring);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
