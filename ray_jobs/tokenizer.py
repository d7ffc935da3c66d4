"""The generative family's tokenizer stage: the quantizer of `model.quantizer` (RQ or MPQ,
`ray_jobs.models.semantic_ids`) trained on the catalogue's MiniLM text embeddings (joined with the
items' collaborative factors from the training interactions, `model.collaborative`) with its own loss
(reconstruction + codebook + commitment, full batch), through the one loop's step loop
(`loop.run_steps` over a `LocalBackend`): checkpointed every `checkpoint_every` steps in its run
folder, resumed from there after an interruption, reported like any stage (`tokenizer/*` per step,
`tokenizer_eval/*`: reconstruction error, per-codebook perplexity and dead codes, collision share).

Training runs it before any generator is built — the driver of a Ray job once, before the workers
start (they read its files), or `train_local` in its process — for a fresh generative model only:
a warm start keeps its checkpoint's token table and quantizer (`loop.known_items`). On a cluster
the workers read the stage's files from `model.cache_dir`, which must be storage every node sees.
The files (`generative.TokenizerFiles`) are keyed
by the embeddings and the settings; a second run with the same ones reads them, and a lock makes
concurrent runs on one cache fit it once.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from filelock import FileLock
from torch import nn

from jobs.schema import JobSpec
from ray_jobs.catalogue import CatalogueMismatch
from ray_jobs.data import SeqData
from ray_jobs.loop import LocalBackend, Reporter, StepPlan, TrainState, run_steps
from ray_jobs.models.generative import interactions_of, new_quantizer, tokenizer_inputs
from ray_jobs.models.semantic_ids import TokenTable, collaborative_factors, utilisation


class QuantizerFit(nn.Module):
    """The stage's trained module: the quantizer (`.model`, what its checkpoints hold) and its
    auto-encoder loss over the catalogue's embeddings."""

    def __init__(self, quantizer: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.model = quantizer
        self.register_buffer("x", x, persistent=False)

    def forward(self):
        return self.model(self.x)


def quality(q: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The tokenizer's figures on the whole catalogue: reconstruction MSE, each codebook's perplexity
    and dead codes, the share of items whose code collides with another's before disambiguation."""
    mode = q.training
    q.eval()
    with torch.no_grad():
        out = q(x)
    q.train(mode)
    u = utilisation(out.codes.numpy(), q.codes)
    record = {"recon_mse": float(out.recon_loss), "collision_share": u["collision_share"]}
    for b, book in enumerate(u["books"]):
        record |= {f"book{b}_perplexity": book["perplexity"], f"book{b}_dead_codes": float(book["dead_codes"])}
    return record


def fit_tokenizer(spec: JobSpec, data: SeqData, reporter: Reporter = Reporter(), checkpoint_every: int = 100,
                  stop_after: int | None = None) -> dict:
    """Fit (or read) the tokenizer of `spec.model` (kind generative) for `data`'s catalogue; returns
    its report (settings, table hash, final figures, the evaluation curve, seconds). The stage closes
    `reporter`. `stop_after` ends the fit after that many steps without writing the table, as an
    interruption would."""
    m = spec.model
    x, files = tokenizer_inputs(m, data.item_text, interactions_of(spec, data.versions))
    os.makedirs(os.path.dirname(files.table), exist_ok=True)
    with FileLock(f"{files.run}.lock"):
        if files.complete:
            reporter.close()  # the stage is done: the reporter is not needed
            with open(files.report) as fh:
                return json.load(fh)
        torch.manual_seed(m.seed)
        q = new_quantizer(m, x.shape[1])
        text = torch.from_numpy(x)
        xt = centred = q.fit_center(text)  # what `inputs` gives for the text alone
        if m.collaborative:  # the text joined with the items' factors from every user's training sequence
            if data.shard != (0, 1):
                raise ValueError(f"model.collaborative: the tokenizer needs every user's sequences; data holds "
                                 f"shard {data.shard}")
            # the sequences the generator fits on (train.fit_on, without the train.withhold items): never a test item
            fit = data.fit_sequences(spec.train.fit_on, withhold=spec.train.withhold)
            factors, lift = collaborative_factors(fit, data.num_items, centred.numpy(), m.collaborative, m.seed)
            q.lift.copy_(torch.from_numpy(lift))
            q.cf_scale.fill_(float(centred.norm(dim=1).mean()))  # as long as an average (centred) text embedding
            xt = q.inputs(text, torch.from_numpy(factors))
        torch.manual_seed(m.seed)
        q.init_codebooks(xt, m.seed)  # k-means codebooks; a resumed fit loads its own next
        # its own optimisation: Adam at model.tokenizer_lr, no gradient clipping (train.grad_clip is the
        # generator's)
        stage = spec.model_copy(update={"train": spec.train.model_copy(update={"grad_clip": 0.0})})
        state = TrainState(spec=stage, module=QuantizerFit(q, xt), optimizer=torch.optim.Adam(q.parameters(),
                           lr=m.tokenizer_lr), scheduler=None, catalogue=data.catalogue, versions=dict(data.versions),
                           stage="tokenizer")
        backend = LocalBackend(state, files.run)
        try:
            backend.restore()
        except CatalogueMismatch:  # the same texts under other item ids: that fit is not this one's to resume
            shutil.rmtree(files.run)
        total = m.tokenizer_steps if stop_after is None else min(stop_after, m.tokenizer_steps)

        def step(_: int) -> tuple[torch.Tensor, dict]:
            out = state.module()
            return out.loss, {"loss": out.loss.item(), "recon_mse": out.recon_loss.item()}

        q.train()
        run_steps(state, backend, StepPlan(total, max(1, m.tokenizer_steps // 10), checkpoint_every, None), step,
                  lambda s: {"step": s, **quality(q, xt)}, reporter, prefix="tokenizer", monitor="tokenizer_eval")
        if total < m.tokenizer_steps:
            return {"stopped_at": state.step}
        q.eval()
        with torch.no_grad():
            table = TokenTable.of(m.quantizer, m.codes, q(xt).codes.numpy())
        from safetensors.torch import save_file
        report = {"settings": files.settings, "items": len(x), "hash": table.hash, "steps": state.step,
                  "seconds": round(state.seconds, 2), "restarts": state.restarts,
                  **{k: v for k, v in state.evals[-1].items() if k != "step"},
                  "curve": state.evals}
        tmp = f"{files.weights}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in q.state_dict().items()}, tmp)
        os.replace(tmp, files.weights)
        tmp = f"{files.report}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(report, fh, indent=1)
        os.replace(tmp, files.report)
        tmp = f"{files.table}.{os.getpid()}.tmp"
        table.to_parquet(tmp)
        os.replace(tmp, files.table)  # the table last: whole or absent, and complete means all three are there
        shutil.rmtree(files.run, ignore_errors=True)
        return report
