"""GPU smoke of the training stack: one Ray Train worker on one GPU (NCCL, bf16, DeepSpeed ZeRO-2),
SASRec and a tiny end-to-end HLLM trained for one epoch each on MovieLens-100K, the saved models
evaluated by GPU Ray tasks, and 5 alignment steps from the SASRec model; then one HLLM training step
at a stated size (`STEP_SIZES`: SmolLM2-135M as the item LLM end to end, a 4-layer 576-wide user
Llama) timed inside a Ray worker: its peak GPU memory (measured in the worker), tokens/s, FLOPs
(torch's FlopCounterMode, forward and backward) and MFU against the GPU's dense bf16 peak. Prints
every stage, the step as one JSON line last, and writes bench/results/gpu_check.json.

    bash bench/gpu_check.sh              (runs this with the project's Python)
    python bench/gpu_check.py --dry-run  (no GPU: the step's code path on the CPU at tiny sizes,
                                          MFU left out — what the test suite runs)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from jobs.provenance import provenance, write_result

SMOKE = "jobs/specs/movielens-100k-smoke.yaml"
TINY_LLM = "{hidden: 64, layers: 2, heads: 2, intermediate: 128}"


# The measured HLLM step: item LLM, user LLM, users per step, positions per user, catalogue size.
# Activation checkpointing off, so the counted FLOPs are the model's (no recomputation) and MFU is MFU.
STEP_SIZES = {
    "gpu": {"overrides": ["model.kind=hllm", "model.mode=end_to_end", "model.item_llm=smollm2",
                          "model.user_llm=random:llama",
                          "model.user_llm_size={hidden: 576, layers: 4, heads: 9, kv_heads: 3, intermediate: 1536}",
                          "model.max_item_tokens=32", "model.item_llm_checkpointing=false", "train.negatives=512"],
            "users": 16, "length": 50, "items": 3706},
    "dry-run": {"overrides": ["model.kind=hllm", "model.mode=end_to_end", "model.item_llm=random:llama",
                              f"model.item_llm_size={TINY_LLM}", f"model.user_llm_size={TINY_LLM}",
                              "model.max_item_tokens=16", "model.item_llm_checkpointing=false", "train.negatives=64"],
                "users": 4, "length": 12, "items": 200},
}
# dense bf16 peak FLOP/s by GPU name (vendor data sheets; the SXM parts)
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12,
             "L4": 121.0e12}
GENRES = ["Drama", "Comedy", "Action|Thriller", "Animation|Children's", "Sci-Fi|Adventure", "Romance", "Horror"]


def measure_hllm_step(overrides: list[str], use_gpu: bool, users: int, length: int, items: int,
                      steps: int = 5) -> dict:
    """Runs where it is called (a Ray worker): the spec's HLLM over a synthetic catalogue of `items`
    titled items, AdamW, `users` x `length` positions per step against the spec's shared negatives,
    bf16 autocast on a GPU. One warm-up step, one counted by FlopCounterMode, `steps` timed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from jobs.spec import load_spec
    from ray_jobs.losses import InfoNCE, SequenceLoss
    from ray_jobs.models import build_model
    spec = load_spec(SMOKE, overrides)
    device = torch.device("cuda" if use_gpu else "cpu")
    texts = [""] + [f"Title: Item {i}. Year: {1930 + i % 70}. Genres: {GENRES[i % len(GENRES)]}."
                    for i in range(1, items + 1)]
    torch.manual_seed(0)
    module = SequenceLoss(build_model(spec, texts), InfoNCE(spec.train.temperature)).to(device)
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    rng = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps + 2):
        ids = torch.randint(1, items + 1, (users, length + 1), generator=rng)
        negatives = torch.randint(1, items + 1, (spec.train.negatives,), generator=rng)
        batches.append((ids[:, :-1].to(device), ids[:, 1:].to(device), negatives.to(device)))

    def step(inputs, targets, negatives) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
            loss = module(inputs, targets, negatives)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if use_gpu:
            torch.cuda.synchronize()

    def distinct_items(batch) -> int:  # the items a step embeds: its inputs, targets and negatives
        return len(torch.unique(torch.cat([b.reshape(-1) for b in batch])))

    step(*batches[0])  # warm-up: kernels, the allocator, AdamW's state
    counter = FlopCounterMode(display=False)
    with counter:
        step(*batches[1])
    sync()
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[2:]:
        step(*batch)
    sync()
    seconds = (time.perf_counter() - start) / steps
    distinct = sum(distinct_items(batch) for batch in batches[2:]) / steps
    flops = counter.get_total_flops()
    gpu = torch.cuda.get_device_name(device) if use_gpu else None
    peak = next((v for k, v in PEAK_BF16.items() if gpu and k in gpu), None)
    return {"device": gpu or "cpu", "item_llm": spec.model.item_llm, "mode": spec.model.mode,
            "user_llm_size": spec.model.user_llm_size.model_dump(), "users_per_step": users, "positions": length,
            "trained_params": sum(p.numel() for p in trained), "step_seconds": round(seconds, 6),
            "tokens_per_s": round(users * length / seconds, 1),
            "item_tokens_per_s": round(distinct * spec.model.max_item_tokens / seconds, 1),
            "flops_per_step": int(flops), "counted_item_tokens": distinct_items(batches[1]) * spec.model.max_item_tokens,
            "achieved_tflops": round(flops / seconds / 1e12, 3),
            "mfu": round(flops / seconds / peak, 4) if peak else None,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3) if use_gpu else None}


def not_bf16_share(model_file: str) -> float:
    """Share of the shipped weights' values that bf16 cannot hold: near 1 when the run shipped its fp32
    master copy, 0 when it shipped the bf16 module's weights."""
    import torch

    from ray_jobs.checkpoint import read_model
    values = torch.cat([w.float().ravel() for w in read_model(model_file).weights.values() if w.is_floating_point()])
    return round(float((values != values.bfloat16().float()).float().mean()), 4)


def hllm_step(use_gpu: bool) -> dict:
    """`measure_hllm_step` at its stated size, in a Ray worker (one GPU when use_gpu)."""
    import ray

    from jobs.spec import load_spec
    from ray_jobs.runtime import init_ray
    size = STEP_SIZES["gpu" if use_gpu else "dry-run"]
    init_ray(load_spec(SMOKE, []))
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(measure_hllm_step)
    return ray.get(task.remote(size["overrides"], use_gpu, size["users"], size["length"], size["items"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: the HLLM step's code path on the CPU, tiny sizes")
    ap.add_argument("--out", help="also write the step's JSON here")
    args = ap.parse_args()
    if args.dry_run:
        step = hllm_step(use_gpu=False)
        print(json.dumps({"hllm_step": step}), flush=True)
        if args.out:
            write_result(args.out, {**provenance(), "dry_run": True, "hllm_step": step})
        return
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (--dry-run checks the code path on the CPU)")
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
                "test_ndcg@10": out.test["ndcg@10"], "model_file": out.model_file,
                "shipped_not_bf16_share": not_bf16_share(out.model_file)}

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
        "kl_shipped": out.shipped_kl, "aligned_test_ndcg@10": out.results["aligned_test"]["ndcg@10"]})(align.run(
            load_spec(SMOKE, common + ["name=gpu-sasrec", f"align.init={sasrec}", "align.steps=5",
                                       "align.users_per_step=32", "align.rollouts=8", "align.eval_every=0"]))))
    report["hllm_step"] = hllm_step(use_gpu=True)
    print(json.dumps({"hllm_step": report["hllm_step"]}), flush=True)
    write_result(args.out or Path(__file__).resolve().parent / "results" / "gpu_check.json", report)


if __name__ == "__main__":
    main()
