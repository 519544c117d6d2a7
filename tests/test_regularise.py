"""The regulariser equals the dense distance, has the right gradient, and schedules hit their values."""

import pytest
import torch

from loramigrate.finetune import SCHEDULES, delta_distance_sq, schedule_value


def factors(seed, out=9, inn=7, r=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, inn, generator=g, dtype=torch.float64)


def test_gram_form_equals_dense_distance():
    (b, a), (b0, a0) = factors(0), factors(1, r=5)
    dense = (1.7 * b @ a - 0.6 * b0 @ a0).pow(2).sum()
    assert delta_distance_sq(b, a, 1.7, b0, a0, 0.6).item() == pytest.approx(dense.item(), rel=1e-12)
    assert delta_distance_sq(b0, a0, 0.6, b0, a0, 0.6).item() == pytest.approx(0.0, abs=1e-9)


def test_gradient_is_correct():
    (b, a), (b0, a0) = factors(2), factors(3)
    b.requires_grad_(True)
    a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b, a: delta_distance_sq(b, a, 2.0, b0, a0, 1.5), (b, a))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_start_and_end_where_stated(name):
    assert schedule_value(name, 1.0, 0.01, 0, 100) == pytest.approx(1.0)
    end = schedule_value(name, 1.0, 0.01, 100, 100)
    assert end == pytest.approx(1.0 if name == "constant" else 0.01)


def test_step_schedule_switches_at_the_switch_point():
    assert schedule_value("step", 1.0, 0.1, 29, 100, switch=0.3) == 1.0
    assert schedule_value("step", 1.0, 0.1, 30, 100, switch=0.3) == 0.1
    assert schedule_value("cosine", 1.0, 0.0, 50, 100) == pytest.approx(0.5)
    assert schedule_value("linear", 1.0, 0.0, 25, 100) == pytest.approx(0.75)
    assert schedule_value("exponential", 1.0, 0.01, 50, 100) == pytest.approx(0.1)
