#!/usr/bin/python3
"""kvc's selection beside what a user without kvc would write.

One CSA layer's decode-time selection at 1M tokens (262,144 index keys,
64 heads x 128 dims, top 1,024), timed in the same run two ways:

  kvc    kvc-selection: ScoreIndexKeys on the FP4 keys (an executor of
         --threads), then TopK.
  NumPy  the same keys dequantized to fp32 (what kvc stores, so both rank
         the same values), scores = relu(K @ Q.T) @ w with Debian's NumPy
         and OpenBLAS, then np.argpartition for the top k.

Both use --threads threads (OPENBLAS_NUM_THREADS for NumPy). Prints a table
(best of --repeats each) with kvc's speed-up, and the overlap of the two
top-k sets (their scores differ in fp32 rounding only).

  /usr/bin/python3 bench/numpy_selection.py [--kvc-selection build/release/bin/kvc-selection]
      [--keys N] [--heads H] [--topk K] [--threads T] [--repeats R] [--json FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--kvc-selection", default=os.path.join(here, "..", "build", "release", "bin", "kvc-selection"))
    parser.add_argument("--keys", type=int, default=262144)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    # Before NumPy loads OpenBLAS: its thread count is read once.
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([args.kvc_selection, "--keys", str(args.keys), "--heads", str(args.heads), "--topk",
                              str(args.topk), "--threads", str(args.threads), "--repeats", str(args.repeats),
                              "--dump", tmp], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit("kvc-selection failed: " + run.stderr)
        kvc = json.loads(run.stdout)
        keys = np.fromfile(os.path.join(tmp, "keys_f32.bin"), dtype="<f4").reshape(args.keys, 128)
        query = np.fromfile(os.path.join(tmp, "query_f32.bin"), dtype="<f4").reshape(args.heads, 128)
        weights = np.fromfile(os.path.join(tmp, "weights_f32.bin"), dtype="<f4")
        kvc_topk = np.fromfile(os.path.join(tmp, "kvc_topk_i64.bin"), dtype="<i8")

    best_score = best_topk = best_total = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scores = np.maximum(keys @ query.T, 0.0) @ weights
        t1 = time.perf_counter()
        picked = np.argpartition(-scores, args.topk - 1)[:args.topk]
        t2 = time.perf_counter()
        best_score, best_topk, best_total = min(best_score, t1 - t0), min(best_topk, t2 - t1), min(best_total, t2 - t0)
    overlap = len(np.intersect1d(picked, kvc_topk)) / args.topk
    # The BLAS the matrix product ran on (Debian picks it by alternatives).
    with open("/proc/self/maps") as maps:
        libs = maps.read()
    blas = "OpenBLAS" if "openblas" in libs else "reference BLAS" if "libblas" in libs else "BLAS"

    ms = lambda s: 1e3 * s  # noqa: E731
    print(f"One CSA layer's selection: {args.keys:,} keys x {args.heads} heads x 128 dims, top {args.topk:,}, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print(f"{'':<28}{'scores':>10}{'top-k':>10}{'total':>10}")
    print(f"{'kvc (' + kvc['simd_target'] + ', FP4 keys)':<28}{kvc['score_ms']:>8.2f}ms{kvc['topk_ms']:>8.2f}ms"
          f"{kvc['total_ms']:>8.2f}ms")
    print(f"{'NumPy ' + np.__version__ + ' + ' + blas + ' (fp32)':<28}{ms(best_score):>8.2f}ms{ms(best_topk):>8.2f}ms"
          f"{ms(best_total):>8.2f}ms")
    speedup = best_total / (kvc["total_ms"] / 1e3)
    print(f"kvc is {speedup:.1f}x faster; the two top-{args.topk} sets share {100 * overlap:.1f}% of their entries")
    result = {"kvc": kvc, "numpy": {"version": np.__version__, "blas": blas, "score_ms": ms(best_score),
                                    "topk_ms": ms(best_topk), "total_ms": ms(best_total)},
              "speedup": speedup, "topk_overlap": overlap}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if overlap < min(0.99, 1 - 1 / args.topk):  # fp32 rounding may swap an entry at the boundary
        sys.exit(f"the top-k sets differ too much ({100 * overlap:.1f}% shared): not the same selection")


if __name__ == "__main__":
    main()
