"""Time-to-quality of trained models from their checkpoints: validation HR@10 and NDCG@10 against
training wall time (the per-epoch history every checkpoint records), one line per model.

    python bench/ttq.py --model demo=.ray_results/movielens-1m-demo-<run>/model.pt \
        [--model fusion=.checkpoints/movielens-1m-hllm-fusion/best.pt ...] --out bench/results/ttq-demo.json

Prints each model's curve and writes the JSON and a PNG beside it. Figures only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from jobs.provenance import provenance, write_result
from ray_jobs.checkpoint import read_model


def curve(path: str) -> list[dict]:
    """(seconds, valid HR@10, valid NDCG@10) of every evaluated epoch of the run that wrote `path`."""
    return [{"epoch": h["epoch"], "seconds": round(h["seconds"], 1), "hr@10": h["valid_hr@10"],
             "ndcg@10": h["valid_ndcg@10"]} for h in read_model(path).progress.history if "valid_hr@10" in h]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    curves = {}
    for item in args.model:
        name, path = item.split("=", 1)
        curves[name] = curve(path)
        print(f"{name}: " + ", ".join(f"{c['seconds']:.0f}s HR@10 {c['hr@10']:.4f}" for c in curves[name]))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("hr@10", "ndcg@10")):
        for name, c in curves.items():
            ax.plot([p["seconds"] / 60 for p in c], [p[metric] for p in c], marker="o", label=name)
        ax.set_xlabel("training minutes")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = str(Path(args.out).with_suffix(".png"))
    fig.savefig(png, dpi=110)
    write_result(args.out, {**provenance(), "models": dict(item.split("=", 1) for item in args.model),
                            "curves": curves, "plot": png})


if __name__ == "__main__":
    main()
