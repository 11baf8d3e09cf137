"""Low-rank linear algebra shared by extract, resize and combine. Pure tensor functions, float32 in and out.

Note: errors without cancellation.
    With a full spectrum (exact SVD, factored SVD) the error is the tail, ‖M − M_k‖²_F = Σ_{i>k} σᵢ²,
    summed directly. The shortcut ‖M‖² − ‖S_k‖² loses everything to float32 cancellation when the
    error is tiny (it reports 3e-4 for an exactly rank-k matrix), so a randomized truncation, which
    has no tail, measures its residual ‖M − U S Vh‖_F explicitly (one extra m×k×n product) whenever
    the shortcut says the relative error is below 10%. Above that the shortcut is exact algebra
    (U_k S_k Vh_k = U_k U_kᵀ M is an orthogonal projection of M, so ‖M − PM‖² = ‖M‖² − ‖PM‖²) and its
    rounding (~1e-7·‖M‖²) moves the reported error by < 1e-5 relative; it saves two m×n temporaries
    per matrix, which matters when the matrix product is the whole cost (streamed extraction).

Note: factored SVD.
    The SVD of B·A (B [m, R], A [R, n], R ≪ m, n) needs no dense m×n matrix: B = Q_B R_B and
    Aᵀ = Q_A R_A (thin QR), so B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ and the SVD of the R×R core gives the rest.
    Cost O((m+n)R²) instead of O(mn·min(m,n)).

Note: randomized SVD with --energy / --sv-ratio.
    The randomized range finder needs a target size before it sees the spectrum, but the energy and
    σ-ratio rules pick the rank from the spectrum. `truncate` probes instead: a randomized SVD of size k
    (16 to start, or --max-rank), and the criterion is tested on its k leading values against the exact
    ‖M‖² (computed up front). Met inside the probe: select from it. Not met: double k and probe again,
    up to the cap. Ritz values never exceed the true σᵢ, so the energy picked this way is a lower bound
    and the chosen rank never falls short of the criterion; the retained energy reported is exactly
    ‖S_k‖² of the projection, and the error its explicit residual. Under `auto` the probing stops, and
    the exact SVD runs instead, once k grows past the point where randomized stops paying off
    (`use_randomized`): a delta that needs a quarter of its dimension is nearly full-rank, the exact
    SVD costs about as much as the probes, and it returns the true spectrum. The probes cost at most
    about twice the last one (geometric growth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def svd(M: torch.Tensor):
    """Thin SVD; on CUDA with cuSOLVER's QR-based gesvd.

    torch's default CUDA driver (gesvdj, Jacobi) stops at a loose tolerance: measured on an H100, a rank-3
    5632×2048 matrix came back with 8e-4 relative error (gesvd: 5e-7), and gesvd was also faster there.
    """
    return torch.linalg.svd(M, full_matrices=False, driver="gesvd" if M.is_cuda else None)


@dataclass
class Truncation:
    U: torch.Tensor  # [m, k]
    S: torch.Tensor  # [k]
    Vh: torch.Tensor  # [k, n]
    rank: int
    norm: float  # ‖M‖_F of the matrix that was truncated
    retained_energy: float  # ‖S_k‖² / ‖M‖²
    rel_error: float  # ‖M − U S Vh‖_F / ‖M‖_F
    method: str = "full"  # "full" (exact SVD), "randomized" or "factored" (QR of the factors)

    def factors(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [m, k], A [k, n]) with B·A·scale = U·S·Vh; √S split evenly so neither factor dominates."""
        root = torch.sqrt(self.S / scale)
        return self.U * root, root[:, None] * self.Vh


def select_rank(s: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                sv_ratio: float | None = None, max_rank: int | None = None, total_energy: float | None = None) -> int:
    """Rank from a descending spectrum: fixed rank, or the smallest meeting every given criterion; capped; ≥ 1.

    `total_energy` is ‖M‖² when `s` holds only the leading singular values (randomized SVD).
    """
    n = int(s.numel())
    if n == 0:
        return 1
    s2 = s.double() ** 2
    total = float(total_energy) if total_energy is not None else float(s2.sum())
    k = n
    if rank is not None:
        k = rank
    else:
        picks = []
        if energy is not None:
            if total <= 0:
                picks.append(1)
            else:
                cum = torch.cumsum(s2, 0) / total
                hit = torch.nonzero(cum >= energy - 1e-12)
                picks.append(int(hit[0]) + 1 if len(hit) else n)
        if sv_ratio is not None:
            picks.append(max(1, int((s >= s[0] / sv_ratio).sum())))
        if picks:
            k = max(picks)
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, min(k, n))


def _stats(S: torch.Tensor, k: int, norm2: float, residual2: float | None = None) -> tuple[float, float]:
    """(retained energy, relative error); the error from the spectrum's tail unless a residual is given."""
    if norm2 <= 0:
        return 1.0, 0.0
    err2 = float((S[k:].double() ** 2).sum()) if residual2 is None else residual2
    return max(0.0, 1.0 - err2 / norm2), math.sqrt(err2 / norm2)


def randomized_svd(M: torch.Tensor, k: int, *, oversample: int = 10, n_iter: int = 4, seed: int = 0):
    """Halko–Martinsson–Tropp range finder with power iterations (QR re-orthonormalised each pass).

    Deterministic: the test matrix comes from a fixed-seed CPU generator, moved to M's device.
    """
    m, n = M.shape
    p = min(k + oversample, m, n)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, p, generator=g, dtype=torch.float32).to(M.device)
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    Ub, S, Vh = svd(Q.T @ M)
    return Q @ Ub, S, Vh


def use_randomized(shape: tuple[int, int], k: int | None, method: str) -> bool:
    if method == "full":
        return False
    if method == "randomized":
        return k is not None
    # auto: randomized pays off only when the target rank is a small fraction of the matrix
    return k is not None and (k + 10) * 4 <= min(shape)


PROBE_START = 16
SHORTCUT_MIN = 1e-2  # squared relative error above which ‖M‖² − ‖S_k‖² is trusted (see the module note)


def _probe_randomized(M: torch.Tensor, norm2: float, *, energy, sv_ratio, max_rank, method: str, seed: int,
                      n_iter: int, oversample: int):
    """Randomized SVD for the energy / σ-ratio rules (see the module note); None = use the exact SVD."""
    full = min(M.shape)
    cap = min(max_rank, full) if max_rank is not None else full
    probe = min(cap, PROBE_START)
    while True:
        if not use_randomized(tuple(M.shape), probe, method):
            return None
        U, S, Vh = randomized_svd(M, probe, oversample=oversample, n_iter=n_iter, seed=seed)
        head = S[:probe]
        met = True
        if energy is not None:
            met &= float((head.double() ** 2).sum()) >= (energy - 1e-12) * norm2
        if sv_ratio is not None:
            met &= bool(head[-1] < head[0] / sv_ratio)
        if met or probe >= cap:
            k = select_rank(head, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank, total_energy=norm2)
            return U, S, Vh, k
        probe = min(cap, probe * 2)


def truncate(M: torch.Tensor, *, rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
             max_rank: int | None = None, method: str = "auto", seed: int = 0, n_iter: int = 4,
             oversample: int = 10) -> Truncation:
    """Best rank-k approximation of a dense matrix (k chosen by `select_rank`), on M's device.

    method: "full" exact SVD; "randomized" range finder (fixed rank, or probing for energy / σ-ratio);
    "auto" randomized when the rank is a small fraction of the matrix, else exact.
    """
    M = M.float()
    # Σ M² as a float32 cascade sum (~1e-7 relative). Not linalg.vector_norm: in float32 on CPU it is off by
    # ~1e-3 on an 11M-element delta, which the residual shortcut below would turn into a 0.5% error error.
    norm2 = float((M * M).sum().double())
    found = None
    if rank is not None:
        if use_randomized(tuple(M.shape), rank, method):
            U, S, Vh = randomized_svd(M, rank, oversample=oversample, n_iter=n_iter, seed=seed)
            found = U, S, Vh, select_rank(S, rank=rank, max_rank=max_rank)
    elif method != "full" and (energy is not None or sv_ratio is not None):
        found = _probe_randomized(M, norm2, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank, method=method,
                                  seed=seed, n_iter=n_iter, oversample=oversample)
    if found is not None:
        U, S, Vh, k = found
        residual2 = max(0.0, norm2 - float((S[:k].double() ** 2).sum()))
        if residual2 < SHORTCUT_MIN * norm2:
            residual2 = float((torch.linalg.matrix_norm(M - (U[:, :k] * S[:k]) @ Vh[:k]).double()) ** 2)
        used = "randomized"
    else:
        U, S, Vh = svd(M)
        k = select_rank(S, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank, total_energy=norm2)
        residual2 = None
        used = "full"
    retained, err = _stats(S, k, norm2, residual2)
    return Truncation(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous(), k, math.sqrt(norm2),
                      retained, err, used)


def factored_svd(B: torch.Tensor, A: torch.Tensor):
    """SVD of B·A from its factors (see the module note). Returns U [m, R], S [R], Vh [R, n]."""
    B, A = B.float(), A.float()
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vhc = svd(Rb @ Ra.T)
    return Qb @ Uc, S, Vhc @ Qa.T


def truncate_factors(B: torch.Tensor, A: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                     sv_ratio: float | None = None, max_rank: int | None = None) -> Truncation:
    """Optimal truncation of the product B·A without forming it; lossless when rank ≥ rank(B·A)."""
    U, S, Vh = factored_svd(B, A)
    norm2 = float((S.double() ** 2).sum())
    k = select_rank(S, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank, total_energy=norm2)
    retained, err = _stats(S, k, norm2)
    return Truncation(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous(), k, math.sqrt(norm2),
                      retained, err, "factored")


# Note: one rank per expert parameter.
#     PEFT gives all experts of a targeted parameter one r (A is (r·E, in)), so a rank chosen per expert (by
#     --energy or --sv-ratio) becomes the parameter's rank R = the largest any expert needs, and every expert
#     then keeps its R leading components: the file holds r·E factors' rows either way, so an expert that
#     would have needed fewer gets a better approximation for free rather than zero padding. A fixed
#     --rank is the same for every expert anyway.

@dataclass
class ExpertsTruncation:
    """Per-expert truncations of one expert parameter, at one rank R (see Note: one rank per expert parameter);
    rank, norm, retained_energy, rel_error and method as Truncation's, over the whole [E, out, in] delta."""

    experts: list[Truncation]

    @property
    def rank(self) -> int:
        return max(t.rank for t in self.experts)

    @property
    def norm(self) -> float:
        return math.sqrt(sum(t.norm ** 2 for t in self.experts))

    @property
    def rel_error(self) -> float:
        n2 = self.norm ** 2
        return math.sqrt(sum((t.rel_error * t.norm) ** 2 for t in self.experts) / n2) if n2 > 0 else 0.0

    @property
    def retained_energy(self) -> float:
        return 1.0 - self.rel_error ** 2

    @property
    def method(self) -> str:
        return self.experts[0].method

    def factors(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_e [E, out, R], A_e [E, R, in]) with B_e·A_e·scale = each expert's U·S·Vh (zero-padded to R)."""
        R, Bs, As = self.rank, [], []
        for t in self.experts:
            B, A = t.factors(scale)
            pad = R - B.shape[1]
            Bs.append(torch.nn.functional.pad(B, (0, pad)) if pad else B)
            As.append(torch.nn.functional.pad(A, (0, 0, 0, pad)) if pad else A)
        return torch.stack(Bs), torch.stack(As)


def truncate_experts(run, experts: int, criteria: dict) -> ExpertsTruncation:
    """`run(e, criteria) -> Truncation` for each expert; where the chosen ranks differ, the experts below the
    largest R run again with rank=R (and no other criterion), so all keep R components."""
    trs = [run(e, criteria) for e in range(experts)]
    R = max(t.rank for t in trs)
    if any(t.rank != R for t in trs):
        fixed = {k: None for k in criteria} | {"rank": R}
        trs = [t if t.rank == R else run(e, fixed) for e, t in enumerate(trs)]
    return ExpertsTruncation(trs)
