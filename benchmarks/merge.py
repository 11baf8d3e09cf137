#!/usr/bin/env python
"""Merge a rank-16 adapter (all seven projections) into a Llama-style fp16 checkpoint:
`loratools merge` vs `PeftModel.from_pretrained(...).merge_and_unload()` + `save_pretrained`.

    flock /tmp/loratools-bench.lock python benchmarks/merge.py [--size 0.75b] [--small 0.35b]

Each contender runs in its own process (wall time and peak RSS from wait4). loratools also runs on a
second, smaller model (`--small`) to show that its peak RSS does not grow with the model: it is the
import cost plus a few tensors. The two outputs are compared tensor by tensor at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from common import SIZES, dir_bytes, generate_llama, generate_lora, llama_shapes, measure, python_rss_baseline, no_sync_report, report

PEFT_CODE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16), adapter)
model.merge_and_unload().save_pretrained(out, max_shard_size="500MB")
"""


def inputs(work: Path, size: str) -> tuple[Path, Path]:
    base = generate_llama(work / f"base-{size}", size)
    lora = generate_lora(work / f"lora16-{size}", size, r=16, alpha=32, base_name=str(base))
    return base, lora


def ours_cmd(base, lora, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loratools", "merge", str(base), str(lora), "-o", str(out),
            "--max-shard-size", "500MB", "--force", *extra]


def warm(*dirs: Path) -> None:
    """Read the inputs once so that every contender starts with them in the page cache (whoever ran
    first would otherwise pay the cold reads alone)."""
    for d in dirs:
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(1 << 24):
                        pass


def compare_outputs(a: Path, b: Path) -> dict:
    """Bit-identical tensors between the two merged checkpoints (read one tensor at a time)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loratools.io import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    same = differ = 0
    worst = 0.0
    for name, t in ca.iter_tensors():
        u = cb.read(name)
        if torch.equal(t, u):
            same += 1
        else:
            differ += 1
            worst = max(worst, float((t.float() - u.float()).abs().max()))
    return {"tensors_bit_identical": same, "tensors_differing": differ, "max_abs_diff": worst}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.75b", choices=sorted(SIZES))
    ap.add_argument("--small", default="0.35b", choices=sorted(SIZES),
                    help="second model size for loratools alone (RSS independent of model size)")
    ap.add_argument("--work", default="/tmp/loratools-bench")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.prepare_only:
        inputs(work, args.size)
        inputs(work, args.small)
        return
    # Generate in a child: a child's peak RSS (wait4) starts from its parent's at fork time, so this
    # process must stay small for the measurements below to be the contenders' own.
    subprocess.run([sys.executable, __file__, "--prepare-only", "--size", args.size, "--small", args.small,
                    "--work", str(work)], check=True)
    base, lora = inputs(work, args.size)
    small_base, small_lora = inputs(work, args.small)
    for d in ("merge-ours", "merge-ours-nosync", "merge-peft", "merge-ours-small"):
        shutil.rmtree(work / d, ignore_errors=True)

    baseline = python_rss_baseline()
    warm(base, lora)
    ours = measure("loratools merge", ours_cmd(base, lora, work / "merge-ours"))
    warm(base, lora)
    nosync = measure("loratools merge --no-sync", ours_cmd(base, lora, work / "merge-ours-nosync", "--no-sync"))
    warm(base, lora)
    theirs = measure("PEFT merge_and_unload+save", [sys.executable, "-c", PEFT_CODE, str(base), str(lora),
                                                    str(work / "merge-peft")])
    warm(small_base, small_lora)
    small = measure(f"loratools merge ({args.small})", ours_cmd(small_base, small_lora, work / "merge-ours-small"))

    largest = max(2 * math.prod(s) for s in llama_shapes(**SIZES[args.size]).values()) / 2**20
    size = dir_bytes(base)
    agree = compare_outputs(work / "merge-ours", work / "merge-peft")
    doc = report(f"merge rank-16 adapter (7 projections) into {args.size} fp16", ours, theirs, size_bytes=size,
                 extra={"baseline_rss_mb": baseline, "largest_tensor_mb": largest, "small": small.__dict__ |
                        {"output": None, "size": args.small, "checkpoint_mb": dir_bytes(small_base) / 2**20},
                        "agreement": agree})
    doc["no_sync"] = no_sync_report(nosync, theirs)
    print(f"loratools RSS above import baseline ({baseline:.0f} MB): {args.size} {ours.peak_rss_mb - baseline:.0f} MB, "
          f"{args.small} {small.peak_rss_mb - baseline:.0f} MB (largest tensor {largest:.0f} MB; checkpoints "
          f"{size / 2**20:.0f} MB and {dir_bytes(small_base) / 2**20:.0f} MB)")
    print(f"outputs: {agree['tensors_bit_identical']} tensors bit-identical to PEFT's, {agree['tensors_differing']} "
          f"differ (max |diff| {agree['max_abs_diff']:.3g})")
    ok_rss = doc["rss_ratio"] <= 0.25
    for label, speed in (("durable (default)", doc["speedup"]), ("--no-sync", doc["no_sync"]["speedup"])):
        print(f"target speed-up >= 4x, {label}: {'met' if speed >= 4 else 'MISSED'} ({speed:.2f}x)")
    print(f"target RSS ratio <= 1/4: {'met' if ok_rss else 'MISSED'} ({doc['rss_ratio']:.3f})")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
