"""kohya / LyCORIS-style LoRA keys <-> PEFT (pure tensor functions; file plumbing is the format object's).

kohya keys, one module `model.layers.0.self_attn.q_proj` under prefix `lora_te`:
    lora_te_model_layers_0_self_attn_q_proj.lora_down.weight   [r, in]    = PEFT lora_A
    lora_te_model_layers_0_self_attn_q_proj.lora_up.weight     [out, r]   = PEFT lora_B
    lora_te_model_layers_0_self_attn_q_proj.alpha              []         scale = alpha / r (always r, no rsLoRA)
    lora_te_model_layers_0_self_attn_q_proj.dora_scale         [out, 1]   = PEFT lora_magnitude_vector (LyCORIS
                                                                            wd_on_out layout)
One alpha per module, so rank_pattern/alpha_pattern are carried as they are; an rsLoRA scale alpha/sqrt(r)
is written as the alpha kohya divides by r (alpha·sqrt(r)). The original adapter_config.json rides in the
safetensors metadata (METADATA_CONFIG), so PEFT -> kohya -> PEFT gives back the same config and factors.

Reading needs the base's module names: `.` became `_`, and `model.layers_0` cannot be told from
`model_layers.0` without them. A name that matches no module, or several, is refused.

Note: the prefix. kohya's tools name the diffusion model `lora_unet` and text encoders `lora_te`/`lora_te1`/
`lora_te2`; there is no kohya convention for a causal LM, which is a text model, so writing defaults to
`lora_te`. Reading takes any `lora_<word>[N]_` or `lycoris_` prefix (one per file).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

from ..adapter import PREFIX, adapter_config, pattern_value
from ..errors import FormatError, LoratoolsError, UnsupportedError, UsageError
from . import PeftFiles, factor_modules, register

DEFAULT_PREFIX = "lora_te"
METADATA_CONFIG = "loratools.peft_config"
_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha", ".dora_scale": "magnitude"}
_PREFIX_RE = re.compile(r"^(lora_[a-z]+\d*|lycoris)_(.+)$")


def kohya_alpha(scale: float, r: int) -> float:
    """The alpha kohya needs for a PEFT scale: kohya applies alpha / r."""
    return scale * r


def is_kohya_key(key: str) -> bool:
    """Whether `key` is a kohya/LyCORIS LoRA tensor name (lora_<word>[N]_ or lycoris_ prefix, known suffix)."""
    return any(key.endswith(s) for s in _SUFFIXES) and _PREFIX_RE.match(key) is not None


def peft_to_kohya(config: dict, tensors: dict[str, torch.Tensor], prefix: str = DEFAULT_PREFIX
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT config + PEFT-keyed tensors -> kohya-keyed tensors + safetensors metadata.

    Refuses (UnsupportedError, one line) what kohya keys cannot hold: embeddings, lora_bias, modules_to_save
    tensors and target_parameters (expert) adapters."""
    if not _PREFIX_RE.match(prefix + "_x"):
        raise UnsupportedError(f"kohya prefix {prefix!r} must look like lora_<word> (lora_te, lora_unet)")
    modules = factor_modules(config, tensors, "kohya LoRA keys")
    out: dict[str, torch.Tensor] = {}
    for name, m in sorted(modules.items()):
        what = ("an embedding" if m.kind == "embedding" else "a target_parameters entry" if m.param
                else "a LoRA bias (lora_bias)" if m.bias is not None else None)
        if what:
            raise UnsupportedError(f"kohya LoRA keys cannot hold {what}", tensor=PREFIX + m.key_path)
        key = f"{prefix}_{name.replace('.', '_')}"
        if key + ".lora_down.weight" in out:
            raise UnsupportedError(f"two modules give the same kohya name {key}", tensor=PREFIX + name)
        out[key + ".lora_down.weight"] = m.A.contiguous()
        out[key + ".lora_up.weight"] = m.B.contiguous()
        out[key + ".alpha"] = torch.tensor(kohya_alpha(m.scale, m.r), dtype=torch.float32)
        if m.magnitude is not None:
            out[key + ".dora_scale"] = m.magnitude.reshape(-1, 1).contiguous()
    ranks = Counter(m.r for m in modules.values())
    alphas = Counter(float(out[f"{prefix}_{n.replace('.', '_')}.alpha"]) for n in modules)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0] if ranks else config.get("r")),
        "ss_network_alpha": str(alphas.most_common(1)[0][0] if alphas else config.get("lora_alpha")),
        METADATA_CONFIG: json.dumps(config, sort_keys=True),
    }
    return out, metadata


def module_index(modules: Iterable[str]) -> dict[str, list[str]]:
    """Underscored name -> the base module names that give it (more than one: ambiguous)."""
    index: dict[str, list[str]] = {}
    for m in modules:
        index.setdefault(m.replace(".", "_"), []).append(m)
    return index


def kohya_to_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, modules: Iterable[str],
                  conv1d: Iterable[str] = (), base_model_name_or_path: str | None = None,
                  embeddings: Iterable[str] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """kohya-keyed tensors -> PEFT config + PEFT-keyed tensors, names resolved against the base's `modules`
    (`conv1d`: those stored [in, out], GPT-2's Conv1D, which PEFT adapts with fan_in_fan_out; `embeddings`:
    nn.Embedding modules, refused: PEFT keys their LoRA lora_embedding_A/B and would ignore lora_A/lora_B).

    The config comes from METADATA_CONFIG when every module's rank and alpha agree with it (our own files);
    otherwise from the tensors: the most common rank/alpha as r/lora_alpha, the others as exact-name
    rank_pattern/alpha_pattern entries, target_modules = the adapted modules' full names."""
    index = module_index(modules)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, t in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        match = _PREFIX_RE.match(key[: -len(suffix)]) if suffix else None
        if match is None:
            raise FormatError("not a kohya LoRA key (expected lora_<prefix>_<module>.lora_down.weight / "
                              ".lora_up.weight / .alpha / .dora_scale)", tensor=key)
        prefixes.add(match.group(1))
        groups.setdefault(match.group(2), {})[_SUFFIXES[suffix]] = t
    if len(prefixes) > 1:
        raise UnsupportedError(f"kohya keys with several prefixes {sorted(prefixes)} (several models' LoRAs in "
                               f"one file); convert one model's keys at a time")
    prefix = prefixes.pop() if prefixes else DEFAULT_PREFIX
    conv1d = set(conv1d)
    resolved: dict[str, dict[str, torch.Tensor]] = {}
    for flat, p in sorted(groups.items()):
        key = f"{prefix}_{flat}"
        names = index.get(flat, [])
        if len(names) != 1:
            what = (f"matches {len(names)} modules of the base ({', '.join(sorted(names)[:3])})" if names else
                    "matches no module of the base (its name with '.' written as '_')")
            raise FormatError(f"kohya module {key} {what}", tensor=key + ".lora_down.weight")
        if names[0] in embeddings:  # as the writer: kohya LoRA keys hold Linear LoRAs
            raise UnsupportedError(f"kohya module {key} is the base's embedding {names[0]}; kohya LoRA keys are read "
                                   f"as Linear LoRAs only", tensor=key + ".lora_down.weight")
        missing = [s for s, role in (("lora_down.weight", "A"), ("lora_up.weight", "B")) if role not in p]
        if missing:
            raise FormatError(f"kohya module has no {missing[0]} tensor", tensor=f"{key}.{missing[0]}")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise FormatError(f"expected lora_down [r, in] and lora_up [out, r]; found {list(A.shape)} and "
                              f"{list(B.shape)}", tensor=key + ".lora_up.weight")
        if "alpha" in p and p["alpha"].numel() != 1:
            raise FormatError(f"alpha must be one number, found shape {list(p['alpha'].shape)}", tensor=key + ".alpha")
        if "magnitude" in p and tuple(p["magnitude"].shape) not in ((B.shape[0], 1), (B.shape[0],)):
            # by shape, not size: LyCORIS's wd_on_out=False [1, in] has as many numbers for a square weight
            if tuple(p["magnitude"].shape) == (1, A.shape[1]):
                raise UnsupportedError(f"dora_scale [1, {A.shape[1]}] normalises the weight's input columns "
                                       f"(LyCORIS wd_on_out=False); PEFT's DoRA magnitude is per output row",
                                       tensor=key + ".dora_scale")
            raise FormatError(f"dora_scale has shape {list(p['magnitude'].shape)}, expected [{B.shape[0]}, 1]",
                              tensor=key + ".dora_scale")
        resolved[names[0]] = p
    if not resolved:
        raise FormatError("no kohya LoRA modules in the file")
    fifo = {n in conv1d for n in resolved}
    if len(fifo) > 1:
        raise UnsupportedError("the kohya file adapts both Linear and Conv1D modules; one PEFT adapter has one "
                               "fan_in_fan_out")
    # kohya's default when a module has no alpha: alpha = r (scale 1).
    alphas = {n: float(p["alpha"].reshape(())) if "alpha" in p else float(p["A"].shape[0]) for n, p in resolved.items()}
    ranks = {n: int(p["A"].shape[0]) for n, p in resolved.items()}
    dora = {"magnitude" in p for p in resolved.values()}
    if len(dora) > 1:
        raise UnsupportedError("only some kohya modules carry dora_scale; a PEFT adapter is DoRA everywhere or "
                               "nowhere")
    fan_in_fan_out, use_dora = fifo.pop(), dora.pop()
    config = _stored_config(metadata, ranks, alphas, fan_in_fan_out, use_dora) or _derived_config(
        ranks, alphas, fan_in_fan_out, use_dora, base_model_name_or_path)
    out: dict[str, torch.Tensor] = {}
    for name, p in resolved.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = p["A"]
        out[f"{PREFIX}{name}.lora_B.weight"] = p["B"]
        if "magnitude" in p:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = p["magnitude"].reshape(-1)
    return config, out


def _stored_config(metadata: dict | None, ranks: dict[str, int], alphas: dict[str, float], fan_in_fan_out: bool,
                   use_dora: bool) -> dict | None:
    """The PEFT config we stored on writing, when the file's ranks, alphas, layout (Conv1D or not) and DoRA
    (dora_scale present or not) still say what it says: PEFT would apply a stored use_dora to a file whose
    dora_scale is gone, with magnitudes of its own."""
    text = (metadata or {}).get(METADATA_CONFIG)
    if not text:
        return None
    try:
        config = json.loads(text)
        if bool(config.get("use_dora")) != use_dora or bool(config.get("fan_in_fan_out")) != fan_in_fan_out:
            return None
        rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        for name, r in ranks.items():
            if int(pattern_value(rp, name, config["r"])) != r:
                return None
            a = float(pattern_value(ap, name, config["lora_alpha"]))
            scale = a / r ** 0.5 if config.get("use_rslora") else a / r
            if float(torch.tensor(kohya_alpha(scale, r), dtype=torch.float32)) != alphas[name]:
                return None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return config


def _derived_config(ranks: dict[str, int], alphas: dict[str, float], fan_in_fan_out: bool, use_dora: bool,
                    base: str | None) -> dict:
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return adapter_config(r=r, lora_alpha=alpha, target_modules=list(ranks), base_model_name_or_path=base,
                          rank_pattern={n: v for n, v in sorted(ranks.items()) if v != r},
                          alpha_pattern={n: v for n, v in sorted(alphas.items()) if v != alpha},
                          fan_in_fan_out=fan_in_fan_out, use_dora=use_dora)


# -- files --------------------------------------------------------------------------------------------

WEIGHTS_NAME = "lora.safetensors"  # what `write` names its one file (kohya files have no fixed name)


def base_modules(base: Path) -> tuple[list[str], set[str], set[str]]:
    """(module names, Conv1D modules, embedding modules) of the checkpoint at `base`, named as the loaded
    model names them (what PEFT names adapter modules after): every 2-D `<module>.weight`. Embeddings are
    the nn.Embedding modules of the model class (by leaf name where transformers cannot build it)."""
    from ..tensor_roles import EMBEDDING_LEAVES
    from ..hf_layout import layout_for, meta_model
    from ..io.checkpoint import Checkpoint
    from ..key_layout import checkpoint_layout

    ck = Checkpoint(base)
    try:
        shapes = checkpoint_layout(ck).lookup
    finally:
        ck.close()
    modules = [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    layout = layout_for(ck.config)
    model = meta_model(ck.config)
    embeddings = ({n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)} if model is not None
                  else {m for m in modules if m.rsplit(".", 1)[-1] in EMBEDDING_LEAVES})
    return modules, {m for m in modules if layout.is_conv1d(m)}, embeddings & set(modules)


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    found = sorted(path.glob("*.safetensors")) if path.is_dir() and not (path / "adapter_config.json").exists() else []
    return found[0] if len(found) == 1 else None


def _header_names(f: Path) -> list[str] | None:
    """The tensor names of a safetensors header, its data unchecked: a kohya file cut short is still told
    apart by its names, and read() then says what is wrong with it (None: no readable header)."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n <= 100_000_000 else None
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else None


class KohyaFormat:
    name = "kohya"

    def detect(self, path: Path) -> bool:
        f = _weights_file(Path(path))
        names = _header_names(f) if f is not None else None
        return bool(names) and all(is_kohya_key(k) for k in names)

    def read(self, path: Path, base: Path | None = None) -> PeftFiles:
        from ..io.safetensors_format import read_header, read_tensor

        f = _weights_file(Path(path))
        if base is None:
            raise UsageError(f"{f}: kohya keys name modules with '.' written as '_'; reading them back needs the "
                             f"base checkpoint's module list (--base BASE)")
        modules, conv1d, embeddings = base_modules(Path(base))
        infos, metadata = read_header(str(f))
        with open(f, "rb", buffering=0) as fh:
            tensors = {k: read_tensor(info, fh) for k, info in infos.items()}
        for k, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FormatError("adapter tensor holds NaN/Inf values", path=f, tensor=k)
        try:
            config, peft = kohya_to_peft(tensors, metadata, modules, conv1d, base_model_name_or_path=str(base),
                                         embeddings=embeddings)
        except LoratoolsError as e:
            e.path = e.path or str(f)
            raise
        return PeftFiles(config=config, tensors=peft, source=self.name, path=f)

    def check(self, files: PeftFiles, base: Path | None = None) -> None:
        try:
            peft_to_kohya(files.config, {k: t.to("meta") for k, t in files.tensors.items()})
        except LoratoolsError as e:
            e.path = e.path or (str(files.path) if files.path else None)
            raise

    def write(self, files: PeftFiles, out_dir: Path, base: Path | None = None, *, provenance=None,
              durability=None) -> list[str]:
        from ..io.durability import DURABLE
        from ..io.writer import save_tensors

        tensors, metadata = peft_to_kohya(files.config, files.tensors)
        return save_tensors(out_dir, tensors, filename=WEIGHTS_NAME, allow_shards=False, metadata=metadata,
                            provenance=provenance, durability=durability or DURABLE)


FORMAT = register(KohyaFormat())
