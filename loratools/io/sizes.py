"""Shard sizes as the command line spells them (`--max-shard-size 5GB`). No torch here: the command
line parses its options before torch is imported."""
from __future__ import annotations

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}


def parse_size(text: str | int) -> int:
    """A size in bytes from its spelling (GB = 10^9 as transformers counts, GiB = 2^30).

    Args:
        text: "5GB", "500MB", "2GiB", "1000", or an int (returned as is).
    Returns:
        The number of bytes.
    Raises:
        ValueError: not a size, or not positive.
    Example:
        >>> parse_size("2GiB")
        2147483648
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    for unit, mult in _UNITS.items():
        if s.endswith(unit):
            num = s[: -len(unit)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * mult)
