"""lowrank: rank rules, exact and randomized truncation (fixed rank and probing), factored SVD."""
import math

import pytest
import torch

from loratools.lowrank import factored_svd, randomized_svd, select_rank, truncate, truncate_factors


def low_rank(m, n, r, seed=0, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.tensor([decay ** i for i in range(r)])
    return (U * s) @ V.T


def test_select_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energies 16, 4, 1, .25 of 21.25
    assert select_rank(s, rank=2) == 2
    assert select_rank(s, rank=99) == 4  # never above min(dims)
    assert select_rank(s, energy=16 / 21.25) == 1
    assert select_rank(s, energy=0.94) == 2  # 20/21.25 = 0.941
    assert select_rank(s, energy=0.95) == 3
    assert select_rank(s, energy=0.98) == 3
    assert select_rank(s, energy=0.99) == 4
    assert select_rank(s, sv_ratio=4) == 3  # keeps σ ≥ 1
    assert select_rank(s, energy=0.5, sv_ratio=4) == 3  # every criterion met
    assert select_rank(s, sv_ratio=100, max_rank=2) == 2
    assert select_rank(torch.zeros(3), energy=0.9) >= 1


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_truncate_recovers_exact_low_rank(method):
    M = low_rank(96, 80, 5)
    t = truncate(M, rank=5, method=method)
    assert t.rank == 5 and t.method == method
    B, A = t.factors(scale=0.25)
    rel = float(torch.linalg.matrix_norm(M - B @ A * 0.25) / torch.linalg.matrix_norm(M))
    assert rel < 1e-5 and t.rel_error < 1e-5 and t.retained_energy > 1 - 1e-9


def test_randomized_matches_full_at_fixed_rank():
    g = torch.Generator().manual_seed(3)
    M = low_rank(200, 150, 60, seed=1, decay=0.93) + 1e-3 * torch.randn(200, 150, generator=g)
    full = truncate(M, rank=12, method="full")
    rnd = truncate(M, rank=12, method="randomized")
    assert rnd.method == "randomized"
    assert rnd.rel_error <= full.rel_error * 1.01
    # the exact error is the spectrum's tail
    S = torch.linalg.svdvals(M.double())
    assert full.rel_error == pytest.approx(math.sqrt(float((S[12:] ** 2).sum() / (S ** 2).sum())), rel=1e-5)


@pytest.mark.parametrize("rule", [{"energy": 0.9}, {"energy": 0.999}, {"sv_ratio": 10.0}, {"energy": 0.99, "max_rank": 20}])
def test_randomized_probing_meets_the_criterion(rule):
    M = low_rank(300, 200, 120, seed=2, decay=0.95)
    full = truncate(M, method="full", **rule)
    rnd = truncate(M, method="randomized", **rule)
    # Ritz values underestimate σ: the probe's rank is never below the exact rule's, and close to it
    assert full.rank <= rnd.rank <= full.rank + 2
    if "energy" in rule and rnd.rank < rule.get("max_rank", 10**9):
        assert rnd.retained_energy >= rule["energy"] - 1e-6
    assert rnd.rel_error <= full.rel_error * 1.01 + 1e-6


def test_auto_falls_back_to_full_when_the_rank_is_large():
    M = low_rank(64, 64, 60, decay=0.99)
    t = truncate(M, energy=0.99, method="auto")
    assert t.method == "full"  # needs ~ the whole matrix: probing would cost as much as the exact SVD
    t = truncate(low_rank(400, 400, 8), energy=0.99, method="auto")
    assert t.method == "randomized" and t.rank <= 8


def test_deterministic():
    M = low_rank(200, 150, 40, decay=0.9)
    a = randomized_svd(M, 8, seed=0)
    b = randomized_svd(M, 8, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_factored_svd_and_truncate_factors():
    g = torch.Generator().manual_seed(5)
    B, A = torch.randn(70, 6, generator=g), torch.randn(6, 50, generator=g)
    U, S, Vh = factored_svd(B, A)
    assert torch.allclose(S, torch.linalg.svdvals(B @ A)[:6], rtol=1e-4)
    t = truncate_factors(B, A, rank=6)
    assert t.method == "factored" and t.rank == 6 and t.rel_error < 1e-6
    nb, na = t.factors()
    assert torch.allclose(nb @ na, B @ A, atol=1e-4)
    t3 = truncate_factors(B, A, rank=3)
    dense = truncate(B @ A, rank=3, method="full")
    assert t3.rel_error == pytest.approx(dense.rel_error, rel=1e-4)
    x, y = t3.factors()
    assert torch.allclose(x @ y, (dense.U * dense.S) @ dense.Vh, atol=1e-4)


def test_reported_error_matches_the_explicit_residual():
    """The randomized path's ‖M‖² − ‖S_k‖² shortcut (see the module note) agrees with the residual in float64."""
    g = torch.Generator().manual_seed(7)
    M = low_rank(1500, 1000, 64, seed=3, decay=0.97) + 0.02 * torch.randn(1500, 1000, generator=g) / 40
    t = truncate(M, rank=16, method="randomized")
    R = M.double() - (t.U.double() * t.S.double()) @ t.Vh.double()
    explicit = float(torch.linalg.matrix_norm(R) / torch.linalg.matrix_norm(M.double()))
    assert t.rel_error > 0.1 and t.rel_error == pytest.approx(explicit, rel=1e-5)
    assert t.norm == pytest.approx(float(torch.linalg.matrix_norm(M.double())), rel=1e-6)
