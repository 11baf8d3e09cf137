"""Adapter file formats (PEFT, MLX-LM, and those registered by their modules) and one in-memory value between them.

Every conversion goes through PEFT: a format's `read` turns its files into a `PeftFiles` (adapter_config.json's
dict + tensors under PEFT's saved keys, exactly what loratools/adapter.py reads and writes), and its `write`
turns a `PeftFiles` into its files. So X -> Y is `Y.write(X.read(path))`, and every other command can take any
format through `read`.

A format is any object with (see `AdapterFormat`):
    name                                  the `--to` value ("peft", "mlx", ...)
    detect(path) -> bool                  whether the directory/file at `path` is in this format (cheap: file
                                          names, a JSON field, a header; never the tensors)
    read(path, base=None) -> PeftFiles    the adapter as PEFT would save it. `base`: a checkpoint directory, for
                                          formats whose keys need the base's module list to be read back (kohya)
    check(files, base=None) -> None       raise UnsupportedError (one line: what cannot be carried, and where)
                                          when the format cannot hold `files`; called before any output exists
    write(files, out_dir, base=None, *, provenance=None, durability=DURABLE) -> list[str]
                                          write into `out_dir`, a directory the caller made (the temporary
                                          directory of io.atomic.AtomicOutput: atomic output is the caller's);
                                          returns the relative names of the files written
and is made known with `register(fmt)`.

Pure tensor/dict conversion (key names, transposes, folding scales) lives in functions of each format's
module, separate from its file plumbing; `parse(files)` gives the per-module view (r, alpha, scale, DoRA
magnitude, experts) that loratools/adapter.py resolves for a PEFT adapter, for converters that need it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from ..errors import InputError, LoratoolsError, UnsupportedError

if TYPE_CHECKING:
    from ..adapter import Adapter


@dataclass
class PeftFiles:
    """An adapter in memory, as PEFT saves it.

    config: adapter_config.json's dict (peft_type "LORA", r, lora_alpha, target_modules, use_rslora, use_dora,
        rank_pattern, alpha_pattern, modules_to_save, target_parameters, ...).
    tensors: adapter_model.safetensors' tensors by saved key (`base_model.model.<module>.lora_A.weight` ...,
        see the key table in loratools/adapter.py).
    source: the format it was read from, and `path` the file or directory, for messages.
    notes: one line per exact transformation a reader or writer made (a scale folded into B, ranks
        zero-padded), reported by `convert`.
    """

    config: dict
    tensors: dict[str, torch.Tensor]
    source: str = "peft"
    path: Path | None = None
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class AdapterFormat(Protocol):
    """What `register` takes; see the module docstring for each member's contract."""

    name: str

    def detect(self, path: Path) -> bool: ...

    def read(self, path: Path, base: Path | None = None) -> PeftFiles: ...

    def check(self, files: PeftFiles, base: Path | None = None) -> None: ...

    def write(self, files: PeftFiles, out_dir: Path, base: Path | None = None, *, provenance=None,
              durability=None) -> list[str]: ...


_FORMATS: dict[str, AdapterFormat] = {}


def register(fmt: AdapterFormat) -> AdapterFormat:
    """Make `fmt` known under fmt.name (detection tries formats in registration order); returns it, so a
    module can write `register(MyFormat())`."""
    if not isinstance(fmt, AdapterFormat):
        raise TypeError(f"{fmt!r} lacks name/detect/read/check/write")
    _FORMATS[fmt.name] = fmt
    return fmt


def _load_builtin() -> None:
    # Imported lazily: each module registers itself on import. Other formats add their module here.
    for mod in ("peft", "mlx", "kohya", "gguf_lora"):
        try:
            __import__(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def names() -> list[str]:
    """The registered format names, in registration order."""
    _load_builtin()
    return list(_FORMATS)


def get(name: str) -> AdapterFormat:
    """The format registered as `name`."""
    _load_builtin()
    try:
        return _FORMATS[name]
    except KeyError:
        from ..errors import UsageError
        raise UsageError(f"unknown adapter format {name!r}; known: {', '.join(_FORMATS)}") from None


def detect(path: str | os.PathLike) -> AdapterFormat | None:
    """The format of the adapter at `path`, or None when no registered format recognises it."""
    _load_builtin()
    p = Path(path)
    for fmt in _FORMATS.values():
        if fmt.detect(p):
            return fmt
    return None


def read(path: str | os.PathLike, base: str | os.PathLike | None = None) -> PeftFiles:
    """Read the adapter at `path` in whatever format it is (InputError naming the known formats otherwise)."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", path=p)
    fmt = detect(p)
    if fmt is None:
        raise InputError(f"not an adapter in a known format ({', '.join(_FORMATS)})", path=p)
    try:
        return fmt.read(p, Path(base) if base is not None else None)
    except LoratoolsError as e:  # name the input in every error (e.g. "needs --base"), once
        if e.path is None and str(p) not in e.message:
            e.path = str(p)
        raise


def parse(files: PeftFiles) -> Adapter:
    """The loratools.adapter.Adapter of `files` (modules with r, alpha, scale, DoRA magnitude, experts; saved
    tensors), resolved and checked exactly as load_adapter resolves a PEFT adapter on disk (NaN/Inf shown, not
    refused); FormatError on factors that do not describe a LoRA module."""
    from ..adapter import adapter_from_files

    return adapter_from_files(files, check_finite=False)


def factor_modules(config: dict, tensors: dict[str, torch.Tensor], target: str) -> dict:
    """The LoRA modules (name -> adapter.LoraModule) of PEFT-keyed `tensors`, for a target format that holds
    factors only (kohya, GGUF): a tensor saved whole or a non-LoRA key is refused in one line naming `target`;
    factors that do not describe a module are refused as load_adapter refuses them."""
    from ..adapter import PREFIX, KeyKind, classify_key, parse_modules

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        kind, name, role = classify_key(key)
        if kind is not KeyKind.FACTOR:
            raise UnsupportedError(f"{target} cannot hold a tensor saved whole (modules_to_save, an embedding's "
                                   "base layer) or a non-LoRA key", tensor=key)
        parts.setdefault(name, {})[role] = t
    cfg = {**config, "rank_pattern": config.get("rank_pattern") or {},
           "alpha_pattern": config.get("alpha_pattern") or {}}
    modules, issues = parse_modules(parts, cfg)
    if issues:
        path, issue = issues[0]
        raise issue.error(issue.message, tensor=PREFIX + path)
    return modules
