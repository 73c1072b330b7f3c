"""KV-cache memory per sequence against context length: DeepSeek-V4-Pro and -Flash
(kvc's FP8/FP4 formats), DeepSeek-V3.2, DeepSeek-V3 (MLA, bf16) and Llama-3-70B
(GQA, bf16), from kvc.footprint, drawn with matplotlib to a PNG.

    PYTHONPATH=build/release/python /usr/bin/python3 examples/python/footprint.py [OUT.png]
"""

import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

import kvc  # noqa: E402

MODELS = ["v4-pro", "v4-flash", "deepseek-v3.2", "deepseek-v3", "llama3-70b"]
TOKENS = [1 << k for k in range(10, 21)]  # 1K .. 1M


def main(out):
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for model in MODELS:
        rows = kvc.footprint(model, tokens=TOKENS)
        axes.plot(TOKENS, [row["total_bytes"] / 2 ** 30 for row in rows], marker="o", markersize=3,
                  label=rows[0]["model"])
    at_1m = {model: kvc.footprint(model, tokens=1 << 20, baseline="deepseek-v3") for model in MODELS}
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("KV cache per sequence (GiB)")
    axes.set_title("KV-cache memory vs context (kvc.footprint)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    for model, row in at_1m.items():
        print(f"{row['model']:<36} {row['total_bytes'] / 2 ** 30:8.2f} GiB at 1M tokens "
              f"({100 * row['ratio_to_baseline']:.1f}% of DeepSeek-V3)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "footprint.png")
