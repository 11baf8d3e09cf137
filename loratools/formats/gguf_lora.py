"""GGUF LoRA (llama.cpp) <-> PEFT: pure tensor functions, then the file plumbing (needs the `gguf` package).

What llama.cpp's own converter (`convert_lora_to_gguf.py`) writes and `src/llama-adapter.cpp` reads:
    KV     general.architecture = the base's GGUF arch, general.type = "adapter", adapter.type = "lora",
           adapter.lora.alpha (float32)
    names  the base tensor's GGUF name (`gguf.get_tensor_name_map(arch, n_blocks)`) + `.lora_a` / `.lora_b`
    a, b   lora_a = PEFT lora_A (r, in), lora_b = PEFT lora_B (out, r); token_embd: lora_a = lora_embedding_A.T
           (num_embeddings, r), lora_b = lora_embedding_B (dim, r). Llama-family q/k rows are in the RoPE order
           convert_hf_to_gguf writes its base weights in (LlamaModel.permute), so lora_b's rows are permuted too.
           MoE experts (PEFT target_parameters, A (r·E, in), B (out, r·E)) become llama.cpp's stacked tensors
           `ffn_{gate,up,down}_exps`: lora_a [E, r, in], lora_b [E, out, r], what the converter stacks from
           per-expert Linear LoRAs; a fused gate_up_proj is split into gate and up (same lora_a).
llama.cpp applies alpha / r per tensor (r = that tensor's rank) with one alpha per file: rank_pattern is
carried, but rsLoRA (alpha/sqrt(r)) and alpha_pattern are not. We fold the difference into lora_b:
lora_b = B · s / (alpha / r), s = PEFT's scale for the module; where s = alpha / r already (no rsLoRA, no
alpha_pattern entry) lora_b is B unchanged, so plain adapters give the converter's tensors bit for bit.
Tensors are written float32 (the converter's default --outtype f32).

The PEFT config rides in the KV (METADATA_CONFIG), so reading our own file back restores the config and
unfolds the scales (bit-identical where nothing was folded). Reading needs the base: GGUF names are mapped
back to module names through the base's module list.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..adapter import PREFIX, LoraModule, adapter_config, nest_param_targets, pattern_value
from ..errors import FormatError, InputError, LoratoolsError, UnsupportedError, UsageError
from ..lora_math import lora_scale, pack_expert_factors
from . import PeftFiles, factor_modules, register

METADATA_CONFIG = "loratools.peft_config"
METADATA_DTYPE = "loratools.dtype"
WEIGHTS_NAME = "adapter.gguf"

# HF architecture class -> (GGUF arch, q/k rows RoPE-permuted as convert_hf_to_gguf's LlamaModel does).
# Only architectures whose converter class we checked are listed; others are refused in one line.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "MixtralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}


@dataclass(frozen=True)
class GgufArch:
    """What naming and orienting tensors needs from the base's config.json."""

    arch: str
    n_blocks: int
    n_head: int
    n_kv_head: int
    permute_qk: bool
    tied: bool = False  # the base stores no lm_head: llama.cpp's output is token_embd itself (see peft_to_gguf)

    @classmethod
    def from_config(cls, config: dict | None, where=None) -> "GgufArch":
        archs = (config or {}).get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise UnsupportedError(f"GGUF LoRA: base architecture {archs or 'unknown'} is not one loratools maps to "
                                   f"llama.cpp names (known: {', '.join(ARCHITECTURES)})", path=where)
        arch, permute = ARCHITECTURES[known[0]]
        heads = int(config["num_attention_heads"])
        return cls(arch, int(config["num_hidden_layers"]), heads, int(config.get("num_key_value_heads") or heads),
                   permute)

    def name_map(self):
        return _name_map(self.arch, self.n_blocks)

    def gguf_name(self, module: str) -> str | None:
        """`blk.0.attn_q.weight` for `model.layers.0.self_attn.q_proj` (None: llama.cpp has no such tensor)."""
        return self.name_map().get_name(module + ".weight", try_suffixes=(".weight",))

    def qk_heads(self, module: str) -> int | None:
        """The head count whose RoPE row order llama.cpp stores this module's output in (LlamaModel.permute:
        q_proj, k_proj of Llama-family archs), or None."""
        if not self.permute_qk:
            return None
        leaf = module.rsplit(".", 1)[-1]
        heads = {"q_proj": self.n_head, "k_proj": self.n_kv_head}.get(leaf)
        return None if heads is None else heads


@lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int):
    # ~16 ms to build (80 blocks); looked up once per module
    import gguf

    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(names[arch], n_blocks)


def _permute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    # convert_hf_to_gguf LlamaModel.permute: (heads, 2, d/2) -> (heads, d/2, 2) on the output rows
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _unpermute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def fold_factor(scale: float, alpha: float, r: int) -> float:
    """What lora_b is multiplied by so that llama.cpp's alpha / r gives PEFT's scale."""
    return scale / (alpha / r)


def peft_to_gguf(config: dict, tensors: dict[str, torch.Tensor], arch: GgufArch
                 ) -> tuple[dict[str, torch.Tensor], dict[str, object], list[str]]:
    """PEFT config + tensors -> (GGUF tensors by name, float32; KV; notes on scales folded into lora_b).

    Refuses (UnsupportedError, one line) what llama.cpp's LoRA cannot apply: DoRA magnitudes, lora_bias,
    tensors saved whole (modules_to_save), experts stored [E, in, out], Conv1D (fan_in_fan_out), modules the
    GGUF arch has no tensor for, and an embedding or lm_head LoRA when `arch.tied` (llama.cpp's output tensor
    is then token_embd.weight)."""
    modules = factor_modules(config, tensors, "GGUF LoRA")
    alpha = float(config["lora_alpha"])
    out: dict[str, torch.Tensor] = {}
    folded = []
    for name, m in sorted(modules.items()):
        what = ("a DoRA magnitude (llama.cpp applies plain LoRA only)" if m.magnitude is not None
                else "a LoRA bias (lora_bias)" if m.bias is not None
                else "experts stored [E, in, out]" if m.experts_transposed
                else "a Conv1D (fan_in_fan_out) module" if m.fan_in_fan_out else None)
        if what:
            raise UnsupportedError(f"GGUF LoRA cannot hold {what}", tensor=PREFIX + m.key_path)
        if arch.tied and (m.kind == "embedding" or arch.gguf_name(m.name) == "output.weight"):
            # llama.cpp looks LoRAs up by tensor name and its tied output *is* token_embd.weight: an embedding
            # LoRA would be applied to the output matmul too (PEFT: input only), an lm_head one finds no tensor
            raise UnsupportedError(f"GGUF LoRA cannot hold {'an embedding' if m.kind == 'embedding' else 'an lm_head'} "
                                   f"LoRA for a base with tied word embeddings (llama.cpp's output is token_embd)",
                                   tensor=PREFIX + m.key_path)
        f = fold_factor(m.scale, alpha, m.r)
        if f != 1.0:
            folded.append(name)
        for gname, A, B in _gguf_factors(m, arch):
            if gname is None:
                raise UnsupportedError(f"llama.cpp's {arch.arch} has no tensor for {name}", tensor=PREFIX + m.key_path)
            out[gname + ".lora_a"] = A.contiguous()
            out[gname + ".lora_b"] = (B if f == 1.0 else B * f).contiguous()
    notes = [f"GGUF LoRA: {len(folded)} module(s) have a scale other than adapter.lora.alpha / r "
             f"({'rsLoRA' if config.get('use_rslora') else 'alpha_pattern'}); folded into lora_b"] if folded else []
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    kv = {"alpha": alpha, METADATA_CONFIG: json.dumps(config, sort_keys=True),
          METADATA_DTYPE: dtypes[0] if len(dtypes) == 1 else "float32"}
    return out, kv, notes


def _gguf_factors(m, arch: GgufArch) -> list[tuple[str | None, torch.Tensor, torch.Tensor]]:
    """(GGUF base tensor name, lora_a, lora_b) in float32, unscaled, as convert_lora_to_gguf.py lays them out.

    A target_parameters expert tensor becomes llama.cpp's stacked experts: lora_a [E, r, in], lora_b
    [E, out, r] (what the converter stacks from per-expert Linear LoRAs); a fused gate_up_proj [E, 2I, H]
    (gate rows first) is split into ffn_gate_exps and ffn_up_exps, both with the same lora_a."""
    if m.param:
        A_e, B_e = m.expert_factors(torch.float32)
        module = m.name[: -len(m.param) - 1]
        if m.experts == 1 and m.param == "weight":  # a 2-D parameter (a router's weight): a plain Linear
            return [(arch.gguf_name(module), A_e[0], B_e[0])]
        if m.param == "gate_up_proj":
            half = B_e.shape[1] // 2
            return [(arch.gguf_name(f"{module}.gate_proj"), A_e, B_e[:, :half]),
                    (arch.gguf_name(f"{module}.up_proj"), A_e, B_e[:, half:])]
        return [(arch.gguf_name(m.name), A_e, B_e)]
    B, A = m.B.float(), m.A.float()
    heads = arch.qk_heads(m.name)
    if heads is not None:
        B = _permute_rows(B, heads)
    if m.kind == "embedding":
        A = A.T  # llama.cpp's inp_embd takes rows of lora_a per token (the converter transposes it)
    return [(arch.gguf_name(m.name), A, B)]


def _reverse_names(arch: GgufArch, modules: list[str], params: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    """GGUF base tensor name -> [(module or expert parameter, part)]: part "gate"/"up" for the halves of a
    fused gate_up_proj, None otherwise (more than one entry: ambiguous)."""
    reverse: dict[str, list[tuple[str, str | None]]] = {}
    for m in modules:
        g = arch.gguf_name(m)
        if g is not None:
            reverse.setdefault(g, []).append((m, None))
    for p in params:
        module, _, leaf = p.rpartition(".")
        halves = [(f"{module}.gate_proj", "gate"), (f"{module}.up_proj", "up")] if leaf == "gate_up_proj" else [(p, None)]
        for name, part in halves:
            g = arch.gguf_name(name)
            if g is not None:
                reverse.setdefault(g, []).append((p, part))
    return reverse


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """GGUF base tensor name -> {"lora_a"/"lora_b": float32 tensor}; UnsupportedError for any other tensor."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        base, dot, role = key.rpartition(".")
        if not dot or role not in ("lora_a", "lora_b"):
            raise UnsupportedError("GGUF LoRA tensor is neither .lora_a nor .lora_b (norm tensors from "
                                   "mergekit-extract-lora are not carried)", tensor=key)
        pairs.setdefault(base, {})[role] = t.float() if t.dtype != torch.float32 else t
    return pairs


def _modules(pairs: dict[str, dict[str, torch.Tensor]], arch: GgufArch, reverse: dict, params: list[str],
             alpha: float) -> dict[str, LoraModule]:
    """The LoraModules (scale not yet known) of a GGUF LoRA's tensor pairs, each name resolved through
    `reverse` (_reverse_names): q/k rows back in transformers' order, token_embd's lora_a transposed back,
    stacked experts packed as PEFT's target_parameters (gate and up joined into one gate_up_proj)."""
    plain: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # module -> (A, B, embedding)
    experts: dict[str, dict[str | None, tuple[torch.Tensor, torch.Tensor]]] = {}  # param -> part -> (A_e, B_e)
    for gname, p in sorted(pairs.items()):
        names = reverse.get(gname, [])
        if len(names) != 1:
            what = (f"several base tensors ({', '.join(sorted(n for n, _ in names)[:3])})" if names
                    else "no tensor of the base")
            raise FormatError(f"GGUF tensor {gname} maps to {what} under llama.cpp's {arch.arch} names",
                              tensor=gname + ".lora_a")
        (name, part) = names[0]
        if set(p) != {"lora_a", "lora_b"}:
            raise FormatError(f"GGUF LoRA has no {({'lora_a', 'lora_b'} - set(p)).pop()} for {gname}", tensor=gname)
        a, b = p["lora_a"], p["lora_b"]
        if name in params:
            if a.dim() != 3 or b.dim() != 3 or b.shape[2] != a.shape[1] or b.shape[0] != a.shape[0]:
                raise FormatError(f"expected expert lora_a [E, r, in] and lora_b [E, out, r]; found {list(a.shape)} "
                                  f"and {list(b.shape)}", tensor=gname + ".lora_b")
            experts.setdefault(name, {})[part] = (a, b)
            continue
        embedding = gname.startswith("token_embd.")
        A = a.T if embedding else a
        if A.dim() != 2 or b.dim() != 2 or b.shape[1] != A.shape[0]:
            raise FormatError(f"expected lora_a [r, in] and lora_b [out, r]; found {list(a.shape)} and "
                              f"{list(b.shape)}", tensor=gname + ".lora_b")
        heads = arch.qk_heads(name)
        plain[name] = (A, _unpermute_rows(b, heads) if heads is not None else b, embedding)
    found: dict[str, LoraModule] = {}
    for name, (A, B, embedding) in plain.items():
        found[name] = LoraModule(name=name, kind="embedding" if embedding else "linear", A=A, B=B,
                                 r=int(A.shape[0]), alpha=alpha, scale=0.0)
    for name, parts in experts.items():
        if None in parts:
            A_e, B_e = parts[None]
        else:
            if set(parts) != {"gate", "up"} or not torch.equal(parts["gate"][0], parts["up"][0]):
                raise UnsupportedError(f"{name}: llama.cpp's gate and up expert LoRAs must both be present with the "
                                       f"same lora_a to form one PEFT gate_up_proj LoRA",
                                       tensor=arch.gguf_name(name.rpartition(".")[0] + ".gate_proj"))
            A_e, B_e = parts["gate"][0], torch.cat([parts["gate"][1], parts["up"][1]], dim=1)
        A, B = pack_expert_factors(A_e, B_e)
        found[name] = LoraModule(name=name, kind="experts", A=A, B=B, r=int(A_e.shape[1]), alpha=alpha, scale=0.0,
                                 param=name.rpartition(".")[2], experts=int(A_e.shape[0]))
    return found


def gguf_to_peft(tensors: dict[str, torch.Tensor], kv: dict, arch: GgufArch, modules: list[str],
                 base_model_name_or_path: str | None = None, params: list[str] = ()
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """GGUF LoRA tensors + KV (`alpha`, and our METADATA_* when we wrote the file) -> PEFT config + tensors,
    GGUF names resolved through the base's `modules` (2-D weights' modules) and `params` (3-D expert
    parameters, as target_parameters). With our metadata the config is restored and folded scales are
    divided out again; otherwise the config says what llama.cpp applies: lora_alpha = the file's alpha (0:
    llama.cpp's scale 1, so each module's alpha is its rank), r the most common rank, other ranks in
    rank_pattern, target_modules = full module names."""
    pairs = _pairs(tensors)
    alpha = float(kv["alpha"])
    stored = _stored_config(kv.get(METADATA_CONFIG))
    found = _modules(pairs, arch, _reverse_names(arch, modules, list(params)), list(params), alpha)
    if not found:
        raise FormatError("no LoRA tensors in the GGUF file")
    if stored is not None:  # a router's LoRA PEFT made on its `weight` parameter (target_parameters "gate.weight")
        stored_params = stored.get("target_parameters") or []
        for name, m in found.items():
            if not m.param and any(f"{name}.weight".endswith(t) for t in stored_params):
                m.param, m.name = "weight", f"{name}.weight"
    nest_param_targets(found)
    ranks = {m.name: m.r for m in found.values()}
    if stored is not None and not (float(stored["lora_alpha"]) == alpha and all(
            int(pattern_value(stored.get("rank_pattern") or {}, n, stored["r"])) == r for n, r in ranks.items())):
        stored = None  # not what we wrote (alpha or a rank changed since): read it as llama.cpp applies it
    dtype = getattr(torch, str(kv.get(METADATA_DTYPE) or "float32"), torch.float32) if stored else torch.float32
    out: dict[str, torch.Tensor] = {}
    for m in found.values():
        B = m.B
        if stored is not None:
            a_m = float(pattern_value(stored.get("alpha_pattern") or {}, m.name, stored["lora_alpha"]))
            f = fold_factor(lora_scale(a_m, m.r, bool(stored.get("use_rslora"))), alpha, m.r)
            B = B if f == 1.0 else B / f
        roles = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        out[f"{PREFIX}{m.key_path}.{roles[0]}"] = m.A.to(dtype).contiguous()
        out[f"{PREFIX}{m.key_path}.{roles[1]}"] = B.to(dtype).contiguous()
    if stored is not None:
        return stored, out
    r = Counter(ranks.values()).most_common(1)[0][0]
    leaves = sorted({m.param for m in found.values() if m.param})
    # llama.cpp's get_scale: alpha 0 means scale 1 for every tensor, i.e. PEFT's alpha = each module's rank
    config = adapter_config(r=r, lora_alpha=alpha or float(r),
                            target_modules=[m.name for m in found.values() if not m.param],
                            base_model_name_or_path=base_model_name_or_path,
                            rank_pattern={n: v for n, v in sorted(ranks.items()) if v != r},
                            alpha_pattern={} if alpha else {n: float(v) for n, v in sorted(ranks.items()) if v != r},
                            target_parameters=leaves or None)
    return config, out


def _stored_config(text) -> dict | None:
    try:
        config = json.loads(text) if text else None
    except ValueError:
        return None
    return config if isinstance(config, dict) and "r" in config and "lora_alpha" in config else None


# -- files --------------------------------------------------------------------------------------------

def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise UnsupportedError("the GGUF LoRA format needs the gguf package: pip install 'loratools[gguf]'") from None
    return gguf


def _gguf_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def _base_config(base: Path | None, what: str) -> dict:
    from ..io.checkpoint import load_json

    if base is None:
        raise UsageError(f"GGUF LoRA {what} needs the base checkpoint (--base BASE): its architecture names the "
                         f"tensors")
    cfg_path = Path(base) / "config.json"
    if not cfg_path.is_file():
        raise InputError("base has no config.json (GGUF tensor names follow its architecture)", path=base)
    return load_json(cfg_path, "config.json")


def read_gguf(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by name, KV of interest) of a GGUF LoRA file; FormatError when it is not one."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on truncated or foreign files
        raise FormatError(f"not a readable GGUF file ({e})", path=path) from None

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise FormatError(f"not a GGUF LoRA adapter (general.type={field('general.type')!r}, "
                          f"adapter.type={field('adapter.type')!r})", path=path)
    kv = {"arch": field("general.architecture"), "alpha": field("adapter.lora.alpha"),
          METADATA_CONFIG: field(METADATA_CONFIG), METADATA_DTYPE: field(METADATA_DTYPE)}
    if kv["alpha"] is None:
        raise FormatError("GGUF LoRA has no adapter.lora.alpha", path=path)
    tensors = {}
    for t in reader.tensors:
        if t.tensor_type.name not in ("F32", "F16", "BF16"):
            raise UnsupportedError(f"quantized ({t.tensor_type.name}) LoRA tensors are not read", path=path,
                                   tensor=t.name)
        data = torch.from_numpy(t.data.copy())
        if t.tensor_type.name == "BF16":
            data = data.view(torch.bfloat16)
        tensors[t.name] = data.reshape(tuple(int(x) for x in reversed(t.shape)))
        if not bool(torch.isfinite(tensors[t.name]).all()):
            raise FormatError("adapter tensor holds NaN/Inf values", path=path, tensor=t.name)
    return tensors, kv


def base_names(base: Path) -> tuple[list[str], list[str]]:
    """(modules of the 2-D `.weight`s, 3-D expert parameters) of the checkpoint at `base`, as the loaded model
    names them (what PEFT names an adapter's modules and target_parameters after)."""
    from ..io.checkpoint import Checkpoint
    from ..key_layout import checkpoint_layout

    ck = Checkpoint(base)
    try:
        shapes = checkpoint_layout(ck).shapes  # model names only: a stored name differing from it would be a 2nd match
    finally:
        ck.close()
    return ([k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2],
            [k for k, s in shapes.items() if len(s) == 3])


def _write_arch(base: Path | None) -> GgufArch:
    """The base's GgufArch for writing, `tied` when it stores no lm_head (convert_hf_to_gguf writes no output)."""
    from dataclasses import replace

    from ..checks import tied_embedding_key
    from ..io.checkpoint import Checkpoint

    arch = GgufArch.from_config(_base_config(base, "writing"), base)
    ck = Checkpoint(base)
    try:
        return replace(arch, tied=tied_embedding_key(ck) is not None)
    finally:
        ck.close()


class GgufLoraFormat:
    name = "gguf"

    def detect(self, path: Path) -> bool:
        f = _gguf_file(Path(path))
        if f is None:
            return False
        with open(f, "rb") as fh:
            return fh.read(4) == b"GGUF"

    def read(self, path: Path, base: Path | None = None) -> PeftFiles:
        f = _gguf_file(Path(path))
        config = _base_config(base, "reading")
        arch = GgufArch.from_config(config, base)
        tensors, kv = read_gguf(f)
        if kv["arch"] != arch.arch:
            raise FormatError(f"GGUF LoRA is for architecture {kv['arch']!r}, the base is {arch.arch!r}", path=f)
        modules, params = base_names(Path(base))
        try:
            cfg, peft = gguf_to_peft(tensors, kv, arch, modules, str(base), params)
        except LoratoolsError as e:
            e.path = e.path or str(f)
            raise
        return PeftFiles(config=cfg, tensors=peft, source=self.name, path=f)

    def check(self, files: PeftFiles, base: Path | None = None) -> None:
        _gguf()
        arch = _write_arch(base)
        try:
            peft_to_gguf(files.config, {k: t.to("meta") for k, t in files.tensors.items()}, arch)
        except LoratoolsError as e:
            e.path = e.path or (str(files.path) if files.path else None)
            raise

    def write(self, files: PeftFiles, out_dir: Path, base: Path | None = None, *, provenance=None,
              durability=None) -> list[str]:
        arch = _write_arch(base)
        from ..io.durability import DURABLE

        tensors, kv, notes = peft_to_gguf(files.config, files.tensors, arch)
        files.notes.extend(notes)
        if provenance is not None:  # the record every loratools output carries (safetensors: metadata "loratools")
            kv = {**kv, **provenance.final_metadata()}
        path = Path(out_dir) / WEIGHTS_NAME
        write_gguf(path, arch.arch, tensors, kv)
        (durability or DURABLE).fsync_path(path)
        return [WEIGHTS_NAME]


def write_gguf(path: Path, arch: str, tensors: dict[str, torch.Tensor], kv: dict) -> None:
    """One GGUF LoRA file with the KV llama.cpp reads (and ours) and float32 tensors."""
    gguf = _gguf()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, kv["alpha"])
    for key in (METADATA_CONFIG, METADATA_DTYPE, "loratools"):
        if kv.get(key):
            w.add_string(key, kv[key])
    for name, t in tensors.items():
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


FORMAT = register(GgufLoraFormat())
