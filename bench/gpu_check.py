"""GPU smoke of the training stack: one Ray Train worker on one GPU (NCCL, bf16, DeepSpeed ZeRO-2),
SASRec and a tiny end-to-end HLLM trained for one epoch each on MovieLens-100K, the saved models
evaluated by GPU Ray tasks, and 5 alignment steps from the SASRec model. Prints the figures and
writes bench/results/gpu_check.json (date, GPU, commit, seconds and metrics per stage).

    bash bench/gpu_check.sh            (runs this with the project's Python)
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from jobs.provenance import provenance, write_result

SMOKE = "jobs/specs/movielens-100k-smoke.yaml"
TINY_LLM = "{hidden: 64, layers: 2, heads: 2, intermediate: 128}"


def main() -> None:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device")
    from jobs.spec import load_spec
    from ray_jobs import align, evaluate, train
    from spark.etl import engine_for, run_etl
    tmp = Path(tempfile.mkdtemp(prefix="llmrec-gpu-"))
    common = [f"lake.root={tmp}/lake", f"train.storage_path={tmp}/ray", f"train.checkpoint_dir={tmp}/ckpt",
              f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"model.cache_dir={tmp}/cache", "train.workers=1",
              "train.use_gpu=true", "train.cpus_per_worker=2", "train.deepspeed=zero2", "train.epochs=1",
              "train.batch_size=128", "train.max_failures=0"]
    report: dict = {**provenance(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "stages": {}}

    def stage(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        report["stages"][name] = {"seconds": round(time.perf_counter() - t0, 1), **out}
        print(f"{name}: {json.dumps(report['stages'][name])}", flush=True)

    def etl():
        spec = load_spec(SMOKE, common)
        with engine_for(spec) as engine:
            summary = run_etl(spec, engine)
        return {"users": summary.gold.users, "items": summary.gold.items}

    def trained(name: str, *extra: str):
        spec = load_spec(SMOKE, common + [f"name=gpu-{name}", *extra])
        out = train.run(spec)
        return {"steps": out.steps, "stopped": out.stopped, "test_hr@10": out.test["hr@10"],
                "test_ndcg@10": out.test["ndcg@10"], "model_file": out.model_file}

    stage("etl", etl)
    stage("train_sasrec", lambda: trained("sasrec", "model.kind=sasrec", "train.negative_sampling=per_position"))
    stage("train_hllm_tiny", lambda: trained("hllm", "model.kind=hllm", "model.mode=end_to_end",
                                             "model.item_llm=random:llama", f"model.item_llm_size={TINY_LLM}",
                                             f"model.user_llm_size={TINY_LLM}", "model.max_item_tokens=24",
                                             "train.batch_size=64"))
    sasrec = report["stages"]["train_sasrec"]["model_file"]
    stage("evaluate_sasrec", lambda: {k: v for k, v in evaluate.run(
        load_spec(SMOKE, common + ["name=gpu-sasrec"]), [sasrec], ("test",), 1).models[0].results["test"].items()
        if k in ("hr@10", "ndcg@10")})
    stage("align_sasrec_5_steps", lambda: (lambda out: {
        "steps": out.steps, "first_reward": out.first_step["reward_mean"], "last_reward": out.last_step["reward_mean"],
        "kl_last": out.last_kl, "aligned_test_ndcg@10": out.results["aligned_test"]["ndcg@10"]})(align.run(
            load_spec(SMOKE, common + ["name=gpu-sasrec", f"align.init={sasrec}", "align.steps=5",
                                       "align.users_per_step=32", "align.rollouts=8", "align.eval_every=0"]))))
    report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    write_result(Path(__file__).resolve().parent / "results" / "gpu_check.json", report)


if __name__ == "__main__":
    main()
