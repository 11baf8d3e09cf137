"""Checkpoint index and lazy reader.

A checkpoint is one of:
  - a single `.safetensors` file;
  - a directory holding `model.safetensors` (or exactly one other `*.safetensors` file);
  - a sharded directory with `*.safetensors.index.json` naming its shards.
Opening one reads only the headers. Tensors are then read one at a time, in file order, with at most
one shard file open (mergekit's lazy loader does the same; it swaps shards only when a key lives
elsewhere).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import FormatError, InputError, UnsupportedError
from ..parallel import pooled_empty
from .safetensors_format import TensorInfo, read_header, read_tensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
QUANT_STATE_MARK = ".quant_state.bitsandbytes__"


def load_json(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from a file; unreadable, invalid or non-object content is an error naming `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{what} is not valid JSON ({e.msg} at line {e.lineno})", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what}: {getattr(e, 'strerror', None) or e}", path=path) from None
    if not isinstance(data, dict):
        raise FormatError(f"{what} must hold a JSON object", path=path)
    return data


def _refuse_pickle(path: Path):
    raise UnsupportedError(
        "pickle checkpoints are not read (loading them can run arbitrary code); convert to safetensors first, "
        "e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)` "
        "on a machine you trust",
        path=path,
    )


class Checkpoint:
    """Header-level view of a safetensors checkpoint plus tensor-at-a-time reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError("no such file or directory", path=self.path)
        self.index_file: Path | None = None
        if self.path.is_file():
            if self.path.suffix in PICKLE_SUFFIXES:
                _refuse_pickle(self.path)
            if self.path.suffix != ".safetensors":
                raise InputError("expected a .safetensors file or a checkpoint directory", path=self.path)
            self.dir = self.path.parent
            self.layout = "file"
            shard_files = [self.path]
            self._config_dir = None
        else:
            self.dir = self.path
            self._config_dir = self.path
            shard_files = self._find_shards()
        self.shards: list[Path] = shard_files
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for shard in shard_files:
            infos, meta = read_header(str(shard))
            self.metadata[shard.name] = meta
            for name, info in infos.items():
                if name in self.tensors:
                    raise FormatError(f"tensor appears in two shards ({Path(self.tensors[name].file).name} and {shard.name})",
                                      path=shard, tensor=name)
                self.tensors[name] = info
        if self.index_file is not None:
            self._check_index_agrees()
        self._fh = None
        self._fh_name = None
        # weight name -> bitsandbytes QuantState, parsed and checked once by quantized.quant_states
        # (held here because that type lives above io/, in bnb4bit.py)
        self.parsed_quant_states: dict[str, object] | None = None

    # -- discovery ---------------------------------------------------------------------------------
    def _find_shards(self) -> list[Path]:
        d = self.path
        indexes = sorted(d.glob("*.safetensors.index.json"))
        if (d / "model.safetensors.index.json").exists():
            indexes = [d / "model.safetensors.index.json"]
        if len(indexes) == 1:
            self.index_file = indexes[0]
            self.layout = "sharded"
            index = load_json(self.index_file, "shard index")
            wm = index.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise FormatError("shard index has no weight_map", path=self.index_file)
            self._weight_map = wm
            names = sorted(set(wm.values()))
            shards = []
            for name in names:
                p = d / name
                if not p.is_file():
                    raise InputError(f"shard {name} named by the index is missing", path=self.index_file,
                                     tensor=next(k for k, v in wm.items() if v == name))
                shards.append(p)
            return shards
        if len(indexes) > 1:
            raise FormatError(f"several shard indexes: {[p.name for p in indexes]}", path=d)
        if (d / "model.safetensors").is_file():
            self.layout = "directory"
            return [d / "model.safetensors"]
        singles = sorted(p for p in d.glob("*.safetensors") if p.is_file())
        if len(singles) == 1 and singles[0].name != "adapter_model.safetensors":
            self.layout = "directory"
            return singles
        if (d / "adapter_config.json").exists():
            raise InputError("this is a PEFT adapter, but a model checkpoint is expected here", path=d)
        pickles = [p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(pickles[0])
        if len(singles) > 1:
            raise FormatError(f"several .safetensors files and no index: {[p.name for p in singles]}", path=d)
        raise InputError("neither a checkpoint (model.safetensors or a shard index) nor an adapter "
                         "(adapter_config.json)", path=d)

    def _check_index_agrees(self):
        wm = self._weight_map
        for name, shard in wm.items():
            info = self.tensors.get(name)
            if info is None:
                raise FormatError(f"the index places this tensor in {shard}, which does not contain it",
                                  path=self.index_file, tensor=name)
            if Path(info.file).name != shard:
                raise FormatError(f"the index places this tensor in {shard}, but it is in {Path(info.file).name}",
                                  path=self.index_file, tensor=name)
        extra = [n for n in self.tensors if n not in wm]
        if extra:
            raise FormatError(f"tensor is in {Path(self.tensors[extra[0]].file).name} but not in the index "
                              f"({len(extra)} such)", path=self.index_file, tensor=extra[0])

    # -- metadata --------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict | None:
        """config.json beside the weights, or None."""
        d = self._config_dir or self.dir
        p = d / "config.json"
        if not p.exists():
            return None
        config = load_json(p, "config.json")
        # every command reads these two to pick conversions and classes (key_layout, hf_layout, task_types)
        archs = config.get("architectures")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise FormatError(f"config.json's architectures must be a list of class names, found {archs!r}", path=p)
        if not isinstance(config.get("model_type", ""), str):
            raise FormatError(f"config.json's model_type must be a string, found {config['model_type']!r}", path=p)
        return config

    @property
    def quantization_config(self) -> dict | None:
        """config.json's quantization_config block, or None."""
        qc = (self.config or {}).get("quantization_config")
        return qc if isinstance(qc, dict) else None

    @cached_property
    def quant_states(self) -> dict[str, dict]:
        """weight name -> bitsandbytes quant_state JSON, for each 4-bit packed weight."""
        out = {}
        for name, info in self.tensors.items():
            if QUANT_STATE_MARK in name:
                weight = name.split(".quant_state.")[0]
                try:
                    out[weight] = json.loads(bytes(read_tensor(info).numpy()).decode())
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise FormatError("quant_state is not valid JSON", path=info.file, tensor=name) from None
                out[weight]["_format"] = name.split(QUANT_STATE_MARK)[1]
        return out

    @property
    def is_quantized(self) -> bool:
        """True when any tensor is a bitsandbytes quant_state (a 4-bit checkpoint)."""
        return any(QUANT_STATE_MARK in n for n in self.tensors)

    @property
    def files(self) -> list[Path]:
        """The weight files: shards, then the index when there is one."""
        return list(self.shards) + ([self.index_file] if self.index_file else [])

    def bytes_on_disk(self) -> int:
        """Total size of the weight files."""
        return sum(p.stat().st_size for p in self.files)

    def dtype_counts(self) -> dict[str, int]:
        """Elements per dtype name, sorted by name."""
        c = Counter()
        for info in self.tensors.values():
            c[info.dtype_name] += info.numel
        return dict(sorted(c.items()))

    # -- reading -----------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Where a tensor lives; a missing name is an InputError naming the checkpoint."""
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError("tensor not found", path=self.path, tensor=name) from None

    def read(self, name: str, pooled: bool = False) -> torch.Tensor:
        """One tensor, read into its own buffer (`pooled`: a recycled one, see parallel.py Note: page
        faults). Keeps only the current shard open."""
        info = self.info(name)
        if self._fh_name != info.file:
            self.close()
            try:
                self._fh = open(info.file, "rb", buffering=0)
            except OSError as e:
                raise InputError(f"cannot open: {e.strerror}", path=info.file) from None
            self._fh_name = info.file
        return read_tensor(info, self._fh, pooled_empty if pooled else None)

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in on-disk order, so each shard is opened once and read forward."""
        names = self.keys() if names is None else list(names)
        order = {n: i for i, n in enumerate(self.tensors)}
        for name in sorted(names, key=lambda n: order.get(n, -1)):
            yield name, self.read(name)
        self.close()

    def prefetched(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names` in the order given, each next tensor read by a background thread
        while the caller works on this one (file reads release the GIL): one tensor more in memory,
        and the reads off the caller's critical path. One reader at a time, so the checkpoint's single
        open file is safe."""
        from concurrent.futures import ThreadPoolExecutor

        names = list(names)

        with ThreadPoolExecutor(1, thread_name_prefix="loratools-read") as pool:
            def read(name):
                return self.read(name, pooled=True)
            pending = pool.submit(read, names[0]) if names else None
            try:
                for i, name in enumerate(names):
                    tensor = pending.result()
                    pending = pool.submit(read, names[i + 1]) if i + 1 < len(names) else None
                    yield name, tensor
                    del tensor
            finally:
                if pending is not None:  # the caller stopped early: let the read in flight finish
                    pending.cancel() or pending.exception()
        self.close()

    def close(self) -> None:
        """Close the open shard, if any (reads reopen it)."""
        if self._fh is not None:
            self._fh.close()
        self._fh = None
        self._fh_name = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def non_weight_files(self) -> list[Path]:
        """Files to copy beside a rewritten checkpoint: config, generation config, tokenizer, etc."""
        if self._config_dir is None:
            return []
        skip = {p.name for p in self.files}
        out = []
        for p in sorted(self._config_dir.iterdir()):
            if not p.is_file() or p.name in skip or p.name.startswith("."):
                continue
            if p.suffix in (".safetensors",) + PICKLE_SUFFIXES or p.name.endswith(".index.json"):
                continue
            out.append(p)
        return out
