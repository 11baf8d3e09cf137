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

target_parameters (LoRA on an nn.Parameter, PEFT's ParamWrapper; what `all-linear` adds on MoE models):
    base_model.model.<module>[.base_layer]*k.lora_A.weight   [r·E, in]    (E experts of a 3-D parameter,
    base_model.model.<module>[.base_layer]*k.lora_B.weight   [out, r·E]    E = 1 for a 2-D one, e.g. a router)
Each targeted parameter of a module gets its own wrapper, nested: the parameter the module registers first
is innermost (most `base_layer`s), the last one outermost (see Note: which parameter is which).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch

from .device import torch_threads
from .errors import FormatError, InputError, LoratoolsError, UnsupportedError
from .io.checkpoint import load_json
from .io.safetensors_format import read_header, read_tensor
from .lora_math import expert_delta, expert_factors, lora_scale, peft_delta, stored_transposed

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
    """One adapted module's (or targeted parameter's) factors and the numbers PEFT derives for it.

    A target_parameters entry has `param` set, its `name` is the parameter's path (`<module>.<param>`, what
    PEFT matches rank_pattern / alpha_pattern against, and the base tensor's key) and `saved_path` is the
    module path its keys are saved under. kind "experts": a 3-D expert parameter, A (r·E, in), B (out, r·E);
    a 2-D parameter (a router's weight) is kind "linear" with E = 1, merged as a Linear is."""

    name: str
    kind: str  # "linear", "embedding" or "experts"
    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    param: str | None = None  # the targeted nn.Parameter's name (target_parameters); None for a module target
    experts: int = 1  # E
    saved_path: str | None = None  # module path of its saved keys, with PEFT's base_layer nesting (default name)
    # Set by a caller that knows the base: the experts are stored [E, in, out] (transformers' is_transposed,
    # GPT-OSS). The adapter alone cannot tell: its factors are the same either way.
    experts_transposed: bool = False

    @property
    def base_key(self) -> str:
        return self.name if self.param else f"{self.name}.weight"

    @property
    def key_path(self) -> str:
        """The module path under which its factors are saved (PREFIX + key_path + ".lora_A.weight")."""
        return self.saved_path or self.name

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias"

    @property
    def transposed(self) -> bool:
        """Whether the base weight is stored as (B·A)ᵀ (Conv1D, embeddings, is_transposed experts)."""
        if self.kind == "experts":
            return self.experts_transposed
        return stored_transposed(self.kind, self.fan_in_fan_out)

    @property
    def base_shape(self) -> tuple[int, ...]:
        """Shape the base weight must have for these factors ([num_embeddings, dim] for an embedding,
        [E, out, in] for experts, [E, in, out] once marked experts_transposed)."""
        out_f, in_f = self.B.shape[0], self.A.shape[1]
        shape = (in_f, out_f) if self.transposed else (out_f, in_f)
        return (self.experts, *shape) if self.kind == "experts" else shape

    def delta(self, weight: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        """ΔW in the base weight's layout: B @ A · scale (transposed for Conv1D and embeddings); per expert
        [E, out, in] for experts (lora_math.expert_delta)."""
        if self.kind == "experts":
            return expert_delta(self.B.to(dtype), self.A.to(dtype), self.scale * weight, self.experts,
                                self.transposed)
        return peft_delta(self.B.to(dtype), self.A.to(dtype), self.scale * weight, self.transposed)

    def orient_experts(self, base_shape) -> bool:
        """Mark experts as stored [E, in, out] when `base_shape` (the base tensor's) is that and not [E, out, in];
        returns whether the factors fit the base tensor. No-op check for other kinds.

        A square [E, n, n] tensor fits both ways and is left as set: only the model can say
        (`use_experts_implementation(is_transposed=True)`: GPT-OSS, Aria, OpenAI privacy filter in transformers
        5.24), so plan.mark_transposed_experts asks the model and refuses a square tensor without one."""
        shape = tuple(base_shape)
        if self.kind == "experts" and shape != self.base_shape:
            self.experts_transposed = not self.experts_transposed
            if shape != self.base_shape:
                self.experts_transposed = not self.experts_transposed
        return shape == self.base_shape

    def expert_factors(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e [E, r, in], B_e [E, out, r]) for experts; ([1, r, in], [1, out, r]) for any other module."""
        if self.kind == "experts":
            return expert_factors(self.A.to(dtype), self.B.to(dtype), self.experts)
        return self.A.to(dtype)[None], self.B.to(dtype)[None]


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)  # peft_types.TypedModule of another peft_type
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> full replacement
    dtypes: set = field(default_factory=set)
    source: str = "peft"  # the file format it was read from (loratools.formats)
    notes: list[str] = field(default_factory=list)  # what reading another format into PEFT's form changed

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def peft_type(self) -> str:
        """"LORA", or the peft_types type whose modules `modules` holds (load_adapter(..., typed=True))."""
        return str(self.config.get("peft_type", "LORA")).upper()

    def trainable_parameters(self) -> int:
        if self.peft_type != "LORA":
            return sum(m.parameters() for m in self.modules.values()) + sum(t.numel() for t in self.saved.values())
        n = sum(m.A.numel() + m.B.numel() + (m.magnitude.numel() if m.magnitude is not None else 0)
                + (m.bias.numel() if m.bias is not None else 0) for m in self.modules.values())
        return n + sum(t.numel() for t in self.saved.values())


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_adapter_config(path: Path, typed: bool = False) -> dict:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(f"not a PEFT adapter: no {CONFIG_NAME}", path=path)
    return check_adapter_config(load_json(cfg_path, CONFIG_NAME), cfg_path, typed)


def check_adapter_config(cfg: dict, cfg_path, typed: bool = False) -> dict:
    """adapter_config.json's dict checked for what loratools relies on (LoRA, r and alpha positive, patterns
    as objects; None patterns become {}); `cfg_path` names it in errors. Returns cfg.

    `typed`: the caller also takes the adapter types of loratools.peft_types (LoHa, LoKr, ...), whose
    configs their own parsers check; otherwise such an adapter is refused in one line (never read as LoRA)."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        from .peft_types import REGISTRY

        if peft_type not in REGISTRY:
            raise UnsupportedError(f"adapter type {cfg.get('peft_type')!r} (peft_type) is not supported; loratools "
                                   f"handles LORA, and {', '.join(REGISTRY)} in merge, unmerge, validate and inspect",
                                   path=cfg_path)
        if not typed:
            raise UnsupportedError(f"this is a {peft_type} adapter (peft_type); this command takes LoRA adapters only "
                                   f"(merge, unmerge, validate and inspect take {peft_type} directly): convert it "
                                   f"first with `loratools convert ADAPTER --to lora --rank R`", path=cfg_path)
        return cfg
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise FormatError(f"{key} must be a positive number, found {v!r}", path=cfg_path)
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is None:
            cfg[key] = {}
        if not isinstance(cfg[key], dict):
            raise FormatError(f"{key} must be an object", path=cfg_path)
    tp = cfg.get("target_parameters")
    if tp is not None and (not isinstance(tp, list) or not all(isinstance(t, str) and t for t in tp)):
        raise FormatError(f"target_parameters must be a list of parameter names, found {tp!r}", path=cfg_path)
    if cfg.get("trainable_token_indices"):
        raise UnsupportedError("trainable_token_indices adapters are not supported", path=cfg_path)
    return cfg


def load_adapter(path: str | Path, *, base: str | Path | None = None, check_finite: bool = True,
                 typed: bool = False) -> Adapter:
    """Read a LoRA adapter whole (adapters are small) and resolve r, alpha and scale per module.

    `path` may be in any registered format (loratools.formats: PEFT, MLX-LM, kohya, GGUF LoRA): one that is
    not PEFT's is read into PEFT's form by its format's reader (`base`: the base checkpoint, which kohya and
    GGUF names, and MLX MoE experts, need to be read back; without it they refuse in one line). The Adapter
    keeps `path` as given and says in `source` / `notes` what it was read from and what reading changed.

    NaN/Inf in any tensor is refused (merging or combining it would spread it silently through the
    output); `inspect` passes check_finite=False to show such an adapter anyway.

    `typed=True`: a PEFT directory of another registered adapter type (loratools.peft_types: LoHa, LoKr, VeRA,
    AdaLoRA, IA3, ...) is read too, its modules being that type's TypedModules (`Adapter.peft_type` says
    which); without it such an adapter is refused in one line pointing to `convert --to lora`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path=path)
    if not _is_peft_dir(path):
        from . import formats

        fmt = formats.detect(path)
        if fmt is not None and fmt.name != "peft":
            return adapter_from_files(formats.read(path, base), path, check_finite=check_finite)
    if path.is_file():
        raise InputError(f"expected an adapter directory holding {CONFIG_NAME}", path=path)
    cfg = read_adapter_config(path, typed)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        if (path / "adapter_model.bin").exists():
            raise UnsupportedError("pickle adapter weights (adapter_model.bin) are read only by `loratools convert "
                                   "ADAPTER -o OUT --to peft` (weights only, written as safetensors); convert it "
                                   "first, or re-save it with safe_serialization=True", path=path / "adapter_model.bin")
        raise InputError(f"adapter has no {WEIGHTS_NAME}", path=path)
    infos, _ = read_header(str(wpath))
    with open(wpath, "rb", buffering=0) as fh:
        tensors = ((key, read_tensor(info, fh)) for key, info in infos.items())
        if str(cfg.get("peft_type")).upper() != "LORA":  # a peft_types adapter (checked: typed=True)
            from .peft_types import read_typed

            modules, saved, dtypes = read_typed(cfg, tensors, wpath, check_finite)
            return Adapter(path=path, config=cfg, modules=modules, saved=saved, dtypes=dtypes)
        return _adapter_from_tensors(path, cfg, tensors, wpath, check_finite)


def _is_peft_dir(path: Path) -> bool:
    """A directory PEFT's own loader reads (its weights file, or a config that says peft_type), which no other
    format's reader may take over; MLX-LM's adapter_config.json has neither."""
    if not is_adapter_dir(path):
        return False
    if (path / WEIGHTS_NAME).is_file() or (path / "adapter_model.bin").exists():
        return True
    try:
        return "peft_type" in load_json(path / CONFIG_NAME, CONFIG_NAME)
    except LoratoolsError:
        return True  # let read_adapter_config say what is wrong with it


def adapter_from_files(files, path: str | Path | None = None, *, check_finite: bool = True) -> Adapter:
    """The Adapter of a formats.PeftFiles (an adapter in another format, read into PEFT's form), checked as
    load_adapter checks a PEFT adapter on disk; `path` (default files.path): the input as the user gave it."""
    where = Path(path) if path is not None else (files.path or Path(f"<{files.source} adapter>"))
    cfg = check_adapter_config(dict(files.config), where)
    ad = _adapter_from_tensors(where, cfg, iter(files.tensors.items()), where, check_finite)
    ad.source, ad.notes = files.source, list(files.notes)
    return ad


def _nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values t holds, on one torch thread: adapter tensors are small, and with several
    threads each op's fork/join costs more than the op (loading a 29 MB adapter took 2 s instead of 0.04 s
    on the shared 2-core box; device.torch_threads)."""
    with torch_threads(1):
        return int((~torch.isfinite(t)).sum())


def _adapter_from_tensors(path: Path, cfg: dict, tensors, wpath: Path, check_finite: bool) -> Adapter:
    """The Adapter from (saved key, tensor) pairs under PEFT's keys; `wpath` names the file in errors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    dtypes = set()
    for key, t in tensors:
        dtypes.add(t.dtype)
        if check_finite and t.is_floating_point():
            bad = _nonfinite(t)
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
    modules, issues = parse_modules(parts, cfg)
    if issues:  # load_adapter refuses at the first; validate reports them all
        path_name, issue = issues[0]
        raise issue.error(issue.message, path=wpath, tensor=PREFIX + path_name)
    for m in modules.values():
        out_features = m.B.shape[0]
        for role, t in (("lora_magnitude_vector", m.magnitude), ("lora_B.bias", m.bias)):
            if t is not None and tuple(t.shape) != (out_features,):
                raise FormatError(f"{role} has shape {list(t.shape)}, expected [{out_features}]", path=wpath,
                                  tensor=PREFIX + m.key_path)
    return Adapter(path=path, config=cfg, modules=dict(sorted(modules.items())), saved=saved, dtypes=dtypes)


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
    if cfg.get("use_dora") and linear and "magnitude" not in parts:  # PEFT would apply DoRA with magnitudes
        # of its own (the base's row norms), so merging it as plain LoRA would differ from PEFT: refuse
        issues.append(FactorIssue("use_dora is set but the adapter has no DoRA magnitude for it "
                                  "(lora_magnitude_vector)", "lora_magnitude_vector", None))
    alpha = float(pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"]))
    m = LoraModule(name=name, kind=kind, A=A, B=B, r=r, alpha=alpha,
                   scale=lora_scale(alpha, r, bool(cfg.get("use_rslora"))),
                   fan_in_fan_out=bool(cfg.get("fan_in_fan_out")) and linear,
                   magnitude=parts.get("magnitude"), bias=parts.get("bias"))
    return m, issues


# -- target_parameters (PEFT's ParamWrapper) --------------------------------------------------------------

# Note: which parameter is which.
#     PEFT wraps the targeted parameters of one module in the order the module registers them
#     (`named_parameters(recurse=False)`), each new wrapper around the previous one, so the first registered
#     parameter ends up innermost: Mixtral's experts save gate_up_proj under `experts.base_layer.lora_A` and
#     down_proj under `experts.lora_A` (measured with peft 0.21.2; target_parameters is saved as a set, in
#     no useful order). The adapter does not record the registration order; every transformers 5 experts
#     class registers its up-projections before down_proj (gate_up_proj, gate_proj, up_proj, then down_proj),
#     so loratools orders a module's parameters that way and then checks the shapes: gate_up_proj's output
#     is twice down_proj's input and its input is down_proj's output.
_REGISTRATION_ORDER = {"gate_up_proj": 0, "w1": 1, "gate_proj": 1, "w3": 2, "up_proj": 2, "down_proj": 4, "w2": 4}
_BASE_LAYER = ".base_layer"


def _nesting(path: str) -> tuple[str, int]:
    """(module, depth): `m.experts.base_layer` -> ("m.experts", 1)."""
    depth = 0
    while path.endswith(_BASE_LAYER):
        path, depth = path[: -len(_BASE_LAYER)], depth + 1
    return path, depth


def _matches_target_modules(cfg: dict, module: str) -> bool:
    """PEFT's check_target_module_exists for a plain name (a str is a full-match regex)."""
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        return re.fullmatch(tm, module) is not None
    return bool(tm) and (module in tm or any(module.endswith(f".{t}") for t in tm))


def _param_candidates(targets: list[str], module: str) -> tuple[list[str], list[str]]:
    """Parameter names of `module` that target_parameters can mean: (named with a module path that matches,
    bare names that match any module). PEFT matches `<module>.<param>` == or ends with `.<target>`."""
    strong, weak = [], []
    for t in targets:
        mod, _, param = t.rpartition(".")
        if not mod:
            weak.append(param)
        elif module == mod or module.endswith(f".{mod}"):
            strong.append(param)
    return list(dict.fromkeys(strong)), [p for p in dict.fromkeys(weak) if p not in strong]


def parse_modules(parts: dict[str, dict[str, torch.Tensor]], cfg: dict
                  ) -> tuple[dict[str, LoraModule], list[tuple[str, FactorIssue]]]:
    """Every adapted module from the saved parts (saved module path -> role -> tensor, see classify_key;
    "meta" tensors will do): LoraModules keyed by name, and every inconsistency as (saved module path,
    FactorIssue). Paths of target_parameters wrappers are grouped by module and assigned their parameters
    (Note: which parameter is which); everything else goes through parse_module."""
    targets = list(cfg.get("target_parameters") or [])
    groups: dict[str, dict[int, str]] = {}
    plain = []
    for path in parts:
        module, depth = _nesting(path)
        is_param = bool(targets) and (depth > 0 or (not _matches_target_modules(cfg, module)
                                                    and any(_param_candidates(targets, module))))
        if is_param:
            groups.setdefault(module, {})[depth] = path
        else:
            plain.append(path)
    modules: dict[str, LoraModule] = {}
    issues: list[tuple[str, FactorIssue]] = []
    for path in plain:
        m, found = parse_module(path, parts[path], cfg)
        issues += [(path, i) for i in found]
        if m is not None:
            modules[m.name] = m
    for module, by_depth in sorted(groups.items()):
        ms, found = _parse_param_module(module, by_depth, parts, cfg, targets)
        issues += found
        modules.update((m.name, m) for m in ms)
    return modules, issues


def _parse_param_module(module: str, by_depth: dict[int, str], parts: dict, cfg: dict, targets: list[str]
                        ) -> tuple[list[LoraModule], list[tuple[str, FactorIssue]]]:
    """The targeted parameters of one module from its nested wrappers' saved factors."""
    levels = max(by_depth) + 1
    first = by_depth[min(by_depth)]
    if len(by_depth) != levels:
        missing = [f"{module}{_BASE_LAYER * d}" for d in range(levels) if d not in by_depth]
        return [], [(first, FactorIssue(f"the adapter has no factors for the nested target_parameters wrapper "
                                        f"{missing[0]} (PEFT nests one per targeted parameter)",
                                        f"{levels} nested wrappers", f"{len(by_depth)}"))]
    strong, weak = _param_candidates(targets, module)
    if len(strong) == levels:
        params = strong
    elif len(strong) + len(weak) == levels:
        params = strong + weak
    else:
        found = f"{levels} wrapper(s)"
        return [], [(first, FactorIssue(f"cannot tell which of target_parameters {sorted(targets)} the {found} of "
                                        f"{module} adapt ({len(strong + weak)} candidate parameters: "
                                        f"{', '.join(strong + weak) or 'none'})", f"{len(strong + weak)} wrappers",
                                        found))]
    order = sorted(params, key=lambda p: _REGISTRATION_ORDER.get(p, 3))  # stable: otherwise as listed
    out, issues = [], []
    for i, param in enumerate(order):
        path = by_depth[levels - 1 - i]  # the first registered is innermost
        m, found = _parse_param(module, param, path, parts[path], cfg)
        issues += [(path, f) for f in found]
        if m is not None:
            out.append(m)
    issues += [(by_depth[0], f) for f in _param_shape_issues(module, {m.param: m for m in out})]
    return out, issues


def _parse_param(module: str, param: str, path: str, p: dict, cfg: dict
                 ) -> tuple[LoraModule | None, list[FactorIssue]]:
    """One targeted parameter: A (r·E, in), B (out, r·E) with r and alpha resolved on `<module>.<param>`."""
    name = f"{module}.{param}"
    other = sorted(set(p) - {"A", "B"})
    if other:
        return None, [FactorIssue(f"target_parameters wrapper for {name} holds {other[0]} tensors (PEFT's "
                                  f"ParamWrapper has only lora_A and lora_B)", "lora_A and lora_B", other[0])]
    missing = [role for role in ("A", "B") if role not in p]
    if missing:
        return None, [FactorIssue(f"the adapter has no {_ROLE_KEYS[missing[0]]} tensor for {name}",
                                  "lora_A.weight and lora_B.weight", f"no {_ROLE_KEYS[missing[0]]}")]
    A, B = p["A"], p["B"]
    if A.dim() != 2 or B.dim() != 2:
        found = f"A {list(A.shape)}, B {list(B.shape)}"
        return None, [FactorIssue(f"{name}: expected 2-D factors A (r·E, in), B (out, r·E); found {found}",
                                  "2-D factors", found)]
    r = int(pattern_value(cfg["rank_pattern"], name, cfg["r"]))
    rows = int(A.shape[0])
    if rows % r or B.shape[1] != rows:
        source = "rank_pattern" if pattern_value(cfg["rank_pattern"], name, None) is not None else "r"
        found = f"A {list(A.shape)}, B {list(B.shape)}"
        return None, [FactorIssue(f"{name}: with r={r} ({source}) expected A (r·E, in) and B (out, r·E) for a "
                                  f"number of experts E; found {found}", f"A [{r}·E, in], B [out, {r}·E]", found)]
    alpha = float(pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"]))
    experts = rows // r
    return LoraModule(name=name, kind="experts" if experts > 1 else "linear", A=A, B=B, r=r, alpha=alpha,
                      scale=lora_scale(alpha, r, bool(cfg.get("use_rslora"))), param=param, experts=experts,
                      saved_path=path), []


def nest_param_targets(modules: dict[str, LoraModule]) -> None:
    """Set saved_path of every target_parameters entry as PEFT nests them: per module, its parameters in
    registration order (Note: which parameter is which), the first innermost. For adapters built from
    several inputs (combine), whose union of targeted parameters decides the nesting."""
    by_module: dict[str, list[LoraModule]] = {}
    for m in modules.values():
        if m.param:
            by_module.setdefault(m.name[: -len(m.param) - 1], []).append(m)
    for module, ms in by_module.items():
        ms.sort(key=lambda m: _REGISTRATION_ORDER.get(m.param, 3))
        for i, m in enumerate(ms):
            m.saved_path = module + _BASE_LAYER * (len(ms) - 1 - i)


def _param_shape_issues(module: str, by_param: dict[str, LoraModule]) -> list[FactorIssue]:
    """One expert count per module, and gate_up_proj / down_proj shapes that fit each other."""
    experts = {m.param: m.experts for m in by_param.values() if m.kind == "experts"}
    if len(set(experts.values())) > 1:
        found = ", ".join(f"{p}: {e}" for p, e in experts.items())
        return [FactorIssue(f"{module}: its parameters' factors give different expert counts ({found}); is r or "
                            f"rank_pattern wrong?", "one expert count", found)]
    gu, down = by_param.get("gate_up_proj"), by_param.get("down_proj")
    if gu is not None and down is not None and (gu.B.shape[0] != 2 * down.A.shape[1]
                                                 or gu.A.shape[1] != down.B.shape[0]):
        found = f"gate_up_proj {list(gu.base_shape)}, down_proj {list(down.base_shape)}"
        return [FactorIssue(f"{module}: gate_up_proj and down_proj factors do not fit together as saved "
                            f"(expected gate_up_proj [E, 2I, H], down_proj [E, H, I] with gate_up_proj innermost); "
                            f"found {found}", "[E, 2I, H] and [E, H, I]", found)]
    return []


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
    out, paths = {}, set()
    for name, m in sorted(modules.items()):
        cast = (lambda t: t.to(dtype).contiguous()) if dtype else (lambda t: t.contiguous())
        path = m.key_path
        if path in paths:  # two entries (target_parameters of one module) under one path: one would be lost
            raise RuntimeError(f"two adapted entries would be saved under {PREFIX}{path} (the second: {name}); "
                               f"target_parameters nesting was not assigned")
        paths.add(path)
        if m.kind == "embedding":
            out[f"{PREFIX}{path}.lora_embedding_A"] = cast(m.A)
            out[f"{PREFIX}{path}.lora_embedding_B"] = cast(m.B)
        else:
            out[f"{PREFIX}{path}.lora_A.weight"] = cast(m.A)
            out[f"{PREFIX}{path}.lora_B.weight"] = cast(m.B)
        if m.bias is not None:
            out[f"{PREFIX}{path}.lora_B.bias"] = cast(m.bias)
        if m.magnitude is not None:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = cast(m.magnitude)
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


