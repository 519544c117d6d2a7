"""CKA estimators against direct (non-streaming) computations. Run: pytest tests/test_cka.py"""

import pytest
import torch

from loramigrate.align.cka import FeatureCKA, MinibatchCKA, make_cka, unbiased_hsic


def direct_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Full-data linear CKA from centred Gram matrices (Kornblith et al. 2019)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, m = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * m).sum() / (k.norm() * m.norm()))


def direct_unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC written out term by term."""
    k, m = (x.double() @ x.double().T), (y.double() @ y.double().T)
    k.fill_diagonal_(0)
    m.fill_diagonal_(0)
    n = k.shape[0]
    one = torch.ones(n, 1, dtype=torch.float64)
    t1 = torch.trace(k @ m)
    t2 = (one.T @ k @ one) * (one.T @ m @ one) / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * (one.T @ k @ m @ one)
    return float((t1 + t2 - t3) / (n * (n - 3)))


def layers(n_layers: int, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    return torch.stack([base @ torch.randn(d, d, generator=g) + 5 * i for i in range(n_layers)])


@pytest.mark.parametrize("batch", [7, 50, 300])
def test_feature_cka_matches_direct_and_ignores_batch_size(batch):
    x, y = layers(3, 300, 8, 0), layers(4, 300, 6, 1)
    acc = FeatureCKA(3, 8, 4, 6)
    for s in range(0, 300, batch):
        acc.update(x[:, s:s + batch], y[:, s:s + batch])
    got = acc.result()
    want = torch.tensor([[direct_cka(x[i], y[j]) for j in range(4)] for i in range(3)], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_feature_cka_invariances():
    x = layers(1, 200, 10, 2)
    q = torch.linalg.qr(torch.randn(10, 10))[0]
    acc = FeatureCKA(1, 10, 2, 10)
    acc.update(x, torch.cat([x @ q * 3.0 + 1.0, torch.randn(1, 200, 10)]))
    cka = acc.result()
    assert cka[0, 0] == pytest.approx(1.0, abs=1e-9)  # rotation, scale and shift invariant
    assert cka[0, 1] < 0.5


def test_unbiased_hsic_matches_formula():
    x, y = torch.randn(2, 40, 5), torch.randn(3, 40, 7)
    k = x.double() @ x.double().transpose(1, 2)
    m = y.double() @ y.double().transpose(1, 2)
    k.diagonal(dim1=1, dim2=2).zero_()
    m.diagonal(dim1=1, dim2=2).zero_()
    got = unbiased_hsic(k, m)
    for a in range(2):
        for b in range(3):
            assert got[a, b].item() == pytest.approx(direct_unbiased_hsic(x[a], y[b]), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("batch", [3, 64, 256])
def test_minibatch_cka_is_chunked_reference_and_batch_independent(batch):
    x, y = layers(2, 256, 6, 3), layers(3, 256, 5, 4)
    acc = MinibatchCKA(chunk=64)
    for s in range(0, 256, batch):
        acc.update(x[:, s:s + batch], y[:, s:s + batch])
    got = acc.result()
    chunks = [slice(s, s + 64) for s in range(0, 256, 64)]
    for a in range(2):
        for b in range(3):
            xy = sum(direct_unbiased_hsic(x[a, c], y[b, c]) for c in chunks)
            xx = sum(direct_unbiased_hsic(x[a, c], x[a, c]) for c in chunks)
            yy = sum(direct_unbiased_hsic(y[b, c], y[b, c]) for c in chunks)
            assert got[a, b].item() == pytest.approx(xy / (xx * yy) ** 0.5, abs=1e-6)


def test_minibatch_close_to_exact_on_much_data():
    x, y = layers(2, 4096, 6, 5), layers(2, 4096, 6, 6)
    exact, mini = FeatureCKA(2, 6, 2, 6), MinibatchCKA(chunk=512)
    for acc in (exact, mini):
        acc.update(x, y)
    assert torch.allclose(exact.result(), mini.result(), atol=0.05)


def test_auto_picks_exact_when_it_fits():
    assert make_cka("auto", 2, 8, 2, 8, 64, 1 << 20)[0] == "feature"
    assert make_cka("auto", 30, 4096, 30, 4096, 64, 1 << 30)[0] == "minibatch"
