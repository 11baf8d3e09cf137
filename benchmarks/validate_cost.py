#!/usr/bin/env python
"""What `loratools validate` costs, and how far a correct 4-bit copy sits from its reference.

    flock /tmp/loratools-bench.lock python benchmarks/validate_cost.py [--size 0.75b] [--repeat 3]
    python benchmarks/validate_cost.py --size tiny --repeat 1      # smoke test

A child generates a Llama-style fp16 model and a rank-16 adapter, merges them (`loratools merge`) and
quantizes the base (`loratools quantize --nf4`). Then, each in its own process, `--repeat` times interleaved,
each run after reading its inputs once (page cache warm), on the CPU:
  validate BASE LORA --merged MERGED                (forward passes: transformers builds the models)
  validate BASE LORA --merged MERGED --static-only  (headers and streamed tensor checks only)
  validate BASE --quantized Q                       (the 4-bit copy against BASE quantized by the same rule)
Prints wall time, CPU time and peak RSS (min and median), and the quantized run's logits errors: against
its reference (`quantized`, with the allowed rtol) and against the unquantized base (`quantization`). Any
validate run that does not pass is a FAIL (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import (Contender, Failures, add_common_args, generate_llama, generate_lora, prepare_in_child,
                    run_interleaved)


def paths(work: Path, size: str) -> dict[str, Path]:
    return {"base": work / f"base-{size}", "lora": work / f"lora16-{size}", "merged": work / f"validate-merged-{size}",
            "q": work / f"validate-nf4-{size}"}


def prepare(p: dict[str, Path], size: str) -> None:
    generate_llama(p["base"], size)
    generate_lora(p["lora"], size, r=16, alpha=32, base_name=str(p["base"]))
    for argv in (["merge", p["base"], p["lora"], "-o", p["merged"], "--force", "--no-sync"],
                 ["quantize", p["base"], "-o", p["q"], "--nf4", "--force", "--no-sync"]):
        done = subprocess.run([sys.executable, "-m", "loratools", *map(str, argv)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"FAIL: loratools {argv[0]} exited {done.returncode}:\n{done.stderr[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    args = ap.parse_args()
    p = paths(Path(args.work), args.size)
    if args.prepare_only:
        prepare(p, args.size)
        return
    prepare_in_child()  # Note: a quiet parent (common.py)
    v = [sys.executable, "-m", "loratools", "validate"]
    merged = [*v, str(p["base"]), str(p["lora"]), "--merged", str(p["merged"]), "--device", "cpu", "--json"]
    quant = [*v, str(p["base"]), "--quantized", str(p["q"]), "--device", "cpu", "--json"]
    runs = run_interleaved([
        Contender("validate --merged", merged, (p["base"], p["lora"], p["merged"])),
        Contender("validate --merged --static-only", [*merged, "--static-only"], (p["base"], p["lora"], p["merged"])),
        Contender("validate --quantized", quant, (p["base"], p["q"])),
    ], args.repeat)
    print(f"== validate on a generated {args.size} fp16 Llama + rank-16 adapter, CPU; "
          f"{args.repeat} runs each, interleaved; min / median")
    print(f"{'':34s}{'seconds':>18s}{'CPU-seconds':>18s}{'peak RSS MB':>16s}")
    for s in runs.values():
        print(f"{s.name:34s}{s.min():9.1f}{s.median():9.1f}{s.min('cpu_seconds'):9.1f}{s.median('cpu_seconds'):9.1f}"
              f"{s.min('peak_rss_mb'):8.0f}{s.median('peak_rss_mb'):8.0f}")
    checks = Failures()
    docs = {name: json.loads(s.last.output[s.last.output.index("{"):]) for name, s in runs.items()}
    q = {c["name"]: c for c in docs["validate --quantized"]["comparisons"]}
    print(f"quantized logits: rel_err {q['quantized']['rel_err']:.3g} against BASE quantized by bitsandbytes' rule "
          f"(allowed {q['quantized']['rtol']:.3g}); {q['quantization']['rel_err']:.3g} against BASE itself")
    print(json.dumps({name: s.summary() for name, s in runs.items()} | {"quantized": q}))
    for name, doc in docs.items():
        checks.check(doc["passed"] is True, f"{name} passed")
    checks.exit()


if __name__ == "__main__":
    main()
