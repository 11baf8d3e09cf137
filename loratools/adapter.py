"""The PEFT LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Saved keys (PEFT strips the adapter name):
    base_model.model.<module>.lora_A.weight           [r, in]
    base_model.model.<module>.lora_B.weight           [out, r]
    base_model.model.<module>.lora_B.bias             [out]             (lora_bias=True)
    base_model.model.<module>.lora_embedding_A        [r, num_embeddings]
    base_model.model.<module>.lora_embedding_B        [dim, r]
    base_model.model.<module>.lora_magnitude_vector   [out]             (DoRA)
    base_model.model.<module>.<param>                 modules_to_save: the module's full parameters
    base_model.model.<module>.base_layer.weight       a targeted embedding saved whole (save_embedding_layers)
`<module>` is the module's name inside the model PEFT wrapped, so `<module>.weight` is the base tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import FormatError, InputError, UnsupportedError
from .io.checkpoint import load_json
from .io.safetensors_format import read_header, read_tensor
from .lora_math import lora_scale, peft_delta, stored_transposed

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_FACTOR_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


class KeyKind(str, Enum):
    """What one saved adapter key holds."""

    FACTOR = "factor"  # a LoRA factor of a module (A, B, bias, embedding A/B, DoRA magnitude)
    SAVED = "saved"  # a base tensor stored whole (modules_to_save, an embedding's base layer)
    UNKNOWN_LORA = "unknown_lora"  # a LoRA kind loratools does not handle
    NOT_PEFT = "not_peft"  # not under PEFT's base_model.model. prefix


class SavedKey(NamedTuple):
    kind: KeyKind
    name: str | None  # the module (FACTOR, UNKNOWN_LORA) or base tensor (SAVED) it belongs to
    role: str | None  # FACTOR only: "A", "B", "bias", "emb_A", "emb_B" or "magnitude"


def classify_key(key: str) -> SavedKey:
    """What a saved adapter key holds (see KeyKind)."""
    if not key.startswith(PREFIX):
        return SavedKey(KeyKind.NOT_PEFT, None, None)
    rest = key[len(PREFIX):]
    for suffix, role in _FACTOR_SUFFIXES.items():
        if rest.endswith(suffix):
            return SavedKey(KeyKind.FACTOR, rest[: -len(suffix)], role)
    if ".lora_" in rest or "trainable_tokens" in rest:
        return SavedKey(KeyKind.UNKNOWN_LORA, rest.split(".lora_")[0], None)
    return SavedKey(KeyKind.SAVED, rest.replace(".base_layer.", "."), None)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override lookup (peft.utils.other.get_pattern_key): the first pattern key that
    matches the end of the module name on a dot boundary wins; otherwise an exact-name entry; else default."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return patterns.get(module, default)


@dataclass
class LoraModule:
    """One adapted module's factors and the numbers PEFT derives for it."""

    name: str
    kind: str  # "linear" or "embedding"
    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def base_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias"

    @property
    def transposed(self) -> bool:
        """Whether the base weight is stored as (B·A)ᵀ (Conv1D, embeddings): lora_math.stored_transposed."""
        return stored_transposed(self.kind, self.fan_in_fan_out)

    @property
    def base_shape(self) -> tuple[int, int]:
        """Shape the base weight must have for these factors ([num_embeddings, dim] for an embedding)."""
        out_f, in_f = self.B.shape[0], self.A.shape[1]
        return (in_f, out_f) if self.transposed else (out_f, in_f)

    def delta(self, weight: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        """ΔW in the base weight's layout: B @ A · scale (transposed for Conv1D and embeddings)."""
        return peft_delta(self.B.to(dtype), self.A.to(dtype), self.scale * weight, self.transposed)


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> full replacement
    dtypes: set = field(default_factory=set)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def trainable_parameters(self) -> int:
        n = sum(m.A.numel() + m.B.numel() + (m.magnitude.numel() if m.magnitude is not None else 0)
                + (m.bias.numel() if m.bias is not None else 0) for m in self.modules.values())
        return n + sum(t.numel() for t in self.saved.values())


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_adapter_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(f"not a PEFT adapter: no {CONFIG_NAME}", path=path)
    cfg = load_json(cfg_path, CONFIG_NAME)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"adapter type {cfg.get('peft_type')!r} is not supported; loratools handles "
                               f"LoRA adapters (peft_type \"LORA\") only", path=cfg_path)
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise FormatError(f"{key} must be a positive number, found {v!r}", path=cfg_path)
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is None:
            cfg[key] = {}
        if not isinstance(cfg[key], dict):
            raise FormatError(f"{key} must be an object", path=cfg_path)
    if cfg.get("target_parameters"):
        raise UnsupportedError("LoRA on target_parameters (nn.Parameter targets) is not supported", path=cfg_path)
    if cfg.get("trainable_token_indices"):
        raise UnsupportedError("trainable_token_indices adapters are not supported", path=cfg_path)
    return cfg


def load_adapter(path: str | Path, *, check_finite: bool = True) -> Adapter:
    """Read a PEFT LoRA adapter whole (adapters are small) and resolve r, alpha and scale per module.

    NaN/Inf in any tensor is refused (merging or combining it would spread it silently through the
    output); `inspect` passes check_finite=False to show such an adapter anyway.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path=path)
    if path.is_file():
        raise InputError(f"expected an adapter directory holding {CONFIG_NAME}", path=path)
    cfg = read_adapter_config(path)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        if (path / "adapter_model.bin").exists():
            raise UnsupportedError("pickle adapter weights (adapter_model.bin) are not read; re-save the adapter "
                                   "with safe_serialization=True", path=path / "adapter_model.bin")
        raise InputError(f"adapter has no {WEIGHTS_NAME}", path=path)
    infos, _ = read_header(str(wpath))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    dtypes = set()
    with open(wpath, "rb", buffering=0) as fh:
        for key, info in infos.items():
            t = read_tensor(info, fh)
            dtypes.add(t.dtype)
            if check_finite and t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise FormatError(f"adapter tensor holds NaN/Inf values ({bad} of {t.numel()} elements)",
                                      path=wpath, tensor=key)
            kind, name, role = classify_key(key)
            if kind is KeyKind.NOT_PEFT:
                raise FormatError(f"unexpected key (PEFT keys start with {PREFIX!r})", path=wpath, tensor=key)
            if kind is KeyKind.UNKNOWN_LORA:
                raise UnsupportedError("unsupported LoRA tensor kind", path=wpath, tensor=key)
            if kind is KeyKind.FACTOR:
                parts.setdefault(name, {})[role] = t
            else:
                saved[name] = t
    modules = {}
    for name, p in parts.items():
        modules[name] = _build_module(name, p, cfg, wpath)
    return Adapter(path=path, config=cfg, modules=dict(sorted(modules.items())), saved=saved, dtypes=dtypes)


def _build_module(name: str, p: dict, cfg: dict, wpath: Path) -> LoraModule:
    m, issues = parse_module(name, p, cfg)
    if issues:  # load_adapter refuses at the first; validate reports them all
        raise issues[0].error(issues[0].message, path=wpath, tensor=PREFIX + name)
    out_features = m.B.shape[0]
    for role, t in (("lora_magnitude_vector", m.magnitude), ("lora_B.bias", m.bias)):
        if t is not None and tuple(t.shape) != (out_features,):
            raise FormatError(f"{role} has shape {list(t.shape)}, expected [{out_features}]", path=wpath,
                              tensor=PREFIX + name)
    return m


class FactorIssue(NamedTuple):
    """One inconsistency in a module's saved factors (parse_module)."""

    message: str  # what is wrong, without the module's name
    expected: object
    found: object
    error: type = FormatError  # what load_adapter raises for it


_ROLE_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}


def parse_module(name: str, parts: dict[str, torch.Tensor], cfg: dict) -> tuple[LoraModule | None, list[FactorIssue]]:
    """One adapted module from its saved parts (role -> tensor, see classify_key; shape-only "meta" tensors
    will do) and the adapter config: the LoraModule, None when the factors cannot describe one, and every
    inconsistency found. A rank that disagrees with the config is an issue, but the module is still built
    with its factors' rank. The magnitude and bias are taken as they are (their shapes are checked by the
    callers: load_adapter on its own, validate against the base)."""
    linear = "A" in parts or "B" in parts
    kind, a_role, b_role = ("linear", "A", "B") if linear else ("embedding", "emb_A", "emb_B")
    missing = [role for role in (a_role, b_role) if role not in parts]
    if missing:
        return None, [FactorIssue(f"the adapter has no {_ROLE_KEYS[missing[0]]} tensor",
                                  f"{_ROLE_KEYS[a_role]} and {_ROLE_KEYS[b_role]}",
                                  "only " + ", ".join(_ROLE_KEYS[r] for r in (a_role, b_role) if r in parts))]
    A, B = parts[a_role], parts[b_role]
    if A.dim() != 2 or B.dim() != 2:
        found = f"A {list(A.shape)}, B {list(B.shape)}"
        return None, [FactorIssue(f"only 2-D LoRA factors (Linear, Conv1D, Embedding) are supported; found {found}",
                                  "2-D factors", found, UnsupportedError)]
    r = int(A.shape[0])
    if B.shape[1] != r:
        return None, [FactorIssue(f"lora_A has rank {r} but lora_B is {list(B.shape)} (expected [out, {r}])",
                                  f"lora_B [out, {r}]", list(B.shape))]
    issues = []
    cfg_r = pattern_value(cfg["rank_pattern"], name, cfg["r"])
    if int(cfg_r) != r:
        source = "rank_pattern" if pattern_value(cfg["rank_pattern"], name, None) is not None else "r"
        issues.append(FactorIssue(f"adapter_config.json says r={cfg_r} ({source}) but its factors have rank {r}",
                                  f"r={cfg_r} ({source})", f"rank {r}"))
    alpha = float(pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"]))
    m = LoraModule(name=name, kind=kind, A=A, B=B, r=r, alpha=alpha,
                   scale=lora_scale(alpha, r, bool(cfg.get("use_rslora"))),
                   fan_in_fan_out=bool(cfg.get("fan_in_fan_out")) and linear,
                   magnitude=parts.get("magnitude"), bias=parts.get("bias"))
    return m, issues


# -- writing ---------------------------------------------------------------------------------------------

def adapter_config(*, r: int, lora_alpha: float, target_modules: list[str], base_model_name_or_path: str | None,
                   rank_pattern: dict | None = None, alpha_pattern: dict | None = None, fan_in_fan_out=False,
                   use_rslora=False, use_dora=False, lora_bias=False, modules_to_save=None,
                   task_type: str | None = "CAUSAL_LM", **extra) -> dict:
    """A LoraConfig dict that `PeftModel.from_pretrained` accepts (absent fields take PEFT's defaults)."""
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": _num(lora_alpha),
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "rank_pattern": {k: int(v) for k, v in (rank_pattern or {}).items()},
        "alpha_pattern": {k: _num(v) for k, v in (alpha_pattern or {}).items()},
        "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": bool(use_rslora),
        "use_dora": bool(use_dora),
        "lora_bias": bool(lora_bias),
        "modules_to_save": modules_to_save,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    cfg.update(extra)
    return cfg


def _num(v):
    f = float(v)
    return int(f) if f.is_integer() else f


def adapter_tensors(modules: dict[str, LoraModule], saved: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The saved-key dict for modules (and modules_to_save tensors), in PEFT's key format."""
    out = {}
    for name, m in sorted(modules.items()):
        cast = (lambda t: t.to(dtype).contiguous()) if dtype else (lambda t: t.contiguous())
        if m.kind == "embedding":
            out[f"{PREFIX}{name}.lora_embedding_A"] = cast(m.A)
            out[f"{PREFIX}{name}.lora_embedding_B"] = cast(m.B)
        else:
            out[f"{PREFIX}{name}.lora_A.weight"] = cast(m.A)
            out[f"{PREFIX}{name}.lora_B.weight"] = cast(m.B)
        if m.bias is not None:
            out[f"{PREFIX}{name}.lora_B.bias"] = cast(m.bias)
        if m.magnitude is not None:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = cast(m.magnitude)
    for key, t in sorted((saved or {}).items()):
        module, param = key.rsplit(".", 1)
        # A LoRA-wrapped module saved whole (an embedding) keeps its weights under `base_layer` in PEFT.
        out[PREFIX + (f"{module}.base_layer.{param}" if module in modules else key)] = t.contiguous()
    return out


def write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write config + weights into an existing directory (tests, benchmarks); returns the file names.

    The commands write adapters through io.output.write_adapter_dir (atomic, provenance, report)."""
    from .io.output import write_adapter_files

    return write_adapter_files(directory, config, tensors, metadata=metadata)


