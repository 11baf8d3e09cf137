"""MLX-LM's adapter format (mlx_lm/tuner/utils.py `load_adapters`, tuner/lora.py, tuner/dora.py).

Files: `adapters.safetensors` + `adapter_config.json` with `fine_tune_type` ("lora" | "dora"; "full" is a
fine-tune, not an adapter), `num_layers` (LoRA goes into the last N blocks, -1 = all) and `lora_parameters`
{`rank`, `scale`, `dropout`, `keys`}: `keys` are module paths inside one block ("self_attn.q_proj") or in the
whole model ("lm_head"). Tensors are the parameter paths of mlx_lm's LoRA layers:

    <module>.lora_a   (in, r)      = PEFT lora_A.T        (an embedding: (num_embeddings, r) = lora_embedding_A.T)
    <module>.lora_b   (r, out)     = PEFT lora_B.T        (an embedding: (r, dim) = lora_embedding_B.T)
    <module>.m        (out,)       = PEFT lora_magnitude_vector (DoRA, Linear only)
    <switch>.{gate,up,down}_proj.lora_a (E, r, in), .lora_b (E, out, r): MoE experts, not transposed (MOE_NAMES)

and mlx_lm computes y + scale · (x @ lora_a) @ lora_b, so `scale` is PEFT's scaling. `<module>` is the module
path in mlx_lm's model, which is transformers' for the Llama-style families (model.layers.N.self_attn.q_proj).

Note: one rank and one scale per adapter.
    MLX builds every LoRA layer with lora_parameters' rank and scale. A PEFT adapter whose modules differ in
    scale (rsLoRA, alpha_pattern, rank_pattern) is written with the most common scale S, and each other module's
    B multiplied by s_m / S in float32 and stored in float32: the product B·(s_m/S)·A·S equals B·A·s_m up to
    float32 rounding. Ranks below the largest, R, are padded with zero columns of lora_a and zero rows of
    lora_b, which adds exactly nothing. Modules whose scale is S keep their bits. Blocks that MLX gives LoRA
    layers but the file does not fill keep lora_b = 0 (DoRA: m = ‖W‖), i.e. no change, so `num_layers` is -1.
    Reading back, trailing rank components that are zero in both factors are dropped again (rank_pattern),
    which changes no product, so PEFT -> MLX -> PEFT gives every module's rank and delta back.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..adapter import PREFIX, Adapter, adapter_config, adapter_tensors
from ..checks import tied_embedding_key
from ..errors import FormatError, UnsupportedError
from ..io.checkpoint import load_json
from ..io.durability import DURABLE
from ..io.safetensors_format import read_header, read_tensor
from ..io.writer import save_tensors, write_json
from . import PeftFiles, parse, register

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
_LEAVES = ("lora_a", "lora_b", "m")
_BLOCK = "layers"  # mlx_lm's `model.layers`: the blocks num_layers and block-relative keys refer to


# -- pure conversion ---------------------------------------------------------------------------------------

# mlx_lm's names for transformers' MoE modules, per model_type (mlx_lm/models/<type>.py; only those checked against
# mlx_lm itself: its qwen3_moe does not load a transformers 5 config): the experts become a
# SwitchGLU `switch_mlp` with gate_proj/up_proj/down_proj SwitchLinears [E, out, in]; transformers' fused
# gate_up_proj [E, 2I, in] is [gate; up] along its output rows (w1; w3 for Mixtral).
MOE_NAMES = {
    "mixtral": {"mlp.experts": "block_sparse_moe.switch_mlp", "mlp.gate": "block_sparse_moe.gate"},
}


def unsupported(ad: Adapter, model_type: str | None = None) -> tuple[str, str | None] | None:
    """(what MLX-LM cannot hold, the tensor or module concerned) for `ad`, or None when it converts.
    `model_type`: the base's (from --base), which decides MoE expert names."""
    cfg = ad.config
    if cfg.get("target_parameters") and model_type not in MOE_NAMES:
        return (f"target_parameters (MoE expert) adapters convert to MLX only for "
                f"{', '.join(sorted(MOE_NAMES))} bases given with --base (mlx_lm renames and splits the experts); "
                f"base model_type: {model_type or 'not given'}", None)
    if ad.saved:
        name = sorted(ad.saved)[0]
        return (f"MLX-LM adapters hold only lora_a/lora_b/m, not whole tensors (modules_to_save or a saved "
                f"embedding layer; {len(ad.saved)} here; with --base those equal to the base's own are left out)", name)
    if cfg.get("fan_in_fan_out"):
        return ("fan_in_fan_out (Conv1D, GPT-2) adapters are not converted to MLX: mlx_lm's GPT-2 has other module "
                "names and nn.Linear layouts", None)
    for name, m in ad.modules.items():
        if m.bias is not None:
            return "MLX-LM's LoRA layers have no lora_B bias (lora_bias=True)", name
        if m.kind == "embedding" and m.magnitude is not None:
            return "DoRA on an embedding is not converted to MLX (its magnitude runs over another axis)", name
        if m.kind == "experts" and (m.experts_transposed or m.param not in ("gate_up_proj", "down_proj")):
            return f"expert parameter {m.param!r} has no mlx_lm SwitchLinear counterpart", name
        if m.param and m.kind != "experts" and m.param != "weight":
            return f"target parameter {m.param!r} has no mlx_lm counterpart", name
    if len({m.magnitude is not None for m in ad.modules.values()}) > 1:
        return "MLX-LM makes every module DoRA or none; this adapter mixes them", None
    return None


def block_key(module: str) -> str:
    """The lora_parameters.keys entry for a module path: relative to its block for modules inside
    `...layers.N.`, the full path otherwise (mlx_lm matches both)."""
    parts = module.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == _BLOCK and parts[i + 1].isdigit():
            return ".".join(parts[i + 2:])
    return module


def mlx_module(module: str, moe_names: dict[str, str] | None) -> str:
    """mlx_lm's path for a transformers module path (MoE parts renamed per MOE_NAMES, others kept)."""
    for hf, mlx in (moe_names or {}).items():
        if module.endswith("." + hf):
            return module[: -len(hf)] + mlx
    return module


def _mlx_factors(m, moe_names) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(mlx module path, A, B) for one PEFT module: A (r, in), B (out, r) for a Linear/embedding/router,
    A (E, r, in), B (E, out, r) per SwitchLinear for experts (gate_up_proj split into gate_proj and up_proj,
    which share A)."""
    if m.kind != "experts":
        module = m.name[: -len(".weight")] if m.param == "weight" else m.name
        return [(mlx_module(module, moe_names), m.A, m.B)]
    A_e, B_e = m.expert_factors(dtype=m.A.dtype)
    switch = mlx_module(m.name.rsplit(".", 1)[0], moe_names)
    if m.param == "down_proj":
        return [(f"{switch}.down_proj", A_e, B_e)]
    half = B_e.shape[1] // 2
    return [(f"{switch}.gate_proj", A_e, B_e[:, :half]), (f"{switch}.up_proj", A_e, B_e[:, half:])]


def to_mlx(ad: Adapter, moe_names: dict[str, str] | None = None) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """(adapter_config.json, adapters.safetensors tensors, notes) for a PEFT adapter `ad` (check `unsupported`
    first); `moe_names`: MOE_NAMES of the base's model_type. See the module note for how ranks and scales are
    made one."""
    mods = ad.modules
    if not mods:
        raise UnsupportedError("the adapter has no LoRA modules to convert", path=ad.path)
    rank = max(m.r for m in mods.values())
    scales = Counter(m.scale for m in mods.values())
    scale = max(scales, key=lambda s: (scales[s], s))
    dora = any(m.magnitude is not None for m in mods.values())
    tensors, folded, padded, keys = {}, [], [], set()
    for name, m in mods.items():
        folded += [name] if m.scale != scale else []
        padded += [name] if m.r < rank else []
        for module, A, B in _mlx_factors(m, moe_names):
            if m.scale != scale:
                B = fold_scale(B, m.scale / scale)
            if m.r < rank:  # r is the second-to-last axis of A, the last of B
                A = torch.cat([A, A.new_zeros(*A.shape[:-2], rank - m.r, A.shape[-1])], dim=-2)
                B = torch.cat([B, B.new_zeros(*B.shape[:-1], rank - m.r)], dim=-1)
            # LoRALinear/LoRAEmbedding hold PEFT's factors transposed; LoRASwitchLinear holds them as they are
            tensors[f"{module}.lora_a"] = (A if A.dim() == 3 else A.T).contiguous()
            tensors[f"{module}.lora_b"] = (B if B.dim() == 3 else B.T).contiguous()
            if m.magnitude is not None:
                tensors[f"{module}.m"] = m.magnitude.contiguous()
            keys.add(block_key(module))
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(ad.config.get("lora_dropout") or 0.0),
                            "keys": sorted(keys)},
    }
    if ad.base_model:
        config["model"] = ad.base_model
    notes = []
    if folded:
        notes.append(f"scale: MLX has one scale ({scale:g}); {len(folded)} modules had another (rsLoRA/alpha_pattern/"
                     f"rank_pattern), folded into their lora_b in float32 (exact up to float32 rounding)")
    if padded:
        notes.append(f"rank: MLX has one rank ({rank}); {len(padded)} modules zero-padded (exact)")
    return config, tensors, notes


def fold_scale(B: torch.Tensor, ratio: float) -> torch.Tensor:
    """B · ratio in float32 (stored float32: no second rounding into B's dtype)."""
    return B.to(torch.float32) * ratio


def _trailing_zero_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """The rank left once trailing components that are zero in both lora_a (in, r) and lora_b (r, out) go."""
    r = a.shape[1]
    while r > 1 and not a[:, r - 1].any() and not b[r - 1].any():
        r -= 1
    return r


def is_embedding(module: str, a: torch.Tensor, b: torch.Tensor, base_shape: tuple | None = None) -> bool:
    """Whether the MLX LoRA of `module` (lora_a, lora_b) is an embedding's (LoRAEmbedding): by the base
    tensor's shape when known and not square ([num_embeddings, dim] = (a rows, b cols), a Linear's is
    (b cols, a rows)), else by its name (an MLX file does not say which LoRA is an embedding's)."""
    from ..tensor_roles import EMBEDDING_LEAVES

    if base_shape is not None and len(base_shape) == 2 and base_shape[0] != base_shape[1]:
        return tuple(base_shape) == (a.shape[0], b.shape[1])
    return module.rsplit(".", 1)[-1] in EMBEDDING_LEAVES


def _fuse_gate_up(gate, up):
    """PEFT's gate_up_proj factors (A_e [E, r', in], B_e [E, 2I, r']) from mlx_lm's gate_proj and up_proj
    LoRAs ((A, B) each, or None): one shared A when both have the same A (what we write), else A stacked and
    B block-diagonal (rank 2r). Exact either way: the fused delta is [B_g A_g; B_u A_u]."""
    if gate is None or up is None:
        a, b = gate or up
        gate, up = (gate or (a, torch.zeros_like(b))), (up or (a, torch.zeros_like(b)))
    (ag, bg), (au, bu) = gate, up
    if torch.equal(ag, au):
        return ag, torch.cat([bg, bu], dim=1)
    E, n_out, r = bg.shape
    B = bg.new_zeros(E, n_out + bu.shape[1], 2 * r)
    B[:, :n_out, :r], B[:, n_out:, r:] = bg, bu
    return torch.cat([ag, au], dim=1), B


def _experts_from_mlx(switch_groups: dict, scale: float) -> dict:
    """PEFT target_parameters LoraModules (packed, nested as PEFT saves them) for mlx_lm SwitchGLU LoRAs:
    switch_groups = {transformers experts module: {"gate_proj"|"up_proj"|"down_proj": (lora_a, lora_b)}}."""
    from ..adapter import LoraModule, nest_param_targets
    from ..lora_math import pack_expert_factors

    mods = {}
    for hf, projs in switch_groups.items():
        factors = {}
        if "gate_proj" in projs or "up_proj" in projs:
            factors["gate_up_proj"] = _fuse_gate_up(projs.get("gate_proj"), projs.get("up_proj"))
        if "down_proj" in projs:
            factors["down_proj"] = projs["down_proj"]
        for param, (A_e, B_e) in factors.items():
            r = A_e.shape[1]
            while r > 1 and not A_e[:, r - 1].any() and not B_e[:, :, r - 1].any():  # zero padding, as _trailing_zero_rank
                r -= 1
            if (scale * r) / r != scale:
                r = A_e.shape[1]
            A, B = pack_expert_factors(A_e[:, :r], B_e[:, :, :r])
            name = f"{hf}.{param}"
            mods[name] = LoraModule(name=name, kind="experts", A=A, B=B, r=r, alpha=scale * r, scale=scale,
                                    param=param, experts=A_e.shape[0])
    nest_param_targets(mods)
    return mods


def _module_from_mlx(module: str, p: dict[str, torch.Tensor], rank: int, scale: float, kind: str,
                     embedding: bool, w_path: Path | None) -> tuple[int, dict[str, torch.Tensor]]:
    """(rank kept, PEFT tensors) for one Linear/embedding MLX LoRA `p` {lora_a (in, R), lora_b (R, out), m?}:
    shapes checked, trailing zero-padded rank components dropped where alpha = scale · r stays exact."""
    a, b, m = p["lora_a"], p["lora_b"], p.get("m")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != rank or b.shape[0] != rank:
        raise FormatError(f"expected lora_a (in, {rank}) and lora_b ({rank}, out) for rank {rank}, found lora_a "
                          f"{list(a.shape)}, lora_b {list(b.shape)} (wrong orientation or rank)", path=w_path,
                          tensor=f"{module}.lora_a")
    if m is not None and tuple(m.shape) != (b.shape[1],):
        raise FormatError(f"m has shape {list(m.shape)}, expected [{b.shape[1]}]", path=w_path, tensor=f"{module}.m")
    if (m is not None) != (kind == "dora"):
        raise FormatError(f"fine_tune_type is {kind!r} but the module {'has' if m is not None else 'lacks'} "
                          f"a DoRA magnitude m", path=w_path, tensor=f"{module}.m")
    if embedding and m is not None:
        raise UnsupportedError("DoRA on an embedding is not converted from MLX", path=w_path, tensor=f"{module}.m")
    r = _trailing_zero_rank(a, b)
    if r != rank and (scale * r) / r != scale:  # PEFT recomputes alpha / r: keep the rank where that is inexact
        r = rank
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    out = {f"{PREFIX}{module}.{a_key}": a[:, :r].T.contiguous(), f"{PREFIX}{module}.{b_key}": b[:r].T.contiguous()}
    if m is not None:
        out[f"{PREFIX}{module}.lora_magnitude_vector"] = m.contiguous()
    return r, out


def from_mlx(config: dict, tensors: dict[str, torch.Tensor], where: Path | None = None,
             embeddings: set[str] = frozenset(), moe_names: dict[str, str] | None = None
             ) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """(adapter_config.json, adapter_model.safetensors tensors, notes) in PEFT's format for an MLX-LM adapter;
    the modules in `embeddings` are embeddings (see is_embedding); `moe_names`: MOE_NAMES of the base's
    model_type, for SwitchLinear (MoE) LoRAs. FormatError (naming file and tensor) for a config or tensor that
    is not MLX-LM's LoRA/DoRA format."""
    cfg_path = where / CONFIG_NAME if where else None
    w_path = where / WEIGHTS_NAME if where else None
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise UnsupportedError("fine_tune_type \"full\" is a full fine-tune, not an adapter", path=cfg_path)
    if kind not in ("lora", "dora"):
        raise FormatError(f"fine_tune_type must be lora or dora, found {kind!r}", path=cfg_path)
    lp = config.get("lora_parameters")
    if not isinstance(lp, dict):
        raise FormatError("lora_parameters must be an object with rank and scale", path=cfg_path)
    rank, scale = lp.get("rank"), lp.get("scale")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise FormatError(f"lora_parameters.rank must be a positive integer, found {rank!r}", path=cfg_path)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        # PEFT's lora_alpha (= scale · r) must be positive (adapter.read_adapter_config)
        raise FormatError(f"lora_parameters.scale must be a positive number, found {scale!r}", path=cfg_path)
    scale = float(scale)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in _LEAVES or not module:
            raise FormatError("not an MLX-LM adapter tensor (expected <module>.lora_a, .lora_b or .m)", path=w_path,
                              tensor=key)
        parts.setdefault(module, {})[leaf] = t
    out, ranks, notes, trimmed = {}, {}, [], 0
    inverse = {v: k for k, v in (moe_names or {}).items()}
    switch_groups: dict[str, dict] = {}
    params = []  # target_parameters entries (routers, experts)
    for module, p in sorted(parts.items()):
        a, b, m = p.get("lora_a"), p.get("lora_b"), p.get("m")
        if a is None or b is None:
            raise FormatError(f"has {'lora_b' if a is None else 'lora_a'} without "
                              f"{'lora_a' if a is None else 'lora_b'}", path=w_path, tensor=f"{module}.lora_a")
        if a.dim() == 3 or b.dim() == 3:
            switch, _, proj = module.rpartition(".")
            hf = mlx_module(switch, inverse)
            if not moe_names or hf == switch or proj not in ("gate_proj", "up_proj", "down_proj"):
                raise UnsupportedError(f"MoE (SwitchLinear) MLX adapters convert to PEFT only with --base of a "
                                       f"{', '.join(sorted(MOE_NAMES))} model", path=w_path, tensor=f"{module}.lora_a")
            if a.dim() != 3 or b.dim() != 3 or a.shape[1] != rank or b.shape[2] != rank or a.shape[0] != b.shape[0]:
                raise FormatError(f"expected lora_a (E, {rank}, in) and lora_b (E, out, {rank}), found lora_a "
                                  f"{list(a.shape)}, lora_b {list(b.shape)} (wrong orientation or rank)", path=w_path,
                                  tensor=f"{module}.lora_a")
            if m is not None:
                raise UnsupportedError("DoRA on MoE experts is not converted", path=w_path, tensor=f"{module}.m")
            switch_groups.setdefault(hf, {})[proj] = (a, b)
            continue
        hf = mlx_module(module, inverse)
        if hf != module:  # a MoE router: transformers keeps it as a parameter (target_parameters "<module>.weight")
            params.append(f"{hf}.weight")
            module = hf
        ranks[module], tensors_m = _module_from_mlx(module, p, rank, scale, kind, module in embeddings, w_path)
        trimmed += ranks[module] < rank
        out.update(tensors_m)
    if not parts:
        raise FormatError("the adapter holds no lora_a/lora_b tensors", path=w_path)
    experts = _experts_from_mlx(switch_groups, scale)
    out.update(adapter_tensors(experts))
    ranks.update({n: e.r for n, e in experts.items()})
    params += list(experts)
    router_modules = {p[: -len(".weight")] for p in params}
    r0 = max(Counter(ranks.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    pattern = {(k + ".weight" if k in router_modules else k): v for k, v in ranks.items() if v != r0}
    extra = {"target_parameters": sorted(params)} if params else {}
    peft_cfg = adapter_config(r=r0, lora_alpha=scale * r0,
                              target_modules=sorted(k for k in ranks if k not in router_modules and k not in experts),
                              base_model_name_or_path=config.get("model"),
                              rank_pattern=pattern, alpha_pattern={k: scale * v for k, v in pattern.items()},
                              use_dora=kind == "dora", **extra)
    peft_cfg["lora_dropout"] = float(lp.get("dropout") or 0.0)
    if trimmed:
        notes.append(f"rank: {trimmed} modules had zero-padded rank components, dropped (rank_pattern; exact)")
    return peft_cfg, out, notes


def without_base_copies(files: PeftFiles, base: Path | None) -> PeftFiles:
    """`files` without the tensors saved whole that equal the base's own bit for bit (PEFT saves a targeted
    embedding whole, save_embedding_layers, even when unchanged): they carry nothing, so MLX need not hold
    them. Without a base nothing is dropped. A tied-embedding base with an embedding LoRA is refused: mlx_lm
    applies that LoRA to the output head too (LoRAEmbedding.as_linear), PEFT does not."""
    if base is None:
        return files
    from ..adapter import KeyKind, classify_key
    from ..io import Checkpoint

    ck = Checkpoint(base)
    tensors, dropped = {}, 0
    for key, t in files.tensors.items():
        kind, name, _ = classify_key(key)
        if kind is KeyKind.SAVED and name in ck.tensors and torch.equal(ck.read(name), t):
            dropped += 1
            continue
        tensors[key] = t
    # the rule GGUF uses: the base stores no lm_head (tied, also when config.json leaves the default)
    if any(k.endswith(".lora_embedding_A") for k in tensors) and tied_embedding_key(ck) is not None:
        raise UnsupportedError("cannot convert to MLX-LM: the base ties its word embeddings, and mlx_lm applies an "
                               "embedding's LoRA to the output head as well, PEFT does not", path=files.path)
    notes = list(files.notes)
    if dropped:
        notes.append(f"{dropped} tensors saved whole equal the base's own bit for bit: left out (exact)")
    return PeftFiles(config=files.config, tensors=tensors, source=files.source, path=files.path, notes=notes)


def _model_type(base: Path | None) -> str | None:
    if base is None:
        return None
    from ..io import Checkpoint

    return (Checkpoint(base).config or {}).get("model_type")


# -- files -------------------------------------------------------------------------------------------------

class MlxFormat:
    name = "mlx"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not (path.is_dir() and (path / CONFIG_NAME).is_file()):
            return False
        if (path / WEIGHTS_NAME).is_file():
            return True
        try:
            cfg = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(cfg, dict) and "lora_parameters" in cfg and "peft_type" not in cfg

    def read(self, path: Path, base: Path | None = None) -> PeftFiles:
        path = Path(path)
        config = load_json(path / CONFIG_NAME, CONFIG_NAME)
        wpath = path / WEIGHTS_NAME
        if not wpath.is_file():
            raise FormatError(f"MLX-LM adapter has no {WEIGHTS_NAME}", path=path)
        infos, _ = read_header(str(wpath))
        with open(wpath, "rb", buffering=0) as fh:
            tensors = {key: read_tensor(info, fh) for key, info in infos.items()}
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FormatError("adapter tensor holds NaN/Inf values", path=wpath, tensor=key)
        shapes = {}
        if base is not None:
            from ..io import Checkpoint

            ck = Checkpoint(base)
            shapes = {k: tuple(i.shape) for k, i in ck.tensors.items()}
        embeddings = set()
        for key, a in tensors.items():
            if key.endswith(".lora_a") and a.dim() == 2:
                module = key[: -len(".lora_a")]
                b = tensors.get(f"{module}.lora_b")
                if b is not None and b.dim() == 2 and is_embedding(module, a, b, shapes.get(f"{module}.weight")):
                    embeddings.add(module)
        cfg, out, notes = from_mlx(config, tensors, path, embeddings, MOE_NAMES.get(_model_type(base)))
        if embeddings and base is None:
            notes.append(f"embedding LoRA told by name ({', '.join(sorted(embeddings))}); give --base to tell by shape")
        files = PeftFiles(config=cfg, tensors=out, source=self.name, path=path, notes=notes)
        parse(files)  # the result must be a PEFT adapter loratools reads
        return files

    def check(self, files: PeftFiles, base: Path | None = None) -> None:
        files = without_base_copies(files, base)
        problem = unsupported(parse(files), _model_type(base))
        if problem is not None:
            message, tensor = problem
            raise UnsupportedError(f"cannot convert to MLX-LM: {message}", path=files.path, tensor=tensor)

    def write(self, files: PeftFiles, out_dir: Path, base: Path | None = None, *, provenance=None,
              durability=None) -> list[str]:
        self.check(files, base)
        kept = without_base_copies(files, base)
        ad = parse(kept)
        config, tensors, notes = to_mlx(ad, MOE_NAMES.get(_model_type(base)))
        if base is None and any(m.kind == "embedding" for m in ad.modules.values()):
            notes.append("embedding LoRA: with tied word embeddings mlx_lm applies it to the output head as well, "
                         "PEFT does not (give --base to have that checked)")
        files.notes.extend(kept.notes[len(files.notes):] + notes)
        durability = durability or DURABLE
        write_json(Path(out_dir) / CONFIG_NAME, config, durability)
        written = save_tensors(out_dir, tensors, filename=WEIGHTS_NAME, allow_shards=False, provenance=provenance,
                               durability=durability)
        return [CONFIG_NAME] + written


FORMAT = register(MlxFormat())
