"""The Ray layer's pieces that need no cluster: collectives (on a real two-process gloo group), the
device they run on, that no loop calls torch.distributed around them, checkpoints as data, atomic
writes, and the jobs' entry point."""
from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from jobs.contracts import RunProgress
from jobs.files import write_atomic
from jobs.schema import MODEL_KINDS, model_section
from jobs.spec import load_spec
from ray_jobs.catalogue import Catalogue
from ray_jobs.checkpoint import ModelCheckpoint, load, load_model, read_model, save_model
from ray_jobs.models import build_model
from ray_jobs.distributed import Collectives, collective_device

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "barrier", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "all_to_all", "gather", "scatter"}


def test_collective_device_follows_the_process_group_backend():
    cuda = torch.device("cuda", 3)
    assert collective_device("nccl", cuda) == cuda
    assert collective_device("cpu:gloo,cuda:nccl", cuda) == cuda
    assert collective_device("gloo", cuda) == torch.device("cpu")
    assert collective_device("gloo", torch.device("cpu")) == torch.device("cpu")


def test_no_loop_calls_torch_distributed_around_the_backend():
    """Every collective of the jobs goes through distributed.Collectives, which puts tensors on the
    device the process group handles (NCCL takes CUDA tensors only). The one exception is the
    differentiable all-gather of the loss's negatives, which runs on the model's own device."""
    offenders = []
    for path in sorted((ROOT / "ray_jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in ("dist", "torch.distributed") or owner.startswith("torch.distributed"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
        if path.name == "losses.py":
            assert "from torch.distributed.nn.functional import all_gather" in path.read_text()
    assert sorted(offenders) == sorted(f"ray_jobs/distributed.py:{n}" for n in _collectives_lines()), offenders


def _collectives_lines() -> list[str]:
    """The lines of Collectives' own calls (the only place allowed)."""
    src = (ROOT / "ray_jobs" / "distributed.py").read_text()
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Collectives")
    return [f"{n.lineno} dist.{n.func.attr}" for n in ast.walk(cls)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in COLLECTIVES]


def _worker(rank: int, store: str, out) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    comm = Collectives()
    x = torch.tensor([1.0 + rank, 10.0 * rank])
    out.put((rank, comm.rank, comm.world, comm.device.type, comm.all_sum(x).tolist(), comm.all_max(x).tolist(),
             comm.all_gather_object({"rank": rank}), x.tolist()))
    comm.barrier()
    dist.destroy_process_group()


def test_collectives_on_a_real_two_process_group(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    for rank, (r, comm_rank, world, device, total, peak, gathered, untouched) in enumerate(results):
        assert (r, comm_rank, world, device) == (rank, rank, 2, "cpu")
        assert total == [3.0, 10.0] and peak == [2.0, 10.0] and gathered == [{"rank": 0}, {"rank": 1}]
        assert untouched == [1.0 + rank, 10.0 * rank]  # the caller's tensor is not reduced in place
    single = Collectives()
    assert not single.active and single.all_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    assert single.all_gather_object("x") == ["x"]


# ----------------------------------------------------------------------------- checkpoints as data

class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    evil = tmp_path / "model.pt"
    marker = tmp_path / "marker"
    torch.save({"format": "llmrec-checkpoint/1", "weights": Payload(str(marker))}, evil)
    torch.load(evil, weights_only=False)  # what an unguarded loader does: the file runs code
    assert marker.read_text() == "ran"
    marker.unlink()
    for loader in (load, read_model, load_model):
        with pytest.raises(ValueError, match=r"model\.pt: refusing to load it: not a checkpoint of plain tensors"):
            loader(str(evil))
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as fh:
        pickle.dump({"x": Payload(str(marker))}, fh)
    with pytest.raises(ValueError, match="refusing to load it"):
        load(str(plain))
    assert not marker.exists()


def test_model_checkpoint_round_trip_and_catalogue_check(tmp_path):
    spec = load_spec("movielens-100k-smoke", ["model.dim=8"])
    items = ["", "Title: A.", "Title: B.", "Title: C."]
    model = build_model(spec, items)
    ids = ["", "a", "b", "c"]
    ckpt = ModelCheckpoint.of({k: v.clone() for k, v in model.state_dict().items()}, spec, Catalogue(ids, items),
                              {"item_index": 4, "sequences": 2}, RunProgress(best_epoch=3, history=[{"loss": 1.5}]))
    path = save_model(str(tmp_path / "m.pt"), ckpt)
    again, back = load_model(path)
    assert back.spec == spec and back.item_text == items and back.item_ids == ids and back.progress.best_epoch == 3
    assert back.seen.tolist() == [False, True, True, True]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert back.check_catalogue(Catalogue(ids, items), 9, "m.pt").identical  # same items, another version: accepted
    grown = back.check_catalogue(Catalogue(ids + ["d"], items + ["Title: D."]), 5, "m.pt")  # one extends the other
    assert (grown.known, grown.new_items, grown.changed) == (3, 1, [])
    edited = back.check_catalogue(Catalogue(ids, ["", "Title: A.", "Title: Z.", "Title: C."]), 5, "m.pt")
    assert edited.changed == [2] and not edited.identical  # a changed text is not a mismatch
    with pytest.raises(ValueError, match=r"m\.pt: the model was trained on a catalogue of 3 items \(item_index version "
                                         r"4 vs 5\) .* index 2 names another item id \('b' then, 'z' now\)"):
        back.check_catalogue(Catalogue(["", "a", "z", "c"], items), 5, "m.pt")
    with pytest.raises(ValueError, match="catalogue of 3 items .* now hold 2"):
        back.check_catalogue(Catalogue(ids[:3], items[:3]), 5, "m.pt")
    # a checkpoint written before item ids were recorded: known by its texts
    old = ModelCheckpoint(ckpt.weights, spec, items, {"item_index": 4})
    assert old.check_catalogue(Catalogue(["", "x", "y", "z", "w"], items + ["Title: D."]), 5, "old").new_items == 1
    with pytest.raises(ValueError, match="index 2 names another item text"):
        old.check_catalogue(Catalogue(ids, ["", "Title: A.", "Title: Z.", "Title: C."]), 5, "old")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an llmrec model checkpoint"):
        read_model(str(tmp_path / "other.pt"))


FLAT_MODEL_SECTIONS = json.loads((Path(__file__).parent / "fixtures" / "flat-model-sections.json").read_text())


def _saved_flat(path: Path, kind: str) -> Path:
    """The checkpoint at `path` as versions before the model union wrote it: one flat model section
    holding every kind's fields (the fixture is such a section, dumped by that code)."""
    payload = load(str(path))
    flat = {**FLAT_MODEL_SECTIONS[kind], "cache_dir": payload["spec"]["model"]["cache_dir"]}
    # the same settings: the flat section read the way old checkpoints are (fields added since: defaults)
    assert MODEL_KINDS[kind].model_validate(model_section(flat, lenient=True)).model_dump(mode="json") == \
        payload["spec"]["model"]
    payload["spec"]["model"] = flat
    old = path.with_name(f"flat-{path.name}")
    write_atomic(str(old), lambda tmp: torch.save(payload, tmp))
    return old


def _as_saved(model, p: Path, new: Path):
    """The model section a checkpoint loads with: an old one's item texts were padded left."""
    return model if p == new else model.model_copy(update={"item_text_padding": "left"})


def test_a_checkpoint_with_the_old_flat_model_section_evaluates_identically(tmp_path, ml100k_lake):
    from ray_jobs.data import load_sequences
    from ray_jobs.scoring import evaluate_split, load_for_catalogue
    spec = load_spec("movielens-100k-smoke", [f"lake.root={ml100k_lake}", "model.block=original"])
    data = load_sequences(spec)
    torch.manual_seed(0)
    model = build_model(spec, data.item_text)
    path = Path(save_model(str(tmp_path / "sasrec.pt"), ModelCheckpoint.of(model.state_dict(), spec, data.catalogue,
                                                                           data.versions)))
    metrics = []
    for p in (path, _saved_flat(path, "sasrec")):
        loaded = load_for_catalogue(str(p), data.catalogue)
        assert loaded.ckpt.spec.model == _as_saved(spec.model, p, path)
        metrics.append(evaluate_split(spec, loaded.score_function(), data, "valid", scorable=loaded.scorable).metrics)
    assert metrics[0] == metrics[1] and metrics[0]["ndcg@10"] > 0


def test_an_hllm_checkpoint_with_the_old_flat_model_section_scores_identically(tmp_path):
    spec = load_spec("movielens-100k-smoke", ["model.kind=hllm", "model.item_llm=minilm", "model.mode=cached",
                                              "model.user_dropout=0.2", f"model.cache_dir={tmp_path}/cache"])
    items, ids = ["", "Title: A.", "Title: B.", "Title: C."], ["", "a", "b", "c"]
    torch.manual_seed(0)
    model = build_model(spec, items)
    path = Path(save_model(str(tmp_path / "hllm.pt"), ModelCheckpoint.of(model.state_dict(), spec,
                                                                         Catalogue(ids, items), {"item_index": 1})))
    history = torch.tensor([[0, 1, 2], [1, 3, 2]])
    scores = []
    for p in (path, _saved_flat(path, "hllm")):
        again, ckpt = load_model(str(p))
        assert ckpt.spec.model == _as_saved(spec.model, p, path)
        with torch.no_grad():
            scores.append(again.user_embeddings(history) @ again.all_item_embeddings().T)
    assert torch.equal(scores[0], scores[1])


@pytest.mark.parametrize("kind,shapes", [(["model.kind=sasrec"], False), (["model.kind=hstu"], False),
                                          (["model.kind=hllm", "model.item_llm=minilm"], True),
                                          (["model.kind=hllm", "model.item_llm=random:llama"], False),
                                          (["model.kind=hllm", "model.item_llm=smollm2"], False),
                                          (["model.kind=generative"], True)])
def test_the_item_text_padding_belongs_to_a_trained_model_only_where_it_shapes_its_weights(kind, shapes):
    """An old checkpoint (padding left) warm-starts and resumes under a new spec (right) unless its
    weights read padded text: an HLLM's encoder item LLM, a generative model's tokenizer input. A
    causal item LLM's cache is the same folder under either padding (its vectors are the same)."""
    from ray_jobs.loop import trained_section, training_changes
    from ray_jobs.models.llm import cache_settings, minilm_settings
    right = load_spec("movielens-100k-smoke", kind)
    left = load_spec("movielens-100k-smoke", [*kind, "model.item_text_padding=left"])
    assert (trained_section(left.model) != trained_section(right.model)) == shapes
    assert training_changes(left, right) == (["model.item_text_padding: 'left' -> 'right'"] if shapes else [])
    if right.model.kind == "hllm":
        assert (cache_settings(left.model) != cache_settings(right.model)) == shapes
    # the MiniLM space ILD is measured in follows the field for every kind
    assert cache_settings(minilm_settings(left.model)) != cache_settings(minilm_settings(right.model))
    from ray_jobs.align import with_init_model
    aligned = with_init_model(right, ModelCheckpoint({}, left, [""], {}), "old", None).model
    # aligning an old start: its weights' padding where it shapes them, else the spec's space
    assert aligned.item_text_padding == ("left" if shapes else "right")


def test_write_atomic_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    write_atomic(str(target), lambda tmp: Path(tmp).write_text("one"))
    assert target.read_text() == "one"

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(str(target), broken)
    assert target.read_text() == "one" and os.listdir(target.parent) == ["f.txt"]


# ----------------------------------------------------------------------------- entry point

@pytest.mark.slow
def test_job_entry_points_report_user_mistakes_in_one_line(tmp_path):
    for job, args, message in [
        ("evaluate", ["--set", "train.epochs=0"], "error: spec jobs/specs/movielens-100k-smoke.yaml: 'train.epochs'"),
        ("recommend", ["--model", str(tmp_path / "missing.pt")], f"error: no trained model at {tmp_path / 'missing.pt'}"),
    ]:
        proc = subprocess.run([sys.executable, "-m", f"ray_jobs.{job}", "--spec", "jobs/specs/movielens-100k-smoke.yaml",
                               *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [x for x in proc.stderr.splitlines() if x.strip() and "Warning" not in x and "warn" not in x]
        assert lines[-1].startswith(message) and "Traceback" not in proc.stderr


def without_preload() -> dict[str, str]:
    """This environment less an allocator preload (`make test` runs the suite on jemalloc)."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}


FRAGMENTS = """
import torch
from ray_jobs.distributed import return_freed_memory
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
assert return_freed_memory()
big = torch.ones(24 << 18)  # a 24 MiB block freed: by default glibc's mmap threshold would rise to it
del big
kept, freed = [], []
for _ in range(64):  # 4 MiB activations interleaved with small tensors that stay alive
    freed.append(torch.ones(1 << 20))
    kept.append(torch.ones(1 << 10))
before = rss()
del freed
print((before - rss()) / 2 ** 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_processes_give_freed_activations_back_to_the_os():
    """`return_freed_memory` (called by run_epochs / run_steps): 64 freed 4 MiB blocks between live
    small ones go back to the OS instead of staying resident as heap fragments (a clean process, so
    no earlier test has moved the allocator's threshold)."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTS], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env=without_preload())
    assert float(out.stdout.strip()) >= 0.9 * 256, out.stdout


def test_the_allocator_each_cpu_allocator_setting_gives_a_jobs_processes(monkeypatch):
    import jobs.allocator as allocator
    from jobs.errors import SpecError
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/lib/libjemalloc.so.2")

    def env(*overrides: str) -> dict:
        return allocator.allocator_env(load_spec("movielens-100k-smoke", list(overrides)))
    kept = {"LD_PRELOAD": "/lib/libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    assert env() == kept  # auto, a CPU job
    from jobs.rayjob import job_runtime_env  # a submitted job's driver starts with it (Jobs API, Dagster)
    assert job_runtime_env(load_spec("movielens-100k-smoke"))["env_vars"].items() >= kept.items()
    assert env("train.use_gpu=true") == {} and env("train.use_gpu=true", "cluster.cpu_allocator=jemalloc") == kept
    assert env("cluster.cpu_allocator=system") == {}
    assert allocator.ray_runtime_env(load_spec("movielens-100k-smoke"), OMP_NUM_THREADS="2") == {
        "env_vars": {**kept, "OMP_NUM_THREADS": "2"}}
    assert allocator.ray_runtime_env(load_spec("movielens-100k-smoke", ["cluster.cpu_allocator=system"])) is None
    monkeypatch.setenv("LD_PRELOAD", "/lib/libtcmalloc.so.4")
    assert env() == {}  # someone else's preload is left alone, unless jemalloc is asked for
    assert env("cluster.cpu_allocator=jemalloc")["LD_PRELOAD"] == "/lib/libjemalloc.so.2:/lib/libtcmalloc.so.4"
    monkeypatch.setenv("LD_PRELOAD", "/lib/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "narenas:2")
    assert env() == {"LD_PRELOAD": "/lib/libjemalloc.so.2", "MALLOC_CONF": "narenas:2"}  # what the process has
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    assert env() == {}
    with pytest.raises(SpecError, match=r"cluster\.cpu_allocator=jemalloc: libjemalloc\.so\.2 is not installed"):
        env("cluster.cpu_allocator=jemalloc")
    with pytest.raises(SpecError, match="cluster.cpu_allocator"):
        env("cluster.cpu_allocator=tcmalloc")


PROBE_JOB = """
import os, sys
from dataclasses import dataclass
from jobs.contracts import Record
from ray_jobs.entrypoint import job_main

@dataclass
class Seen(Record):
    pid: int
    jemalloc_mapped: bool
    malloc_conf: str | None

sys.exit(job_main("probe", lambda ap: None, lambda spec, args: Seen(
    os.getpid(), "libjemalloc" in open("/proc/self/maps").read(), os.environ.get("MALLOC_CONF"))))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a preloaded shared library")
def test_a_job_process_restarts_itself_with_its_allocator_keeping_its_pid():
    """`make install` installs libjemalloc2; a job started without the preload (as Dagster or `ray job
    submit` start it), or an `llmrec` command that runs a model in its own process, re-executes itself
    with it, as the same process; cluster.cpu_allocator=system keeps the system's. `python -m
    jobs.allocator CMD` runs CMD with it."""
    env = without_preload()
    for overrides, mapped, conf in [([], True, "dirty_decay_ms:-1,muzzy_decay_ms:-1"),
                                    (["--set", "cluster.cpu_allocator=system"], False, None)]:
        proc = subprocess.Popen([sys.executable, "-c", PROBE_JOB, "--spec", "movielens-100k-smoke", *overrides],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out[out.index("{"):]) == {"pid": proc.pid, "jemalloc_mapped": mapped, "malloc_conf": conf}
    # `llmrec evaluate` (in its own process) too: the loader's record of what it loaded names the preload
    for overrides, mapped in [([], True), (["--set", "cluster.cpu_allocator=system"], False)]:
        proc = subprocess.run([str(Path(sys.executable).parent / "llmrec"), "evaluate", "--spec", "movielens-100k-smoke",
                               "--set", "lake.root=/nonexistent-lake", *overrides], cwd=ROOT,
                              env={**env, "LD_DEBUG": "files"}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "error: dataset movielens-100k at /nonexistent-lake" in proc.stderr
        assert ("libjemalloc" in proc.stderr) == mapped
    # and `python -m jobs.allocator CMD`, what `make test` runs the suite under
    from jobs.allocator import find_jemalloc
    shown = subprocess.run([sys.executable, "-m", "jobs.allocator", "sh", "-c", "echo $LD_PRELOAD $MALLOC_CONF"],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == [find_jemalloc(), "dirty_decay_ms:-1,muzzy_decay_ms:-1"]


def test_a_local_ray_that_misses_a_start_up_deadline_is_started_again(monkeypatch):
    """A loaded machine: the GCS server binds its port after the wait, or the raylet times out; each
    such start is torn down — the processes it left behind killed — and retried; any other failure,
    and the last attempt's, is raised."""
    import psutil
    import ray

    from ray_jobs.runtime import start_local_ray
    calls = {"init": 0, "shutdown": 0}
    left: list[subprocess.Popen] = []
    failures = [RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0"),
                Exception("The current node timed out during startup.")]

    def init(**kwargs):
        calls["init"] += 1
        if failures:
            left.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))  # a slow GCS
            raise failures.pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1))
    start_local_ray(1, {})
    assert calls == {"init": 3, "shutdown": 2} and len(left) == 2
    assert not any(psutil.pid_exists(p.pid) for p in left)  # killed (and reaped), not left beside the new start
    failures[:] = [RuntimeError("Timed out waiting for file x")] * 3
    with pytest.raises(RuntimeError, match="Timed out waiting for file"):
        start_local_ray(1, {}, attempts=3)
    failures[:] = [ValueError("num_cpus must be positive")]
    with pytest.raises(ValueError, match="num_cpus"):
        start_local_ray(1, {})
    assert calls["init"] == 3 + 3 + 1 and len(left) == 6 and not any(psutil.pid_exists(p.pid) for p in left)


def _ray_run_folder(storage: Path, name: str, checkpoints: list[str], ray_version: str) -> Path:
    """A Ray Train V2 run folder as it leaves it: checkpoint folders and the manager's snapshot."""
    folder = storage / name
    results = []
    for i, c in enumerate(checkpoints):
        (folder / c / "state").mkdir(parents=True)
        (folder / c / "model.pt").write_bytes(b"weights %d" % i)
        (folder / c / "state" / "optim.pt").write_bytes(b"optimizer %d" % i)
        (folder / c / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
        results.append({"version": 0, "checkpoint_dir_name": c, "metrics": {"epoch": i + 1}})
    (folder / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": ray_version, "checkpoint_results": results, "checkpoint_report_indices": [4, 7][:len(results)],
        "latest_checkpoint_result": results[-1], "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": 8, "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))
    return folder


def test_a_runs_kept_progress_holds_its_newest_checkpoint_alone_and_restores_only_where_it_can(tmp_path, monkeypatch):
    """`keep_run_progress` copies the newest checkpoint (not DeepSpeed's scripts) with a snapshot that
    lists it alone, replacing what was kept; `restore_run_progress` puts it where Ray Train resumes,
    over a folder a run cut before its first checkpoint left, never over a run's own checkpoints, and
    refuses progress kept under another Ray version. (That Ray Train resumes from it:
    test_distributed's killed-worker test.)"""
    import ray

    from ray_jobs import runtime
    spec = load_spec("movielens-100k-smoke", [f"train.storage_path={tmp_path}/ray"])
    kept = tmp_path / "kept"
    assert runtime.keep_run_progress(spec, "r", kept) is None and not kept.exists()  # no run yet
    _ray_run_folder(tmp_path / "ray", "r", ["checkpoint_a", "checkpoint_b"], ray.__version__)
    (kept / "stale").mkdir(parents=True)
    assert runtime.keep_run_progress(spec, "r", kept) == {"epoch": 2}
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "r/checkpoint_b/model.pt", "r/checkpoint_b/state/optim.pt", "r/checkpoint_manager_snapshot.json"]
    snap = json.loads((kept / "r/checkpoint_manager_snapshot.json").read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["checkpoint_b"]
    assert snap["checkpoint_report_indices"] == [7] and snap["latest_checkpoint_result"]["metrics"] == {"epoch": 2}
    assert not list(tmp_path.glob("kept.*"))  # no .tmp / .old left

    fresh = load_spec("movielens-100k-smoke", [f"train.storage_path={tmp_path}/fresh"])
    (tmp_path / "fresh" / "r").mkdir(parents=True)  # cut before its first checkpoint
    assert runtime.restore_run_progress(fresh, "r", kept)
    assert (tmp_path / "fresh/r/checkpoint_b/model.pt").read_bytes() == b"weights 1"
    assert not runtime.restore_run_progress(fresh, "r", kept)  # the storage holds the run's checkpoints now
    assert not runtime.restore_run_progress(fresh, "other", kept)  # nothing kept under that name

    other = tmp_path / "other-ray"
    _ray_run_folder(other / "ray", "r", ["checkpoint_c"], "2.0.0")
    elsewhere = load_spec("movielens-100k-smoke", [f"train.storage_path={tmp_path}/elsewhere"])
    with pytest.raises(ValueError, match=r"kept under Ray 2\.0\.0; this is Ray "):
        runtime.restore_run_progress(elsewhere, "r", other / "ray")
    assert not (tmp_path / "elsewhere" / "r").exists()

    # a snapshot that never reads whole (Ray rewriting it each time): tried again, then the error
    (tmp_path / "ray/r/checkpoint_manager_snapshot.json").write_text('{"ray_version": ')
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    with pytest.raises(ValueError):
        runtime.keep_run_progress(spec, "r", kept)
    assert (kept / "r/checkpoint_b/model.pt").exists() and not list(tmp_path.glob("kept.*"))  # what was kept stays
