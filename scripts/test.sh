#!/usr/bin/env bash
# Builds kvc and runs every test, twice: a release build with warnings as
# errors (with the Python module and its pytest suite), then an
# AddressSanitizer + UndefinedBehaviorSanitizer build. In between: the main
# job (./scripts/run.sh) at a reduced size and at its max_context edge, each
# leaving nothing behind but its JSON summary; the concurrent parts (cache,
# the stress test with saves and restores, concurrent prefix publishers and
# matchers, planned steps raced, the parallel paths through an executor) under
# ThreadSanitizer; and the parsers, the snapshot loader and
# the C API under libFuzzer for a bounded time.
# Installs missing packages first. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
kvc_install_deps
jobs=$(nproc)

echo "== release build (-Werror), with the Python module (Debian's /usr/bin/python3)"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVC_WERROR=ON -DKVC_PYTHON=ON > /dev/null
cmake --build build/release -j "$jobs"
ctest --test-dir build/release --output-on-failure -j "$jobs"

echo "== the main job, reduced: the README's command (prefill, decode, save, incremental save, restore, compare), then at its max_context edge"
# Each run must exit 0 and leave nothing but its JSON summary (which must parse).
run_dir=$(mktemp -d)
trap 'rm -rf "$run_dir"' EXIT
only_json_left() {
  local left
  left=$(ls -A "$run_dir")
  [ "$left" = kvc-run.json ] || { echo "kvc-run left behind: ${left:-nothing, not even its JSON}"; exit 1; }
  python3 -m json.tool "$run_dir/kvc-run.json" > /dev/null
  rm "$run_dir/kvc-run.json"
}
./scripts/run.sh --tokens 20000 --decode-steps 3 --json "$run_dir/kvc-run.json" --snapshot "$run_dir/kvc-run.kvcsnap"
only_json_left
kvc_run="$PWD/build/release/bin/kvc-run"
(cd "$run_dir" && "$kvc_run" --tokens 5000 --decode-steps 2 --max-context 5003)
only_json_left

echo "== ThreadSanitizer build of the concurrent parts (-Werror)"
cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_WERROR=ON \
  -DKVC_SANITIZE=thread -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_TOOLS=OFF -DKVC_BUILD_EXAMPLES=OFF > /dev/null
cmake --build build/tsan -j "$jobs" --target cache_stress_test cache_test prefix_cache_test step_adversarial_test executor_test
# executor_test's SpawnedThreads tests run kvc's parallel paths on std::threads
# (oneTBB's own synchronization is invisible to TSan).
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
  ctest --test-dir build/tsan --output-on-failure -j "$jobs" -R '^(CacheStress|Cache|PrefixCacheConcurrency|StepAdversarialConcurrency)\.|SpawnedThreads$'

echo "== libFuzzer: JSON, safetensors, config.json, snapshot loader, C API call sequences (${FUZZ_SECONDS:-20}s each)"
./scripts/fuzz.sh

echo "== ASan + UBSan build (-Werror)"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_WERROR=ON \
  -DKVC_SANITIZE=address,undefined -DKVC_BUILD_BENCH=OFF > /dev/null
cmake --build build/asan -j "$jobs"
# Label "perf" (timing tests) runs in the release build only: sanitizers distort the times.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan --output-on-failure -j "$jobs" -LE perf
