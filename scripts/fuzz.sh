#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a
# bounded time on a copy of its checked-in corpus (tests/fuzz/corpus/NAME).
# Targets: the JSON, safetensors and config.json readers, the snapshot loader
# and random sequences of C API calls. FUZZ_SECONDS (default 20) per target.
# Fails on any crash, leak, UB or broken invariant (__builtin_trap).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
source scripts/deps.sh
kvc_install_deps  # includes clang
CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_FUZZ=ON \
  -DKVC_SANITIZE=address,undefined -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_TOOLS=OFF -DKVC_BUILD_BENCH=OFF \
  -DKVC_BUILD_EXAMPLES=OFF -DKVC_INSTALL=OFF > /dev/null
cmake --build build/fuzz -j "$(nproc)"
mkdir -p build/fuzz/artifacts
for target in json safetensors config snapshot c_api; do
  work="build/fuzz/corpus-$target"
  rm -rf "$work" && cp -r "tests/fuzz/corpus/$target" "$work"
  echo "== fuzz_$target for ${seconds}s"
  set +e
  out=$(build/fuzz/tests/fuzz/fuzz_$target -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix=build/fuzz/artifacts/$target- "$work" 2>&1)
  rc=$?
  set -e
  echo "$out" | grep -E "^Done|^stat::number_of_executed_units" || true
  if [ "$rc" -ne 0 ]; then  # a crash, leak, sanitizer report or timeout
    echo "$out" | tail -60
    echo "fuzz_$target FAILED (exit $rc); the input is in build/fuzz/artifacts/"
    exit 1
  fi
done
