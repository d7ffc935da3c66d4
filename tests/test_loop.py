"""The one training loop in one process (`LocalBackend`): what it evaluates, when it stops, what it
ships, and resuming from a mid-epoch checkpoint after a crash (MovieLens-100K)."""
import pytest
import torch

from jobs.spec import load_spec
from ray_jobs.checkpoint import read_model
from ray_jobs.data import load_sequences
from ray_jobs.loop import LocalBackend, Reporter, run_epochs, training_state
from ray_jobs.train import train_local


def _spec(lake, tmp_path, *extra):
    return load_spec("jobs/specs/movielens-100k-smoke.yaml",
                     [f"lake.root={lake}", f"train.checkpoint_dir={tmp_path}", "model.dim=16", "train.lr=0.003",
                      "train.batch_size=128", "train.negatives=128", *extra])


def test_budget_stop_between_evaluations_evaluates_and_ships_that_epoch(ml100k_lake, tmp_path):
    spec = _spec(ml100k_lake, tmp_path, "train.epochs=10", "train.eval_every=5", "train.max_minutes=0.000001")
    result = train_local(spec)
    assert result.stopped == "time_budget" and result.epochs_run == 1 and result.steps == 19
    # epoch 1 is not an evaluation epoch (eval_every 5), but the run ends there: it is evaluated
    assert "valid_ndcg@10" in result.history[0] and result.best_epoch == 1
    assert result.best_metric == result.history[0]["valid_ndcg@10"]
    shipped, last = read_model(result.checkpoint), read_model(str(tmp_path / spec.name / "last.pt"))
    assert all(torch.equal(shipped.weights[k], last.weights[k]) for k in last.weights)
    # run again (as after a cut between its stop and its caller's record): it resumes already
    # stopped and trains no further epoch; a larger budget lets it go on
    again = train_local(spec)
    assert again.stopped == "time_budget" and again.epochs_run == 1 and again.steps == 19
    assert read_model(str(tmp_path / spec.name / "last.pt")).progress.stopped == "time_budget"
    longer = train_local(_spec(ml100k_lake, tmp_path, "train.epochs=2", "train.eval_every=5", "train.max_minutes=60"))
    assert longer.stopped == "epochs" and longer.epochs_run == 2


def test_max_steps_ends_the_run_mid_epoch_evaluated(ml100k_lake, tmp_path):
    result = train_local(_spec(ml100k_lake, tmp_path, "train.epochs=5", "train.eval_every=5", "train.max_steps=3"))
    assert result.stopped == "max_steps" and result.steps == 3 and result.epochs_run == 1
    assert "valid_ndcg@10" in result.history[0]


def test_refit_ships_the_newest_weights_and_reports_test(ml100k_lake, tmp_path):
    spec = _spec(ml100k_lake, tmp_path, "train.epochs=3", "train.eval_every=2", "train.fit_on=train_valid")
    result = train_local(spec)
    assert result.stopped == "epochs" and result.best_epoch == 3
    assert [sorted(k for k in h if k.startswith(("valid_", "test_"))) for h in result.history] == \
        [[], ["test_hr@10", "test_hr@50", "test_mrr", "test_ndcg@10"], ["test_hr@10", "test_hr@50", "test_mrr", "test_ndcg@10"]]
    shipped, last = read_model(result.checkpoint), read_model(str(tmp_path / spec.name / "last.pt"))
    assert all(torch.equal(shipped.weights[k], last.weights[k]) for k in last.weights)


def test_early_stopping_keeps_the_best_validation_model(ml100k_lake, tmp_path):
    spec = _spec(ml100k_lake, tmp_path, "train.epochs=40", "train.patience=2", "train.lr=0.05")
    result = train_local(spec)
    scores = [h["valid_ndcg@10"] for h in result.history]
    best = max(range(len(scores)), key=scores.__getitem__)
    assert result.stopped == "early_stopping" and result.epochs_run == best + 1 + 2
    assert result.best_epoch == best + 1 and result.best_metric == scores[best]
    assert read_model(result.checkpoint).progress.best_epoch == best + 1


class CrashAt(Reporter):
    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, step: int, metrics: dict) -> None:
        if step == self.step:
            raise KeyboardInterrupt(f"crash at step {step}")


def test_crash_mid_epoch_resumes_from_the_step_checkpoint_and_replays_exactly(ml100k_lake, tmp_path):
    """A crash after step 27 (checkpoints every 5 steps, 19 steps per epoch) resumes at step 25,
    mid-epoch 2, and ends with the uninterrupted run's history and weights."""
    straight = train_local(_spec(ml100k_lake, tmp_path / "a", "train.epochs=2", "train.checkpoint_every=5"))
    spec = _spec(ml100k_lake, tmp_path / "b", "train.epochs=2", "train.checkpoint_every=5")
    with pytest.raises(KeyboardInterrupt):
        train_local(spec, reporter=CrashAt(27))
    saved = read_model(str(tmp_path / "b" / spec.name / "last.pt")).progress
    assert (saved.step, saved.epoch, saved.batch) == (25, 1, 6)
    data = load_sequences(spec)
    state = training_state(spec, data, torch.device("cpu"))
    backend = LocalBackend(state, str(tmp_path / "b" / spec.name))
    assert backend.restore() and state.restarts == 1 and state.step == 25
    run_epochs(state, backend, data)
    assert state.step == straight.steps == 38
    assert [h["loss"] for h in state.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)
    a, b = read_model(straight.checkpoint).weights, read_model(backend.best).weights
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_rebuilt_catalogue(ml100k_lake, tmp_path):
    spec = _spec(ml100k_lake, tmp_path, "train.epochs=1")
    train_local(spec)
    data = load_sequences(spec)
    data.item_text[5] = "Title: something else entirely."  # a changed text: a run resumes on its own versions only
    state = training_state(spec, data, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"resuming from .*last\.pt: the run started on a catalogue of 1682 items and "
                                         r"the data now holds 1682 \(1 texts changed\)"):
        LocalBackend(state, str(tmp_path / spec.name)).restore()
    data.catalogue.item_ids[5] = "another-item"  # a renumbered index: a mismatch whatever the use
    with pytest.raises(ValueError, match=r"index 5 names another item id"):
        LocalBackend(training_state(spec, data, torch.device("cpu")), str(tmp_path / spec.name)).restore()


# ----------------------------------------------------------------------------- the step loop: which weights ship

class _Policy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(2, 1, bias=False)
        torch.nn.init.zeros_(self.model.weight)


VALID = {0: 0.50, 2: 0.60, 4: 0.55, 6: 0.58}  # validation figures by step: step 2 is the best


def _steps(folder, ship, reporter: Reporter = Reporter()):
    """Six steps that each move the weights (SGD on -sum(w)), evaluated every 2 steps with the
    figures of VALID, checkpointed every 2. Returns the state, its backend and the weights seen at
    each evaluation."""
    from ray_jobs.catalogue import Catalogue
    from ray_jobs.loop import StepPlan, TrainState, run_steps
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml")
    module = _Policy()
    state = TrainState(spec=spec, module=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
                       scheduler=None, catalogue=Catalogue(["", "a", "b"], ["", "a", "b"]), versions={}, stage="align")
    backend = LocalBackend(state, str(folder))
    backend.restore()
    seen = {}

    def evaluate(step: int) -> dict:
        seen[step] = module.model.weight.detach().clone()
        return {"step": step, "ndcg@10": VALID[step]}
    run_steps(state, backend, StepPlan(6, 2, 2, None, ship), lambda _: (-module.model.weight.sum(), {}), evaluate,
              reporter)
    return state, backend, seen


def test_the_step_loop_ships_the_newest_weights_or_the_step_its_plan_names_across_a_resume(tmp_path):
    from jobs.schema import GateSpec
    from ray_jobs.align import gate_step
    state, backend, seen = _steps(tmp_path / "newest", None)
    shipped = read_model(backend.best)
    assert state.shipped_step == shipped.progress.shipped_step == 6
    assert torch.equal(shipped.weights["weight"], seen[6]) and not torch.equal(seen[6], seen[2])

    def ship(evals):
        return gate_step(GateSpec(), evals)
    state, backend, seen = _steps(tmp_path / "gate", ship)
    shipped = read_model(backend.best)
    assert state.shipped_step == shipped.progress.shipped_step == 2
    assert torch.equal(shipped.weights["weight"], seen[2])
    # cut after step 5 (last checkpoint at step 4): the resumed run keeps step 2's weights and still ships them
    with pytest.raises(KeyboardInterrupt):
        _steps(tmp_path / "cut", ship, CrashAt(5))
    first = read_model(str(tmp_path / "cut" / "best.pt"))
    assert first.progress.shipped_step == 2 and torch.equal(first.weights["weight"], seen[2])
    state, backend, _ = _steps(tmp_path / "cut", ship)
    assert state.restarts == 1 and [e["step"] for e in state.evals] == [0, 2, 4, 6]
    assert read_model(backend.best).progress.shipped_step == 2
    assert torch.equal(read_model(backend.best).weights["weight"], seen[2])


def test_a_run_resumes_only_on_the_gold_versions_it_started_on(tmp_path):
    """Local and Ray checkpoints record the gold table versions the run read; a resume on other
    versions (new data under the same catalogue) is refused, naming the tables and how to pin them."""
    import json

    from ray_jobs.catalogue import Catalogue
    from ray_jobs.loop import RunMismatch, TrainState, check_run_folder, run_folder_doc
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml")

    def state(versions: dict, stage: str = "train") -> TrainState:
        module = _Policy()
        return TrainState(spec=spec, module=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
                          scheduler=None, catalogue=Catalogue(["", "a", "b"], ["", "a", "b"]), versions=versions,
                          stage=stage)
    started = {"sequences": 3, "item_index": 2}
    LocalBackend(state(started), str(tmp_path / "local")).save({})
    assert LocalBackend(state(dict(started)), str(tmp_path / "local")).restore()
    with pytest.raises(RunMismatch, match=r"other versions of the gold tables \(sequences 3 -> 4\).*"
                                          r"data\.pinned_versions='\{\"item_index\":2,\"sequences\":3\}'"):
        LocalBackend(state({"sequences": 4, "item_index": 2}), str(tmp_path / "local")).restore()
    folder = tmp_path / "ray"
    folder.mkdir()
    (folder / "catalogue.json").write_text(json.dumps(run_folder_doc(state(started))))
    check_run_folder(str(folder), state(dict(started)), "resuming")
    with pytest.raises(RunMismatch, match=r"sequences 3 -> 4"):
        check_run_folder(str(folder), state({"sequences": 4, "item_index": 2}), "resuming")
    LocalBackend(state(started, "tokenizer"), str(tmp_path / "fit")).save({})  # a fit is keyed by its inputs
    assert LocalBackend(state({"sequences": 4, "item_index": 2}, "tokenizer"), str(tmp_path / "fit")).restore()
