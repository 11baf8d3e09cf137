"""Non-weight files that travel with a checkpoint (config, generation config, tokenizer)."""
from __future__ import annotations

import shutil
from pathlib import Path

from .durability import DURABLE, Durability
from .writer import _disk_error, write_json


def copy_side_files(files: list[Path], dst: Path, *, config: dict | None = None, skip: tuple[str, ...] = (),
                    durability: Durability = DURABLE) -> list[str]:
    """Copy config/tokenizer/generation files into dst; `config`, when given, replaces config.json.

    Returns the names written, sorted. Each file is synced as `durability` says, like the weights."""
    written = []
    for p in files:
        if p.name in skip or (config is not None and p.name == "config.json"):
            continue
        try:
            shutil.copy2(p, dst / p.name)
            durability.fsync_path(dst / p.name)
        except OSError as e:
            raise _disk_error(e, dst / p.name) from None
        written.append(p.name)
    if config is not None:
        write_json(dst / "config.json", config, durability)
        written.append("config.json")
    return sorted(written)


def config_with_dtype(config: dict, dtype: str) -> dict:
    """A copy of config.json's dict declaring `dtype` (transformers 5 reads `dtype`, older ones `torch_dtype`)."""
    return {**config, "dtype": dtype, "torch_dtype": dtype}
