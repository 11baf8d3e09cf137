"""Non-weight files that travel with a checkpoint, and the provenance record written into outputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import __version__
from .writer import _disk_error, write_json


def copy_side_files(files: list[Path], dst: Path, *, config: dict | None = None,
                    skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config/tokenizer/generation files into dst; `config`, when given, replaces config.json."""
    written = []
    for p in files:
        if p.name in skip or (config is not None and p.name == "config.json"):
            continue
        try:
            shutil.copy2(p, dst / p.name)
        except OSError as e:
            raise _disk_error(e, dst / p.name) from None
        written.append(p.name)
    if config is not None:
        write_json(dst / "config.json", config)
        written.append("config.json")
    return sorted(written)


def provenance(command: str, options: dict, inputs: dict[str, str]) -> dict[str, str]:
    """What loratools did, as safetensors metadata (strings only).

    Output paths are left out on purpose: the same inputs and flags must give the same bytes wherever
    the output goes.
    """
    record = {
        "version": __version__,
        "command": command,
        "options": {k: v for k, v in sorted(options.items()) if v is not None},
        "inputs": {role: Path(p).name for role, p in inputs.items()},
    }
    return {"loratools": json.dumps(record, sort_keys=True, default=str)}
