"""The job spec: packaged specs load, unknown keys are rejected by name, --set overrides are typed."""
import glob
import pytest
import yaml

from jobs.errors import SpecError

from jobs.spec import apply_overrides, dump_spec, load_spec, parse_override, validate_spec


def test_packaged_specs_load():
    ml1m = load_spec("jobs/specs/movielens-1m.yaml")
    assert ml1m.data.source.kind == "movielens_packaged" and ml1m.data.source.variant == "ml-1m"
    assert ml1m.spark.engine == "sail" and ml1m.lake.root == "./.lake"
    assert (ml1m.data.kcore.user, ml1m.data.kcore.item) == (5, 5)
    smoke = load_spec("movielens-100k-smoke")  # a bare name resolves under jobs/specs
    assert smoke.data.source.variant == "ml-100k"


def test_overrides_are_typed_and_nested():
    spec = load_spec("jobs/specs/movielens-1m.yaml",
                     ["spark.engine=local", "data.kcore.user=10", "data.min_value=3.5", "spark.conf.a=b"])
    assert spec.spark.engine == "local"
    assert spec.data.kcore.user == 10 and spec.data.kcore.item == 5
    assert spec.data.min_value == 3.5
    assert spec.spark.conf == {"a": "b"}


def test_unknown_key_is_named():
    with pytest.raises(SpecError, match=r"unknown key 'data\.kcore\.users'"):
        load_spec("jobs/specs/movielens-1m.yaml", ["data.kcore.users=3"])
    with pytest.raises(SpecError, match=r"unknown key 'trian'"):
        load_spec("jobs/specs/movielens-1m.yaml", ["trian.epochs=3"])


def test_unknown_key_inside_a_source_is_named(tmp_path):
    doc = yaml.safe_load(open("jobs/specs/movielens-1m.yaml"))
    doc["data"]["source"]["path"] = "/x"
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"s\.yaml: unknown key 'data\.source\.path'"):
        load_spec(p)


def test_bad_values_name_the_field():
    with pytest.raises(SpecError, match=r"'data\.kcore\.user'"):
        load_spec("jobs/specs/movielens-1m.yaml", ["data.kcore.user=-1"])
    with pytest.raises(SpecError, match=r"'spark\.engine'"):
        load_spec("jobs/specs/movielens-1m.yaml", ["spark.engine=flink"])
    with pytest.raises(SpecError, match="spark.remote"):
        load_spec("jobs/specs/movielens-1m.yaml", ["spark.engine=remote"])


def test_source_kind_switch_and_missing_key():
    spec = load_spec("jobs/specs/movielens-1m.yaml",
                     ["data.source={kind: synthetic, n_users: 10, n_items: 5, n_interactions: 100}"])
    assert spec.data.source.kind == "synthetic" and spec.data.source.n_interactions == 100
    with pytest.raises(SpecError, match=r"missing key 'data\.source\.reviews'"):
        load_spec("jobs/specs/movielens-1m.yaml", ["data.source={kind: amazon2023}"])


def test_each_model_kind_has_its_own_fields():
    from jobs.schema import HLLMSpec, HSTUSpec, SASRecSpec
    assert isinstance(load_spec("movielens-100k-smoke").model, SASRecSpec)  # kind defaults to sasrec
    hstu = load_spec("movielens-1m-hstu-ref").model
    assert isinstance(hstu, HSTUSpec) and (hstu.time_buckets, hstu.query_time) == (128, "target")
    assert not hasattr(hstu, "item_llm")
    with pytest.raises(SpecError, match=r"model\.item_llm is a field of model\.kind=hllm, not of sasrec"):
        load_spec("movielens-100k-smoke", ["model.item_llm=smollm2"])
    with pytest.raises(SpecError, match=r"model\.time_buckets is a field of model\.kind=hstu, not of hllm"):
        load_spec("movielens-1m-hllm", ["model.time_buckets=8"])
    with pytest.raises(SpecError, match=r"unknown key 'model\.itemllm'"):
        load_spec("movielens-1m-hllm", ["model.itemllm=x"])
    with pytest.raises(SpecError, match=r"does not match any of the expected tags: 'sasrec', 'hstu', 'hllm'"):
        load_spec("movielens-100k-smoke", ["model.kind=bert4rec"])
    # switching kind on the command line keeps what the new kind shares (cache_dir) and what is set beside it
    sasrec = load_spec("movielens-1m-replay", ["model.kind=sasrec", "model.dim=64"]).model
    assert isinstance(sasrec, SASRecSpec) and sasrec.dim == 64 and sasrec.cache_dir == ".replay/cache"
    hllm = load_spec("movielens-1m-hstu", ["model.kind=hllm", "model.mode=lora"]).model
    assert isinstance(hllm, HLLMSpec) and hllm.mode == "lora"
    with pytest.raises(SpecError, match=r"model\.dim is a field of model\.kind=sasrec/hstu/generative, not of hllm"):
        load_spec("movielens-1m-hstu", ["model.kind=hllm", "model.dim=64"])


def test_a_saved_flat_model_section_loads_without_other_kinds_fields():
    """Specs saved with checkpoints before the model union held every kind's fields in one section."""
    import json
    from jobs.schema import JobSpec
    flat = json.loads(open("tests/fixtures/flat-model-sections.json").read())
    doc = load_spec("movielens-100k-smoke").model_dump(mode="json")
    hllm = JobSpec.from_saved({**doc, "model": flat["hllm"]}).model
    assert hllm.kind == "hllm" and hllm.user_dropout == 0.2 and "dim" not in hllm.model_dump()
    assert hllm.item_text_padding == "left"  # the padding its item embeddings were made with
    assert load_spec("movielens-100k-smoke").model.item_text_padding == "right"  # what a new spec embeds with
    assert JobSpec.from_saved(doc).model.item_text_padding == "right"  # a spec saved with the field keeps it
    assert JobSpec.from_saved({**doc, "model": flat["sasrec"]}).model.block == "original"
    with pytest.raises(SpecError, match=r"model\.item_llm is a field of model\.kind=hllm"):
        validate_spec({**doc, "model": flat["sasrec"]})  # a spec a user writes is held to its kind


def test_override_parsing_errors():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=x=y") == (["a"], "x=y")
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        parse_override("novalue")
    with pytest.raises(SpecError, match="is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    with pytest.raises(SpecError, match="not found"):
        load_spec("jobs/specs/no-such-spec.yaml")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        validate_spec([1, 2])


@pytest.mark.parametrize("path", sorted(glob.glob("jobs/specs/*.yaml")))
def test_every_shipped_spec_resolves_and_round_trips(path):
    """Each shipped spec loads with its base chain merged, names its dataset, and its resolved form
    (what `llmrec spec` prints and MLflow stores) loads back to the same spec."""
    spec = load_spec(path)
    source = spec.data.source  # the packaged MovieLens, or the replay's cut of it (bench/replay.py writes it)
    assert spec.name and spec.data.name and (source.kind == "movielens_packaged" or
                                             (source.kind == "generic" and source.path.startswith(".replay/")))
    assert validate_spec(yaml.safe_load(dump_spec(spec))) == spec


def test_ml1m_protocol_specs_share_one_data_block():
    names = ["movielens-1m-sasrec", "movielens-1m-sasrec-gr", "movielens-1m-hllm", "movielens-1m-align"]
    specs = [load_spec(n) for n in names]
    assert all(s.data == specs[0].data for s in specs)
    assert specs[0].data.name == "movielens-1m-full" and specs[0].data.kcore.user == 0
    for n in names:
        assert "base: base/movielens-1m-full.yaml" in open(f"jobs/specs/{n}.yaml").read()
    gpu = load_spec("movielens-1m-hllm-gpu")  # the default's data with shorter histories
    assert gpu.data.max_seq_len == 50 and gpu.data.model_copy(update={"max_seq_len": 200}) == load_spec("movielens-1m").data
    assert gpu.model.item_llm == gpu.model.user_llm == "smollm2" and gpu.model.mode == "end_to_end"  # pretrained towers


def test_base_inheritance_merges_overrides_and_refuses_bad_chains(tmp_path):
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump({
        "name": "parent", "data": {"name": "d", "source": {"kind": "movielens_packaged", "variant": "ml-100k"},
                                   "kcore": {"user": 5, "item": 5}}, "train": {"epochs": 3, "lr": 0.01}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({
        "name": "child", "base": "parent.yaml", "data": {"kcore": {"item": 2}}, "train": {"lr": 0.5}}))
    child = load_spec(tmp_path / "child.yaml", ["train.epochs=7"])
    assert child.name == "child" and (child.data.kcore.user, child.data.kcore.item) == (5, 2)
    assert child.train.lr == 0.5 and child.train.epochs == 7 and child.data.source.variant == "ml-100k"
    # another source kind replaces the base's source whole (no variant leaks into a synthetic source)
    (tmp_path / "synth.yaml").write_text(yaml.safe_dump({"name": "s", "base": "parent.yaml",
                                                         "data": {"source": {"kind": "synthetic", "n_users": 10}}}))
    assert load_spec(tmp_path / "synth.yaml").data.source.n_users == 10
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"name": "t", "base": "parent.yaml", "train": {"epoch": 2}}))
    with pytest.raises(SpecError, match=r"unknown key 'train\.epoch'"):
        load_spec(tmp_path / "typo.yaml")
    (tmp_path / "a.yaml").write_text("name: a\nbase: b.yaml\n")
    (tmp_path / "b.yaml").write_text("name: b\nbase: a.yaml\n")
    with pytest.raises(SpecError, match="base cycle"):
        load_spec(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("name: o\nbase: nowhere.yaml\n")
    with pytest.raises(SpecError, match="spec file not found: nowhere.yaml"):
        load_spec(tmp_path / "orphan.yaml")


def test_distributed_fields_and_absolute_paths(tmp_path, monkeypatch):
    from jobs.spec import absolute_paths
    from ray_jobs.distributed import deepspeed_config
    monkeypatch.chdir(tmp_path)
    spec = load_spec("movielens-1m-hllm-gpu")
    assert spec.train.use_gpu and spec.train.workers == 8 and spec.train.deepspeed == "zero2"
    cfg = deepspeed_config(spec, 8)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["train_batch_size"] == 64 and cfg["bf16"]["enabled"]
    cpu = deepspeed_config(load_spec("movielens-100k-smoke", ["train.deepspeed=zero3", "train.grad_clip=0.5"]), 2)
    assert cpu["zero_optimization"]["stage"] == 3 and not cpu["bf16"]["enabled"] and cpu["gradient_clipping"] == 0.5
    a = absolute_paths(load_spec("movielens-100k-smoke", ["tracking.uri=sqlite:///m.db"]))
    assert a.lake.root == str(tmp_path / ".lake") and a.train.storage_path == str(tmp_path / ".ray_results")
    assert a.tracking.uri == f"sqlite:///{tmp_path}/m.db"
    # no URI in the spec: the driver's default store, made absolute, so a worker in another directory finds the run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert absolute_paths(load_spec("movielens-100k-smoke")).tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    # a sqlite store in the environment (what mlflow.set_tracking_uri leaves behind in a driver that
    # published a run, after Ray's workers started without it): pinned, absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert absolute_paths(load_spec("movielens-100k-smoke")).tracking.uri == f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # the environment's server: left to the environment
    assert absolute_paths(load_spec("movielens-100k-smoke")).tracking.uri is None
    assert absolute_paths(load_spec("movielens-100k-smoke", ["lake.root=s3://b/lake"])).lake.root == "s3://b/lake"
    with pytest.raises(FileNotFoundError, match="train.deepspeed='zero9'"):
        deepspeed_config(load_spec("movielens-100k-smoke", ["train.deepspeed=zero9"]), 1)
    from ray_jobs.train import run
    with pytest.raises(ValueError, match="train.storage_path='s3://b/ray'"):
        run(load_spec("movielens-100k-smoke", ["train.storage_path=s3://b/ray"]))
    with pytest.raises(SpecError, match=r"'train\.fit_on'"):
        load_spec("movielens-100k-smoke", ["train.fit_on=everything"])


@pytest.mark.parametrize("override, message", [
    ("data.value_range={min: 5, max: 1}", r"'data\.value_range': .*min 5\.0 is greater than max 1\.0"),
    ("eval.ks=[]", r"'eval\.ks': List should have at least 1 item"),
    ("eval.ks=[0, 10]", r"'eval\.ks\.0': Input should be greater than 0"),
    ("name=../escape", r"'name': .*'\.\./escape' is not a usable name"),
    ("data.name=a/b", r"'data\.name': .*'a/b' is not a usable name"),
    ("tracking.model_name=team/model", r"'tracking\.model_name': .*'team/model' is not a usable name"),
    ("name=", r"'name': .*'' is not a usable name"),
    ("data.split={kind: temporal, valid_start: 'Jan 5'}", r"valid_start='Jan 5' is not a date"),
    ("data.split={kind: temporal, valid_start: 2021-02-01, test_start: 2021-01-01}",
     r"valid_start 2021-02-01 must come before test_start 2021-01-01"),
    ("data.split={kind: temporal, valid_start: 2020-13-01}", r"value is not valid YAML: month must be in 1\.\.12"),
    ("data.source={kind: movielens, path: /x, encoding: latin-9x}", r"'data\.source\.encoding': .*unknown encoding"),
])
def test_inconsistent_values_are_refused_with_the_key_named(override, message):
    with pytest.raises(SpecError, match=message):
        load_spec("movielens-100k-smoke", [override])


def test_the_committed_spec_reference_is_the_schemas():
    """docs/spec-reference.md is generated from the schema's field descriptions (one source of truth):
    regenerate it with `python -m jobs.reference > docs/spec-reference.md` after changing the spec."""
    from pathlib import Path

    from jobs.reference import render
    committed = (Path(__file__).resolve().parents[1] / "docs" / "spec-reference.md").read_text()
    assert committed == render(), "docs/spec-reference.md drifted from jobs/schema.py: regenerate it"
    assert "| `data.landing.items.columns.active` |" in committed and "| `eval.candidates` |" in committed
