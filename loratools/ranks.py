"""Rank options, one rule for every command that picks ranks (extract, resize, combine), and the one
"most common rank" an adapter config's `r` is set to. Torch-free: the command line checks its options with
these before torch is imported."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from .errors import UsageError

# option -> (the test, what the message says it must be)
RANGES = {
    "rank": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1"),
    "max_rank": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1"),
    "energy": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "sv_ratio": (lambda v: v >= 1, "at least 1 (keep σ ≥ σ_max / R)"),
}


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and int(v) == v


def range_problem(option: str, value) -> str | None:
    """Why `value` is out of range for rank option `option` ("rank", "max_rank", "energy", "sv_ratio"), or None."""
    ok, what = RANGES[option]
    try:
        fits = ok(value)
    except TypeError:
        fits = False
    return None if fits else f"--{option.replace('_', '-')} must be {what}, got {value}"


def check_ranges(**values) -> None:
    """UsageError (exit 2) for the first given rank option out of its range; None values are not given."""
    for option, value in values.items():
        problem = None if value is None else range_problem(option, value)
        if problem:
            raise UsageError(problem)


@dataclass(frozen=True)
class RankRule:
    """How each module's rank is chosen (lowrank.select_rank): fixed, or by energy / σ-ratio; capped."""

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    max_rank: int | None = None

    def check(self, *, one_criterion: bool = False) -> "RankRule":
        """The ranges, then the combination: --rank fixes the rank (no --energy / --sv-ratio beside it) and
        at least one criterion is given; `one_criterion` (resize) allows exactly one of the three."""
        given = [x is not None for x in (self.rank, self.energy, self.sv_ratio)]
        if one_criterion and sum(given) > 1:
            raise UsageError("give exactly one of --rank, --energy or --sv-ratio")
        if self.rank is not None and (self.energy is not None or self.sv_ratio is not None):
            raise UsageError("--rank fixes the rank; it cannot be combined with --energy or --sv-ratio "
                             "(use --max-rank to cap those)")
        check_ranges(rank=self.rank, max_rank=self.max_rank, energy=self.energy, sv_ratio=self.sv_ratio)
        if not any(given):
            raise UsageError("give one of --rank, --energy or --sv-ratio")
        return self

    def kwargs(self) -> dict:
        return {"rank": self.rank, "energy": self.energy, "sv_ratio": self.sv_ratio, "max_rank": self.max_rank}


def most_common_rank(ranks: Iterable[int], default: int) -> int:
    """The rank most modules have (an adapter config's `r`; the others go to rank_pattern), `default` for no
    modules. On a tie the larger rank wins: what extract and resize always chose, so their outputs (and the
    golden fixtures) keep their bytes; combine's tie-break (the smaller) changed to it."""
    counts = Counter(ranks)
    return max(counts, key=lambda r: (counts[r], r)) if counts else default


__all__ = ["RANGES", "RankRule", "check_ranges", "most_common_rank", "range_problem"]
