"""The registered model as users serve it: an MLflow pyfunc in the source's own item ids, holding
data only (weights, the catalogue it serves, a cached HLLM's item embeddings) with this installed
module as its loader; and logging it to a run and the registry."""
from __future__ import annotations

import os
import shutil

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from jobs.contracts import CHALLENGER
from jobs.schema import JobSpec
from jobs.spec import tracking_uri
from ray_jobs.catalogue import Catalogue
from ray_jobs.checkpoint import read_model
from ray_jobs.models import reads_request_time
from ray_jobs.models.llm import item_cache, minilm_item_embeddings, minilm_settings
from ray_jobs.scoring import load_for_catalogue, top_k

LOADER_MODULE = "ray_jobs.serving"
LEGACY_LOADER_MODULES = ("ray_jobs.tracking",)  # models registered earlier name it; it loads them the same way


class Recommender:
    """The registered model's pyfunc, in the source's own item ids: histories of item ids -> top-K
    item ids with scores, history items masked.

    Input: a DataFrame with a `history` column (lists of the source's item ids, oldest first; numbers
    are read as their text) or a list of lists; for a model that reads timestamps (HSTU with a time
    bias) also a `timestamps` column (epoch seconds of each history item) and, where its bias
    measures gaps from the predicted event's time (`model.query_time: target`), a `request_time`
    column (epoch seconds the recommendations are for; optional otherwise). History items the
    catalogue does not know are skipped and counted. Params: `k` (default 10). Output: a DataFrame
    with `item_ids` (source ids), `scores` and `unknown_history_items`; never an inactive item,
    padding or a -inf score (fewer than k items where fewer remain).

    The registered model holds data only: `MLmodel` names this installed module as the pyfunc
    loader (`loader_module`), and `data/` holds `model.pt` (weights read with
    `torch.load(weights_only=True)`), `catalogue.parquet` (the item index it serves: index, source
    id, text, active) and, for a cached-mode HLLM, the item embeddings of that catalogue
    (safetensors). No pickle and no code travel with it, so loading it needs llmrec installed and
    runs nothing from the registry (`llmrec verify-model` checks a registered model for that)."""

    def __init__(self, data_path: str) -> None:
        files = {f: os.path.join(data_path, f) for f in os.listdir(data_path)}
        if "model.pt" not in files:
            raise FileNotFoundError(f"{data_path}: no model.pt in the registered model's data")
        ckpt = read_model(files["model.pt"])
        if CATALOGUE_FILE in files:
            self.catalogue = read_catalogue_file(files[CATALOGUE_FILE])
        else:  # registered before catalogues were shipped: the model's own, known by index only
            ids = ckpt.item_ids or [str(i) if i else "" for i in range(ckpt.num_items + 1)]
            self.catalogue = Catalogue(ids, ckpt.item_text)
        loaded = load_for_catalogue(files["model.pt"], self.catalogue, cache_dir=data_path, label="registered model")
        self.model, self.score = loaded.model, loaded.score_function()
        self.index = self.catalogue.index_of()
        self.num_items = self.catalogue.num_items

    def predict(self, model_input, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        frame = isinstance(model_input, pd.DataFrame)
        raw = [list(np.asarray(h, dtype=object).reshape(-1)) for h in (model_input["history"] if frame else model_input)]
        known = [[self.index.get(str(i)) for i in h] for h in raw]
        keep = [np.asarray([x is not None for x in h], dtype=bool) for h in known]
        histories = [np.asarray([x for x in h if x is not None], dtype=np.int64) for h in known]
        unknown = [int((~m).sum()) for m in keep]
        times = None
        if self.score.reads_time:
            if not frame or "timestamps" not in model_input:
                raise ValueError("this model reads event timestamps: the input needs a `timestamps` column "
                                 "(epoch seconds of each history item) beside `history`")
            times = [np.asarray(t, dtype=np.int64).reshape(-1) for t in model_input["timestamps"]]
            if any(len(t) != len(h) for t, h in zip(times, raw)):
                raise ValueError("input: each row's `timestamps` must have one entry per `history` item")
            if "request_time" in model_input:
                asked = [int(x) for x in model_input["request_time"]]
            elif reads_request_time(self.model):
                raise ValueError("this model's time bias reads the time the recommendations are for: the input "
                                 "needs a `request_time` column (epoch seconds) beside `history` and `timestamps`")
            else:  # read by nothing: the model measures gaps from each event
                asked = [int(t.max()) if len(t) else 0 for t in times]
            times = [np.append(t[m], q) for t, m, q in zip(times, keep, asked)]
        ids, scores = top_k(self.score, histories, min(k, self.num_items), batch_size=1024, times=times,
                            candidates=self.catalogue.active)
        rows = [[(self.catalogue.item_ids[i], float(v)) for i, v in zip(r, sc) if i > 0 and np.isfinite(v)]
                for r, sc in zip(ids, scores)]
        return pd.DataFrame({"item_ids": [[i for i, _ in r] for r in rows], "scores": [[v for _, v in r] for r in rows],
                             "unknown_history_items": unknown})


CATALOGUE_FILE = "catalogue.parquet"


def write_catalogue_file(catalogue: Catalogue, path: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = range(1, catalogue.num_items + 1)
    pq.write_table(pa.table({"item_idx": pa.array(list(rows), pa.int32()),
                             "item_id": [catalogue.item_ids[i] for i in rows],
                             "text": [catalogue.item_text[i] for i in rows],
                             "active": pa.array(catalogue.active[1:].tolist(), pa.bool_()),
                             "kcore": pa.array(catalogue.kcore[1:].tolist(), pa.bool_())}), path)
    return path


def read_catalogue_file(path: str) -> Catalogue:
    import pyarrow.parquet as pq
    t = pq.read_table(path).to_pylist()
    n = max((r["item_idx"] for r in t), default=0)
    ids, text = [""] * (n + 1), [""] * (n + 1)
    active, kcore = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    for r in t:
        i = r["item_idx"]
        ids[i], text[i], active[i], kcore[i] = r["item_id"], r["text"], r["active"], r["kcore"]
    return Catalogue(ids, text, active, kcore)


def _load_pyfunc(data_path: str) -> Recommender:
    """MLflow's pyfunc entry point (`loader_module: ray_jobs.serving`)."""
    return Recommender(data_path)


def log_recommender(spec: JobSpec, run_id: str, checkpoint_file: str, catalogue: Catalogue | None = None,
                    alias: str = CHALLENGER) -> int:
    """Log the pyfunc (the checkpoint, the catalogue it serves — by default the one it was trained on —
    and a cached-mode HLLM's item embeddings of it, as its data; `Recommender` as its installed
    loader) to the run, register it under the spec's model name, point `alias` at the new version."""
    import tempfile
    uri = tracking_uri(spec)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    ckpt = read_model(checkpoint_file)
    if catalogue is None:
        ids = ckpt.item_ids or [str(i) if i else "" for i in range(ckpt.num_items + 1)]
        catalogue = Catalogue(ids, ckpt.item_text, kcore=ckpt.catalogue.seen_mask())
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema
    outputs = mlflow.models.infer_signature(
        pd.DataFrame({"history": [["1"]]}),
        pd.DataFrame({"item_ids": [["4", "5"]], "scores": [[0.9, 0.8]], "unknown_history_items": [0]}), params={"k": 10})
    # item ids as the source names them: text, or numbers read as their text (MovieLens' integer ids)
    signature = mlflow.models.ModelSignature(Schema([ColSpec(Array(AnyType()), "history")]), outputs.outputs,
                                             outputs.params)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        shutil.copyfile(checkpoint_file, os.path.join(data, "model.pt"))
        write_catalogue_file(catalogue, os.path.join(data, CATALOGUE_FILE))
        m = ckpt.spec.model
        if m.kind == "hllm" and m.mode == "cached":  # the catalogue's embeddings, computed where the cache is
            ckpt.build(catalogue=catalogue)  # embeds what the cache lacks: items newer than the model
            item_cache(m).export(catalogue.item_text, data)
        elif m.kind == "generative" and catalogue.num_items > ckpt.num_items:
            # items newer than the model get their tokens, when it loads, from their text's MiniLM
            # embeddings through its own tokenizer: those embeddings ship with it
            newer = [""] + catalogue.item_text[ckpt.num_items + 1:]
            minilm_item_embeddings(m, newer)
            item_cache(minilm_settings(m)).export(newer, data)
        info = mlflow.pyfunc.log_model(
            name="model", loader_module=LOADER_MODULE, data_path=data, signature=signature,
            pip_requirements=[f"mlflow=={mlflow.__version__}"], registered_model_name=spec.registered_model_name())
    version = int(info.registered_model_version)
    MlflowClient(uri).set_registered_model_alias(spec.registered_model_name(), alias, version)
    return version
