"""The InfoNCE loss against a hand-written reference; padding and near-duplicate masking."""
import math

import pytest
import torch

from ray_jobs.losses import InfoNCE


def reference(out, pos, neg, temperature):
    total = 0.0
    for o, p in zip(out, pos):
        o, p = o / o.norm(), p / p.norm()
        logits = [float(o @ p) / temperature] + [float(o @ (n / n.norm())) / temperature for n in neg]
        total += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(out)


def test_matches_reference():
    g = torch.Generator().manual_seed(0)
    out, pos, neg = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    loss = InfoNCE(temperature=0.5)(out, pos, neg, torch.ones(4, dtype=torch.bool))
    assert loss.item() == pytest.approx(reference(out, pos, neg, 0.5), rel=1e-5)


def test_padding_positions_are_ignored():
    g = torch.Generator().manual_seed(1)
    out, pos, neg = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    valid = torch.tensor([True, False, True, False])
    loss = InfoNCE(temperature=0.5)(out, pos, neg, valid)
    assert loss.item() == pytest.approx(reference(out[valid], pos[valid], neg, 0.5), rel=1e-5)
    assert InfoNCE()(out, pos, neg, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_negatives_identical_to_the_positive_are_masked():
    g = torch.Generator().manual_seed(2)
    out, pos, neg = torch.randn(1, 3, generator=g), torch.randn(1, 3, generator=g), torch.randn(3, 3, generator=g)
    with_dup = torch.cat([neg, pos * 2.0])  # same direction as the positive: cosine 1
    loss = InfoNCE(temperature=0.5, mask_cosine=0.99)(out, pos, with_dup, torch.ones(1, dtype=torch.bool))
    assert loss.item() == pytest.approx(reference(out, pos, neg, 0.5), rel=1e-5)


def test_learnable_temperature_starts_clip_style_and_is_clamped():
    loss = InfoNCE(learnable=True)
    assert loss.scale().item() == pytest.approx(1 / 0.07, rel=1e-5) and loss.log_scale.requires_grad
    with torch.no_grad():
        loss.log_scale.fill_(10.0)
    assert loss.scale().item() == 100.0
    assert not InfoNCE(temperature=0.05).log_scale.requires_grad


def per_position_reference(out, pos_ids, table, neg_ids, temperature):
    total = 0.0
    for o, p, negs in zip(out, pos_ids, neg_ids):
        o, t = o / o.norm(), table[p] / table[p].norm()
        logits = [float(o @ t) / temperature] + [float(o @ (table[n] / table[n].norm())) / temperature
                                                 for n in negs if int(n) != int(p)]
        total += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(out)


@pytest.mark.parametrize("negatives", [3, 40])  # 3 * d < catalogue: gathered vectors; 40 * d >= it: one matmul
def test_per_position_negatives_match_reference_on_both_paths(negatives):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(31, 4, generator=g)  # 30 items + padding row
    out, pos_ids = torch.randn(6, 4, generator=g), torch.randint(1, 31, (6,), generator=g)
    neg_ids = torch.randint(1, 31, (6, negatives), generator=g)
    neg_ids[0, 0] = pos_ids[0]  # a draw of the target itself is masked, not counted as a negative
    valid = torch.tensor([True, True, False, True, True, True])
    loss = InfoNCE(temperature=0.5).per_position(out, pos_ids, table, neg_ids, valid)
    assert loss.item() == pytest.approx(
        per_position_reference(out[valid], pos_ids[valid], table, neg_ids[valid], 0.5), rel=1e-5)


def test_per_position_with_one_shared_pool_equals_the_shared_loss():
    g = torch.Generator().manual_seed(4)
    table, out = torch.randn(21, 5, generator=g), torch.randn(8, 5, generator=g)
    pos_ids, pool = torch.randint(1, 21, (8,), generator=g), torch.randint(1, 21, (6,), generator=g)
    valid = torch.ones(8, dtype=torch.bool)
    fn = InfoNCE(temperature=0.1)
    shared = fn(out, table[pos_ids], table[pool], valid)
    assert fn.per_position(out, pos_ids, table, pool.expand(8, 6).clone(), valid).item() == pytest.approx(shared.item(), rel=1e-5)
    table.requires_grad_(True)
    fn.per_position(out, pos_ids, table, pool.expand(8, 6).clone(), valid).backward()
    assert table.grad[pool].abs().sum() > 0  # negatives receive gradient through the gathered logits


def test_full_softmax_equals_every_item_as_a_negative():
    g = torch.Generator().manual_seed(5)
    table, out = torch.randn(13, 4, generator=g), torch.randn(5, 4, generator=g)
    pos_ids = torch.randint(1, 13, (5,), generator=g)
    valid = torch.tensor([True, True, True, False, True])
    fn = InfoNCE(temperature=0.2)
    every = torch.arange(1, 13).expand(5, 12).clone()
    assert fn.full(out, pos_ids, table, valid).item() == pytest.approx(
        fn.per_position(out, pos_ids, table, every, valid).item(), rel=1e-5)
    dup = table.clone()
    dup[7] = dup[pos_ids[0]] * 3  # a near-duplicate of a target is masked out of its softmax
    one = fn.full(out[:1], pos_ids[:1], dup, valid[:1])
    keep = [i for i in range(1, 13) if i != 7 and i != int(pos_ids[0])]
    assert one.item() == pytest.approx(per_position_reference(out[:1], pos_ids[:1], dup, [keep], 0.2), rel=1e-5)


def test_logits_and_softmax_stay_float32_under_bf16_autocast():
    """Under bf16 autocast (CPU here, as a GPU recipe trains) every form of the loss computes its
    logits, softmax and cross-entropy in float32 from upcast vectors: the same loss and gradients as
    without autocast, where bf16 logits at scale 20 would be off in the second digit."""
    torch.manual_seed(0)
    loss_fn = InfoNCE(0.05)
    out, pos, neg = torch.randn(64, 32), torch.randn(64, 32), torch.randn(256, 32)
    table, valid = torch.randn(500, 32), torch.ones(64, dtype=torch.bool)
    pos_ids, neg_ids = torch.randint(1, 500, (64,)), torch.randint(1, 500, (64, 20))
    forms = {"shared": lambda o: loss_fn(o, pos, neg, valid),
             "per_position": lambda o: loss_fn.per_position(o, pos_ids, table, neg_ids, valid),
             "full": lambda o: loss_fn.full(o, pos_ids, table, valid)}
    for name, form in forms.items():
        plain = out.clone().requires_grad_(True)
        reference = form(plain)
        reference.backward()
        half = out.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = form(half.to(torch.bfloat16))  # a bf16 model's output, as a DeepSpeed bf16 engine gives
        loss.backward()
        assert loss.dtype == torch.float32, name
        # what is left is the bf16 rounding of the model's output itself (3 significant digits)
        assert loss.item() == pytest.approx(reference.item(), rel=2e-3), name
        assert torch.allclose(half.grad, plain.grad, rtol=0.05, atol=1e-4), name
