#!/usr/bin/env bash
# The main job: installs what is missing, builds kvc (release) and runs
# kvc-demo, which quantizes 262,144 KV rows and index keys the way the cache
# stores them and reports bytes per row, error and throughput.
# Extra arguments go to kvc-demo (e.g. --rows 1048576).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
kvc_install_deps

cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/release --target kvc-demo
build/release/bin/kvc-demo "$@"
