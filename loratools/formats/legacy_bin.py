"""PEFT adapters saved as a pickle (`adapter_model.bin`, or `pytorch_model.bin` from old PEFT versions), read
for `convert` only, never by unpickling code.

Note: why weights_only.
    A pickle can name any importable callable and have it called on load (`__reduce__` → os.system).
    `torch.load(weights_only=True)` runs torch's restricted unpickler, which builds only tensors, storages
    and plain containers and refuses every other global before calling anything; we then accept only a flat
    {str: Tensor} dict. The tensors are written out as safetensors (PEFT's keys as they are), and every
    other command keeps refusing the .bin file (loratools/adapter.py), so a pickle is opened in one place.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from ..errors import FormatError, UnsupportedError
from . import PeftFiles

BIN_NAMES = ("adapter_model.bin", "pytorch_model.bin")


def bin_file(path: Path) -> Path | None:
    """The pickle weights file of a PEFT adapter directory that has no safetensors weights (given as the
    directory or as the file), else None."""
    path = Path(path)
    if path.is_file() and path.name in BIN_NAMES:
        found = bin_file(path.parent)
        return found if found == path else None
    if not path.is_dir() or not (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).exists():
        return None
    return next((path / n for n in BIN_NAMES if (path / n).is_file()), None)


def load_weights_only(wpath: Path) -> dict[str, torch.Tensor]:
    """{key: tensor} from a pickle state dict with torch's restricted unpickler; one-line errors otherwise."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read: the error says it
            warnings.simplefilter("ignore")
            sd = torch.load(wpath, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message, over many lines, names the refused global (posix.system) or opcode: keep that line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0] if lines else "")
        raise UnsupportedError(f"pickle refused: it holds more than tensors and is not unpickled ({first})",
                               path=wpath) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"not a readable torch state dict ({msg})", path=wpath) from None
    if not isinstance(sd, dict):
        raise FormatError(f"expected a state dict {{name: tensor}}, found {type(sd).__name__}", path=wpath)
    out = {}
    for key, t in sd.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise FormatError(f"expected a state dict {{name: tensor}}, found {type(t).__name__} under {key!r}",
                              path=wpath, tensor=str(key))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError("adapter tensor holds NaN/Inf values", path=wpath, tensor=key)
        out[key] = t.detach().contiguous().clone()  # own storage: safetensors refuses shared ones
    return out


def read_bin_adapter(path: Path) -> PeftFiles:
    """The PEFT adapter in directory `path` whose weights are a pickle, as PeftFiles (keys checked by parse)."""
    from . import parse

    wpath = bin_file(path)
    assert wpath is not None, path
    cfg = read_adapter_config(wpath.parent)
    files = PeftFiles(config=dict(cfg), tensors=load_weights_only(wpath), source="peft", path=wpath,
                      notes=[f"read {wpath.name} with torch.load(weights_only=True); written as safetensors"])
    parse(files)  # the same key and shape checks as a safetensors adapter
    return files
