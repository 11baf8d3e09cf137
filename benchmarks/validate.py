#!/usr/bin/env python
"""Peak memory and time of `validate --stream` (layer-streamed forward passes) against the whole-model path.

    flock /tmp/loratools-bench.lock python benchmarks/validate.py [--size 0.75b] [--repeat 1]
    flock /tmp/loratools-bench.lock python benchmarks/validate.py --size 6.7b --repeat 1   # 13.5 GB fp16 model
    python benchmarks/validate.py --size tiny --repeat 1                                  # smoke test

A child generates a Llama-style fp16 model tensor by tensor (never whole in memory; 6.7b: hidden 4096, 32
layers, MLP 11008, vocab 32000), a rank-16 adapter and their merge (`loratools merge`, streamed). Then, each in
its own process, `--repeat` times interleaved, each run after reading its inputs once (page cache warm), on
the CPU in float32:
  validate BASE LORA --merged MERGED --stream       the whole command: static + tensor checks + streamed passes
  streamed forward passes only                      validate.streamed.streamed_forward_checks
  validate BASE LORA --merged MERGED --no-stream    transformers + PEFT whole models (when they fit)
  whole-model forward passes only                   validate.logits.forward_checks (PEFT's forward)
The whole-model runs are left out when the model would not fit in memory now (validate's own rule,
streamed.choose_stream) unless --whole yes. Prints wall time, CPU time and peak RSS (min and median); fails
(exit 1) unless every validate passes and the streamed and whole-model logits numbers agree where both ran.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common
from common import (SIZES, Contender, Failures, add_common_args, generate_llama, generate_lora, prepare_in_child,
                    run_interleaved)

# Llama-2-7B's shapes (the size may already be in common.SIZES)
SIZES.setdefault("6.7b", dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32))

FORWARD_ONLY = """
import json, sys, torch
from pathlib import Path
from loratools.io import Checkpoint
from loratools.validate.{module} import {fn}
base, lora, merged = sys.argv[1:4]
out = {fn}(Checkpoint(base), [Path(lora)], [1.0], {{"merged": Checkpoint(merged)}}, device=torch.device("cpu"),
          dtype=torch.float32, batch=4, seq_len=128, seed=0, atol=None, rtol=None, min_carried=0.0)
print(json.dumps({{"comparisons": [{{k: c.get(k) for k in ("name", "passed", "rel_err", "max_abs", "top1")}}
                                  for c in out["comparisons"]]}}))
"""


def paths(work: Path, size: str) -> dict[str, Path]:
    return {"base": work / f"base-{size}", "lora": work / f"lora16-{size}", "merged": work / f"validate-merged-{size}"}


def prepare(p: dict[str, Path], size: str) -> None:
    generate_llama(p["base"], size)
    generate_lora(p["lora"], size, r=16, alpha=32, base_name=str(p["base"]))
    if not (p["merged"] / "config.json").exists():
        argv = ["merge", p["base"], p["lora"], "-o", p["merged"], "--force", "--no-sync"]
        done = subprocess.run([sys.executable, "-m", "loratools", *map(str, argv)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"FAIL: loratools merge exited {done.returncode}:\n{done.stderr[-2000:]}")


def whole_fits(p: dict[str, Path]) -> tuple[bool, str]:
    """validate's own rule (streamed.choose_stream), asked in a child so this process stays small."""
    code = ("import sys, torch; from loratools.io import Checkpoint; from loratools.validate.streamed import "
            "choose_stream; s, why = choose_stream(None, [Checkpoint(sys.argv[1])], torch.device('cpu'), "
            "torch.float32); print(int(not s), why)")
    out = subprocess.run([sys.executable, "-c", code, str(p["base"])], capture_output=True, text=True, check=True)
    fits, why = out.stdout.strip().split(" ", 1)
    return fits == "1", why


def json_tail(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--whole", choices=["auto", "yes", "no"], default="auto",
                    help="run the whole-model contenders: auto = when validate's rule says the model fits")
    args = ap.parse_args()
    p = paths(Path(args.work), args.size)
    if args.prepare_only:
        prepare(p, args.size)
        return
    prepare_in_child()  # Note: a quiet parent (common.py)
    inputs = (p["base"], p["lora"], p["merged"])
    v = [sys.executable, "-m", "loratools", "validate", *map(str, inputs[:2]), "--merged", str(p["merged"]),
         "--device", "cpu", "--dtype", "float32", "--json"]
    fwd = [sys.executable, "-c"]
    contenders = [
        Contender("validate --stream", [*v, "--stream"], inputs),
        Contender("streamed forward only",
                  [*fwd, FORWARD_ONLY.format(module="streamed", fn="streamed_forward_checks"), *map(str, inputs)],
                  inputs),
    ]
    fits, why = whole_fits(p)
    run_whole = args.whole == "yes" or (args.whole == "auto" and fits)
    if run_whole:
        contenders += [
            Contender("validate --no-stream", [*v, "--no-stream"], inputs),
            Contender("whole forward only (PEFT)",
                      [*fwd, FORWARD_ONLY.format(module="logits", fn="forward_checks"), *map(str, inputs)], inputs),
        ]
    runs = run_interleaved(contenders, args.repeat)
    size_gb = common.dir_bytes(p["base"]) / 1e9
    print(f"== validate on a generated {args.size} fp16 Llama ({size_gb:.1f} GB) + rank-16 adapter and its merge, "
          f"CPU float32, batch 4 x 128; {args.repeat} run(s) each, interleaved; min / median")
    if not run_whole:
        print(f"   whole-model contenders not run: {why}")
    print(f"{'':30s}{'seconds':>18s}{'CPU-seconds':>18s}{'peak RSS MB':>16s}")
    for s in runs.values():
        print(f"{s.name:30s}{s.min():9.1f}{s.median():9.1f}{s.min('cpu_seconds'):9.1f}{s.median('cpu_seconds'):9.1f}"
              f"{s.min('peak_rss_mb'):8.0f}{s.median('peak_rss_mb'):8.0f}")
    print(f"parent process peak RSS (floor under every reading): {common.parent_peak_mb():.0f} MB")
    checks = Failures()
    docs = {name: json_tail(s.last.output) for name, s in runs.items()}
    for name in ("validate --stream", "validate --no-stream"):
        if name in docs:
            checks.check(docs[name]["passed"] is True, f"{name} passed ({docs[name]['summary']})")
    merged = {name: {c["name"]: c for c in d["comparisons"]}["merged"] for name, d in docs.items()}
    for name, c in merged.items():
        print(f"{name:30s} merged logits: rel_err {c['rel_err']:.4g}, max |Δ| {c['max_abs']:.4g}, "
              f"top-1 {c['top1']:.4f}")
    if "validate --stream" in docs:
        d = {c["name"]: c for c in docs["validate --stream"]["comparisons"]}["merged"].get("divergence") or {}
        if d.get("blocks"):
            errs = [r["rel_err"] for r in d["blocks"]]
            print(f"per-block rel err of the merge: {min(errs):.3g} .. {max(errs):.3g} "
                  f"(allowance {d['allowance']:.3g}); "
                  f"logits KL {d['logits']['kl']:.3g}, top-5 overlap {d['logits']['topk']:.4f}")
    if run_whole:
        a, b = merged["streamed forward only"], merged["whole forward only (PEFT)"]
        checks.check(abs(a["rel_err"] - b["rel_err"]) <= 1e-3 * max(b["rel_err"], 1e-12) + 1e-9,
                     f"streamed and whole-model rel_err agree ({a['rel_err']:.6g} vs {b['rel_err']:.6g})")
    print(json.dumps({name: s.summary() for name, s in runs.items()}))
    checks.exit()


if __name__ == "__main__":
    main()
