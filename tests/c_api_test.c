/* The C API from C: every operation, and errors as codes plus messages. */
#define _POSIX_C_SOURCE 200809L
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

int main(void) {
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
