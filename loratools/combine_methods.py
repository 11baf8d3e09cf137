"""The combination methods of `loratools combine`, one small pure function each, per module, in float32,
and their registry (`METHODS`, as mergekit's merge_methods): a new method is one `register(CombineMethod(...))`.

A module's inputs are its `Term`s: one per adapter that adapts the module (lora_B [out, r], lora_A [r, in],
the adapter's scale and the user's weight). Every method returns a `Truncation` whose `factors(1.0)` are
the new lora_B / lora_A at scale 1.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from .lora_math import peft_delta, to_layout
from .lowrank import Truncation, truncate, truncate_factors


@dataclass(frozen=True)
class Term:
    """One adapter's contribution to one module (factors on the compute device)."""

    B: torch.Tensor  # [out, r]
    A: torch.Tensor  # [r, in]
    scale: float
    weight: float

    def task_tensor(self, transposed: bool) -> torch.Tensor:
        """PEFT's get_delta_weight: B·A·scale in the base weight's layout (unweighted)."""
        return peft_delta(self.B.float(), self.A.float(), self.scale, transposed)


def module_seed(seed: int, module: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# -- exact methods: on the factors -----------------------------------------------------------------------

# Note: exact sums by stacking (`cat`).
#     Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [B₁ … Bₙ] · [w₁s₁A₁; …; wₙsₙAₙ]: the concatenated factors are the exact weighted
#     sum, of rank Σ rᵢ, with one rounding per element of A. Stacking happens in the factor layout
#     (lora_B [out, r], lora_A [r, in]); fan_in_fan_out and embedding modules differ only in that their base
#     weight is the transpose of B·A, so stacking is the same for them, provided every adapter of the
#     module shares the layout (checked by the caller).
#
# Note: optimal truncation without a dense matrix (`linear`).
#     `lowrank.truncate_factors` on the stacked factors: thin QR of B and Aᵀ, SVD of the Σr×Σr core. By
#     Eckart–Young the result is the best rank-R approximation of the exact sum; the reported error is
#     the spectrum's tail, and nothing of size out×in is ever formed: O((out+in)·(Σr)²) per module.


def stack_factors(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B₁ … Bₙ], [w₁s₁A₁; …; wₙsₙAₙ]: their product is Σ wᵢ·sᵢ·Bᵢ·Aᵢ exactly (factor layout)."""
    B = torch.cat([t.B.float() for t in terms], dim=1)
    A = torch.cat([t.A.float() * (t.weight * t.scale) for t in terms], dim=0)
    return B, A


def cat(terms: list[Term]) -> Truncation:
    """The exact sum as stacked factors (rank Σ rᵢ); the Truncation carries them as U = B, S = 1, Vh = A."""
    B, A = stack_factors(terms)
    k = B.shape[1]
    # ‖B·A‖²_F = Σ (BᵀB) ∘ (A·Aᵀ), from two k×k Gram matrices
    norm2 = float(((B.T @ B).double() * (A @ A.T).double()).sum())
    return Truncation(B, torch.ones(k, device=B.device), A, k, max(norm2, 0.0) ** 0.5, 1.0, 0.0, method="stacked")


def linear(terms: list[Term], *, rank: int | None = None, energy: float | None = None) -> Truncation:
    """Optimal rank-R truncation of the exact sum from its stacked factors (lossless for R ≥ Σ rᵢ)."""
    B, A = stack_factors(terms)
    if energy is not None:
        return truncate_factors(B, A, energy=energy, max_rank=rank)
    return truncate_factors(B, A, rank=rank)


# -- task arithmetic: on dense deltas (peft.utils.merge_utils semantics) ---------------------------------

# Note: task-arithmetic semantics (`ties`, `dare_linear`, `dare_ties`, `magnitude_prune`).
#     These follow peft.utils.merge_utils operation for operation, so results are identical:
#     - task tensors are the dense deltas in the BASE weight's layout, B·A·scale, transposed for
#       fan_in_fan_out and embeddings (what PEFT's get_delta_weight returns and its *_svd modes feed in);
#       the layout decides which element each random draw lands on;
#     - magnitude pruning keeps the top int(density·numel) |values| of each tensor (torch.topk);
#     - DARE keeps each element with probability `density` (torch.bernoulli on a tensor filled with
#       density, drawn in adapter order) and divides the survivors by density;
#     - the sign is elected from the pruned, unweighted tensors: `total` = sign of their sum,
#       `frequency` = sign of the count of + minus −, a tie counts as +;
#     - ties / dare_ties average the weighted survivors that agree with the elected sign over the number
#       of agreeing adapters (at least 1); dare_linear / magnitude_prune sum the weighted pruned tensors;
#     - density ≥ 1 prunes nothing.
#
# Note: a missing module is a zero, and a zero is an abstention.
#     A zero element has sign 0, which never equals the elected ±1: it adds nothing to the `total` sum or
#     the `frequency` count and is not counted in the disjoint mean's denominator. So an adapter that does
#     not adapt a module is simply left out of that module's terms (as PEFT does), which gives exactly the
#     result of including a zero delta, without drawing a DARE mask for it.
#
# Note: seeded masks, per module.
#     DARE's masks come from a CPU torch.Generator seeded with `module_seed(seed, module name)`, then moved
#     to the compute device. The result depends only on the seed, the module's name and its inputs: not on
#     the order modules are processed in, on the device, or on which other modules exist. (PEFT draws from
#     the global generator in model order; running PEFT's dare_* on one module's deltas right after
#     `torch.manual_seed(module_seed(seed, name))` draws the same masks, which the tests check.)


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def random_prune_tensor(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each element with probability density, rescale survivors by 1/density."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=generator).to(t.device)
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def _weighted(stacked: torch.Tensor, weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    return stacked * w.view(w.shape + (1,) * (stacked.dim() - 1))


def _disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def ties(deltas: list[torch.Tensor], weights: list[float], *, density: float, majority_sign: str = "total",
         generator: torch.Generator | None = None) -> torch.Tensor:
    pruned = torch.stack([magnitude_prune_tensor(d, density) for d in deltas])
    return _disjoint_mean(_weighted(pruned, weights), majority_sign_mask(pruned, majority_sign))


def dare_linear(deltas: list[torch.Tensor], weights: list[float], *, density: float, majority_sign: str = "total",
                generator: torch.Generator | None = None) -> torch.Tensor:
    pruned = torch.stack([random_prune_tensor(d, density, generator) for d in deltas])
    return _weighted(pruned, weights).sum(dim=0)


def dare_ties(deltas: list[torch.Tensor], weights: list[float], *, density: float, majority_sign: str = "total",
              generator: torch.Generator | None = None) -> torch.Tensor:
    pruned = torch.stack([random_prune_tensor(d, density, generator) for d in deltas])
    return _disjoint_mean(_weighted(pruned, weights), majority_sign_mask(pruned, majority_sign))


def magnitude_prune(deltas: list[torch.Tensor], weights: list[float], *, density: float,
                    majority_sign: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    pruned = torch.stack([magnitude_prune_tensor(d, density) for d in deltas])
    return _weighted(pruned, weights).sum(dim=0)


def task_merge(terms: list[Term], method: str, *, module: str, transposed: bool, density: float,
               majority_sign: str = "total", seed: int = 0) -> torch.Tensor:
    """The merged dense delta of one module, in the base weight's layout (before truncation)."""
    spec = METHODS[method]
    generator = torch.Generator().manual_seed(module_seed(seed, module)) if spec.random_masks else None
    deltas = [t.task_tensor(transposed) for t in terms]
    return spec.dense_delta(deltas, [t.weight for t in terms], density=density,
                                   majority_sign=majority_sign, generator=generator)


def task_arithmetic_truncated(terms: list[Term], method: str, *, module: str, transposed: bool, density: float,
                              majority_sign: str = "total", seed: int = 0, rank: int | None = None,
                              energy: float | None = None) -> Truncation:
    """task_merge, then its best rank-R approximation in the factor layout (B·A = merged, transposed back)."""
    merged = task_merge(terms, method, module=module, transposed=transposed, density=density,
                        majority_sign=majority_sign, seed=seed)
    M = to_layout(merged, transposed)
    del merged
    if energy is not None:
        return truncate(M, energy=energy, max_rank=rank)
    return truncate(M, rank=rank)


# -- the registry ------------------------------------------------------------------------------------------

@dataclass
class CombineOptions:
    """The checked options of one combine run (combine.check_options)."""

    method: str
    weights: list[float]
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    majority_sign: str | None = None
    seed: int | None = None

    def record(self) -> dict:
        return {"method": self.method, "weights": self.weights, "rank": self.rank, "energy": self.energy,
                "density": self.density, "majority_sign": self.majority_sign, "seed": self.seed}


@dataclass(frozen=True)
class ModuleJob:
    """What a method knows of the module it combines."""

    name: str  # module name (seeds the DARE masks)
    transposed: bool  # the base weight is (B·A)ᵀ (lora_math.stored_transposed)
    default_rank: int  # rank of a dense method's result when neither --rank nor --energy is given


@dataclass(frozen=True)
class CombineMethod:
    """One combine method and the options it takes (combine.check_options reads these flags)."""

    name: str
    run: Callable[[list[Term], CombineOptions, ModuleJob], Truncation]
    exact: bool = False  # Σ wᵢ·sᵢ·Bᵢ·Aᵢ from the factors: lora_bias sums exactly, one CPU thread suffices
    truncates: bool = True  # takes --rank / --energy
    needs_density: bool = False  # prunes each delta to --density
    elects_sign: bool = False  # takes --majority-sign
    random_masks: bool = False  # draws masks: takes --seed
    dense_delta: Callable[..., torch.Tensor] | None = None  # task arithmetic: the merged dense delta


METHODS: dict[str, CombineMethod] = {}


def register(method: CombineMethod) -> CombineMethod:
    METHODS[method.name] = method
    return method


def names(flag: str) -> tuple[str, ...]:
    """The registered methods with `flag` set, in registration order (for messages)."""
    return tuple(n for n, m in METHODS.items() if getattr(m, flag))


def _task_arithmetic(terms: list[Term], opts: CombineOptions, job: ModuleJob) -> Truncation:
    rank = opts.rank if (opts.rank is not None or opts.energy is not None) else job.default_rank
    return task_arithmetic_truncated(terms, opts.method, module=job.name, transposed=job.transposed,
                                     density=opts.density, majority_sign=opts.majority_sign or "total",
                                     seed=opts.seed or 0, rank=rank, energy=opts.energy)


register(CombineMethod("cat", lambda terms, opts, job: cat(terms), exact=True, truncates=False))
register(CombineMethod("linear", lambda terms, opts, job: linear(terms, rank=opts.rank, energy=opts.energy),
                       exact=True))
register(CombineMethod("ties", _task_arithmetic, needs_density=True, elects_sign=True, dense_delta=ties))
register(CombineMethod("dare_linear", _task_arithmetic, needs_density=True, random_masks=True,
                       dense_delta=dare_linear))
register(CombineMethod("dare_ties", _task_arithmetic, needs_density=True, elects_sign=True, random_masks=True,
                       dense_delta=dare_ties))
register(CombineMethod("magnitude_prune", _task_arithmetic, needs_density=True, dense_delta=magnitude_prune))
