"""Candidate weights of the list-wise alignment methods, and BLADE's reward posterior.

Every method trains the same loss form over the N lists y_1..y_N sampled for a user:
    L = - sum_n w_n · log pi(y_n) / K  +  beta · KL(pi || pi_ref)
and differs only in the weights w (DPO: a pairwise logistic term on the same list log-probabilities).
KL is the whole-list Plackett–Luce KL, estimated on the rollouts (plackett_luce.list_kl), and enters
the loss per pick (beta · KL / K, as the list log-probabilities do). Every method trains
align.epochs optimizer steps on each batch of rollouts, so all of them spend the same lists and steps.

static_bon   w_n ∝ F_ref(r_n)^(N-1): Best-of-N distillation, F_ref the empirical CDF of the
             reward under the frozen reference, estimated once (mid-rank for ties). Once the policy
             beats the reference everywhere, F_ref = 1 for every candidate, the weights are uniform
             and the expected gradient of sum_n w_n log pi(y_n) is zero: the signal fades.
blade        w_n ∝ F_t(r_n)^(N-1), F_t the posterior-predictive CDF of a reward distribution that is
             re-estimated every step. Rewards of a user (scope=user) or of everyone (scope=global)
             are Normal(mu, sigma^2) with a Normal–Inverse-Gamma prior NIG(mu0, kappa0, alpha0, beta0):
               sigma^2 ~ InvGamma(alpha0, beta0),  mu | sigma^2 ~ Normal(mu0, sigma^2 / kappa0).
             The prior at step t is the previous posterior, decayed by gamma (align.blade.decay):
               kappa0 = max(gamma·kappa, c),  alpha0 = max(gamma·alpha, c/2),  beta0 = beta·alpha0/alpha,
             (c = min_pseudo_count; beta is rescaled with alpha so the variance estimate beta/alpha
             is kept while its weight shrinks). With the current N rewards x (mean xbar,
             S = sum (x - xbar)^2) the conjugate update is
               kappa = kappa0 + N,   mu = (kappa0·mu0 + N·xbar) / kappa,   alpha = alpha0 + N/2,
               beta  = beta0 + S/2 + kappa0·N·(xbar - mu0)^2 / (2·kappa),
             and the posterior predictive of a new reward is Student-t with 2·alpha degrees of
             freedom, location mu and scale^2 = beta·(kappa + 1) / (alpha·kappa). The first prior is
             this update applied to the reference rollouts (from a vague NIG(0, 1e-3, 1, 1e-4)).
             The predictive tracks the policy's own reward level, so candidates above the historical
             range keep distinct CDF values and stay ranked. Scopes: one posterior per user, per
             activity group (users bucketed by history length; every group present in a batch is
             updated each step from all its users' rewards), or one global one. The decay is per
             elapsed rollout batch: a group last updated s batches ago is decayed by gamma^s (with the floor,
             the same as decaying s times), so a rarely revisited user's history fades by age.
grpo         w_n = (r_n - mean_n r) / (std_n r + 1e-6) / N: group-relative advantages in PPO's clipped
             surrogate  min(rho_n w_n, clip(rho_n, 1 - eps, 1 + eps) w_n)  with the per-pick (length-
             normalised) list ratio rho_n = (pi(y_n) / pi_old(y_n))^(1/K), pi_old the policy that
             sampled the lists (eps = align.clip); rho = 1 on fresh rollouts, so the first epoch is the
             plain policy gradient and later epochs (align.epochs) cannot push a list's ratio past the clip.
flame        step-wise GRPO with potential-based shaping: the list is built pick by pick, pick j
             is credited with g_j = Phi(y_1..y_j) - Phi(y_1..y_{j-1}), Phi = the list reward of a
             prefix (Phi(empty) = 0, so the g_j sum to the list reward). The return-to-go
             G_j = sum_{m>=j} g_m is normalised per position across the N lists (as GRPO does per
             list) and weights log pi(y_j | y_<j) in the same clipped surrogate, per pick:
             L = - sum_n sum_j min(rho_nj A_nj, clip(rho_nj, 1 - eps, 1 + eps) A_nj) / (N K),
             rho_nj = pi(y_nj | y_n,<j) / pi_old(y_nj | y_n,<j).
pars         token-level credit over the reasoning steps of a generative policy (after REG4Rec's PARS), on
             top of flame: each pick is T token choices along the model's canonical token order, and
             its Plackett–Luce probability factorises exactly over them,
               log pi(y_j | y_<j) = sum_t [LSE_{i in R, i under prefix_t(y_j)} s_i - LSE_{i in R, under prefix_t-1} s_i],
             R the items not yet in the list. V_t = the policy's expected gain of the pick among the items
             under prefix_t (exact, from every item's gain at that position: rewards.*_candidates), so
             V_0 is the pick's expected gain and V_T its actual one. Token t's advantage is
               A_jt = [V_jt - V_j,t-1 + (G_j+1 - mean_n G_j+1)] / s,
             s the root mean square of the bracket over the batch (a per-user spread is 0 for a user
             whose lists all scored the same, while its exact token credit is not),
             G the return-to-go as in flame: the pick's own gain is credited to the tokens that chose
             it with the exact per-token values (an unbiased policy gradient of the expected gain,
             without the sampling noise of the pick), the later picks' return as flame does, to every
             token. The surrogate is flame's, per token: min(rho A, clip(rho) A), rho the token ratio.
gflownet     trajectory balance (a list is a trajectory of K picks; an ordered prefix has one
             parent, so P_B = 1): (log Z + log pi(y) - log R(y))^2 with
             log R(y) = r(y) / tau (+ log pi_ref(y) with reference_prior): the policy is trained
             to sample lists in proportion to the (reference-tilted) reward. log Z is the per-user
             batch estimate mean_n (log R - log pi) (the log-partition variance form), so the loss is
             the variance over a user's N lists of log pi(y_n) - log R(y_n), divided by K.
dpo          the best and worst of the N lists (and optionally the held-out items' list against the
             model's own top list): -log sigmoid(beta_dpo·[(lp_w - lp_ref_w) - (lp_l - lp_ref_l)]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import stdtr

VAGUE = (0.0, 1e-3, 1.0, 1e-4)  # mu0, kappa0, alpha0, beta0


def empirical_cdf(reference: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """reference (B, M), rewards (B, N) -> F_ref(r) = (#ref < r + 0.5·#ref == r) / M."""
    ref, r = reference[:, None, :], rewards[:, :, None]
    return ((ref < r).float().sum(-1) + 0.5 * (ref == r).float().sum(-1)) / reference.shape[1]


def bon_weights(cdf: torch.Tensor, n: int) -> torch.Tensor:
    """w ∝ F^(n-1) per row (log space); a row with F = 0 everywhere gets uniform weights."""
    logw = (n - 1) * torch.log(cdf.double().clamp(min=0))
    all_zero = torch.isinf(logw).all(-1, keepdim=True)
    logw = torch.where(all_zero, torch.zeros_like(logw), logw)
    return torch.softmax(logw, dim=-1).to(cdf.dtype)


def grpo_weights(rewards: torch.Tensor) -> torch.Tensor:
    n = rewards.shape[-1]
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, unbiased=False, keepdim=True) + 1e-6) / n


def ppo_clipped(log_ratio: torch.Tensor, advantage: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate per element: min(rho·A, clip(rho, 1 - clip, 1 + clip)·A), rho = exp(log_ratio).
    Its gradient vanishes where the ratio has left the clip range in the direction the advantage favours."""
    rho = torch.exp(log_ratio.clamp(-20.0, 20.0))  # an overflow would turn a zero advantage into NaN
    a = advantage.detach()
    return torch.minimum(rho * a, rho.clamp(1 - clip, 1 + clip) * a)


def weight_entropy(w: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of a weight distribution (log N = uniform = no preference)."""
    return -(w * torch.log(w.clamp(min=1e-30))).sum(-1)


@dataclass
class NIG:
    """Normal–Inverse-Gamma parameters, one entry per group (float64 arrays)."""
    mu: np.ndarray
    kappa: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray

    @classmethod
    def vague(cls, groups: int) -> "NIG":
        return cls(*(np.full(groups, v, dtype=np.float64) for v in VAGUE))

    def take(self, idx) -> "NIG":
        return NIG(self.mu[idx].copy(), self.kappa[idx].copy(), self.alpha[idx].copy(), self.beta[idx].copy())

    def put(self, idx, other: "NIG") -> None:
        self.mu[idx], self.kappa[idx], self.alpha[idx], self.beta[idx] = other.mu, other.kappa, other.alpha, other.beta

    def decayed(self, gamma: float | np.ndarray, floor: float) -> "NIG":
        kappa = np.maximum(gamma * self.kappa, floor)
        alpha = np.maximum(gamma * self.alpha, floor / 2)
        return NIG(self.mu.copy(), kappa, alpha, self.beta * alpha / self.alpha)

    def updated(self, n: np.ndarray, mean: np.ndarray, sq_dev: np.ndarray) -> "NIG":
        """Conjugate update with n observations of mean `mean` and sum of squared deviations `sq_dev`."""
        kappa = self.kappa + n
        mu = (self.kappa * self.mu + n * mean) / kappa
        alpha = self.alpha + n / 2
        beta = self.beta + sq_dev / 2 + self.kappa * n * (mean - self.mu) ** 2 / (2 * kappa)
        return NIG(mu, kappa, alpha, beta)

    def update_with(self, x: np.ndarray) -> "NIG":
        """x: (groups, N) observations."""
        mean = x.mean(-1)
        return self.updated(np.full(len(mean), x.shape[-1], dtype=np.float64), mean, ((x - mean[:, None]) ** 2).sum(-1))

    def predictive_cdf(self, r: np.ndarray) -> np.ndarray:
        """P(reward <= r) under the posterior predictive (Student-t); r: (groups, N)."""
        scale = np.sqrt(self.beta * (self.kappa + 1) / (self.alpha * self.kappa))
        return stdtr((2 * self.alpha)[:, None], (r - self.mu[:, None]) / scale[:, None])


def flame_advantages(gains: torch.Tensor) -> torch.Tensor:
    """gains (B, N, K) shaped step rewards -> (B, N, K) per-position group-relative advantages of the
    returns-to-go (normalised over the N lists at each position)."""
    ret = torch.flip(torch.cumsum(torch.flip(gains.double(), [-1]), -1), [-1])
    centred = ret - ret.mean(1, keepdim=True)
    return (centred / (ret.std(1, unbiased=False, keepdim=True) + 1e-6)).to(gains.dtype)


def prefix_credit(logits: torch.Tensor, lists: torch.Tensor, groups: torch.Tensor, gains=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A generative policy's picks as token choices. logits (B, n + 1) masked item log-scores (-inf:
    never listed), lists (B, N, K), groups (T + 1, n + 1): each item's prefix group at every token
    depth (depth 0: one group; depth T: the item), `gains(j)` -> (B, N or 1, n + 1) every item's gain
    at list position j (None: no values). Returns the token log-probabilities (B, N, K, T), whose sum
    over T is the pick's Plackett–Luce log-probability, and the prefix values V (B, N, K, T + 1):
    the policy's expected gain of the pick among the remaining items under each prefix."""
    b, n_lists, k = lists.shape
    depth = groups.shape[0] - 1
    x = logits.double()
    top = x.detach().amax(-1, keepdim=True)  # cancels in every ratio below
    w = torch.exp(x - top)[:, None, :].expand(b, n_lists, x.shape[1])                     # 0 where -inf
    taken = torch.zeros((b, n_lists, x.shape[1]), dtype=torch.bool, device=x.device)
    sizes = [int(g.max()) + 1 for g in groups]
    token_lp, values = [], []
    for j in range(k):
        wj = w.masked_fill(taken, 0.0)
        pick = lists[..., j]
        g = None if gains is None else gains(j).expand(b, n_lists, -1).double()
        mass, value = [], []
        for t in range(depth + 1):
            gid = groups[t].expand(b, n_lists, -1)
            at = groups[t][pick][..., None]                                                   # (B, N, 1)
            m = torch.zeros((b, n_lists, sizes[t]), dtype=x.dtype, device=x.device).scatter_add(-1, gid, wj)
            mass.append(m.gather(-1, at)[..., 0])
            if g is not None:
                with torch.no_grad():
                    mg = torch.zeros_like(m).scatter_add(-1, gid, wj.detach() * g)
                    value.append(mg.gather(-1, at)[..., 0] / mass[-1].detach().clamp(min=1e-300))
        log_mass = torch.log(torch.stack(mass, -1).clamp(min=1e-300))                          # (B, N, T + 1)
        token_lp.append(log_mass[..., 1:] - log_mass[..., :-1])
        if g is not None:
            values.append(torch.stack(value, -1))
        taken = taken.scatter(-1, pick[..., None], True)
    return torch.stack(token_lp, 2).to(logits.dtype), torch.stack(values, 2) if gains is not None else None


def pars_advantages(values: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """values (B, N, K, T + 1) prefix values, gains (B, N, K) the picks' sampled gains -> (B, N, K, T)
    token advantages: the exact per-token credit of the pick's own gain plus the group-relative
    return of the picks after it, divided by their root mean square over the batch."""
    g = gains.double()
    ret = torch.flip(torch.cumsum(torch.flip(g, [-1]), -1), [-1])                          # G_j
    after = ret - g                                                                         # G_j+1
    future = after - after.mean(1, keepdim=True)
    raw = values[..., 1:] - values[..., :-1] + future[..., None]
    # one scale for the batch: a user whose lists all scored the same still has exact token credit,
    # which a per-user spread (0 there) would blow up
    return (raw / (raw.pow(2).mean().sqrt() + 1e-12)).to(gains.dtype)


def trajectory_balance(lp: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """Per-user trajectory-balance loss with log Z at its batch optimum: lp, log_reward (B, N) ->
    (B,) mean_n (delta_n - mean delta)^2, delta = log pi(y_n) - log R(y_n). Zero exactly when the
    policy's list probabilities are proportional to R on the sampled lists."""
    delta = lp.double() - log_reward.double()
    return ((delta - delta.mean(-1, keepdim=True)) ** 2).mean(-1).to(lp.dtype)


def dpo_loss(lp_w: torch.Tensor, lp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair DPO loss on (per-item normalised) list log-probabilities."""
    return -torch.nn.functional.logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))
