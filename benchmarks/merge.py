#!/usr/bin/env python
"""Merge a rank-16 adapter (all seven projections) into a Llama-style fp16 checkpoint:
`loratools merge` vs `PeftModel.from_pretrained(...).merge_and_unload()` + `save_pretrained`.

    flock /tmp/loratools-bench.lock python benchmarks/merge.py [--size 0.75b] [--small 0.35b] [--repeat 3]
    python benchmarks/merge.py --size tiny --small tiny --repeat 1      # smoke test, seconds

Each contender runs in its own process (wall time and peak RSS from wait4), `--repeat` times,
interleaved, each run after reading the inputs once (page cache warm). loratools also runs on a second,
smaller model (`--small`) to show that its peak RSS does not grow with the model: it is the import cost
plus a few tensors. The outputs are then compared tensor by tensor: any tensor that differs from PEFT's,
or is missing on either side, is a FAIL (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import (SIZES, Contender, Failures, add_common_args, dir_bytes, generate_llama, generate_lora,
                    largest_tensor_mb, no_sync_report, prepare_in_child, python_rss_baseline, report,
                    run_interleaved)

PEFT_CODE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16), adapter)
model.merge_and_unload().save_pretrained(out, max_shard_size="500MB")
"""


def input_paths(work: Path, size: str) -> tuple[Path, Path]:
    return work / f"base-{size}", work / f"lora16-{size}"


def generate(work: Path, size: str) -> None:
    base, lora = input_paths(work, size)
    generate_llama(base, size)
    generate_lora(lora, size, r=16, alpha=32, base_name=str(base))


def ours_cmd(base, lora, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loratools", "merge", str(base), str(lora), "-o", str(out),
            "--max-shard-size", "500MB", "--force", *extra]


def compare_outputs(a: Path, b: Path) -> dict:
    """Bit-identical tensors between the two merged checkpoints (read one tensor at a time), and the
    names present on one side only."""
    import torch

    from loratools.io import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    same = differ = 0
    worst = 0.0
    for name in sorted(set(ca.keys()) & set(cb.keys())):
        t, u = ca.read(name), cb.read(name)
        if t.dtype == u.dtype and torch.equal(t, u):
            same += 1
        else:
            differ += 1
            worst = max(worst, float((t.float() - u.float()).abs().max()))
    return {"tensors_bit_identical": same, "tensors_differing": differ, "max_abs_diff": worst,
            "only_in_ours": sorted(set(ca.keys()) - set(cb.keys())),
            "only_in_theirs": sorted(set(cb.keys()) - set(ca.keys()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--small", default="0.35b", choices=sorted(SIZES),
                    help="second model size for loratools alone (RSS independent of model size)")
    args = ap.parse_args()
    work = Path(args.work)
    if args.prepare_only:
        generate(work, args.size)
        generate(work, args.small)
        return
    prepare_in_child()  # Note: a quiet parent (common.py)
    base, lora = input_paths(work, args.size)
    small_base, small_lora = input_paths(work, args.small)
    out = {k: work / f"merge-{k}" for k in ("ours", "ours-nosync", "peft", "ours-small")}

    baseline = python_rss_baseline()
    runs = run_interleaved([
        Contender("loratools merge", ours_cmd(base, lora, out["ours"]), (base, lora), out["ours"]),
        Contender("loratools merge --no-sync", ours_cmd(base, lora, out["ours-nosync"], "--no-sync"), (base, lora),
                  out["ours-nosync"]),
        Contender("PEFT merge_and_unload+save", [sys.executable, "-c", PEFT_CODE, str(base), str(lora), str(out["peft"])],
                  (base, lora), out["peft"]),
        Contender(f"loratools merge ({args.small})", ours_cmd(small_base, small_lora, out["ours-small"]),
                  (small_base, small_lora), out["ours-small"]),
    ], args.repeat)
    ours, nosync, theirs, small = runs.values()

    largest = largest_tensor_mb(args.size)
    size = dir_bytes(base)
    agree = compare_outputs(out["ours"], out["peft"])
    doc = report(f"merge rank-16 adapter (7 projections) into {args.size} fp16", ours, theirs, size_bytes=size,
                 extra={"baseline_rss_mb": baseline, "largest_tensor_mb": largest,
                        "small": small.summary() | {"size": args.small,
                                                    "checkpoint_mb": dir_bytes(small_base) / 2**20},
                        "agreement": agree})
    doc["no_sync"] = no_sync_report(nosync, theirs)
    print(f"loratools median RSS above import baseline ({baseline:.0f} MB): "
          f"{args.size} {ours.median('peak_rss_mb') - baseline:.0f} MB, "
          f"{args.small} {small.median('peak_rss_mb') - baseline:.0f} MB (largest tensor {largest:.0f} MB; "
          f"checkpoints {size / 2**20:.0f} MB and {dir_bytes(small_base) / 2**20:.0f} MB)")
    for label, speed in (("durable (default)", doc["speedup_median"]), ("--no-sync", doc["no_sync"]["speedup_median"])):
        print(f"target speed-up >= 4x, {label}: {'met' if speed >= 4 else 'MISSED'} (median {speed:.2f}x)")
    print(f"target RSS ratio <= 1/4: {'met' if doc['rss_ratio_median'] <= 0.25 else 'MISSED'} "
          f"(median {doc['rss_ratio_median']:.3f})")
    print(json.dumps(doc))
    checks = Failures()
    checks.check(agree["tensors_differing"] == 0 and agree["tensors_bit_identical"] > 0,
                 f"outputs: {agree['tensors_bit_identical']} tensors bit-identical to PEFT's, "
                 f"{agree['tensors_differing']} differ (max |diff| {agree['max_abs_diff']:.3g})")
    checks.check(not agree["only_in_ours"] and not agree["only_in_theirs"],
                 f"same tensor names: {len(agree['only_in_ours'])} only in ours, "
                 f"{len(agree['only_in_theirs'])} only in PEFT's {agree['only_in_ours'][:3] + agree['only_in_theirs'][:3]}")
    checks.exit()


if __name__ == "__main__":
    main()
