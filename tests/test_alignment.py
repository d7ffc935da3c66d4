"""Alignment mechanics: Plackett–Luce probabilities and sampling, rewards, method weights, BLADE's
posterior, and one Aligner step on a tiny model."""
from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from jobs.schema import AlignSpec
from ray_jobs.alignment import methods, rewards
from ray_jobs.alignment.aligner import AlignData, Aligner, StepStats, StepSums, posterior_groups
from ray_jobs.alignment.plackett_luce import exact_list_kl, gumbel_topk, list_kl, list_log_prob, pick_log_probs
from ray_jobs.models.sasrec import SASRec
from ray_jobs.scoring import CatalogueScores


def _all_lists(n: int, k: int, masked: set[int] = frozenset()) -> torch.Tensor:
    items = [i for i in range(n) if i not in masked]
    return torch.tensor(list(itertools.permutations(items, k)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_plackett_luce_probabilities_sum_to_one(k):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, dtype=torch.float64) * 2
    logits[1, 3] = float("-inf")  # a masked item: no mass, never in a list
    for row, masked in ((0, set()), (1, {3})):
        lists = _all_lists(5, k, masked)[None]
        p = list_log_prob(logits[row:row + 1], lists).double().exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_plackett_luce_matches_hand_computation():
    s = torch.tensor([[0.0, math.log(2), math.log(3)]])  # weights 1, 2, 3
    lp = list_log_prob(s, torch.tensor([[[2, 0]]]))
    assert lp.item() == pytest.approx(math.log(3 / 6 * 1 / 3))


def test_peaked_policy_stays_finite():
    logits = torch.tensor([[60.0, 0.0, -5.0, 1.0]])  # the first item takes ~all mass
    lp = list_log_prob(logits, torch.tensor([[[0, 3, 1]]]))
    expect = (60 - torch.logsumexp(logits[0], 0)) + (1 - torch.logsumexp(logits[0, 1:], 0)) + (0 - torch.logsumexp(logits[0, 1:3], 0))
    assert torch.isfinite(lp).all() and lp.item() == pytest.approx(expect.item(), abs=1e-6)


def test_gumbel_topk_frequencies_match_exact_probabilities():
    logits = torch.tensor([[1.0, 0.3, -0.5, 0.0]])
    k, samples = 2, 40_000
    lists = gumbel_topk(logits, k, samples, torch.Generator().manual_seed(3))[0]
    all_lists = _all_lists(4, k)
    expected = list_log_prob(logits, all_lists[None])[0].double().exp().numpy() * samples
    index = {tuple(x): i for i, x in enumerate(all_lists.tolist())}
    observed = np.bincount([index[tuple(x)] for x in lists.tolist()], minlength=len(all_lists))
    chi2, p = stats.chisquare(observed, expected)
    assert p > 0.001, (chi2, p)
    assert len({tuple(x) for x in lists.tolist()}) == len(all_lists)  # no repeated item inside a list
    assert all(len(set(x)) == k for x in lists.tolist())


def test_masked_items_never_sampled():
    logits = torch.zeros(1, 6)
    logits[0, [0, 2]] = float("-inf")
    lists = gumbel_topk(logits, 3, 500, torch.Generator().manual_seed(0))
    assert not torch.isin(lists, torch.tensor([0, 2])).any()


def test_whole_list_kl_by_enumeration_equals_a_hand_computation():
    """Weights (1, 2, 3) against (1, 1, 1), lists of K = 2: six ordered lists, written out."""
    p, q = torch.tensor([0.0, math.log(2), math.log(3)], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    w = [1, 2, 3]
    by_hand = 0.0
    for a, b in itertools.permutations(range(3), 2):
        pa = w[a] / 6 * w[b] / (6 - w[a])
        by_hand += pa * math.log(pa / (1 / 3 * 1 / 2))
    assert exact_list_kl(p, q, 2) == pytest.approx(by_hand, rel=1e-12)
    assert exact_list_kl(p, p, 2) == pytest.approx(0.0, abs=1e-15)
    # a masked item (-inf in both) takes no part; K = 1 is the first-pick KL
    pm = torch.tensor([0.5, float("-inf"), -0.2, 1.0], dtype=torch.float64)
    qm = torch.tensor([0.0, float("-inf"), 0.3, 0.1], dtype=torch.float64)
    first = torch.softmax(pm[[0, 2, 3]], 0) * (torch.log_softmax(pm[[0, 2, 3]], 0) - torch.log_softmax(qm[[0, 2, 3]], 0))
    assert exact_list_kl(pm, qm, 1) == pytest.approx(first.sum().item(), rel=1e-9)
    assert exact_list_kl(pm, qm, 3) > exact_list_kl(pm, qm, 1)  # later picks add their own divergence


def test_rollout_kl_estimate_matches_the_exact_whole_list_kl_on_and_off_policy():
    """The estimator on lists sampled from the policy itself, and on lists sampled from an older
    policy (importance-weighted), agrees with enumeration within Monte-Carlo error."""
    torch.manual_seed(4)
    n, k, samples = 6, 3, 200_000
    policy, ref, old = (torch.randn(1, n, dtype=torch.float64) for _ in range(3))
    exact = exact_list_kl(policy[0], ref[0], k)
    for sampler in (policy, old):
        lists = gumbel_topk(sampler, k, samples, torch.Generator().manual_seed(9))
        lp, lp_ref, lp_b = (list_log_prob(x, lists) for x in (policy, ref, sampler))
        est = list_kl(lp, lp_ref, lp_b).item()
        w = torch.exp(lp - lp_b)
        se = (w * (lp - lp_ref)).std().item() / samples ** 0.5
        assert abs(est - exact) < 4 * se, (est, exact, se)
    assert list_kl(list_log_prob(ref, lists), list_log_prob(ref, lists), list_log_prob(old, lists)).item() == 0.0


def test_rollout_kl_gradient_is_the_gradient_of_the_exact_kl():
    torch.manual_seed(5)
    n, k = 5, 2
    ref = torch.randn(1, n, dtype=torch.float64)
    logits = torch.randn(1, n, dtype=torch.float64, requires_grad=True)
    lists = _all_lists(n, k)[None]
    lp = list_log_prob(logits, lists)
    exact = (lp.exp() * (lp - list_log_prob(ref, lists))).sum()
    (g_exact,) = torch.autograd.grad(exact, logits)
    sampled = gumbel_topk(logits.detach(), k, 100_000, torch.Generator().manual_seed(1))
    lp_s = list_log_prob(logits, sampled)
    (g_est,) = torch.autograd.grad(list_kl(lp_s, list_log_prob(ref, sampled), lp_s.detach()).sum(), logits)
    assert torch.allclose(g_est, g_exact, atol=0.03), (g_est, g_exact)


# ----------------------------------------------------------------------------- rewards

def test_ndcg_reward_hand_computed():
    lists = torch.tensor([[[5, 7, 9], [1, 2, 3], [9, 5, 4]]])
    one = rewards.ndcg(lists, torch.tensor([[7]]))
    assert one[0].tolist() == pytest.approx([1 / math.log2(3), 0.0, 0.0])
    two = rewards.ndcg(lists, torch.tensor([[9, 5]]))
    idcg = 1 + 1 / math.log2(3)
    assert two[0].tolist() == pytest.approx([(1 + 1 / 2) / idcg, 0.0, 1.0])
    padded = rewards.ndcg(lists, torch.tensor([[7, 0]]))  # a padded slot is not relevant
    assert padded[0, 0].item() == pytest.approx(1 / math.log2(3))


def test_msra_reward_grades_the_next_interactions_by_how_far_ahead_they_are():
    """MSRA: the next interaction counts 1, the one after it discount, then discount^2; the ideal list
    has them in that order; discount 1 is plain NDCG; padding is never relevant."""
    lists = torch.tensor([[[5, 7, 9], [9, 7, 5], [1, 2, 3], [7, 1, 2]]])
    future = torch.tensor([[5, 7, 9]])  # 5 next, then 7, then 9
    d = 0.5
    p = [1.0, 1 / math.log2(3), 0.5]
    ideal = 1 * p[0] + d * p[1] + d * d * p[2]
    got = rewards.msra_gains(lists, future, d).sum(-1)[0]
    assert got.tolist() == pytest.approx([1.0, (d * d * p[0] + d * p[1] + p[2]) / ideal, 0.0, d * p[0] / ideal])
    assert torch.allclose(rewards.msra_gains(lists, future, 1.0), rewards.ndcg_gains(lists, future))
    short = rewards.msra_gains(lists, torch.tensor([[7, 0, 0]]), d).sum(-1)[0]
    assert short.tolist() == pytest.approx([p[1], p[1], 0.0, 1.0])


def test_diversity_tail_exposure_hand_computed():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    lists = torch.tensor([[[1, 2], [1, 3]]])
    assert rewards.diversity(lists, emb)[0].tolist() == pytest.approx([1.0, 0.0])
    e3 = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    # pairs: (1,2) cos 0, (1,3) cos .7071, (2,3) cos .7071 -> 1 - 1.4142/3
    assert rewards.diversity(torch.tensor([[[1, 2, 3]]]), e3).item() == pytest.approx(1 - 2 * 0.70710678 / 3, abs=1e-6)
    tail = torch.tensor([False, False, True, True])
    assert rewards.tail_share(lists, tail)[0].tolist() == [0.5, 0.5]
    exposure = torch.tensor([0.0, 0.5, 0.0, 1 / 6])  # n = 3: deficits 0 (1.5x share), 1, 0.5
    assert rewards.exposure_deficit(lists, exposure)[0].tolist() == pytest.approx([0.5, 0.25])
    total = rewards.combine({"ndcg": 1.0, "tail": 0.5, "diversity": 0.0},
                            {"ndcg": torch.ones(1, 2), "tail": torch.tensor([[0.5, 0.0]]), "diversity": torch.zeros(1, 2)})
    assert total.tolist() == [[1.25, 1.0]]
    with pytest.raises(ValueError, match="align.rewards"):
        rewards.combine({"ndcg": 0.0}, {"ndcg": torch.ones(1, 2)})


# ----------------------------------------------------------------------------- weights and BLADE

def test_static_cdf_collapses_when_policy_beats_reference_but_blade_keeps_order():
    ref = torch.tensor([[0.1, 0.2, 0.3, 0.2]])
    above = torch.tensor([[0.5, 0.9, 0.7, 0.6]])  # every candidate above the reference range
    static = methods.bon_weights(methods.empirical_cdf(ref, above), 4)
    assert static[0].tolist() == pytest.approx([0.25] * 4)
    assert methods.weight_entropy(static).item() == pytest.approx(math.log(4))
    prior = methods.NIG.vague(1).update_with(ref.double().numpy())
    post = prior.decayed(0.9, 1.0).update_with(above.double().numpy())
    blade = methods.bon_weights(torch.from_numpy(post.predictive_cdf(above.double().numpy())).float(), 4)
    order = torch.argsort(blade[0], descending=True).tolist()
    assert order == [1, 2, 3, 0]  # still ranked by reward
    assert methods.weight_entropy(blade).item() < math.log(4) - 0.05
    # inside the reference range the static weights do order candidates
    mixed = methods.bon_weights(methods.empirical_cdf(ref, torch.tensor([[0.05, 0.25, 0.15, 0.35]])), 4)
    assert torch.argsort(mixed[0], descending=True).tolist() == [3, 1, 2, 0]


def test_nig_update_closed_form_and_conjugacy():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.2, size=(1, 12))
    prior = methods.NIG(np.array([0.1]), np.array([2.0]), np.array([3.0]), np.array([0.5]))
    post = prior.update_with(x)
    n, xbar, s = 12, x.mean(), ((x - x.mean()) ** 2).sum()
    assert post.kappa[0] == pytest.approx(14.0)
    assert post.mu[0] == pytest.approx((2 * 0.1 + n * xbar) / 14)
    assert post.alpha[0] == pytest.approx(3 + n / 2)
    assert post.beta[0] == pytest.approx(0.5 + s / 2 + 2 * n * (xbar - 0.1) ** 2 / (2 * 14))
    # conjugacy: two updates in a row (no decay) equal one update on all the data
    seq = prior.update_with(x[:, :5]).update_with(x[:, 5:])
    for a, b in zip((seq.mu, seq.kappa, seq.alpha, seq.beta), (post.mu, post.kappa, post.alpha, post.beta)):
        assert a[0] == pytest.approx(b[0])
    # decay keeps the variance estimate beta/alpha and the mean, shrinks the pseudo-counts
    d = post.decayed(0.5, 1.0)
    assert d.mu[0] == post.mu[0] and d.kappa[0] == pytest.approx(7.0) and d.alpha[0] == pytest.approx(4.5)
    assert d.beta[0] / d.alpha[0] == pytest.approx(post.beta[0] / post.alpha[0])
    assert methods.NIG.vague(1).decayed(0.1, 1.0).kappa[0] == 1.0  # floored


def test_nig_predictive_cdf_matches_monte_carlo():
    post = methods.NIG(np.array([0.2]), np.array([3.0]), np.array([4.0]), np.array([0.3]))
    rng = np.random.default_rng(1)
    sigma2 = 1 / rng.gamma(4.0, 1 / 0.3, size=400_000)
    mu = rng.normal(0.2, np.sqrt(sigma2 / 3.0))
    draws = rng.normal(mu, np.sqrt(sigma2))
    grid = np.array([[-0.5, 0.0, 0.2, 0.6, 1.2]])
    mc = (draws[None, :] <= grid[0][:, None]).mean(1)
    assert post.predictive_cdf(grid)[0] == pytest.approx(mc, abs=0.004)


def test_grpo_weights_and_dpo_loss():
    r = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    w = methods.grpo_weights(r)
    assert w[0].tolist() == pytest.approx([-1.2247449 / 3, 0.0, 1.2247449 / 3], abs=1e-5)
    assert w[1].abs().max().item() < 1e-5  # no preference, no signal
    loss = methods.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))))


def test_clipped_objective_is_the_ppo_formula():
    """min(rho·A, clip(rho, 1 - eps, 1 + eps)·A) written out for each case of sign and ratio."""
    eps = 0.2
    rho = torch.tensor([0.5, 0.9, 1.0, 1.5, 0.5, 1.1, 1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0, -1.0, 1.0, -2.0, -1.0, -0.5], dtype=torch.float64)
    by_hand = [0.5 * 1.0,   # A > 0, rho below the range: min(0.5, 0.8) keeps rho·A (the pessimistic bound)
               0.9 * 2.0,   # inside the range: rho·A
               -1.0,        # rho = 1
               1.2 * 1.0,   # A > 0 and rho above 1 + eps: clipped, no gain past the bound
               0.8 * -2.0,  # A < 0 and rho below 1 - eps: clipped
               1.1 * -1.0,  # inside
               1.5 * -0.5]  # A < 0 and rho above the range: the unclipped, worse value
    log_ratio = torch.log(rho).requires_grad_(True)
    out = methods.ppo_clipped(log_ratio, adv, eps)
    assert out.tolist() == pytest.approx(by_hand, abs=1e-12)
    out.sum().backward()  # no gradient where the clip is active
    active = torch.tensor([False, False, False, True, True, False, False])
    assert (log_ratio.grad[active] == 0).all() and (log_ratio.grad[~active] != 0).all()


# ----------------------------------------------------------------------------- one step

def _toy(method: str, dtype: torch.dtype = torch.float32, **kw) -> tuple[Aligner, CatalogueScores, AlignSpec]:
    torch.manual_seed(0)
    n = 30
    rng = np.random.default_rng(0)
    train = [rng.choice(np.arange(1, n + 1), size=int(rng.integers(4, 9)), replace=False) for _ in range(16)]
    cfg = AlignSpec(method=method, users_per_step=8, rollouts=6, list_size=4, reference_rollouts=8,
                    rewards={"ndcg": 1.0, "diversity": 0.2, "tail": 0.2, "exposure": 0.1}, **kw)
    data = AlignData.build(train, n, cfg.holdout, cfg.list_size)
    model = SASRec(n, 10, 16, 1, 1, 0.0).to(dtype)
    reference = SASRec(n, 10, 16, 1, 1, 0.0)
    reference.load_state_dict(model.state_dict())
    tail = torch.zeros(n + 1, dtype=torch.bool)
    tail[n // 2:] = True
    aligner = Aligner(cfg, data, n, 10, torch.randn(n + 1, 8), tail, reference, dtype=dtype)
    aligner.init_reference(seed=0)
    return aligner, CatalogueScores(model).eval(), cfg


METHODS = ["blade", "static_bon", "grpo", "dpo", "flame", "gflownet"]


@pytest.mark.parametrize("method", METHODS)
def test_aligner_step_gives_finite_loss_and_gradients(method):
    aligner, policy, cfg = _toy(method, dpo_ground_truth=(method == "dpo"))
    assert aligner.ref_rewards.shape == (len(aligner.data.users), cfg.reference_rollouts)
    assert aligner.exposure.sum().item() == pytest.approx(1.0, abs=1e-5)
    loss, m = aligner.step(policy, step=0, seed=0)
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert m.kl == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert 0 <= m.reward_ndcg <= 1 and m.effective_grad_norm > 0
    assert (m.weight_entropy is not None) == (method in ("blade", "static_bon"))


def test_step_statistics_match_the_rollouts_by_hand():
    """Every named statistic of a step, recomputed from the same rollouts (sampling is seeded by
    step and rank, so `rollouts` draws the lists `step` trains on)."""
    aligner, policy, cfg = _toy("static_bon")
    ro = aligner.rollouts(policy, batch=3, seed=0)  # before step(): the exposure term reads today's exposure
    r = ro.reward.double()
    loss, m = aligner.step(policy, step=3, seed=0)
    lists, users = r.numel(), len(ro.rows)
    assert users == 8 and lists == 8 * cfg.rollouts
    assert m.reward_mean == pytest.approx(r.mean().item())
    assert m.reward_std == pytest.approx(r.std(unbiased=False).item(), abs=1e-9)
    assert m.reward_max == pytest.approx(r.max().item())
    for term in ("ndcg", "diversity", "tail", "exposure"):
        assert getattr(m, f"reward_{term}") == pytest.approx(ro.terms[term].double().mean().item())
    assert m.flat_groups == pytest.approx((r.max(-1).values == r.min(-1).values).double().mean().item())
    w = methods.bon_weights(methods.empirical_cdf(aligner.ref_rewards[ro.rows], ro.reward), cfg.rollouts)
    assert m.weight_entropy == pytest.approx(methods.weight_entropy(w).double().mean().item(), rel=1e-5)
    lp = list_log_prob(ro.logits, ro.lists) / cfg.list_size
    assert m.policy_loss == pytest.approx(-(w * lp).sum().item() / users, rel=1e-5)
    assert m.kl == pytest.approx(0.0, abs=1e-6) and m.sampled_log_ratio == pytest.approx(0.0, abs=1e-5)
    assert m.beta == cfg.beta
    # the loss: policy term + beta * KL, averaged over the global batch (here, this process's users)
    assert loss.item() == pytest.approx(-(w * lp).sum().item() / users, rel=1e-5)


def test_the_loss_carries_beta_times_the_whole_list_kl_once_the_policy_moved():
    """After an update the policy is off the reference: the step's KL is the rollouts' mean
    log-ratio of whole lists (fresh lists: weights 1), positive, and the loss is the policy term plus
    beta * KL / K, averaged over the batch's users."""
    aligner, policy, cfg = _toy("static_bon", beta=0.5)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss, _ = aligner.step(policy, step=0, seed=0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ro = aligner.rollouts(policy, batch=1, seed=0)  # what step 1 samples
    with torch.no_grad():
        ratio = list_log_prob(ro.logits, ro.lists).double() - list_log_prob(ro.ref_logits, ro.lists).double()
    loss, m = aligner.step(policy, step=1, seed=0)
    assert m.kl == pytest.approx(ratio.mean(-1).mean().item(), rel=1e-4) and m.kl > 1e-3
    assert loss.item() == pytest.approx(m.policy_loss + cfg.beta * m.kl / cfg.list_size, rel=1e-5)
    assert abs(cfg.beta * m.kl / cfg.list_size) > 1e-3 * abs(m.policy_loss)  # the KL term is not lost in rounding


def test_step_sums_combine_ranks_into_global_statistics():
    """Two ranks' sums (as the all-reduce adds them) give the statistics of their pooled lists."""
    a = StepSums(users=2, lists=4, reward=2.0, reward_sq=1.5, kl=0.2, grad_norm=1.0, entropy=2.0, flat_groups=1,
                 policy_loss=-0.4, ndcg=1.0, diversity=2.0, tail=0.4, exposure=0.0)
    b = StepSums(users=1, lists=2, reward=1.6, reward_sq=1.3, kl=0.1, grad_norm=0.5, entropy=1.0, flat_groups=0,
                 policy_loss=-0.2, clipped=1.5, ndcg=0.5, diversity=1.0, tail=0.6, exposure=0.3)
    total = StepSums(*(x + y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))))
    s = StepStats.of(total, reward_max=0.9, beta=0.05, has_entropy=True)
    assert s.reward_mean == pytest.approx(3.6 / 6) and s.reward_std == pytest.approx((2.8 / 6 - 0.36) ** 0.5)
    assert s.kl == pytest.approx(0.3 / 3) and s.effective_grad_norm == pytest.approx(1.5 / 3)
    assert s.weight_entropy == pytest.approx(1.0) and s.flat_groups == pytest.approx(1 / 3)
    assert s.policy_loss == pytest.approx(-0.2) and s.reward_tail == pytest.approx(1.0 / 6)
    assert s.clipped_share == pytest.approx(1.5 / 6)
    assert StepStats.of(total, 0.9, 0.05, has_entropy=False).weight_entropy is None
    assert set(s.as_dict()) == {f.name for f in dataclasses.fields(StepStats)}


def test_reference_follows_the_policy_dtype():
    """A bf16 policy (DeepSpeed's GPU precision) gets a bf16 reference, and a step still runs."""
    aligner, policy, _ = _toy("grpo", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in aligner.reference.parameters())
    loss, m = aligner.step(policy, step=0, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and m.kl == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("method", ["grpo", "flame", "blade"])
def test_epochs_reuse_one_rollout_batch_off_policy(method):
    """align.epochs = 3: steps 0-2 train on batch 0's lists (sampled once, posterior and exposure
    updated once), the later epochs are importance-weighted and clipped; step 3 samples batch 1."""
    aligner, policy, cfg = _toy(method, epochs=3, clip=0.1)
    opt = torch.optim.SGD(policy.parameters(), lr=0.03)
    stats, exposures, lists, kappas = [], [], [], []
    for step in range(4):
        if step == 1:  # the second epoch's KL, by hand: self-normalised weights pi / pi_old on batch 0's lists
            with torch.no_grad():
                bt = aligner.batch
                lp_now = list_log_prob(aligner.logits(policy, bt.rollouts.rows), bt.rollouts.lists).double()
                w = torch.softmax(lp_now - bt.pick_old.sum(-1).double(), -1)
                d = lp_now - bt.lp_ref.double()
                weighted, plain = float((w * d).sum(-1).mean()), float(d.mean(-1).mean())
        loss, m = aligner.step(policy, step, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats.append(m)
        exposures.append(aligner.exposure.clone())
        lists.append(aligner.batch.rollouts.lists)
        kappas.append(aligner.posterior.kappa.copy())
    assert aligner.batch.index == 1
    assert torch.equal(lists[0], lists[1]) and torch.equal(lists[0], lists[2]) and not torch.equal(lists[0], lists[3])
    assert torch.equal(exposures[0], exposures[2]) and not torch.equal(exposures[2], exposures[3])
    assert stats[0].kl == pytest.approx(0.0, abs=1e-6) and stats[2].kl > 0     # the policy moved off the reference
    assert stats[0].reward_mean == stats[2].reward_mean                         # the same lists' rewards
    # off-policy, the logged KL is importance-weighted (not vacuous: the plain average differs)
    assert stats[1].kl == pytest.approx(weighted, rel=1e-4) and abs(weighted - plain) > 1e-3 * abs(plain)
    if method == "blade":  # one posterior update per batch
        assert np.array_equal(kappas[0], kappas[2]) and not np.array_equal(kappas[2], kappas[3])
    else:
        assert stats[0].clipped_share == 0 and stats[2].clipped_share > 0       # later epochs hit the clip


def test_a_run_resumed_between_epochs_continues_on_the_same_rollouts():
    aligner, policy, cfg = _toy("grpo", epochs=2)
    opt = torch.optim.SGD(policy.parameters(), lr=0.03)
    loss, _ = aligner.step(policy, 0, 0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    state = aligner.state_dict()
    path = Path(tempfile.mkdtemp()) / "aligner.pt"
    torch.save(state, path)
    resumed, _, _ = _toy("grpo", epochs=2)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    expect, m = aligner.step(policy, 1, 0)
    got, m2 = resumed.step(policy, 1, 0)
    assert got.item() == pytest.approx(expect.item(), rel=1e-6) and m2.kl == pytest.approx(m.kl, rel=1e-6)
    assert torch.equal(resumed.batch.rollouts.lists, aligner.batch.rollouts.lists)
    # several workers: each rank keeps its own users' batch (one rank's client state restores all)
    mine = state["batch"]["ranks"][0]
    for rank, world, ranks, kept in ((1, 2, [{}, mine], True), (0, 2, [{}, mine], False), (0, 2, [mine], False)):
        other, _, _ = _toy("grpo", epochs=2)
        other.rank, other.world = rank, world
        other.load_state_dict({**state, "batch": {"world": 2 if len(ranks) == 2 else 1, "ranks": ranks}})
        assert (other.batch is not None) == kept


def test_a_batch_sampled_again_after_a_resize_enters_the_posteriors_and_exposure_once():
    """Resumed on another number of workers, the saved lists are dropped and the step samples its
    batch again: BLADE's posteriors and the running exposure already hold that batch and keep it
    once; the next batch updates them as usual."""
    import copy
    aligner, policy, _ = _toy("blade", epochs=2)
    aligner.step(policy, 0, 0)
    state = copy.deepcopy(aligner.state_dict())  # as a checkpoint holds it: no arrays shared with the run
    resized, _, _ = _toy("blade", epochs=2)
    resized.load_state_dict({**state, "batch": {"world": 2, "ranks": state["batch"]["ranks"] * 2}})
    assert resized.batch is None and resized.applied == 0
    resized.step(policy, 1, 0)  # batch 0 again
    assert np.array_equal(resized.posterior.mu, aligner.posterior.mu)
    assert np.array_equal(resized.posterior.kappa, aligner.posterior.kappa)
    assert torch.equal(resized.exposure, aligner.exposure)
    resized.step(policy, 2, 0)  # batch 1: new rewards
    assert not np.array_equal(resized.posterior.mu, aligner.posterior.mu)
    assert not torch.equal(resized.exposure, aligner.exposure)


def test_blade_user_posterior_moves_with_rewards():
    aligner, policy, cfg = _toy("blade")
    before = aligner.posterior.kappa.copy()
    rows, _ = aligner.batch_rows(0, 0)
    aligner.step(policy, step=0, seed=0)
    after = aligner.posterior.kappa
    decayed = np.maximum(before[rows] * cfg.blade.decay, cfg.blade.min_pseudo_count)
    assert after[rows] == pytest.approx(decayed + cfg.rollouts)
    untouched = np.setdiff1d(np.arange(len(before)), rows)
    assert np.array_equal(after[untouched], before[untouched])


def test_align_data_holds_out_training_items_only():
    train = [np.array([1, 2, 3, 4]), np.array([5]), np.array([6, 7])]
    data = AlignData.build(train, 20, holdout=1, list_size=3)
    assert data.users.tolist() == [0, 2]
    assert [c.tolist() for c in data.contexts] == [[1, 2, 3], [6]]
    assert data.relevant[:, 0].tolist() == [4, 7]
    with pytest.raises(ValueError, match="align.holdout"):
        AlignData.build([np.array([1])], 20, holdout=1, list_size=3)


@pytest.mark.slow
def test_adaptive_kl_control_raises_beta_when_kl_exceeds_target():
    aligner, policy, cfg = _toy("grpo", kl_target=1e-6, kl_rate=0.5, lr=1e-2)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    betas = []
    for step in range(4):
        loss, m = aligner.step(policy, step=step, seed=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        betas.append(m.beta)
    assert betas[0] == cfg.beta and betas[-1] > betas[0] * 1.3  # KL > target after the first update
    assert aligner.state_dict()["beta"] == aligner.beta


@pytest.mark.parametrize("beta_min", [1e-4, 0.05])
def test_adaptive_kl_control_lowers_beta_under_target_down_to_beta_min(beta_min):
    aligner, policy, cfg = _toy("grpo", kl_target=1e6, kl_rate=0.5, beta=0.05, beta_min=beta_min)
    betas = [aligner.step(policy, step=step, seed=0)[1].beta for step in range(4)]
    assert betas[0] == cfg.beta and aligner.beta == pytest.approx(max(beta_min, 0.05 * math.exp(-0.5 * 4)))


# ----------------------------------------------------------------------------- step-wise credit (FLAME)

def test_pick_log_probs_are_the_sequential_choices_and_sum_to_the_list():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, dtype=torch.float64)
    lists = torch.tensor([[[4, 1, 2], [0, 5, 3]]])
    picks = pick_log_probs(logits, lists)
    for n in range(2):
        left = list(range(6))
        for j in range(3):
            item = int(lists[0, n, j])
            expected = logits[0, item] - torch.logsumexp(logits[0, left], 0)
            assert picks[0, n, j].item() == pytest.approx(expected.item(), abs=1e-12)
            left.remove(item)
    assert torch.allclose(picks.sum(-1), list_log_prob(logits, lists))


def test_shaped_step_rewards_sum_to_the_list_reward_and_diversity_gains_by_hand():
    torch.manual_seed(0)
    n, k = 12, 5
    emb = torch.nn.functional.normalize(torch.randn(n + 1, 4), dim=-1)
    lists = torch.stack([torch.randperm(n)[:k] + 1 for _ in range(6)]).reshape(2, 3, k)
    relevant = torch.tensor([[lists[0, 0, 1].item(), lists[0, 2, 4].item(), 0], [3, 5, 7]])
    tail = torch.arange(n + 1) > n // 2
    exposure = torch.softmax(torch.randn(n + 1), 0)
    exposure[0] = 0
    gains = {"ndcg": rewards.ndcg_gains(lists, relevant), "diversity": rewards.diversity_gains(lists, emb),
             "tail": rewards.tail_gains(lists, tail), "exposure": rewards.exposure_gains(lists, exposure)}
    # the list values from the gains equal the closed forms: NDCG by hand, ILD as 1 - mean pairwise cosine
    e = emb[lists]
    cos = (e[..., :, None, :] * e[..., None, :, :]).sum(-1)
    ild = 1 - (cos.sum((-1, -2)) - k) / (k * (k - 1))
    assert torch.allclose(gains["diversity"].sum(-1), ild, atol=1e-6)
    disc = 1 / torch.log2(torch.arange(k) + 2.0)
    hits = torch.tensor([[float(x in relevant[b].tolist() and x != 0) for x in lists[b, m].tolist()]
                         for b in range(2) for m in range(3)]).reshape(2, 3, k)
    ideal = torch.stack([disc[:2].sum(), disc[:3].sum()])
    assert torch.allclose(gains["ndcg"].sum(-1), (hits * disc).sum(-1) / ideal[:, None], atol=1e-6)
    # diversity gain of pick j: its distances to the picks before it, over the K(K-1)/2 pairs
    j = 3
    by_hand = (1 - cos[1, 2, j, :j]).sum() / (k * (k - 1) / 2)
    assert gains["diversity"][1, 2, j].item() == pytest.approx(by_hand.item(), abs=1e-6)
    weights = {"ndcg": 1.0, "diversity": 0.3, "tail": 0.2, "exposure": 0.1}
    shaped = rewards.combine(weights, gains)
    listwise = rewards.combine(weights, {"ndcg": rewards.ndcg(lists, relevant), "diversity": ild,
                                         "tail": rewards.tail_share(lists, tail),
                                         "exposure": rewards.exposure_deficit(lists, exposure)})
    assert torch.allclose(shaped.sum(-1), listwise, atol=1e-6)
    assert torch.allclose(torch.cumsum(shaped, -1)[..., -1], listwise, atol=1e-6)  # potential at K = the list reward


def test_flame_advantages_credit_positions_by_their_return_to_go():
    # two lists; all their difference comes from the first pick: equal advantages at positions 0 only
    gains = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.5, 0.0]]])
    adv = methods.flame_advantages(gains)
    assert adv[0, :, 0].tolist() == pytest.approx([1.0, -1.0], abs=1e-5)
    assert adv[0, :, 1:].abs().max().item() < 1e-5
    # with K = 1 FLAME is GRPO (times N: the weights of grpo carry the 1/N)
    r = torch.tensor([[0.2, 0.9, 0.4]])
    assert torch.allclose(methods.flame_advantages(r[..., None])[..., 0] / 3, methods.grpo_weights(r), atol=1e-6)


# ----------------------------------------------------------------------------- pars (token-level credit)

def _prefix_case(n: int = 12, seed: int = 0):
    """A tiny catalogue of items with 2 tokens (4 x 3 codes, each item a distinct pair) and its groups."""
    rng = np.random.default_rng(seed)
    pairs = rng.permutation([(a, b) for a in range(4) for b in range(3)])[:n]
    tokens = np.vstack([[0, 0], pairs])
    groups = torch.from_numpy(np.stack([np.zeros(n + 1, dtype=np.int64),
                                        np.unique(tokens[:, :1], axis=0, return_inverse=True)[1].reshape(-1),
                                        np.arange(n + 1)]))
    return tokens, groups


def test_prefix_credit_factorises_each_pick_and_its_values_are_the_policys_expected_gains():
    """The token log-probabilities of a pick sum to its Plackett–Luce log-probability (items already
    listed and masked ones excluded); the prefix values are the expected gain among the remaining items
    under each prefix, by hand: depth 0 over all of them, depth T the pick's own gain."""
    n, k = 12, 3
    tokens, groups = _prefix_case(n)
    torch.manual_seed(0)
    logits = torch.randn(2, n + 1)
    logits[:, 0] = float("-inf")
    logits[1, 5] = float("-inf")  # a seen item: never listed, no mass
    lists = gumbel_topk(logits, k, 4)
    gain = torch.rand(2, n + 1)
    tok, values = methods.prefix_credit(logits, lists, groups, lambda j: gain[:, None, :] * (j + 1))
    assert tok.shape == (2, 4, k, 2) and values.shape == (2, 4, k, 3)
    assert torch.allclose(tok.sum(-1), pick_log_probs(logits, lists), atol=1e-6)
    for b, m, j in itertools.product(range(2), range(4), range(k)):
        y = int(lists[b, m, j])
        left = [i for i in range(1, n + 1) if torch.isfinite(logits[b, i]) and i not in lists[b, m, :j].tolist()]
        p = torch.softmax(logits[b, left].double(), 0)
        g = gain[b, left].double() * (j + 1)
        assert values[b, m, j, 0].item() == pytest.approx(float((p * g).sum()), rel=1e-6)
        same = torch.tensor([tokens[i, 0] == tokens[y, 0] for i in left])
        assert values[b, m, j, 1].item() == pytest.approx(float((p * g)[same].sum() / p[same].sum()), rel=1e-6)
        assert values[b, m, j, 2].item() == pytest.approx(float(gain[b, y]) * (j + 1), rel=1e-6)
        first = float(torch.log(p[same].sum()))
        assert tok[b, m, j, 0].item() == pytest.approx(first, rel=1e-5)


def test_token_credit_is_the_exact_policy_gradient_of_the_expected_gain():
    """With exact prefix values, the expected token-credit gradient sum_t grad log pi(token_t) (V_t - V_t-1)
    over the policy's picks (enumerated) equals the gradient of the expected gain itself: unbiased,
    with no baseline to tune."""
    n = 12
    _, groups = _prefix_case(n, seed=1)
    torch.manual_seed(1)
    base = torch.randn(1, n + 1)
    base[:, 0] = float("-inf")
    gain = torch.rand(1, n + 1)
    logits = base.clone().requires_grad_(True)
    expected = (torch.softmax(logits[:, 1:], -1) * gain[:, 1:]).sum()
    (exact,) = torch.autograd.grad(expected, logits)
    lists = torch.arange(1, n + 1).reshape(1, n, 1)  # every item as a one-pick list
    tok, values = methods.prefix_credit(logits, lists, groups, lambda j: gain[:, None, :])
    p = torch.softmax(base[0, 1:], -1).double()
    surrogate = (p[None, :, None] * tok[0, :, 0, :].double() * (values[0, :, 0, 1:] - values[0, :, 0, :-1])).sum()
    (credit,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(credit[:, 1:].double(), exact[:, 1:].double(), atol=1e-6)
    # the telescoped credit of a pick is its gain over the expected one
    assert torch.allclose((values[0, :, 0, -1] - values[0, :, 0, 0]).float(), gain[0, 1:] - expected.detach(), atol=1e-6)


def test_candidate_gains_at_the_picked_items_are_the_rollouts_gains():
    """What every item would add at each position, read at the items the lists hold, equals the
    per-pick gains of every reward term (MSRA included), so PARS's values end at the gain each pick got."""
    aligner, policy, cfg = _toy("flame")
    aligner.cfg = cfg.model_copy(update={"rewards": cfg.rewards.model_copy(update={"msra": 0.5})})
    ro = aligner.rollouts(policy, 0, 0)
    candidates = aligner.candidate_gains(ro.lists, ro.rows)
    for j in range(cfg.list_size):
        at = candidates(j).expand(*ro.lists.shape[:2], -1).gather(-1, ro.lists[..., j:j + 1])[..., 0]
        assert torch.allclose(at.float(), ro.gains[..., j], atol=1e-6)


def test_pars_advantages_add_the_later_picks_return_and_refuses_a_model_without_tokens():
    values = torch.tensor([[[[0.2, 0.5, 1.0], [0.1, 0.1, 0.0]], [[0.2, 0.0, 0.0], [0.1, 0.3, 0.5]]]])  # (1, 2, 2, 3)
    gains = values[..., -1]
    adv = methods.pars_advantages(values, gains)
    after = torch.tensor([[0.0, 0.0], [0.5, 0.0]])  # G_j+1: (list, position)
    future = after - after.mean(0)
    raw = (values[0, ..., 1:] - values[0, ..., :-1]) + future[..., None]
    assert torch.allclose(adv[0], raw / raw.pow(2).mean().sqrt(), atol=1e-5)
    # a user whose lists all scored the same keeps its exact token credit, at the batch's scale
    flat = methods.pars_advantages(torch.cat([values, values[:, :1].expand(1, 2, 2, 3)], 0),
                                   torch.cat([gains, gains[:, :1].expand(1, 2, 2)], 0))
    assert flat.abs().max() < 10 and (flat[1, 0] == flat[1, 1]).all() and flat[1].abs().sum() > 0
    with pytest.raises(ValueError, match="align.method=pars .* no token table"):
        _toy("pars")


# ----------------------------------------------------------------------------- trajectory balance (Flower)

def test_trajectory_balance_is_zero_for_a_policy_proportional_to_the_reward():
    torch.manual_seed(0)
    n, k, tau = 5, 2, 0.1
    policy, ref = torch.randn(1, n, dtype=torch.float64), torch.randn(1, n, dtype=torch.float64)
    lists = _all_lists(n, k)[None]                                      # every list of the catalogue
    lp, lp_ref = list_log_prob(policy, lists), list_log_prob(ref, lists)
    # rewards under which the policy is exactly proportional to P_ref · exp(r / tau) (and to exp(r / tau))
    r_tilted = tau * (lp - lp_ref) + 0.3
    assert methods.trajectory_balance(lp, r_tilted / tau + lp_ref).item() == pytest.approx(0.0, abs=1e-18)
    assert methods.trajectory_balance(lp, (tau * lp + 1.0) / tau).item() == pytest.approx(0.0, abs=1e-18)
    # any other reward leaves a positive loss, whose gradient moves the policy toward the target
    r = torch.rand(1, lists.shape[1], dtype=torch.float64)
    logits = policy.clone().requires_grad_(True)
    loss = methods.trajectory_balance(list_log_prob(logits, lists), r / tau)
    assert loss.item() > 0
    loss.backward()
    with torch.no_grad():
        moved = logits - 1e-3 * logits.grad
        assert methods.trajectory_balance(list_log_prob(moved, lists), r / tau).item() < loss.item()


# ----------------------------------------------------------------------------- posteriors by group, decay by age

def test_group_posteriors_update_every_group_of_the_batch_every_step():
    aligner, policy, cfg = _toy("blade", blade={"scope": "group", "groups": 3})
    groups = aligner.groups
    assert set(groups.tolist()) == {0, 1, 2}
    lengths = np.array([len(c) for c in aligner.data.contexts])
    assert all(lengths[groups == g].max() <= lengths[groups == g + 1].min() for g in range(2))  # by history length
    for step in range(3):
        rows, _ = aligner.batch_rows(step, 0)
        before, mu_before = aligner.posterior.kappa.copy(), aligner.posterior.mu.copy()
        ro = aligner.rollouts(policy, step, 0)
        x = aligner._centred(ro.reward.double().numpy(), ro.rows)  # the rewards the posteriors take
        aligner.step(policy, step, 0)
        present = np.unique(groups[rows])
        for g in present:  # decayed once (updated the step before, or at the reference) + its users' N lists each
            count = cfg.rollouts * int((groups[rows] == g).sum())
            prior = max(cfg.blade.decay * before[g], 1.0)
            assert aligner.posterior.kappa[g] == pytest.approx(prior + count)
            # the mean: the conjugate blend of the decayed prior's and the group's rewards this batch
            mean = x[groups[ro.rows] == g].mean()
            assert aligner.posterior.mu[g] == pytest.approx((prior * mu_before[g] + count * mean) / (prior + count))
        assert (aligner.last_update[present] == step + 1).all()


def test_user_posterior_decays_by_the_steps_since_its_last_update():
    aligner, policy, cfg = _toy("blade", blade={"decay": 0.8, "min_pseudo_count": 0.5})
    rows0, _ = aligner.batch_rows(0, 0)
    start = aligner.posterior.kappa.copy()                      # reference: vague 1e-3 + M
    aligner.step(policy, 0, 0)
    after0 = aligner.posterior.kappa.copy()
    assert after0[rows0] == pytest.approx(np.maximum(0.8 * start[rows0], 0.5) + cfg.rollouts)
    # step 5 (2 batches per epoch: users seen at step 0 come back at a later step): decay^(elapsed)
    rows5, _ = aligner.batch_rows(5, 0)
    alpha0 = aligner.posterior.alpha.copy()
    aligner.step(policy, 5, 0)
    last_seen = np.where(np.isin(rows5, rows0), 1, 0)           # step + 1 of their last update
    elapsed = 6 - last_seen
    expected = np.maximum(0.8 ** elapsed * np.where(last_seen == 1, after0[rows5], start[rows5]), 0.5) + cfg.rollouts
    assert aligner.posterior.kappa[rows5] == pytest.approx(expected)
    # alpha follows the same decay (floor half the pseudo-count), and beta/alpha (the variance
    # estimate) is kept through it
    assert aligner.posterior.alpha[rows5] == pytest.approx(np.maximum(0.8 ** elapsed * alpha0[rows5], 0.25)
                                                           + cfg.rollouts / 2)
    assert (aligner.last_update[rows5] == 6).all()
    d = methods.NIG(*(np.array([v]) for v in (0.3, 4.0, 3.0, 6.0))).decayed(0.5, 0.5)
    assert (d.kappa[0], d.alpha[0], d.beta[0] / d.alpha[0], d.mu[0]) == pytest.approx((2.0, 1.5, 2.0, 0.3))


def test_centred_rewards_compare_users_on_their_gain_over_the_start():
    aligner, policy, cfg = _toy("blade", blade={"scope": "global", "center": True})
    # the reference observations are centred per user: the global posterior's mean starts at 0
    assert aligner.posterior.mu[0] == pytest.approx(0.0, abs=1e-2)
    loss, m = aligner.step(policy, 0, 0)
    assert torch.isfinite(loss) and m.weight_entropy is not None
    assert posterior_groups(cfg.blade, aligner.data).tolist() == [0] * len(aligner.data.users)


def test_multi_item_holdout_keeps_validation_and_test_out_and_scores_three_relevant_items():
    train = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9]), np.array([10, 11, 12, 13])]
    data = AlignData.build(train, 40, holdout=3, list_size=4)
    assert data.users.tolist() == [0, 2]
    assert [c.tolist() for c in data.contexts] == [[1, 2, 3], [10]]
    assert data.relevant.tolist() == [[4, 5, 6], [11, 12, 13]]
    for ctx, rel in zip(data.contexts, data.relevant):
        assert not set(ctx.tolist()) & set(rel.tolist())
    # NDCG with 3 relevant items: hits at positions 1 and 3 of 4, ideal = 3 hits at the top
    lists = torch.tensor([[[4, 20, 6, 21]]])
    by_hand = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    assert rewards.ndcg(lists, data.relevant[:1]).item() == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_of_every_method_on_movielens_100k(method, ml100k_lake):
    """Each method's first step on the real ML-100K sequences (random-init SASRec policy): finite
    loss and gradients, KL 0 at the start, held-out items never in a context."""
    from jobs.spec import load_spec
    from ray_jobs.data import load_sequences
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [f"lake.root={ml100k_lake}"])
    data = load_sequences(spec)
    cfg = AlignSpec(method=method, users_per_step=16, rollouts=4, list_size=10, reference_rollouts=4, holdout=3,
                    blade={"scope": "group"})
    align = AlignData.build(data.train, data.num_items, cfg.holdout, cfg.list_size)
    torch.manual_seed(0)
    model = SASRec(data.num_items, 20, 16, 1, 1, 0.0)
    reference = SASRec(data.num_items, 20, 16, 1, 1, 0.0)
    reference.load_state_dict(model.state_dict())
    _first_step(cfg, align, data.num_items, model, reference)
    u = int(align.users[0])
    assert align.relevant[0].tolist() == data.train[u][-3:].tolist()
    assert all(not (set(c.tolist()) & set(r.tolist())) - {0} for c, r in zip(align.contexts, align.relevant))
    assert all(r.tolist() == data.train[int(x)][-3:].tolist() for x, r in zip(align.users, align.relevant))

def _first_step(cfg: AlignSpec, align: AlignData, num_items: int, model, reference):
    """One alignment step of `model` from `reference` (its copy) on ML-100K rows: finite loss and
    gradients, KL 0 at the start. Returns the aligner, the policy and the tail mask."""
    tail = torch.zeros(num_items + 1, dtype=torch.bool)
    tail[num_items // 2:] = True
    groups = model.prefix_groups() if hasattr(model, "prefix_groups") else None
    aligner = Aligner(cfg, align, num_items, 20, torch.randn(num_items + 1, 8), tail, reference, prefix_groups=groups)
    aligner.init_reference(seed=0)
    policy = CatalogueScores(model).eval()
    loss, m = aligner.step(policy, 0, 0)
    loss.backward()
    assert torch.isfinite(loss) and m.kl == pytest.approx(0.0, abs=1e-6)
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)  # not vacuous: some parameter has a gradient
    return aligner, policy, tail


@pytest.mark.slow
def test_hstu_with_its_time_bias_aligns_a_step_on_movielens_100k(ml100k_lake):
    """A start model that reads timestamps aligns: each context is scored with its items' timestamps
    and the time of its first held-out item (when its list would be shown); one BLADE step on the
    real ML-100K sequences has finite loss and gradients, KL 0 at the start, and the time bias
    changes the policy's scores."""
    from jobs.spec import load_spec
    from ray_jobs.data import load_sequences
    from ray_jobs.models.hstu import HSTU
    spec = load_spec("jobs/specs/movielens-100k-smoke.yaml", [f"lake.root={ml100k_lake}"])
    data = load_sequences(spec)
    cfg = AlignSpec(method="blade", users_per_step=16, rollouts=4, list_size=10, reference_rollouts=4, holdout=3)
    align = AlignData.build(data.train, data.num_items, cfg.holdout, cfg.list_size, data.train_times)
    u = int(align.users[0])
    assert align.stamps[0].tolist() == data.train_times[u][:len(data.train[u]) - 3 + 1].tolist()
    torch.manual_seed(0)
    model = HSTU(data.num_items, 20, dim=16, heads=2, dropout=0.0, time_buckets=16, query_time="target")
    reference = HSTU(data.num_items, 20, dim=16, heads=2, dropout=0.0, time_buckets=16, query_time="target")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in (model, reference):
            for layer in m.layers:
                layer.rel_time.normal_(0, 0.5)  # a time bias that matters
        reference.load_state_dict(model.state_dict())
    aligner, policy, tail = _first_step(cfg, align, data.num_items, model, reference)
    rows = np.arange(8)
    later = AlignData(align.users, align.contexts, align.relevant,
                      [np.append(t[:-1], t[-1] + 400 * 86_400) for t in align.stamps])
    shifted = Aligner(cfg, later, data.num_items, 20, torch.randn(data.num_items + 1, 8), tail, reference)
    with torch.no_grad():
        assert not torch.allclose(aligner.logits(policy, rows), shifted.logits(policy, rows))


# ----------------------------------------------------------------------------- the benchmark's table and frontier

def _bench_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_alignment", Path(__file__).parents[1] / "bench/alignment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alignment_bench_frontier_choice_and_table_from_finished_runs(tmp_path):
    """The report is rebuilt from the run records alone: the Pareto front, the chosen preset (best
    validation NDCG@10 among the points raising tail share and ILD over the start), mean ± std
    over seeds, and the frontier PNG."""
    import json
    import types
    bench = _bench_module()
    assert bench.pareto([(0.1, 0.5), (0.2, 0.4), (0.15, 0.3), (0.2, 0.45)]) == [0, 3]
    # a start model kept in the tree is found from any working directory; an absolute path as written
    assert bench.model_path({"model_file": "bench/results/m.pt"}) == bench.ROOT / "bench/results/m.pt"
    assert bench.model_path({"model_file": str(tmp_path / "m.pt")}) == tmp_path / "m.pt"
    # a start record holds under today's spec when its own spec, read by today's schema, equals it
    from jobs.spec import load_spec
    doc = load_spec("movielens-100k-smoke").model_dump(mode="json")
    before = json.loads(json.dumps(doc))
    del before["train"]["withhold"]  # recorded before the schema had the field: its default
    assert bench.same_settings({"settings": "old", "spec": before}, doc, "new")
    before["train"]["lr"] = doc["train"]["lr"] * 2
    assert not bench.same_settings({"settings": "old", "spec": before}, doc, "new")
    assert not bench.same_settings({"settings": "old", "spec": {**doc, "unknown": 1}}, doc, "new")
    assert bench.same_settings({"settings": "new"}, doc, "new") and not bench.same_settings({"settings": "old"}, doc, "new")
    figures = lambda ndcg, tail, ild: {c: 0.1 for c in bench.COLUMNS} | {  # noqa: E731
        "ndcg@10": ndcg, "tail_share@10": tail, "ild@10": ild}
    start_valid = figures(0.170, 0.30, 0.45)
    runs = tmp_path / "runs" / "toy"
    runs.mkdir(parents=True)
    for variant, ndcg in (("full", 0.172), ("withheld", 0.170)):
        (runs / f"start-{variant}.json").write_text(json.dumps(
            {"start": "toy", "variant": variant, "withhold": 3 if variant == "withheld" else 0, "model_file": "x",
             "run_id": f"run-{variant}",  # a training run's figures: accuracy only (its align runs carry the rest)
             "valid": {"ndcg@10": ndcg, "hr@10": 0.3}, "test": {"ndcg@10": ndcg - 0.02, "hr@10": 0.28}}))

    args = types.SimpleNamespace(out=str(tmp_path / "alignment.json"), runs=str(tmp_path / "runs"))
    b = bench.Bench.__new__(bench.Bench)
    b.args, b.dir, b.align_doc = args, Path(args.runs), {"holdout": 3, "steps": 300, "rewards": {"ndcg": 1.0}}
    current = b.fingerprint("toy")

    def run(key, method, seed, preset, valid, test_ndcg, fingerprint=current):
        (runs / f"{key}.json").write_text(json.dumps(
            {"start": "toy", "method": method, "seed": seed, "preset": preset, "seen_rewards": False, "seconds": 10.0,
             "fingerprint": fingerprint,
             "last_step": {"kl": 1.5}, "evals": [{"step": 1, "ndcg@10": valid["ndcg@10"]}],
             "curve": [{"step": 1, "reward_mean": 0.2, "kl": 0.1, "weight_entropy": None, "effective_grad_norm": 0.3,
                        "clipped_share": 0.0}],
             "base_valid": start_valid, "base_test": figures(0.15, 0.3, 0.45), "aligned_valid": valid,
             "aligned_test": figures(test_ndcg, 0.35, 0.47)}))
    run("unseen-blade-spec-s0", "blade", 0, None, figures(0.171, 0.33, 0.46), 0.155)
    run("unseen-blade-spec-s1", "blade", 1, None, figures(0.172, 0.33, 0.46), 0.157)
    run("unseen-grpo-ndcg-s0", "grpo", 0, "ndcg", figures(0.175, 0.29, 0.44), 0.160)          # best NDCG, loses tail
    run("unseen-grpo-ndcg+tail-s0", "grpo", 0, "ndcg+tail", figures(0.169, 0.40, 0.46), 0.150)
    run("unseen-grpo-ndcg+diversity-s0", "grpo", 0, "ndcg+diversity", figures(0.171, 0.32, 0.50), 0.152)
    run("unseen-grpo-ndcg+diversity-s1", "grpo", 1, "ndcg+diversity", figures(0.190, 0.40, 0.60), 0.2)  # 2nd seed: not a point
    run("unseen-blade-spec-s2", "blade", 2, None, figures(0.2, 0.4, 0.6), 0.3, fingerprint="other")  # stale: left out
    for key, run_id in (("unseen-blade-spec-s0", "align-b0"), ("unseen-blade-spec-s1", "align-b1"),
                        ("unseen-blade-spec-s2", "align-stale")):
        (runs / f"{key}.json").write_text(json.dumps({**json.loads((runs / f"{key}.json").read_text()), "run_id": run_id}))

    def refit(name, source_run_id, method, seed, test_ndcg, refit_set=()):  # --refit: next-item epochs from a source
        (runs / f"refit-{name}.json").write_text(json.dumps(
            {"start": "toy", "refit_of": name, "source_run_id": source_run_id, "method": method, "seed": seed,
             "epochs": 3, "refit_set": refit_set, "valid": figures(test_ndcg + 0.02, 0.3, 0.45),
             "test": figures(test_ndcg, 0.31, 0.46)}))
    refit("start-withheld", "run-withheld", None, None, 0.152)
    refit("start-full", "run-full", None, None, 0.154)
    refit("blade-s0", "align-b0", "blade", 0, 0.158)
    refit("blade-s1", "align-b1", "blade", 1, 0.4, ["train.lr=0.1"])  # other settings: a row of its own
    refit("blade-s2", "align-stale", "blade", 2, 0.3)  # its source is a stale run: left out
    b.align_doc = {"holdout": 3, "steps": 600, "rewards": {"ndcg": 1.0}}
    assert b.fingerprint("toy") != current  # other settings: every finished run is stale
    b.align_doc = {"holdout": 3, "steps": 300, "rewards": {"ndcg": 1.0}}
    rep = b.report(["toy"])
    block = rep["blocks"]["toy"]
    assert block["chosen"] == {"grpo": "ndcg+diversity"}  # raises both over the start, best NDCG of those
    assert [p["ndcg@10"] for p in block["frontier"]["grpo"] if p["preset"] == "ndcg+diversity"] == [0.171]
    rows = {r["model"]: r for r in block["table"]}
    assert rows["blade"]["n"] == 2 and rows["blade"]["ndcg@10"] == pytest.approx((0.156, np.std([0.155, 0.157], ddof=1)))
    assert rows["grpo [ndcg+diversity]"]["ndcg@10"][0] == pytest.approx(0.152)
    assert {"start, full (served)", "start, withheld (withhold 3)"} <= set(rows)
    assert rows["refit 3 ep. from blade"]["n"] == 1 and rows["refit 3 ep. from blade"]["ndcg@10"][0] == pytest.approx(0.158)
    assert rows["refit 3 ep. from withheld start"]["ndcg@10"][0] == pytest.approx(0.152)
    assert rows["refit 3 ep. from full start"]["ndcg@10"][0] == pytest.approx(0.154)
    assert rows["refit 3 ep. [train.lr=0.1] from blade"]["ndcg@10"][0] == pytest.approx(0.4)
    assert sorted(r["refit_of"] for r in block["refits"]) == ["blade-s0", "blade-s1", "start-full", "start-withheld"]
    assert "| refit 3 ep. from blade | 1 |" in rep["table_md"]
    assert "| blade | 2 |" in rep["table_md"]
    assert all(Path(p).exists() for p in block["plots"]) and any(p.endswith("frontier.png") for p in block["plots"])
    tested = {(r["method"], r["preset"]) for r in block["runs"] if "aligned_test" in r}
    assert tested == {("blade", None), ("grpo", "ndcg+diversity")}  # the points not chosen: validation only
    # a refit holds while its settings and its source run do, without the source's model file (a refit
    # done on another machine is not redone)
    bench.STARTS["toy"] = "movielens-100k-smoke"
    b.args = types.SimpleNamespace(**vars(args), start_set=[], refit=3, refit_set=[])
    source = {"run_id": "align-b0", "model_file": str(tmp_path / "gone.pt")}
    _, fp = b.refit_spec("toy", source)
    assert not b.refit_done("toy", source, "blade-s0")  # the record has no fingerprint yet
    (runs / "refit-blade-s0.json").write_text(json.dumps({**json.loads((runs / "refit-blade-s0.json").read_text()),
                                                          "fingerprint": fp}))
    assert b.refit_done("toy", source, "blade-s0") and b.refit("toy", source, "blade-s0")["fingerprint"] == fp
    assert not b.refit_done("toy", {**source, "run_id": "align-other"}, "blade-s0")  # another source run
    b.args.refit_set = ["train.lr=0.1"]
    assert not b.refit_done("toy", source, "blade-s0") and not b.refit_done("toy", None, "blade-s0")
    # a key the schema gained after a run was recorded counts only where it is set away from its default
    old = {**json.loads((runs / "unseen-blade-spec-s0.json").read_text()), "align": {"holdout": 3, "steps": 300}}
    assert b.current("toy", old)
    b.align_doc = {"holdout": 3, "steps": 300, "rewards": {"ndcg": 1.0}, "beta_min": 1e-4}  # the default
    assert b.current("toy", old) and not b.current("toy", {**old, "align": {**old["align"], "beta_min": 1e-4}})
    b.align_doc["beta_min"] = 1e-3
    assert not b.current("toy", old)


@pytest.mark.parametrize("method", ["blade", "grpo", "pars"])
def test_a_generative_model_aligns_a_step_with_its_own_item_distribution(method):
    """A generative start model's policy is its exact item distribution (temperature 1): Plackett–Luce
    sampling, rewards and KL apply unchanged; one step has finite loss and gradients that reach the
    decoder and the user encoder, KL 0 at the start."""
    from ray_jobs.models.generative import SemanticGenerator
    from ray_jobs.models.semantic_ids import TokenTable
    n = 30
    rng = np.random.default_rng(0)
    table = TokenTable.of("mpq", 4, rng.integers(0, 4, size=(n, 3)))
    train = [rng.choice(np.arange(1, n + 1), size=int(rng.integers(5, 9)), replace=False) for _ in range(16)]
    cfg = AlignSpec(method=method, users_per_step=8, rollouts=4, list_size=4, reference_rollouts=4, holdout=2,
                    temperature=1.0)
    align = AlignData.build(train, n, cfg.holdout, cfg.list_size)
    torch.manual_seed(0)
    model = SemanticGenerator(table, 20, dim=16, blocks=1, heads=1, dropout=0.0, paths=2, max_disambiguation=8)
    reference = SemanticGenerator(table, 20, dim=16, blocks=1, heads=1, dropout=0.0, paths=2, max_disambiguation=8)
    reference.load_state_dict(model.state_dict())
    aligner, policy, _ = _first_step(cfg, align, n, model, reference)
    logits = aligner.logits(policy, np.arange(4))  # log-probabilities, the user's seen items masked: mass <= 1
    assert (torch.logsumexp(logits, -1) <= 1e-5).all() and torch.isfinite(logits).sum(-1).min() >= cfg.list_size
    assert model.cell.weight_hh.grad is not None and model.user.layers[0].self_attn.in_proj_weight.grad is not None


# ----------------------------------------------------------------------------- which step ships (align.ship=gate)

def test_gate_step_ships_the_best_step_meeting_the_rule_against_the_start():
    """align.ship=gate judges each evaluated step as the champion gate judges a candidate, against
    the start model's record (step 0): the best on gate.metric among the steps meeting every
    constraint; the best on gate.metric when none (or no constraint) applies; never the start."""
    from jobs.schema import GateSpec
    from ray_jobs.align import gate_step
    rule = GateSpec(constraints=[{"metric": "ndcg@10", "min_change": -0.002},
                                 {"metric": "tail_share@10", "min_change": 0.2, "relative": True}])
    evals = [{"step": 0, "ndcg@10": 0.170, "tail_share@10": 0.30},
             {"step": 25, "ndcg@10": 0.1695, "tail_share@10": 0.33},   # tail +10%: fails the relative rise
             {"step": 50, "ndcg@10": 0.1685, "tail_share@10": 0.37},   # meets both
             {"step": 75, "ndcg@10": 0.1682, "tail_share@10": 0.45},   # meets both, lower NDCG
             {"step": 100, "ndcg@10": 0.1660, "tail_share@10": 0.50}]  # NDCG 0.004 lower: fails
    assert gate_step(rule, evals) == 50
    assert gate_step(rule, evals[:2]) == 25  # none meets the rule: the best on NDCG@10
    assert gate_step(GateSpec(), evals) == 25  # no constraints: the best on the gate's metric
    assert gate_step(GateSpec(metric="tail_share@10"), evals) == 100
    assert gate_step(rule, evals[:1]) is None  # only the start evaluated: nothing to ship yet
    tie = [{"step": 0, "ndcg@10": 0.1}, {"step": 10, "ndcg@10": 0.2}, {"step": 20, "ndcg@10": 0.2}]
    assert gate_step(GateSpec(), tie) == 20


def test_the_shipped_weights_kl_is_the_record_of_the_step_they_sampled():
    """A step's record holds the KL of the weights that sampled its rollouts (before its update: 0 at
    the first step, tested above), so the weights shipped after step s have step s+1's; after the
    last step there is none and the shipped step's own stands in."""
    from ray_jobs.align import kl_after
    history = [{"step": 1, "kl": 0.0}, {"step": 2, "kl": 0.3}, {"step": 3, "kl": 0.5}]
    assert kl_after(history, 1) == 0.3 and kl_after(history, 2) == 0.5 and kl_after(history, 3) is None


def test_ship_by_gate_names_a_figure_the_run_evaluates_and_needs_evaluations():
    from jobs.spec import load_spec
    from ray_jobs.align import check_ship
    spec = load_spec("jobs/specs/movielens-1m-demo.yaml", ["align.ship=gate"])
    check_ship(spec)  # the demo's rule: ndcg@10, tail_share@10 and ild@10, all evaluated
    bad = spec.model_copy(update={"gate": spec.gate.model_copy(update={"metric": "recall@20"})})
    with pytest.raises(ValueError, match=r"gate.metric names 'recall@20'.*does not evaluate"):
        check_ship(bad)
    with pytest.raises(ValueError, match="align.ship=gate .* needs align.eval_every > 0"):
        load_spec("jobs/specs/movielens-1m-demo.yaml", ["align.ship=gate", "align.eval_every=0"])
