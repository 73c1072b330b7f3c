#!/usr/bin/env bash
# The main job: installs what is missing, builds kvc (release) and runs
# kvc-run: one DeepSeek-V4-Flash sequence of 1,048,576 tokens on a real
# kvc::Cache (prefill through the compressors, then decode steps with index
# scoring, top-k and gathers, then a snapshot saved, restored into a second
# cache and compared byte for byte), with progress, then a summary that is
# also written to kvc-run.json. Extra arguments go to kvc-run (e.g. --model
# v4-pro). The run needs about 8 GB of memory and 4 GB of free disk at peak.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
kvc_install_deps

cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/release --target kvc-run
build/release/bin/kvc-run "$@"
