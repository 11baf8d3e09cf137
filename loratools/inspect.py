"""`loratools inspect`: what a checkpoint or adapter holds, from headers (and small adapter tensors).

JSON schema (stable; fields are only ever added):
  checkpoint: {"kind": "checkpoint", "path", "layout": "file"|"directory"|"sharded", "architecture",
               "model_type", "tensors", "parameters", "dtypes": {dtype: parameters},
               "shards": [{"file", "tensors", "bytes"}], "bytes_on_disk",
               "quantization": null | {"method", "quant_type", "blocksize", "double_quant",
                                       "compute_dtype", "quant_storage", "quantized_tensors",
                                       "quantized_parameters", "skip_modules"},
               "provenance": null | {...what loratools recorded when it wrote the file...}}
  adapter:    {"kind": "adapter", "format" (peft, mlx, kohya, gguf: the file format; kohya and gguf need the base; other formats are shown as the
               PEFT adapter they convert to, with "format_notes" on what reading them changed), "path", "peft_type", "task_type", "base_model", "target_modules",
               "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save",
               "trainable_parameters", "dtypes", "bytes_on_disk",
               "modules": [{"name", "kind", "r", "alpha", "scale", "base_shape", "dora", "bias",
                            "parameter", "experts", "expert_delta_norms"}],
               "saved_tensors": [{"name", "shape"}], "provenance", "target_parameters"}
  A target_parameters entry (PEFT's LoRA on an nn.Parameter) is listed under its parameter's path
  (`...mlp.experts.gate_up_proj`) with `parameter` set; kind "experts" for a 3-D expert tensor, with
  `experts` (E; 1 otherwise), `base_shape` [E, out, in] (models that store experts transposed, GPT-OSS,
  hold [E, in, out]) and `expert_delta_norms` (‖ΔW_e‖_F of each expert, null for other kinds). r, alpha
  and scale are per parameter: PEFT gives every expert of a parameter the same.
"""
from __future__ import annotations

import math
from pathlib import Path

from .adapter import WEIGHTS_NAME, is_adapter_dir, load_adapter
from .io.checkpoint import Checkpoint
from .lora_math import expert_delta_norms
from .io.provenance import read_provenance
from .io.safetensors_format import read_header
from .quantized import is_companion


def inspect_path(path: str | Path, base: str | Path | None = None) -> dict:
    """What `path` holds (an adapter in any format, or a checkpoint), as the JSON document described above.
    `base`: the base checkpoint, which kohya and GGUF LoRA adapters need to be read (their module names);
    without it they are refused in one line that names the format."""
    path = Path(path)
    if path.exists():
        from . import formats

        fmt = formats.detect(path)  # a kohya directory or GGUF file is an adapter, not a checkpoint
        if fmt is not None and fmt.name != "peft":  # MLX-LM, kohya, GGUF: described through PEFT's view
            return inspect_adapter(path, files=formats.read(path, base))
    if is_adapter_dir(path):
        return inspect_adapter(path)
    return inspect_checkpoint(path)


def inspect_checkpoint(path: str | Path) -> dict:
    """A checkpoint's layout, parameters, dtypes, shards, 4-bit quantization and provenance, from headers."""
    ck = Checkpoint(path)
    cfg = ck.config or {}
    qstates = ck.quant_states
    params = 0
    quant_params = 0
    for name, info in ck.tensors.items():
        if is_companion(name, qstates):
            continue
        if name in qstates:
            n = math.prod(qstates[name].get("shape", [0]))
            quant_params += n
            params += n
        else:
            params += info.numel
    shards = []
    for shard in ck.shards:
        names = [n for n, i in ck.tensors.items() if Path(i.file) == shard.absolute()]
        shards.append({"file": shard.name, "tensors": len(names), "bytes": shard.stat().st_size})
    quant = None
    if qstates or ck.quantization_config:
        qc = ck.quantization_config or {}
        first = next(iter(qstates.values()), {})
        quant = {
            "method": qc.get("quant_method", "bitsandbytes" if qstates else None),
            "quant_type": first.get("quant_type", qc.get("bnb_4bit_quant_type")),
            "blocksize": first.get("blocksize"),
            "double_quant": bool(first.get("nested_blocksize")) if first else qc.get("bnb_4bit_use_double_quant"),
            "compute_dtype": qc.get("bnb_4bit_compute_dtype"),
            "quant_storage": qc.get("bnb_4bit_quant_storage"),
            "quantized_tensors": len(qstates),
            "quantized_parameters": quant_params,
            "skip_modules": qc.get("llm_int8_skip_modules"),
        }
    archs = cfg.get("architectures") or []
    meta = next(iter(ck.metadata.values()), {})
    return {
        "kind": "checkpoint",
        "path": str(path),
        "layout": ck.layout,
        "architecture": archs[0] if archs else None,
        "model_type": cfg.get("model_type"),
        "tensors": len(ck.tensors),
        "parameters": params,
        "dtypes": ck.dtype_counts(),
        "shards": shards,
        "bytes_on_disk": ck.bytes_on_disk(),
        "quantization": quant,
        "provenance": read_provenance(meta),
    }


def inspect_adapter(path: str | Path, files=None) -> dict:
    """A PEFT adapter's config, modules (r, alpha, scale, base shape) and saved tensors (NaN/Inf shown, not refused).
    `files`: an adapter in another format, read into PEFT's form (formats.PeftFiles); `format` says which."""
    if files is not None:
        from . import formats

        ad = formats.parse(files)
        meta = _safetensors_metadata(files.path)  # kohya's and MLX-LM's files carry the provenance we wrote
    else:
        ad = load_adapter(path, check_finite=False, typed=True)
        _, meta = read_header(str(Path(path) / WEIGHTS_NAME))
    cfg = ad.config
    modules = [_typed_row(m) for m in ad.modules.values()] if ad.peft_type != "LORA" else [{
        "name": m.name,
        "kind": m.kind,
        "r": m.r,
        "alpha": m.alpha,
        "scale": m.scale,
        "base_shape": list(m.base_shape),
        "dora": m.magnitude is not None,
        "bias": m.bias is not None,
        "parameter": m.param,
        "experts": m.experts,
        "expert_delta_norms": _expert_norms(m) if m.kind == "experts" else None,
    } for m in ad.modules.values()]
    tm = cfg.get("target_modules")
    p = Path(path)
    return {
        "kind": "adapter",
        "format": files.source if files is not None else "peft",
        "format_notes": list(files.notes) if files is not None else [],
        "path": str(path),
        "peft_type": cfg.get("peft_type"),
        "task_type": cfg.get("task_type"),
        "base_model": cfg.get("base_model_name_or_path"),
        "target_modules": sorted(tm) if isinstance(tm, list) else tm,
        "use_rslora": ad.use_rslora,
        "use_dora": ad.use_dora,
        "lora_bias": bool(cfg.get("lora_bias")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "modules_to_save": cfg.get("modules_to_save"),
        "trainable_parameters": ad.trainable_parameters(),
        "dtypes": sorted(str(d).removeprefix("torch.") for d in ad.dtypes),
        "bytes_on_disk": p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir() if f.is_file()),
        "modules": modules,
        "saved_tensors": [{"name": k, "shape": list(t.shape)} for k, t in sorted(ad.saved.items())],
        "provenance": read_provenance(meta),
        "target_parameters": sorted(cfg["target_parameters"]) if cfg.get("target_parameters") else None,
    }


def _typed_row(m) -> dict:
    """A module row of an adapter of another PEFT type (peft_types): the LoRA row's keys, r/alpha/scale where
    the type has them (else None), its saved factors' shapes, and a base shape with None where only the base
    can say (VeRA's input, IA3's other side)."""
    d = m.describe()
    return {"name": m.name, "kind": m.kind, "r": d.get("r"), "alpha": d.get("alpha"), "scale": d.get("scale"),
            "base_shape": [None if x == -1 else x for x in m.base_shape], "dora": False, "bias": False,
            "parameter": None, "experts": 1, "expert_delta_norms": None, "peft_type": m.peft_type,
            "factors": {k: list(t.shape) for k, t in m.tensors().items()},
            "details": {k: v for k, v in d.items() if k not in ("r", "alpha", "scale")}}


def _safetensors_metadata(path: Path | None) -> dict:
    """The metadata of the adapter's one safetensors file (`path` or the one in that directory); {} otherwise."""
    if path is not None and path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        path = found[0] if len(found) == 1 else None
    return read_header(str(path))[1] if path is not None and path.suffix == ".safetensors" else {}


def _expert_norms(m) -> list[float | None]:
    """‖ΔW_e‖_F per expert, rounded to 6 significant digits; None where not finite (inspect shows NaN/Inf)."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None
            for v in expert_delta_norms(m.A, m.B, m.scale, m.experts).tolist()]


def group_modules(modules: list[dict]) -> list[dict]:
    """Collapse modules that share a leaf name (q_proj, ..., gate.weight for a parameter named weight) and
    identical r/alpha/scale/experts into one row."""
    groups: dict[tuple, dict] = {}
    for m in modules:
        leaf = ".".join(m["name"].split(".")[-2:]) if m.get("parameter") == "weight" else m["name"].rsplit(".", 1)[-1]
        experts = m.get("experts", 1)
        scale = None if m["scale"] is None else round(m["scale"], 9)  # None: a peft_types module without one
        key = (leaf, m["kind"], m["r"], m["alpha"], scale, m["dora"], m["bias"], experts)
        g = groups.setdefault(key, {"module": leaf, "kind": m["kind"], "r": m["r"], "alpha": m["alpha"],
                                    "scale": m["scale"], "count": 0, "dora": m["dora"], "bias": m["bias"],
                                    "base_shape": m["base_shape"], "experts": experts})
        g["count"] += 1
    return list(groups.values())
