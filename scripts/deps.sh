# Sourced by run.sh and test.sh: installs kvc's build dependencies from
# Debian's packages (apt) when any is missing. Nothing is fetched elsewhere.
kvc_install_deps() {
  # The last line: the Python module (pybind11, headers, NumPy), its tests and examples; NumPy with
  # OpenBLAS (without libopenblas0-pthread NumPy falls back to reference BLAS, ~20x slower) also for
  # bench/numpy_selection.py (its ctest: numpy_selection.small).
  local packages=(cmake ninja-build g++ clang libclang-rt-dev pkg-config libhwy-dev libabsl-dev libtbb-dev libfmt-dev
                  libbenchmark-dev libgtest-dev libgmock-dev nlohmann-json3-dev python3
                  pybind11-dev python3-dev python3-numpy libopenblas0-pthread python3-pytest python3-matplotlib)
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "kvc: installing ${missing[*]} (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
