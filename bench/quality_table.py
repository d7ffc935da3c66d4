"""The ML-1M quality table from the result files of the quality runs that made its rows.

    python bench/quality_table.py --from bench/results/quality-movielens-1m-2026-12-02.json \
        --from bench/results/quality-movielens-1m-hstu-orig.json ... \
        [--out bench/results/quality-movielens-1m-final.json]

Each `bench/quality.py` run scores some rows on the test split and writes them with its command,
commit and date; a table of every model is assembled here from those files, not re-run (the
checkpoints are not kept in the tree). A row keeps what its run recorded: its config (spec, model and
train sections, checkpoint), test metrics, train and evaluation seconds, training peak memory,
time to quality, and the file, date, command and commit it came from. A name in several files takes
the newest file's row (by the file's date). Prints the markdown table; figures only.
"""
from __future__ import annotations

import argparse
import json

from jobs.provenance import ROOT, provenance, write_result

COLUMNS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr", "coverage@10", "tail_share@10", "ild@10")


def rows_of(path: str) -> list[dict]:
    with open(path) as fh:
        doc = json.load(fh)
    source = {"file": path, "date": doc.get("date"), "command": doc.get("command"), "commit": doc.get("commit")}
    out = []
    for m in doc["models"]:
        r = m["metrics"]
        figures = {**r["metrics"], **r.get("beyond_accuracy", {})}
        out.append({"name": m["name"], "config": m.get("config", {}), "test": {k: figures.get(k) for k in COLUMNS},
                    "timing": m.get("timing", {}), "time_to_quality": m.get("time_to_quality"), "source": source})
    return out


def table(rows: list[dict]) -> str:
    head = "| model | spec | " + " | ".join(COLUMNS) + " | train s | eval s | train peak RSS GiB | date |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 6)]
    for r in rows:
        t = r["timing"]
        spec = r["config"].get("spec", "–")
        cells = [f"{r['test'][k]:.4f}" if r["test"].get(k) is not None else "–" for k in COLUMNS]
        lines.append(f"| {r['name']} | {spec} | " + " | ".join(cells) +
                     f" | {t.get('train_seconds', '–')} | {t.get('eval_seconds', '–')} | "
                     f"{t.get('train_peak_rss_gib', '–')} | {(r['source']['date'] or '')[:10]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="sources", action="append", required=True, metavar="RESULT_JSON")
    ap.add_argument("--out", default=str(ROOT / "bench/results/quality-movielens-1m-final.json"))
    args = ap.parse_args()
    chosen: dict[str, dict] = {}
    for path in args.sources:
        for row in rows_of(path):
            held = chosen.get(row["name"])
            if held is None or (row["source"]["date"] or "") > (held["source"]["date"] or ""):
                chosen[row["name"]] = row
    rows = sorted(chosen.values(), key=lambda r: -(r["test"].get("hr@10") or 0.0))
    print(table(rows))
    write_result(args.out, {**provenance(), "rows": rows})


if __name__ == "__main__":
    main()
