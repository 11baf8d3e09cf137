#!/usr/bin/env python
"""Combining two adapters into one of rank 16: `loratools combine --method linear` vs PEFT's
`add_weighted_adapter(..., combination_type="svd")`.

    flock /tmp/loratools-bench.lock python benchmarks/combine.py [--size 0.75b] [--rank 16] [--peft-layers N]

Two rank-16 adapters (different seeds) on all seven projections of a generated Llama-style model, weights 1
and 1, combined to rank 16. Each contender runs in its own process:
  ours    `python -m loratools combine A1 A2 -o OUT --method linear --rank 16` (whole process, the CLI a
          user runs), and once more as a Python child timing the `combine_adapters()` call alone (read
          both adapters, combine, write) after its imports;
  PEFT    base loaded in fp16 (the LoRA layers stay fp32), both adapters loaded, then the timed part:
          add_weighted_adapter(svd, svd_rank=16) + save_pretrained of the new adapter.
Two ratios: whole processes (PEFT's includes loading the base, which it needs), and the operation alone
(our combine_adapters() call vs PEFT's add_weighted_adapter + save).
Then, in this process, each result's error against the exact sum Σ sᵢ·Bᵢ·Aᵢ, module by module (float64).

`--peft-layers N` runs PEFT on the first N layers' modules only and scales its timed part by
(all modules / those modules); the report says so. Without it, PEFT does the whole model.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from common import SIZES, dir_bytes, generate_llama, generate_lora, measure, python_rss_baseline, report

OURS_CHILD = r"""
import sys, time
t0 = time.perf_counter()
from loratools.combine import combine_adapters
t1 = time.perf_counter()
combine_adapters(sys.argv[1:3], sys.argv[3], method="linear", rank=int(sys.argv[4]), device="cpu")
print("OURS_IMPORT_SECONDS", t1 - t0, flush=True)
print("OURS_TIMED_SECONDS", time.perf_counter() - t1, flush=True)
"""

PEFT_CHILD = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, a1, a2, out, rank = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, a1, adapter_name="a")
model.load_adapter(a2, adapter_name="b")
t0 = time.perf_counter()
model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type="svd", svd_rank=int(rank))
model.save_pretrained(out, selected_adapters=["c"])
print("PEFT_TIMED_SECONDS", time.perf_counter() - t0, flush=True)
"""


def subset_adapter(src: Path, dst: Path, layers: int) -> Path:
    """The modules of the first `layers` layers, targeted by full name (so PEFT injects nothing else)."""
    from loratools.adapter import adapter_tensors, load_adapter, write_adapter

    ad = load_adapter(src)
    keep = {n: m for n, m in ad.modules.items() if int(n.split(".")[2]) < layers}
    cfg = dict(ad.config, target_modules=sorted(keep))
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    write_adapter(dst, cfg, adapter_tensors(keep))
    return dst


def errors_against_exact(sources: list[Path], result: Path, modules: set[str] | None = None) -> dict:
    """‖Σ sᵢBᵢAᵢ − result‖_F / ‖Σ sᵢBᵢAᵢ‖_F over the given modules (default: all of the result's), float64."""
    from loratools.adapter import load_adapter

    srcs = [load_adapter(p) for p in sources]
    out = load_adapter(result)
    num = den = 0.0
    worst = 0.0
    chosen = {n: m for n, m in out.modules.items() if modules is None or n in modules}
    for name, m in chosen.items():
        exact = sum(s.modules[name].delta(dtype=torch.float64) for s in srcs)
        e2 = float(torch.linalg.matrix_norm(exact - m.delta(dtype=torch.float64)) ** 2)
        n2 = float(torch.linalg.matrix_norm(exact) ** 2)
        num, den, worst = num + e2, den + n2, max(worst, math.sqrt(e2 / n2))
    return {"modules": len(chosen), "rel_error_total": math.sqrt(num / den), "rel_error_max_module": worst}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.75b", choices=sorted(SIZES))
    ap.add_argument("--rank", type=int, default=16, help="rank of each input adapter and of the output")
    ap.add_argument("--peft-layers", type=int, default=None,
                    help="time PEFT on the first N layers only and extrapolate (default: the whole model)")
    ap.add_argument("--work", default="/tmp/loratools-bench")
    args = ap.parse_args()
    work = Path(args.work)
    base = generate_llama(work / f"base-{args.size}", args.size)
    a1 = generate_lora(work / f"combine-{args.size}-a1", args.size, r=args.rank, alpha=2 * args.rank, seed=1,
                       base_name=str(base))
    a2 = generate_lora(work / f"combine-{args.size}-a2", args.size, r=args.rank, alpha=2 * args.rank, seed=2,
                       base_name=str(base))
    n_layers = SIZES[args.size]["layers"]
    p1, p2 = a1, a2
    if args.peft_layers is not None and args.peft_layers < n_layers:
        p1 = subset_adapter(a1, work / f"combine-{args.size}-a1-sub", args.peft_layers)
        p2 = subset_adapter(a2, work / f"combine-{args.size}-a2-sub", args.peft_layers)
    out_ours, out_peft = work / "combine-out-ours", work / "combine-out-peft"
    for d in (out_ours, out_peft):
        shutil.rmtree(d, ignore_errors=True)

    baseline = python_rss_baseline()
    ours = measure("loratools combine linear", [sys.executable, "-m", "loratools", "combine", str(a1), str(a2),
                                                "-o", str(out_ours), "--method", "linear", "--rank",
                                                str(args.rank), "--device", "cpu", "--json"])
    ours_op = measure("loratools combine_adapters()", [sys.executable, "-c", OURS_CHILD, str(a1), str(a2),
                                                         str(work / "combine-out-ours-op"), str(args.rank)])
    shutil.rmtree(work / "combine-out-ours-op", ignore_errors=True)
    ours_timed = float(next(line.split()[1] for line in ours_op.output.splitlines()
                            if line.startswith("OURS_TIMED_SECONDS")))
    theirs = measure("PEFT add_weighted_adapter svd", [sys.executable, "-c", PEFT_CHILD, str(base), str(p1),
                                                       str(p2), str(out_peft), str(args.rank)])
    timed = float(next(line.split()[1] for line in theirs.output.splitlines()
                       if line.startswith("PEFT_TIMED_SECONDS")))
    total_modules = len(json.loads(ours.output[ours.output.index("{"):])["modules"])

    from loratools.adapter import load_adapter

    peft_modules = set(load_adapter(out_peft / "c").modules)
    err_ours = errors_against_exact([a1, a2], out_ours, peft_modules)  # compared on the same modules
    err_peft = errors_against_exact([a1, a2], out_peft / "c")
    scale = total_modules / err_peft["modules"]
    peft_work = timed * scale
    adapters_mb = (dir_bytes(a1) + dir_bytes(a2)) / 2**20
    over = ours.peak_rss_mb - baseline

    doc = report(f"combine two rank-{args.rank} adapters to rank {args.rank}, {args.size} "
                 f"({total_modules} modules)", ours, theirs,
                 extra={"peft_timed_seconds": timed, "peft_modules": err_peft["modules"], "peft_extrapolation": scale,
                        "peft_timed_seconds_whole_model": peft_work,
                        "speedup_vs_peft_combine_and_save": peft_work / ours.seconds,
                        "ours_timed_seconds": ours_timed, "speedup_operation_alone": peft_work / ours_timed,
                        "baseline_rss_mb": baseline,
                        "adapters_mb": adapters_mb, "error_ours": err_ours, "error_peft": err_peft})
    note = f" (measured on {err_peft['modules']} of {total_modules} modules, x{scale:.2f})" if scale != 1 else ""
    print(f"PEFT add_weighted_adapter + save alone: {peft_work:.2f} s{note}")
    print(f"our combine_adapters() call alone (read, combine, write): {ours_timed:.2f} s")
    print(f"speed-up, operation alone (PEFT add_weighted_adapter + save / our combine_adapters()): "
          f"{peft_work / ours_timed:.0f}x")
    print(f"speed-up, our whole CLI process vs PEFT's combine+save alone: {peft_work / ours.seconds:.1f}x")
    if scale != 1:
        whole = theirs.seconds - timed + peft_work
        print(f"speed-up, whole processes (PEFT's combine+save extrapolated to the whole model, {whole:.0f} s): "
              f"{whole / ours.seconds:.1f}x")
    print(f"error vs the exact sum (‖Σ − result‖/‖Σ‖ over all modules / worst module):  "
          f"ours {err_ours['rel_error_total']:.6f} / {err_ours['rel_error_max_module']:.6f}   "
          f"PEFT {err_peft['rel_error_total']:.6f} / {err_peft['rel_error_max_module']:.6f}")
    print(f"our peak RSS above the import baseline ({baseline:.0f} MB): {over:.0f} MB; the two input adapters: "
          f"{adapters_mb:.0f} MB on disk")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
