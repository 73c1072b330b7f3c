/* A C program using the installed kvc through its C API. */
#include <stdio.h>

#include "kvc/kvc.h"

int main(void) {
  kvc_cache* cache = NULL;
  kvc_options options;
  kvc_options_default(&options);
  options.state_bytes = (int64_t)64 << 20;
  if (kvc_cache_create("v4-pro", &options, &cache) != KVC_OK) {
    printf("error: %s\n", kvc_last_error());
    return 1;
  }
  kvc_seq seq;
  const int rc = kvc_seq_create(cache, &seq);
  printf("consumer_c: created a V4-Pro cache and sequence %lld (rc %d)\n", (long long)seq, rc);
  kvc_cache_destroy(cache);
  return rc == KVC_OK ? 0 : 1;
}
