"""RefLoRA rebalancing changes the factorisation, never the product."""

import torch

from loramigrate.finetune import rebalance_full, rebalance_scalar


def factors(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, 4, generator=g, dtype=torch.float64) * 3, torch.randn(4, 12, generator=g, dtype=torch.float64)


def test_scalar_rebalance_equalises_norms_and_keeps_the_product():
    b, a = factors(0)
    b2, a2 = rebalance_scalar(b, a)
    assert torch.allclose(b2.norm(), a2.norm()) and torch.allclose(b2 @ a2, b @ a)


def test_full_rebalance_balances_the_grams_and_keeps_the_product():
    b, a = factors(1)
    b2, a2 = rebalance_full(b, a)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-9)
    assert torch.allclose(b2.T @ b2, a2 @ a2.T, atol=1e-8)


def test_full_rebalance_does_not_depend_on_the_gauge():
    b, a = factors(2)
    g = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] @ torch.diag(torch.tensor([0.2, 1.0, 3.0, 9.0],
                                                                                              dtype=torch.float64))
    b1, a1 = rebalance_full(b, a)
    b2, a2 = rebalance_full(b @ torch.linalg.inv(g), g @ a)  # same product, another factorisation
    # balanced factorisations agree up to an orthogonal r × r rotation Q: b2 = b1 Q
    q = torch.linalg.lstsq(b1, b2).solution
    assert torch.allclose(b1 @ q, b2, atol=1e-8) and torch.allclose(q.T @ q, torch.eye(4, dtype=q.dtype), atol=1e-8)
    assert torch.allclose(b1 @ a1, b2 @ a2, atol=1e-9)


def test_full_rebalance_works_on_the_factors_device_and_dtype():
    """Every tensor it makes lives where the factors do (here the meta device, where a CPU tensor cannot join)."""
    b, a = (t.float().to("meta") for t in factors(3))
    b2, a2 = rebalance_full(b, a)
    assert (b2.device.type, a2.device.type, b2.dtype, a2.dtype) == ("meta", "meta", torch.float32, torch.float32)
