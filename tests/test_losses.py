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
