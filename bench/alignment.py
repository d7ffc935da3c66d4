"""List-wise alignment on MovieLens-1M: one block per start model, every method from the same start
with the same budget (steps x users_per_step x rollouts lists, align.epochs steps per batch), each
with several seeds, and a Pareto sweep of the reward weights.

    python bench/alignment.py --start hstu-orig,hllm-hstu-large --seeds 0,1,2 [--sweep] [--budget-hours H]

Start models (their shipped specs, fit on the train split so that validation stays clean for
choosing weights) are trained here through `ray_jobs.train`, twice:
  full      on every training item: the model that would otherwise be served (the bar of goal 1)
  withheld  with train.withhold = align.holdout: every method aligns from it, so the NDCG reward is
            computed on items the start model never fitted
From `full`, BLADE also runs with align.allow_seen_rewards (rewards on items it fitted), so the
table shows what the holdout-free start changes. With --sweep, blade, static_bon and grpo run once
per reward preset (seed 0) from `withheld`; their validation NDCG@10 against tail share and ILD@10
gives one frontier PNG per start; per method the chosen preset is the one with the best validation
NDCG@10 among those that raise both tail share and ILD over the start (else the best validation
NDCG@10), and only the chosen presets' test figures enter the table. With --refit N, both starts
and each model aligned from the withheld one (--refit-methods, every seed) are trained N more epochs with the
next-item loss on every training item, withheld ones included (the start's training settings,
--refit-set on top, the epoch chosen on validation): the served model then loses no data, and the
refits of the two starts, with no alignment in between, are the controls (the served model given the
same epochs is the bar).

Every finished run is written at once to bench/results/alignment-runs/<start>/<run>.json, and a start
model's file beside its record (<start>/start-<variant>.pt, committed with it: the block outlasts a
machine, and a retrained start would make every align run from it stale), so a rerun skips what is
done and resumes a cut run by its name. A start's training can take longer than a machine lasts:
`--keep-progress` (run beside it, then commit) copies its newest checkpoint to
<start>/start-<variant>.progress/, and the next run on a fresh machine resumes from there; the table, bench/results/alignment-movielens-1m.json and the PNGs are rebuilt from all
finished runs each time (also with --report, which runs nothing). A start model is reused only under
the settings it was trained with (its record keeps its spec: a field the schema gained since counts
at its default); a record made with other align settings or presets, or from other
start-model runs, is stale: it is run again, and left out of the report until then (an align key
the schema gained after the record was made counts only where it is set away from its default). A
sweep point not chosen keeps only its validation figures in the report's JSON. An align run takes everything but its align section from the start model's spec (train:
workers, DeepSpeed, budgets; `--start-set` applies to both). The ML-1M gold tables are built
first when missing (`llmrec etl`). Runs are real `ray_jobs.align` / `ray_jobs.train` jobs (Ray
Train + DeepSpeed), each with its own MLflow run; the table is logged to an MLflow run too.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from jobs.files import write_atomic
from jobs.provenance import ROOT, provenance, write_result
from jobs.schema import JobSpec
from jobs.spec import load_spec, tracking_uri

COLUMNS = ("hr@10", "ndcg@10", "mrr", "coverage@10", "ild@10", "tail_share@10", "gini@10")
METHODS = "static_bon,blade,grpo,flame,gflownet,dpo"
STARTS = {"sasrec-full": "jobs/specs/movielens-1m-sasrec-full.yaml",
          "hstu-orig": "jobs/specs/movielens-1m-hstu-orig.yaml",
          "hllm-fusion": "jobs/specs/movielens-1m-hllm-fusion.yaml",
          "hllm-hstu-large": "jobs/specs/movielens-1m-hllm-hstu-large.yaml"}
PRESETS = {"ndcg": {"ndcg": 1.0},
           "ndcg+tail": {"ndcg": 1.0, "tail": 0.3},
           "ndcg+diversity": {"ndcg": 1.0, "diversity": 0.3},
           "ndcg+exposure": {"ndcg": 1.0, "exposure": 0.3}}
SWEEP_METHODS = ("blade", "static_bon", "grpo")
CURVE_KEYS = ("reward_mean", "kl", "weight_entropy", "effective_grad_norm", "clipped_share")


def model_path(rec: dict) -> Path:
    """A start record's model file (kept relative to the checkout; an absolute one as written)."""
    return ROOT / rec["model_file"]


def same_settings(rec: dict, doc: dict, settings: str) -> bool:
    """A start record was trained under today's spec `doc`: the same hash, or its own spec read by
    today's schema (a field added since takes its default, what the record's code did) equal to it."""
    if rec.get("settings") == settings:
        return True
    try:
        return "spec" in rec and JobSpec.model_validate(rec["spec"]).model_dump(mode="json") == doc
    except ValueError:  # a field since removed or renamed: another spec
        return False


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def average_curves(histories: list[list[dict]], keys=CURVE_KEYS) -> list[dict]:
    """Step-wise mean over seeds of the step records (steps all runs reached)."""
    n = min(len(h) for h in histories)
    out = []
    for i in range(n):
        rec = {"step": histories[0][i]["step"]}
        for k in keys:
            vals = [h[i].get(k) for h in histories]
            rec[k] = None if any(v is None for v in vals) else float(np.mean(vals))
        out.append(rec)
    return out


def average_evals(evals: list[list[dict]]) -> list[dict]:
    steps = sorted(set.intersection(*(set(e["step"] for e in ev) for ev in evals)))
    return [{"step": s, "ndcg@10": float(np.mean([next(e["ndcg@10"] for e in ev if e["step"] == s) for ev in evals]))}
            for s in steps]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(keep, key=lambda i: points[i][0])


def choose(points: list[dict], start_valid: dict) -> dict:
    """The preset a user should pick, on validation: the best NDCG@10 among the points that raise both
    tail share and ILD@10 over the start model; without such a point, the best NDCG@10."""
    raising = [p for p in points if p["aligned_valid"]["tail_share@10"] > start_valid["tail_share@10"]
               and p["aligned_valid"]["ild@10"] > start_valid["ild@10"]]
    return max(raising or points, key=lambda p: p["aligned_valid"]["ndcg@10"])


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.align_doc = load_spec(args.spec, args.overrides).align.model_dump(mode="json")
        self.holdout = self.align_doc["holdout"]
        self.dir = Path(args.runs)
        self.deadline = time.monotonic() + args.budget_hours * 3600 if args.budget_hours else None

    # -------------------------------------------------------------- specs
    def start_spec(self, start: str, variant: str) -> JobSpec:
        withhold = self.holdout if variant == "withheld" else 0
        spec = load_spec(STARTS[start], ["train.fit_on=train", f"train.withhold={withhold}"] + self.args.start_set)
        return spec.model_copy(update={"name": f"{spec.name}-{variant}"})

    def align_spec(self, start: str, init: str, method: str, seed: int, seen: bool, rewards: dict | None) -> JobSpec:
        doc = self.start_spec(start, "full").model_dump(mode="json")
        a = dict(self.align_doc, method=method, seed=seed, init=init, allow_seen_rewards=seen)
        if rewards is not None:
            a["rewards"] = {t: rewards.get(t, 0.0) for t in ("ndcg", "diversity", "tail", "exposure")}
        doc["align"] = a
        return JobSpec.model_validate(doc)

    # -------------------------------------------------------------- runs (each persisted when done)
    def path(self, start: str, key: str) -> Path:
        return self.dir / start / f"{key}.json"

    def done(self, start: str, key: str) -> dict | None:
        p = self.path(start, key)
        return json.loads(p.read_text()) if p.exists() else None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def start_run(self, start: str, variant: str) -> tuple[JobSpec, str, dict | None]:
        """A start's spec, its training run's name (the settings in it: a cut run resumes under it,
        never a run of other settings) and its record when that holds under these settings."""
        import hashlib
        spec = self.start_spec(start, variant)
        doc = spec.model_dump(mode="json")
        settings = hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]
        rec = self.done(start, f"start-{variant}")
        if rec and same_settings(rec, doc, settings) and model_path(rec).exists():
            if "spec" not in rec:  # recorded before records kept their spec: keep it from now on
                write_result(self.path(start, f"start-{variant}"), rec := {**rec, "spec": doc})
            return spec, f"bench-align-{spec.name}-{settings}", rec
        if rec:  # trained with other settings (an edited spec, other --start-set) or its file is gone
            print(f"{start} {variant}: the recorded start model is stale ({rec.get('settings')} vs {settings}, "
                  f"file {'present' if model_path(rec).exists() else 'missing'}): training it again", flush=True)
        return spec, f"bench-align-{spec.name}-{settings}", None

    # ---------------------------------------- a start's training outlives the machine it began on
    def progress_dir(self, start: str, variant: str) -> Path:
        return self.dir / start / f"start-{variant}.progress"

    def keep_progress(self, starts: list[str]) -> None:
        """--keep-progress: each unfinished start training's newest checkpoint beside the start's
        record (<start>/start-<variant>.progress, to be committed): a start that takes longer than a
        machine lasts resumes on the next one."""
        from ray_jobs.runtime import keep_run_progress
        for start in starts:
            for variant in ("full", "withheld"):
                spec, name, rec = self.start_run(start, variant)
                if rec:
                    continue
                out = self.progress_dir(start, variant)
                metrics = keep_run_progress(spec, name, out)
                print(f"{start} {variant}: " + (f"kept {name} at epoch {metrics.get('epoch')} in {out}"
                                                 if metrics is not None else f"{name} has no checkpoint to keep"),
                      flush=True)

    def train_start(self, start: str, variant: str) -> dict | None:
        key = f"start-{variant}"
        spec, name, rec = self.start_run(start, variant)
        if rec:
            return rec
        if self.out_of_time():
            return None
        from ray_jobs.runtime import restore_run_progress
        from ray_jobs.train import run as train
        doc, settings = spec.model_dump(mode="json"), name.rsplit("-", 1)[1]
        progress = self.progress_dir(start, variant)
        if restore_run_progress(spec, name, progress):
            print(f"{start} {variant}: resuming {name} from its kept progress", flush=True)
        elif progress.is_dir() and not (progress / name).is_dir():
            print(f"{start} {variant}: the kept progress ({', '.join(p.name for p in progress.iterdir())}) is of other "
                  f"settings than {name}: training from the start", flush=True)
        t0 = time.perf_counter()
        out = train(spec, run_name=name, register=False)
        kept = self.path(start, key).with_suffix(".pt")
        write_atomic(str(kept), lambda tmp: shutil.copyfile(out.model_file, tmp))
        rec = {"start": start, "variant": variant, "withhold": spec.train.withhold, "settings": settings, "spec": doc,
               "model_file": str(kept.relative_to(ROOT)) if kept.is_relative_to(ROOT) else str(kept),
               "run_id": out.run_id, "best_epoch": out.best_epoch, "seconds": out.seconds,
               "wall_seconds": time.perf_counter() - t0, "valid": out.valid, "test": out.test, **provenance()}
        write_result(self.path(start, key), rec)
        shutil.rmtree(self.progress_dir(start, variant), ignore_errors=True)  # done: its progress is not needed
        print(f"{start} {variant}: test ndcg@10 {out.test['ndcg@10']:.4f}, valid {out.valid['ndcg@10']:.4f} "
              f"(epoch {out.best_epoch}, {out.seconds:.0f} s)", flush=True)
        return rec

    def fingerprint(self, start: str, known: set[str] | None = None) -> str | None:
        """What a finished run's figures depend on besides its method, preset and seed: the align
        settings and the two start models' training runs. A record with another one is stale. With
        `known` (the align keys a record's spec had), a key added to the schema since counts only
        where it is set away from its default (the default is what the record's code did)."""
        import hashlib

        from jobs.schema import AlignSpec
        inits = [self.done(start, f"start-{v}") for v in ("full", "withheld")]
        if not all(inits):
            return None
        defaults = AlignSpec().model_dump(mode="json")
        doc = {"align": {k: v for k, v in self.align_doc.items() if k not in ("method", "seed", "init", "rewards")
                         and (known is None or k in known or v != defaults.get(k))},
               "rewards": self.align_doc["rewards"], "starts": [i["run_id"] for i in inits], "presets": PRESETS}
        return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def current(self, start: str, rec: dict) -> bool:
        """A finished run's record holds under today's settings and start models."""
        return rec.get("fingerprint") is not None and rec["fingerprint"] == self.fingerprint(start, set(rec.get("align", {})))

    def align(self, start: str, init: dict, method: str, seed: int, preset: str | None = None,
              seen: bool = False, keep: bool = False) -> dict | None:
        """One alignment run, or its record when it holds; with `keep` (a refit starts from its
        weights) a finished run whose model file is gone — it ran on another machine — runs again."""
        key = f"{'seen' if seen else 'unseen'}-{method}-{preset or 'spec'}-s{seed}"
        rec = self.done(start, key)
        fingerprint = self.fingerprint(start)
        kept = rec is not None and bool(rec.get("model_file")) and model_path(rec).exists()
        if rec and self.current(start, rec) and (kept or not keep):
            return rec
        if self.out_of_time():
            return None
        from ray_jobs.align import run
        spec = self.align_spec(start, str(model_path(init)), method, seed, seen, PRESETS[preset] if preset else None)
        t0 = time.perf_counter()
        out = run(spec, run_name=f"bench-align-{start}-{key}-{fingerprint or 'unpinned'}", register=False)
        history = self.history(spec, out.run_id)
        rec = {"start": start, "method": method, "seed": seed, "preset": preset, "seen_rewards": seen,
               "fingerprint": fingerprint, "model_file": out.model.model_file,
               "rewards": spec.align.rewards.model_dump(), "run_id": out.run_id, "steps": out.steps,
               "seconds": out.seconds, "wall_seconds": time.perf_counter() - t0, "last_step": out.last_step,
               "evals": out.evals, "curve": [{"step": h["step"], **{k: h.get(k) for k in CURVE_KEYS}} for h in history],
               **out.results, "align": spec.align.model_dump(mode="json"), **provenance()}
        write_result(self.path(start, key), rec)
        print(f"{start} {key}: {out.steps} steps in {out.seconds:.0f} s; test ndcg@10 "
              f"{out.results['aligned_test']['ndcg@10']:.4f} (start {out.results['base_test']['ndcg@10']:.4f}), "
              f"valid {out.results['aligned_valid']['ndcg@10']:.4f}", flush=True)
        return rec

    def refit_spec(self, start: str, source: dict) -> tuple[JobSpec, str]:
        """A refit's spec (no `init_from` yet: the source's file may be on another machine) and its
        fingerprint: that spec and the source's run."""
        import hashlib
        spec = load_spec(STARTS[start], ["train.fit_on=train", "train.withhold=0", *self.args.start_set,
                                         f"train.epochs={self.args.refit}", *self.args.refit_set])
        doc = spec.model_dump(mode="json")
        doc["train"].pop("init_from")  # the source is named by its run
        return spec, hashlib.sha1(json.dumps({"spec": doc, "source": source["run_id"]}, sort_keys=True)
                                  .encode()).hexdigest()[:10]

    def refit_done(self, start: str, source: dict | None, name: str) -> bool:
        rec = self.done(start, f"refit-{name}")
        return bool(source and rec and rec.get("fingerprint") == self.refit_spec(start, source)[1])

    def refit(self, start: str, source: dict, name: str) -> dict | None:
        """`--refit N`: N epochs of next-item training on every training item (train.withhold=0, the
        start's other training settings, `--refit-set` on top), warm-started from `source` (a start
        model, or a model aligned from the withheld one), the epoch chosen on validation: the served
        model loses no data, and the refits of the starts are the controls that tell what alignment
        added from what the extra epochs did."""
        from ray_jobs.train import run as train
        key = f"refit-{name}"
        spec, fingerprint = self.refit_spec(start, source)
        rec = self.done(start, key)
        if rec and rec.get("fingerprint") == fingerprint:
            return rec
        if self.out_of_time():
            return None
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"init_from": str(model_path(source))})})
        t0 = time.perf_counter()
        out = train(spec, run_name=f"bench-align-{start}-{key}-{fingerprint}", register=False)
        # the training record's figures are accuracy only: beyond-accuracy ones from the evaluate job
        from ray_jobs.evaluate import run as evaluate
        figures = evaluate(spec, [out.model_file], ("valid", "test"), spec.train.workers).models[0].results
        src_test = source.get("aligned_test") or source["test"]
        rec = {"start": start, "refit_of": name, "source_run_id": source["run_id"], "method": source.get("method"),
               "seed": source.get("seed"), "fingerprint": fingerprint, "epochs": self.args.refit,
               "refit_set": self.args.refit_set, "run_id": out.run_id, "best_epoch": out.best_epoch,
               "seconds": out.seconds, "wall_seconds": time.perf_counter() - t0, "valid": figures["valid"],
               "test": figures["test"], "source_test": src_test,
               "source_valid": source.get("aligned_valid") or source["valid"],
               "spec": spec.model_dump(mode="json"), **provenance()}
        write_result(self.path(start, key), rec)
        print(f"{start} {key}: test ndcg@10 {figures['test']['ndcg@10']:.4f} (before the refit "
              f"{src_test['ndcg@10']:.4f}), valid {figures['valid']['ndcg@10']:.4f} "
              f"(epoch {out.best_epoch} of {self.args.refit}, {out.seconds:.0f} s)", flush=True)
        return rec

    @staticmethod
    def history(spec: JobSpec, run_id: str) -> list[dict]:
        import tempfile

        import mlflow
        local = mlflow.MlflowClient(tracking_uri(spec)).download_artifacts(run_id, "alignment_curves.json",
                                                                          tempfile.mkdtemp())
        return json.loads(Path(local).read_text())["steps"]

    def run(self, starts: list[str], methods: list[str], seeds: list[int], sweep: bool) -> None:
        """Seed by seed over every start, so a cut run leaves complete seeds; the sweep last."""
        inits = {}
        for start in starts:
            inits[start] = {v: self.train_start(start, v) for v in ("full", "withheld")}
        for seed in seeds:
            for start in starts:
                full, withheld = inits[start]["full"], inits[start]["withheld"]
                if withheld:
                    for method in methods:
                        self.align(start, withheld, method, seed)
                if full and "blade" in methods:
                    self.align(start, full, "blade", seed, seen=True)
        if self.args.refit:
            for start in starts:
                full, withheld = inits[start]["full"], inits[start]["withheld"]
                if full:  # the served model given the same epochs: the bar a refit of an aligned model must pass
                    self.refit(start, full, "start-full")
                if not withheld:
                    continue
                self.refit(start, withheld, "start-withheld")
                for seed in seeds:
                    for method in self.args.refit_methods.split(","):
                        # a refit done from the current aligned run holds without that run's file
                        if self.refit_done(start, self.align(start, withheld, method, seed), f"{method}-s{seed}"):
                            continue
                        aligned = self.align(start, withheld, method, seed, keep=True)
                        if aligned:
                            self.refit(start, aligned, f"{method}-s{seed}")
        if sweep:
            for start in starts:
                if inits[start]["withheld"]:
                    for method in SWEEP_METHODS:
                        for preset in PRESETS:
                            self.align(start, inits[start]["withheld"], method, seeds[0], preset)

    # -------------------------------------------------------------- report (from every finished run)
    def report(self, starts: list[str]) -> dict:
        blocks, tables = {}, []
        for start in starts:
            recs = [json.loads(p.read_text()) for p in sorted((self.dir / start).glob("*.json"))]
            starts_ = {r["variant"]: r for r in recs if "variant" in r}
            refits = [r for r in recs if "refit_of" in r]
            aligns = [r for r in recs if "method" in r and "refit_of" not in r]
            runs = [r for r in aligns if self.current(start, r)]
            if len(runs) < len(aligns):
                print(f"{start}: {len(aligns) - len(runs)} records of other settings left out")
            if not starts_:
                continue
            rows, start_valid = [], {}
            for v, r in sorted(starts_.items()):  # an alignment run from it has every figure of the start
                base = next((a for a in runs if a["seen_rewards"] == (v == "full")), None)
                test, valid = (base["base_test"], base["base_valid"]) if base else (r["test"], r["valid"])
                start_valid[v] = valid  # (the training record's figures are accuracy only)
                rows.append({"model": f"start, {v}" + (" (served)" if v == "full" else f" (withhold {r['withhold']})"),
                             "n": 1, **{c: (test[c], 0.0) for c in COLUMNS if c in test},
                             "valid_ndcg@10": (valid["ndcg@10"], 0.0)})
            groups: dict[str, list[dict]] = {}
            for r in runs:
                if r["preset"] is None:
                    groups.setdefault(r["method"] + (" (seen rewards)" if r["seen_rewards"] else ""), []).append(r)
            chosen, frontier = {}, {}
            withheld = start_valid.get("withheld")
            for method in SWEEP_METHODS:
                points = {}  # one point per preset: its lowest seed's
                for r in sorted((r for r in runs if r["method"] == method and r["preset"] is not None),
                                key=lambda r: -r["seed"]):
                    points[r["preset"]] = r
                points = list(points.values())
                if points and withheld:
                    pick = choose(points, withheld)
                    chosen[method] = pick["preset"]
                    frontier[method] = [{"preset": p["preset"], **{k: p["aligned_valid"][k] for k in
                                                                   ("ndcg@10", "tail_share@10", "ild@10")}}
                                        for p in points]
                    groups[f"{method} [{pick['preset']}]"] = [pick]
            for name, rs in groups.items():
                rows.append({"model": name, "n": len(rs), **{c: mean_std([r["aligned_test"][c] for r in rs]) for c in COLUMNS},
                             "valid_ndcg@10": mean_std([r["aligned_valid"]["ndcg@10"] for r in rs]),
                             "last_kl": mean_std([(r["last_step"] or {}).get("kl", 0.0) for r in rs]),
                             "align_seconds": mean_std([r["seconds"] for r in rs])})
            # refits (--refit): grouped by source kind; a refit of a run that no longer holds is left out
            current_ids = {r.get("run_id") for r in runs} | {r.get("run_id") for r in starts_.values()}
            refit_groups: dict[str, list[dict]] = {}
            for r in refits:  # one row per source kind and refit setting
                if r["source_run_id"] in current_ids:
                    label = r["method"] or r["refit_of"].replace("start-", "") + " start"
                    how = f"{r['epochs']} ep." + (f" [{', '.join(r['refit_set'])}]" if r.get("refit_set") else "")
                    refit_groups.setdefault(f"refit {how} from {label}", []).append(r)
            for name, rs in sorted(refit_groups.items()):
                rows.append({"model": name, "n": len(rs), **{c: mean_std([r["test"][c] for r in rs])
                                                             for c in COLUMNS if c in rs[0]["test"]},
                             "valid_ndcg@10": mean_std([r["valid"]["ndcg@10"] for r in rs])})
            lines = [f"**{start}** (test split; aligned rows mean ± std over n seeds)", "",
                     "| model | n | " + " | ".join(COLUMNS) + " | valid ndcg@10 | last KL | align s |",
                     "|---" * (len(COLUMNS) + 5) + "|"]
            for r in rows:
                cells = ["–" if c not in r else f"{r[c][0]:.4f} ± {r[c][1]:.4f}" if r["n"] > 1 else f"{r[c][0]:.4f}"
                         for c in (*COLUMNS, "valid_ndcg@10")]
                kl = f"{r['last_kl'][0]:.2f}" if "last_kl" in r else "–"
                secs = f"{r['align_seconds'][0]:.0f}" if "align_seconds" in r else "–"
                lines.append(f"| {r['model']} | {r['n']} | " + " | ".join(cells) + f" | {kl} | {secs} |")
            tables.append("\n".join(lines))
            curves = {name: average_curves([r["curve"] for r in rs]) for name, rs in groups.items()
                      if all(r["curve"] for r in rs)}
            png = self.plots(start, curves, {name: average_evals([r["evals"] for r in rs]) for name, rs in groups.items()
                                             if all(r["evals"] for r in rs)}, frontier, start_valid)
            # a sweep point not chosen keeps its validation figures only: the choice is made on them, and
            # its test figures (the align job evaluates both) are not reported
            picked = set(chosen.items())
            shown = [r if r["preset"] is None or (r["method"], r["preset"]) in picked else
                     {k: v for k, v in r.items() if k not in ("aligned_test", "base_test")} for r in runs]
            blocks[start] = {"table": rows, "chosen": chosen, "frontier": frontier, "plots": png,
                             "starts": starts_, "runs": shown, "refits": [r for rs in refit_groups.values() for r in rs]}
        return {"blocks": blocks, "table_md": "\n\n".join(tables)}

    def plots(self, start: str, curves: dict, evals: dict, frontier: dict, start_valid: dict) -> list[str]:
        from ray_jobs.tracking import plot_alignment_curves
        stem = Path(self.args.out).with_suffix("")
        out = []
        if curves:
            out.append(plot_alignment_curves(curves, f"{stem}-{start}-curves.png", evals))
        if frontier:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for ax, y in zip(axes, ("tail_share@10", "ild@10")):
                for method, pts in frontier.items():
                    xy = [(p["ndcg@10"], p[y]) for p in pts]
                    line = ax.scatter(*zip(*xy), label=method)
                    front = pareto(xy)
                    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color=line.get_facecolor()[0])
                    for (x_, y_), p in zip(xy, pts):
                        ax.annotate(p["preset"], (x_, y_), fontsize=6)
                for v, valid in start_valid.items():
                    if y in valid:
                        ax.scatter([valid["ndcg@10"]], [valid[y]], marker="*", s=120, color="black")
                        ax.annotate(f"start ({v})", (valid["ndcg@10"], valid[y]), fontsize=7)
                ax.set_xlabel("validation NDCG@10")
                ax.set_ylabel(f"validation {y}")
                ax.legend(fontsize=7)
            fig.suptitle(f"alignment frontier, {start} (one seed per point)")
            fig.tight_layout()
            path = f"{stem}-{start}-frontier.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            out.append(path)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="jobs/specs/movielens-1m-align.yaml", help="the align section every run uses")
    ap.add_argument("--start", default="hstu-orig,hllm-hstu-large",
                    help=f"start models: {', '.join(STARTS)}, or NAME=SPEC for another spec")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--seeds", default="0,1,2", help="align.seed values; every method runs with each")
    ap.add_argument("--sweep", action="store_true", help="also the reward-weight sweep (frontier PNGs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="align spec overrides (align.steps=...)")
    ap.add_argument("--start-set", action="append", default=[], help="overrides for the start models' training")
    ap.add_argument("--refit", type=int, default=0, metavar="N",
                    help="also N epochs of next-item training on every training item from both start models and "
                         "from each model of --refit-methods aligned from the withheld start (each seed), the epoch "
                         "chosen on validation")
    ap.add_argument("--refit-methods", default="blade")
    ap.add_argument("--refit-set", action="append", default=[], help="overrides of the refit's training (train.lr=...)")
    ap.add_argument("--budget-hours", type=float, help="start no run after this much wall time (rerun to resume)")
    ap.add_argument("--report", action="store_true", help="only rebuild the table and plots from finished runs")
    ap.add_argument("--keep-progress", action="store_true",
                    help="only copy each unfinished start training's newest checkpoint beside its record (commit it: "
                         "the next machine resumes from it)")
    ap.add_argument("--runs", default=str(ROOT / "bench/results/alignment-runs"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/alignment-movielens-1m.json"))
    args = ap.parse_args()
    starts = []
    for s in args.start.split(","):
        name, _, path = s.partition("=")
        if path:
            STARTS[name] = path
        starts.append(name)
    unknown = [s for s in starts if s not in STARTS]
    if unknown:
        raise SystemExit(f"--start: unknown start model(s) {unknown}; known: {', '.join(STARTS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    bench = Bench(args)
    if args.keep_progress:
        bench.keep_progress(starts)
        return
    if not args.report:
        ensure_gold(bench.start_spec(starts[0], "full"))
        bench.run(starts, args.methods.split(","), seeds, args.sweep)
    rep = bench.report(starts)
    print(rep["table_md"])
    doc = {**provenance(), "command": "python bench/alignment.py " + " ".join(sys.argv[1:]), "spec": args.spec,
           "align": bench.align_doc, "starts": starts, "seeds": seeds, "presets": PRESETS, **rep}
    write_result(args.out, doc)
    import mlflow
    spec = load_spec(args.spec, args.overrides)
    mlflow.set_tracking_uri(tracking_uri(spec))
    mlflow.set_experiment(spec.tracking.experiment)
    with mlflow.start_run(run_name="bench-alignment"):
        mlflow.log_text(rep["table_md"], "alignment_table.md")
        mlflow.log_dict(doc, "alignment.json")
        for block in rep["blocks"].values():
            for png in block["plots"]:
                mlflow.log_artifact(png, "plots")


def ensure_gold(spec: JobSpec) -> None:
    """Build the gold tables with the ETL when this spec's lake has none yet."""
    from ray_jobs.data import load_sequences
    try:
        load_sequences(spec)
    except FileNotFoundError:
        from spark.etl import engine_for, run_etl
        print(f"building the gold tables of {spec.data.name} under {spec.lake.root}", flush=True)
        with engine_for(spec) as engine:
            run_etl(spec, engine)


if __name__ == "__main__":
    main()
