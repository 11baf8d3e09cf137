#!/usr/bin/env python
"""The peers' extraction method, for benchmarks/extract.py: a full SVD of every module's dense delta.

    python benchmarks/extract_fullsvd.py BASE TUNED -o OUT --rank 16 [--device cpu|cuda] [--report FILE]

What mergekit-extract-lora and kohya's extract_lora_from_models.py do per module: load the base and
fine-tuned tensors (here lazily, one pair at a time, through safetensors' safe_open as mergekit's lazy
loader does), ΔW = tuned − base in float32, `torch.linalg.svd(ΔW, full_matrices=False)`, keep the top
`rank` triplets (B = U_k·diag(S_k), A = V_kᵀ, alpha = rank) and save PEFT-format keys. They report no
error; this script also writes the optimal relative error √(Σ_{i>k} σᵢ²)/‖ΔW‖ that the full spectrum
gives for free, which is the yardstick for loratools' randomized path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shard_map(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in wm.items()}
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        return {k: f for k in h.keys()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report")
    args = ap.parse_args()
    base, tuned = shard_map(Path(args.base)), shard_map(Path(args.tuned))
    names = [k for k in base if k.endswith(".weight") and k.rsplit(".", 2)[-2] in PROJ]
    out = {}
    rows = []
    for name in names:
        with safe_open(str(base[name]), "pt") as hb, safe_open(str(tuned[name]), "pt") as ht:
            delta = ht.get_tensor(name).to(args.device).float() - hb.get_tensor(name).to(args.device).float()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(args.rank, S.numel())
        module = name.removesuffix(".weight")
        out[f"base_model.model.{module}.lora_B.weight"] = (U[:, :k] * S[:k]).contiguous().cpu()
        out[f"base_model.model.{module}.lora_A.weight"] = Vh[:k].contiguous().cpu()
        s2 = S.double() ** 2
        rows.append({"name": module, "rank": k, "rel_error": math.sqrt(float(s2[k:].sum() / s2.sum()))})
        del delta, U, S, Vh
    os.makedirs(args.output, exist_ok=True)
    save_file(out, os.path.join(args.output, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": args.base, "r": args.rank,
           "lora_alpha": args.rank, "target_modules": sorted({r["name"] for r in rows}), "lora_dropout": 0.0}
    Path(args.output, "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps({"modules": rows}))
    print(f"full-SVD extraction: {len(rows)} modules", file=sys.stderr)


if __name__ == "__main__":
    main()
