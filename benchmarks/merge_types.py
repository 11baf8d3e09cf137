#!/usr/bin/env python
"""Merge a LoHa and a LoKr adapter (all seven projections) into a Llama-style fp16 checkpoint:
`loratools merge` vs PEFT's `PeftModel.from_pretrained(...).merge_and_unload()` + `save_pretrained`.

    flock /tmp/loratools-bench.lock python benchmarks/merge_types.py [--size 0.75b] [--repeat 3]
    python benchmarks/merge_types.py --size tiny --repeat 1      # smoke test, seconds

PEFT runs twice per adapter: as users run it (the base loaded in float16: PEFT then merges in float16)
and as the reference (the base loaded in float32, merged, cast to float16: one rounding, what loratools
computes). Each contender runs in its own process (wall time and peak RSS from wait4), `--repeat` times,
interleaved. The ratios are against PEFT in float16 (the faster, smaller PEFT); the outputs must equal the
float32 reference bit for bit (FAIL otherwise), and their distance from PEFT's float16 merge is reported.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from common import (PROJ, SIZES, Contender, Failures, add_common_args, dir_bytes, generate_llama, llama_shapes,
                    prepare_in_child, python_rss_baseline, report, run_interleaved)
from merge import compare_outputs

PEFT_CODE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, dtype = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)), adapter)
model.merge_and_unload().to(torch.float16).save_pretrained(out, max_shard_size="500MB")
"""


def generate_typed(out: Path, kind: str, size: str, base_name: str, r: int = 8, alpha: int = 16, seed: int = 1) -> Path:
    """A PEFT LoHa or LoKr adapter (PEFT's config, its factor shapes) on every projection, all tensors non-zero."""
    import torch
    from peft import LoHaConfig, LoKrConfig
    from peft.tuners.lokr.layer import factorization
    from safetensors.torch import save_file

    marker = out / ".generated"
    tag = json.dumps({"kind": kind, "size": size, "r": r, "alpha": alpha, "seed": seed})
    if marker.exists() and marker.read_text() == tag:
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(shape, generator=g) * std

    tensors = {}
    for name, s in llama_shapes(**SIZES[size]).items():
        mod = name.removesuffix(".weight")
        if len(s) != 2 or mod.rsplit(".", 1)[-1] not in PROJ:
            continue
        n_out, n_in = s
        p = f"base_model.model.{mod}"
        if kind == "loha":
            tensors |= {f"{p}.hada_w1_a": rnd(n_out, r, std=0.1), f"{p}.hada_w1_b": rnd(r, n_in, std=0.1),
                        f"{p}.hada_w2_a": rnd(n_out, r, std=0.1), f"{p}.hada_w2_b": rnd(r, n_in, std=0.1)}
        else:  # PEFT's LoKr layout for these defaults: w1 whole [a, c], w2 as w2_a [b, r] @ w2_b [r, d]
            (a, b), (c, d) = factorization(n_out), factorization(n_in)  # (or whole when r >= max(b, d) / 2)
            tensors[f"{p}.lokr_w1"] = rnd(a, c, std=0.1)
            if r < max(b, d) / 2:
                tensors |= {f"{p}.lokr_w2_a": rnd(b, r, std=0.1), f"{p}.lokr_w2_b": rnd(r, d, std=0.3 / math.sqrt(d))}
            else:
                tensors[f"{p}.lokr_w2"] = rnd(b, d, std=0.1 / math.sqrt(d))
    cfg = (LoHaConfig if kind == "loha" else LoKrConfig)(r=r, alpha=alpha, target_modules=PROJ,
                                                         base_model_name_or_path=base_name)
    cfg.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors")
    marker.write_text(tag)
    return out


def paths(work: Path, size: str) -> dict[str, Path]:
    return {"base": work / f"base-{size}", "loha": work / f"loha8-{size}", "lokr": work / f"lokr8-{size}"}


def ours_cmd(base, adapter, out) -> list[str]:
    return [sys.executable, "-m", "loratools", "merge", str(base), str(adapter), "-o", str(out),
            "--max-shard-size", "500MB", "--force"]


def peft_cmd(base, adapter, out, dtype: str) -> list[str]:
    return [sys.executable, "-c", PEFT_CODE, str(base), str(adapter), str(out), dtype]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    args = ap.parse_args()
    work = Path(args.work)
    p = paths(work, args.size)
    if args.prepare_only:
        generate_llama(p["base"], args.size)
        for kind in ("loha", "lokr"):
            generate_typed(p[kind], kind, args.size, str(p["base"]))
        return
    prepare_in_child()  # Note: a quiet parent (common.py)
    baseline = python_rss_baseline()
    checks, docs, measured = Failures(), {}, {}
    outs = {kind: {k: work / f"merge-{kind}-{k}" for k in ("ours", "peft16", "peft32")} for kind in ("loha", "lokr")}
    for kind, out in outs.items():  # every run first: the parent imports torch only afterwards (common.py)
        measured[kind] = run_interleaved([
            Contender(f"loratools merge ({kind})", ours_cmd(p["base"], p[kind], out["ours"]), (p["base"], p[kind]),
                      out["ours"]),
            Contender(f"PEFT fp16 merge+save ({kind})", peft_cmd(p["base"], p[kind], out["peft16"], "float16"),
                      (p["base"], p[kind]), out["peft16"]),
            Contender(f"PEFT fp32 merge+save ({kind})", peft_cmd(p["base"], p[kind], out["peft32"], "float32"),
                      (p["base"], p[kind]), out["peft32"]),
        ], args.repeat)
    for kind, out in outs.items():
        ours, peft16, peft32 = measured[kind].values()
        exact, usual = compare_outputs(out["ours"], out["peft32"]), compare_outputs(out["ours"], out["peft16"])
        doc = report(f"merge {kind.upper()} r=8 (7 projections) into {args.size} fp16 vs PEFT fp16", ours, peft16,
                     size_bytes=dir_bytes(p["base"]),
                     extra={"baseline_rss_mb": baseline, "peft_fp32": peft32.summary(),
                            "speedup_vs_fp32_median": peft32.median() / ours.median(),
                            "rss_ratio_vs_fp32_median": ours.median("peak_rss_mb") / peft32.median("peak_rss_mb"),
                            "agreement_fp32_reference": exact, "agreement_peft_fp16": usual})
        print(f"{peft32.name}: {peft32.median():.2f} s, {peft32.median('peak_rss_mb'):.0f} MB median peak RSS; "
              f"speed-up {doc['speedup_vs_fp32_median']:.2f}x, RSS ratio {doc['rss_ratio_vs_fp32_median']:.3f}")
        print(f"vs PEFT fp16: {usual['tensors_bit_identical']} tensors bit-identical, {usual['tensors_differing']} "
              f"differ (max |diff| {usual['max_abs_diff']:.3g})")
        checks.check(exact["tensors_differing"] == 0 and exact["tensors_bit_identical"] > 0
                     and not exact["only_in_ours"] and not exact["only_in_theirs"],
                     f"{kind}: {exact['tensors_bit_identical']} tensors bit-identical to PEFT's float32 merge rounded "
                     f"once, {exact['tensors_differing']} differ (max |diff| {exact['max_abs_diff']:.3g})")
        docs[kind] = doc
    print(json.dumps(docs))
    checks.exit()


if __name__ == "__main__":
    main()
