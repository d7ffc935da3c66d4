"""One alignment step, shared by the Ray Train worker and the tests: rollouts from the policy,
rewards, method weights, the loss, and the step's statistics. Cross-worker state (running exposure,
BLADE posteriors) is synchronised through the backend's collectives, so every rank holds the same
state and one rank's checkpoint restores all of them.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jobs.schema import AlignSpec, BladeSpec
from ray_jobs.alignment import methods, rewards
from ray_jobs.alignment.plackett_luce import gumbel_topk, list_kl, list_log_prob, pick_log_probs
from ray_jobs.data import left_pad
from ray_jobs.metrics import mask_scores
from ray_jobs.distributed import Collectives
from ray_jobs.scoring import CatalogueScores

Scores = Callable[..., torch.Tensor]  # left-padded histories (B, L)[, their times (B, L + 1)] -> item scores (B, n + 1)
REWARD_TERMS = ("ndcg", "diversity", "tail", "exposure", "msra")


@dataclass
class StepSums:
    """One rank's sums behind a step's statistics; all ranks' are added in one collective."""
    users: float = 0.0
    lists: float = 0.0
    reward: float = 0.0
    reward_sq: float = 0.0
    kl: float = 0.0
    grad_norm: float = 0.0
    log_ratio: float = 0.0
    entropy: float = 0.0
    flat_groups: float = 0.0
    policy_loss: float = 0.0
    clipped: float = 0.0
    ndcg: float = 0.0
    diversity: float = 0.0
    tail: float = 0.0
    exposure: float = 0.0
    msra: float = 0.0

    def all_sum(self, comm: Collectives) -> "StepSums":
        return StepSums(*comm.all_sum(torch.tensor(astuple(self), dtype=torch.float64)).tolist())


@dataclass
class StepStats:
    """What a step logs, over every rank's users and lists: reward moments, the mean whole-list KL to
    the reference per user (nats per list), the effective gradient norm (|d policy loss / d logits|
    per user), the weight entropy (Best-of-N methods), the share of users whose lists all scored the
    same, the share of ratios outside the clip range (grpo: lists, flame: picks, pars: tokens; 0 for the others)."""
    reward_mean: float
    reward_std: float
    reward_max: float
    kl: float
    effective_grad_norm: float
    weight_entropy: float | None
    sampled_log_ratio: float
    flat_groups: float
    policy_loss: float
    clipped_share: float
    beta: float
    reward_ndcg: float
    reward_diversity: float
    reward_tail: float
    reward_exposure: float
    reward_msra: float = 0.0
    users: float = 0.0  # users the step's lists were sampled for, every rank's

    @classmethod
    def of(cls, s: StepSums, reward_max: float, beta: float, has_entropy: bool) -> "StepStats":
        users, lists = max(s.users, 1.0), max(s.lists, 1.0)
        mean = s.reward / lists
        return cls(mean, max(s.reward_sq / lists - mean * mean, 0.0) ** 0.5, reward_max, s.kl / users,
                   s.grad_norm / users, s.entropy / users if has_entropy else None, s.log_ratio / lists,
                   s.flat_groups / users, s.policy_loss / users, s.clipped / lists, beta,
                   *(getattr(s, t) / lists for t in REWARD_TERMS), s.users)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Rollouts:
    """A step's sampled lists for this rank's users, with their policy logits and rewards."""
    rows: np.ndarray                 # AlignData rows
    logits: torch.Tensor | None      # (B, n + 1) masked policy logits (with gradients; None once restored)
    ref_logits: torch.Tensor         # (B, n + 1) masked reference logits
    lists: torch.Tensor              # (B, N, K) item ids
    terms: dict[str, torch.Tensor]   # reward term -> (B, N)
    reward: torch.Tensor             # (B, N) weighted list reward
    gains: torch.Tensor              # (B, N, K) weighted per-pick gains (sum along K = reward)
    global_users: int                # users in the step's global batch


@dataclass
class Batch:
    """A rollout batch and what stays fixed over its align.epochs optimizer steps."""
    index: int                       # rollout batch (step // align.epochs)
    rollouts: Rollouts
    pick_old: torch.Tensor | None    # (B, N, K) log pi_old(y_j | y_<j) of the policy that sampled the lists
                                     # (set by the batch's first step, from the picks it computes anyway)
    lp_ref: torch.Tensor             # (B, N) log pi_ref(list), whole list
    weights: torch.Tensor | None     # (B, N) blade / static_bon / grpo candidate weights
    entropy: torch.Tensor | None     # (B,) their entropy (Best-of-N methods)
    advantages: torch.Tensor | None  # (B, N, K) flame's per-pick advantages; (B, N, K, T) pars's per-token ones
    token_old: torch.Tensor | None = None  # (B, N, K, T) pars: log pi_old of each pick's tokens

    TENSORS = ("pick_old", "lp_ref", "weights", "entropy", "advantages", "token_old")

    def to_state(self) -> dict:
        """Tensors only (a checkpoint is read with weights_only=True); the policy logits are not kept."""
        ro = self.rollouts
        return {"index": self.index, "rows": torch.from_numpy(ro.rows), "ref_logits": ro.ref_logits,
                "lists": ro.lists, "terms": ro.terms, "reward": ro.reward, "gains": ro.gains,
                "global_users": ro.global_users, **{k: getattr(self, k) for k in self.TENSORS}}

    @classmethod
    def from_state(cls, s: dict) -> "Batch":
        ro = Rollouts(s["rows"].numpy(), None, s["ref_logits"], s["lists"], s["terms"], s["reward"], s["gains"],
                      s["global_users"])
        return cls(s["index"], ro, *(s.get(k) for k in cls.TENSORS))


@dataclass
class AlignData:
    """Users eligible for alignment and the relevant set of each one's NDCG reward: by default the
    context is the training sequence minus its last `holdout` items, which are the relevant set
    (validation and test items are never used); `of_day`: the history before a landed day, and that
    day's new items."""
    users: np.ndarray              # row in SeqData.train (`of_day`: user_idx)
    contexts: list[np.ndarray]
    relevant: torch.Tensor         # (U, R), 0-padded
    stamps: list[np.ndarray] | None = None  # with `times`: each context's timestamps, then the time its list is for

    @classmethod
    def build(cls, train: list[np.ndarray], num_items: int, holdout: int, list_size: int,
              times: list[np.ndarray] | None = None) -> "AlignData":
        """`times` (SeqData.train_times), for a start model that reads timestamps: a context is
        scored at the time of its first held-out item, the moment its list would be shown."""
        users, contexts, relevant, stamps = [], [], [], []
        for u, seq in enumerate(train):
            ctx = seq[:-holdout]
            # at least one context item, a held-out item, and K unseen items to fill a list
            if len(ctx) >= 1 and len(seq) > holdout and num_items - len(ctx) >= list_size:
                users.append(u)
                contexts.append(ctx)
                relevant.append(seq[-holdout:])
                if times is not None:
                    stamps.append(times[u][:len(ctx) + 1])
        if not users:
            raise ValueError(f"alignment: no user has more than align.holdout={holdout} training items")
        return cls(np.asarray(users), contexts, padded(relevant), stamps if times is not None else None)

    @classmethod
    def of_day(cls, users: np.ndarray, histories: list[np.ndarray], targets: list[np.ndarray], num_items: int,
               list_size: int, times: list[np.ndarray] | None = None, at: int | None = None) -> "AlignData":
        """A landed day as the reward (`ray_jobs.next_day.NextDay`'s users, histories before the day and
        the day's new items): users with a history and room for a list; with `times`, each list is
        scored at `at`, the day's start."""
        keep = [i for i, h in enumerate(histories) if len(h) >= 1 and num_items - len(h) >= list_size]
        if not keep:
            raise ValueError("alignment: no user of the reward day has a history before it")
        stamps = [np.append(times[i], at) for i in keep] if times is not None else None
        return cls(np.asarray(users)[keep], [histories[i] for i in keep], padded([targets[i] for i in keep]), stamps)


def padded(rows: list[np.ndarray]) -> torch.Tensor:
    """(U, longest) item ids, 0-padded."""
    out = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r)
    return out


def posterior_groups(cfg: BladeSpec, data: AlignData) -> np.ndarray:
    """Group of each AlignData row for BLADE's posteriors: itself (scope=user), one for all
    (global), or its history-length quantile bucket (group; at most cfg.groups, dense ids)."""
    n = len(data.users)
    if cfg.scope == "user":
        return np.arange(n)
    if cfg.scope == "global":
        return np.zeros(n, dtype=np.int64)
    lengths = np.asarray([len(c) for c in data.contexts])
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, cfg.groups + 1)[1:-1]))
    return np.unique(np.searchsorted(edges, lengths, side="right"), return_inverse=True)[1].astype(np.int64)


class Aligner:
    """State and step of list-wise alignment for one worker. `reference` is the frozen starting
    model; it is kept in the policy's dtype and on its device (`dtype`, `device`). `comm` carries
    every cross-worker sum and gather (one process: the identity). `prefix_groups` (T + 1, n + 1):
    the token prefixes of a generative policy's items (`SemanticGenerator.prefix_groups`), which
    align.method=pars credits."""

    def __init__(self, cfg: AlignSpec, data: AlignData, num_items: int, max_len: int, item_emb: torch.Tensor,
                 tail: torch.Tensor, reference: nn.Module, comm: Collectives | None = None,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                 candidates: np.ndarray | None = None, prefix_groups: torch.Tensor | None = None) -> None:
        if cfg.method == "pars" and prefix_groups is None:
            raise ValueError("align.method=pars credits the tokens of a generative model's items: the start model "
                             "has no token table (model.kind generative has one)")
        self.prefix_groups = prefix_groups
        self.cfg, self.data, self.num_items, self.max_len = cfg, data, num_items, max_len
        self.candidates = candidates  # items a list may hold (the training items the start model scores); None: all
        self.item_emb = F.normalize(item_emb.float(), dim=-1)
        self.tail = tail
        self.comm = comm or Collectives()
        self.rank, self.world = self.comm.rank, self.comm.world
        self.device = device
        self.reference = CatalogueScores(reference).to(device=device, dtype=dtype).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.exposure = torch.full((num_items + 1,), 1.0 / num_items)
        self.exposure[0] = 0.0
        self.ref_rewards: torch.Tensor | None = None     # (U, M) reference rollout rewards
        self.groups = posterior_groups(cfg.blade, data)  # BLADE posterior of each user row
        n_groups = int(self.groups.max()) + 1
        self.posterior = methods.NIG.vague(n_groups)
        self.last_update = np.zeros(n_groups)            # step + 1 of each group's last update (0: reference)
        self.beta = cfg.beta
        self.batch: Batch | None = None                  # the rollout batch of the current steps
        self.applied = -1                                # the last batch whose rewards the posteriors and exposure took

    # ------------------------------------------------------------------ policy and rewards
    def logits(self, scores: Scores, rows: np.ndarray) -> torch.Tensor:
        """Masked policy logits (B, n + 1) of the given AlignData rows, on the CPU in fp32 (gradients
        flow back to the policy on its device when enabled)."""
        ctx = [self.data.contexts[i] for i in rows]
        ids = left_pad(ctx, self.max_len).to(self.device)
        if self.data.stamps is None:
            s = scores(ids)
        else:  # a time-reading model: each context's timestamps, then the time its list is for
            s = scores(ids, left_pad([self.data.stamps[i] for i in rows], self.max_len + 1).to(self.device))
        return mask_scores(s.float().cpu() / self.cfg.temperature, ctx, self.candidates)

    def reward_gains(self, lists: torch.Tensor, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Reward term -> per-pick gains (B, N, K); each term's list value is their sum along K."""
        return {"ndcg": rewards.ndcg_gains(lists, self.data.relevant[rows]),
                "diversity": rewards.diversity_gains(lists, self.item_emb),
                "tail": rewards.tail_gains(lists, self.tail),
                "exposure": rewards.exposure_gains(lists, self.exposure),
                "msra": rewards.msra_gains(lists, self.data.relevant[rows], self.cfg.msra_discount)}

    def candidate_gains(self, lists: torch.Tensor, rows: np.ndarray) -> Callable[[int], torch.Tensor]:
        """Position j -> (B, N or 1, n + 1): the weighted reward gain every item would add at j of each
        list (after its first j items); at the picked items, `reward(reward_gains(...))`."""
        k, n, rel = self.cfg.list_size, self.num_items, self.data.relevant[rows]
        terms = {"ndcg": lambda j: rewards.ndcg_candidates(j, k, rel, n),
                 "diversity": lambda j: rewards.diversity_candidates(j, lists, self.item_emb),
                 "tail": lambda j: rewards.tail_candidates(k, self.tail),
                 "exposure": lambda j: rewards.exposure_candidates(k, self.exposure),
                 "msra": lambda j: rewards.msra_candidates(j, k, rel, n, self.cfg.msra_discount)}
        weights = {t: w for t, w in self.cfg.rewards.model_dump().items() if w}
        return lambda j: sum(w * terms[t](j) for t, w in weights.items())

    def reward_terms(self, lists: torch.Tensor, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {t: g.sum(-1) for t, g in self.reward_gains(lists, rows).items()}

    def reward(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return rewards.combine(self.cfg.rewards.model_dump(), terms)

    def update_exposure(self, lists: torch.Tensor) -> None:
        counts = self.comm.all_sum(torch.bincount(lists.reshape(-1), minlength=self.num_items + 1).double())
        share = counts / counts.sum().clamp(min=1)
        self.exposure = ((1 - self.cfg.exposure_momentum) * self.exposure.double()
                         + self.cfg.exposure_momentum * share).float()
        self.exposure[0] = 0.0

    # ------------------------------------------------------------------ reference statistics
    @torch.no_grad()
    def init_reference(self, seed: int, chunk: int = 256) -> None:
        """M reference rollouts for every user (rows split over ranks, gathered): the static CDF,
        BLADE's first prior and the starting exposure."""
        cfg = self.cfg
        mine = np.arange(self.rank, len(self.data.users), self.world)
        parts, counts = [], torch.zeros(self.num_items + 1, dtype=torch.float64)
        for start in range(0, len(mine), chunk):
            rows = mine[start:start + chunk]
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 7 * int(rows[0]) + 1)
            lists = gumbel_topk(self.logits(self.reference, rows), cfg.list_size, cfg.reference_rollouts, gen)
            parts.append((rows, self.reward(self.reward_terms(lists, rows)).numpy()))
            counts += torch.bincount(lists.reshape(-1), minlength=self.num_items + 1).double()
        ref = np.zeros((len(self.data.users), cfg.reference_rollouts), dtype=np.float32)
        for part in self.comm.all_gather_object(parts):
            for rows, r in part:
                ref[rows] = r
        self.ref_rewards = torch.from_numpy(ref)
        counts = self.comm.all_sum(counts)
        self.exposure = (counts / counts.sum()).float()
        self.exposure[0] = 0.0
        rows = np.arange(len(self.data.users))  # every rank holds every user's reference rewards: observe once
        self._observe(rows[self.rank::self.world], self._centred(ref.astype(np.float64), rows)[self.rank::self.world], None)

    # ------------------------------------------------------------------ BLADE posteriors
    def _centred(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if not self.cfg.blade.center:
            return x
        return x - self.ref_rewards[rows].double().mean(-1, keepdim=True).numpy()

    def _observe(self, rows: np.ndarray, x: np.ndarray, step: int | None) -> None:
        """Add this rank's rewards x (rows, N) to their groups' posteriors, pooled with every rank's
        (one all-reduce of per-group count, sum and sum of squares). At a step, each observed
        group's prior is its posterior decayed by decay^(rollout batches since its last update)."""
        b = self.cfg.blade
        stats = np.zeros((len(self.last_update), 3))
        g = self.groups[rows]
        np.add.at(stats[:, 0], g, x.shape[1])
        np.add.at(stats[:, 1], g, x.sum(-1))
        np.add.at(stats[:, 2], g, (x * x).sum(-1))
        stats = self.comm.all_sum(torch.from_numpy(stats)).numpy()
        seen = np.nonzero(stats[:, 0])[0]
        cnt = stats[seen, 0]
        mean = stats[seen, 1] / cnt
        sq_dev = np.maximum(stats[seen, 2] - cnt * mean * mean, 0.0)
        prior = self.posterior.take(seen)
        if step is not None:
            prior = prior.decayed(b.decay ** (step + 1 - self.last_update[seen]), b.min_pseudo_count)
            self.last_update[seen] = step + 1
        self.posterior.put(seen, prior.updated(cnt, mean, sq_dev))

    # ------------------------------------------------------------------ one step
    def batch_rows(self, batch: int, seed: int) -> tuple[np.ndarray, int]:
        """This rank's rows of rollout batch `batch` (epochs of a seeded permutation of users).
        Only full batches are used (the remainder of a permutation waits for the next pass's), so
        every rank gets users_per_step // world or more rows."""
        n, b = len(self.data.users), self.cfg.users_per_step
        per_pass = max(1, n // b)
        epoch, i = divmod(batch, per_pass)
        order = np.random.default_rng((seed, epoch)).permutation(n)
        rows = order[i * b:(i + 1) * b]
        return rows[self.rank::self.world], len(rows)

    def rollouts(self, scores: Scores, batch: int, seed: int) -> Rollouts:
        """Rollout batch `batch`: N Plackett–Luce samples of K items per user of this rank, and their
        rewards. Deterministic in (seed, batch, rank), so a resumed run samples what the first one did."""
        cfg = self.cfg
        rows, global_b = self.batch_rows(batch, seed)
        logits = self.logits(scores, rows)
        with torch.no_grad():
            ref_logits = self.logits(self.reference, rows)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 131 + self.rank + 17)
        lists = gumbel_topk(logits.detach(), cfg.list_size, cfg.rollouts, gen)     # (B, N, K)
        gains = self.reward_gains(lists, rows)
        terms = {t: g.sum(-1) for t, g in gains.items()}
        return Rollouts(rows, logits, ref_logits, lists, terms, self.reward(terms), self.reward(gains), global_b)

    def weights(self, r: torch.Tensor, rows: np.ndarray, batch: int,
                observe: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N) candidate weights for blade / static_bon / grpo, and the per-row entropy; BLADE's
        posteriors take the rewards first unless `observe` is false (they hold this batch already)."""
        cfg, n = self.cfg, r.shape[1]
        if cfg.method == "static_bon":
            w = methods.bon_weights(methods.empirical_cdf(self.ref_rewards[rows], r), n)
            return w, methods.weight_entropy(w)
        if cfg.method == "blade":
            x = self._centred(r.double().numpy(), rows)
            if observe:
                self._observe(rows, x, batch)
            cdf = self.posterior.take(self.groups[rows]).predictive_cdf(x)
            w = methods.bon_weights(torch.from_numpy(cdf).float(), n)
            return w, methods.weight_entropy(w)
        if cfg.method == "grpo":
            return methods.grpo_weights(r), None
        raise ValueError(f"align.method={cfg.method!r} has no candidate weights")

    def sample(self, scores: Scores, batch: int, seed: int) -> Batch:
        """Rollout batch `batch` with what its epochs keep fixed: the reference's log-probabilities
        (the sampling policy's are taken at the batch's first step), the method's weights (BLADE's posteriors take the batch's
        rewards here, once) or step-wise advantages; the running exposure takes its lists."""
        ro = self.rollouts(scores, batch, seed)
        # a batch sampled again (a resume on another number of workers drops the saved lists) must not
        # enter the posteriors and the exposure twice
        new, self.applied = batch > self.applied, max(self.applied, batch)
        with torch.no_grad():
            lp_ref = list_log_prob(ro.ref_logits, ro.lists)
        weights = entropy = advantages = None
        if self.cfg.method in ("blade", "static_bon", "grpo"):
            weights, entropy = self.weights(ro.reward, ro.rows, batch, observe=new)
        elif self.cfg.method == "flame":
            advantages = methods.flame_advantages(ro.gains)
        elif self.cfg.method == "pars":
            with torch.no_grad():
                _, values = methods.prefix_credit(ro.logits.detach(), ro.lists, self.prefix_groups,
                                                  self.candidate_gains(ro.lists, ro.rows))
            advantages = methods.pars_advantages(values, ro.gains)
        if new:
            self.update_exposure(ro.lists)
        return Batch(batch, ro, None, lp_ref, weights, entropy, advantages)

    def step(self, scores: Scores, step: int, seed: int) -> tuple[torch.Tensor, StepStats]:
        """The step's loss (scaled so that the average over ranks is the global-batch mean) and its
        global statistics. `scores` is the trained policy (CatalogueScores, or a DeepSpeed engine on it).
        Step s trains on rollout batch s // align.epochs, sampled at its first step and reused after."""
        cfg, k = self.cfg, self.cfg.list_size
        index = step // cfg.epochs
        fresh = self.batch is None or self.batch.index != index
        if fresh:
            self.batch = self.sample(scores, index, seed)
            logits, self.batch.rollouts.logits = self.batch.rollouts.logits, None  # the graph lives for this step only
        else:
            logits = self.logits(scores, self.batch.rollouts.rows)
        bt, ro = self.batch, self.batch.rollouts
        r = ro.reward
        # pars's token log-probabilities sum to the picks' (tested): one computation, not two
        tokens = methods.prefix_credit(logits, ro.lists, self.prefix_groups)[0] if cfg.method == "pars" else None
        picks = tokens.sum(-1) if tokens is not None else pick_log_probs(logits, ro.lists)   # (B, N, K)
        if fresh:  # the sampling policy is this step's: its pick log-probabilities, without gradients
            bt.pick_old = picks.detach()
        lp_list = picks.sum(-1)
        lp, lp_ref = lp_list / k, bt.lp_ref / k
        clipped = torch.zeros(())
        if cfg.method == "dpo":
            best, worst = r.argmax(-1), r.argmin(-1)
            idx = torch.arange(len(ro.rows))
            keep = (r[idx, best] > r[idx, worst]).float()
            pair = methods.dpo_loss(lp[idx, best], lp[idx, worst], lp_ref[idx, best], lp_ref[idx, worst], cfg.dpo_beta)
            policy_sum = (pair * keep).sum()
            if cfg.dpo_ground_truth:
                policy_sum = policy_sum + self._ground_truth_pairs(logits, ro.ref_logits, ro.rows).sum()
        elif cfg.method == "flame":
            log_ratio = picks - bt.pick_old
            policy_sum = -methods.ppo_clipped(log_ratio, bt.advantages, cfg.clip).sum() / (r.shape[1] * k)
            clipped = ((log_ratio.detach().exp() - 1).abs() > cfg.clip).double().mean(-1)
        elif cfg.method == "pars":
            if fresh:
                bt.token_old = tokens.detach()
            log_ratio = tokens - bt.token_old
            policy_sum = -methods.ppo_clipped(log_ratio, bt.advantages, cfg.clip).sum() / (r.shape[1] * k)
            clipped = ((log_ratio.detach().exp() - 1).abs() > cfg.clip).double().mean((-2, -1))
        elif cfg.method == "gflownet":
            g = cfg.gflownet
            log_r = r.double() / g.temperature + (bt.lp_ref.double() if g.reference_prior else 0.0)
            policy_sum = methods.trajectory_balance(lp_list, log_r).sum() / k
        elif cfg.method == "grpo":
            log_ratio = (lp_list - bt.pick_old.sum(-1)) / k
            policy_sum = -methods.ppo_clipped(log_ratio, bt.weights, cfg.clip).sum()
            clipped = ((log_ratio.detach().exp() - 1).abs() > cfg.clip).double()
        else:
            policy_sum = -(bt.weights.detach() * lp).sum()
        kl = list_kl(lp_list, bt.lp_ref, bt.pick_old.sum(-1))                    # (B,) nats per list
        loss = (policy_sum + self.beta * kl.sum() / k) * self.world / max(ro.global_users, 1)
        grad_logits = torch.autograd.grad(policy_sum, logits, retain_graph=True, allow_unused=True)[0]
        r64 = r.double()
        sums = StepSums(
            users=float(len(ro.rows)), lists=float(r.numel()), reward=r64.sum().item(), reward_sq=(r64 * r64).sum().item(),
            kl=kl.detach().double().sum().item(),
            grad_norm=grad_logits.norm(dim=-1).sum().item() if grad_logits is not None else 0.0,
            log_ratio=(lp_list - bt.lp_ref).detach().double().sum().item(),
            entropy=bt.entropy.double().sum().item() if bt.entropy is not None else 0.0,
            flat_groups=(r.max(-1).values == r.min(-1).values).double().sum().item(),
            policy_loss=policy_sum.detach().double().item(), clipped=float(clipped.sum()),
            **{t: ro.terms[t].double().sum().item() for t in REWARD_TERMS}).all_sum(self.comm)
        reward_max = self.comm.all_max(r.max().reshape(1).double() if r.numel() else torch.zeros(1, dtype=torch.float64))
        stats = StepStats.of(sums, reward_max.item(), self.beta, bt.entropy is not None)
        if cfg.kl_target:  # adaptive KL control: beta grows while KL is above target, shrinks below
            error = min(max(stats.kl / cfg.kl_target - 1.0, -1.0), 1.0)
            self.beta = float(min(max(self.beta * np.exp(cfg.kl_rate * error), cfg.beta_min), 1e4))
        return loss, stats

    def _ground_truth_pairs(self, logits, ref_logits, rows) -> torch.Tensor:
        """DPO pairs: the held-out items first, then the model's top items, against the model's
        own top-K list (rows whose held-out items are all in the top list already are skipped)."""
        k = self.cfg.list_size
        top = torch.topk(logits.detach(), k, dim=-1).indices
        chosen = []
        for i, row in enumerate(rows):
            rel = [int(x) for x in self.data.relevant[row] if x != 0 and torch.isfinite(logits[i, x])]
            fill = [int(x) for x in top[i] if int(x) not in rel]
            chosen.append((rel + fill)[:k])
        chosen = torch.tensor(chosen, dtype=torch.long)[:, None, :]
        rejected = top[:, None, :]
        differs = (chosen != rejected).any(-1).squeeze(1).float()
        lp_w, lp_l = list_log_prob(logits, chosen)[:, 0] / k, list_log_prob(logits, rejected)[:, 0] / k
        with torch.no_grad():
            ref_w, ref_l = list_log_prob(ref_logits, chosen)[:, 0] / k, list_log_prob(ref_logits, rejected)[:, 0] / k
        return methods.dpo_loss(lp_w, lp_l, ref_w, ref_l, self.cfg.dpo_beta) * differs

    # ------------------------------------------------------------------ checkpoint state (tensors only)
    def state_dict(self) -> dict:
        p = self.posterior
        # every rank's batch (each holds its own users' lists): DeepSpeed keeps one rank's client state
        ranks = self.comm.all_gather_object(self.batch.to_state() if self.batch is not None else {})
        return {"exposure": self.exposure.clone(), "ref_rewards": self.ref_rewards, "beta": self.beta,
                "batch": {"world": self.world, "ranks": ranks},
                "posterior": {k: torch.from_numpy(np.asarray(getattr(p, k), dtype=np.float64))
                              for k in ("mu", "kappa", "alpha", "beta")},
                "last_update": torch.from_numpy(self.last_update.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.exposure, self.ref_rewards, self.beta = state["exposure"], state["ref_rewards"], state["beta"]
        self.posterior = methods.NIG(**{k: np.asarray(v, dtype=np.float64) for k, v in state["posterior"].items()})
        self.last_update = np.asarray(state["last_update"], dtype=np.float64)
        batch = state.get("batch") or {}
        mine = batch["ranks"][self.rank] if batch.get("world") == self.world else None
        self.batch = Batch.from_state(mine) if mine else None  # another world size: the step samples anew
        self.applied = max((int(r["index"]) for r in batch.get("ranks", []) if r), default=-1)
