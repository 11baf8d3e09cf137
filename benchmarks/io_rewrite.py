#!/usr/bin/env python
"""Read-and-rewrite of a checkpoint: `loratools convert` vs transformers from_pretrained + save_pretrained.

    python benchmarks/io_rewrite.py [--size 0.75b] [--work /tmp/loratools-bench]

Shows that loratools' peak RSS is the import cost plus a few tensors, whatever the checkpoint size
(run it with --size 0.1b and --size 0.75b), against the whole-model path a user would otherwise take.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from common import SIZES, dir_bytes, generate_llama, llama_shapes, measure, python_rss_baseline, no_sync_report, report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.75b", choices=sorted(SIZES))
    ap.add_argument("--work", default="/tmp/loratools-bench")
    args = ap.parse_args()
    work = Path(args.work)
    base = generate_llama(work / f"base-{args.size}", args.size)
    largest = max(2 * math.prod(s) for s in llama_shapes(**SIZES[args.size]).values()) / 2**20
    for d in ("out-ours", "out-ours-nosync", "out-hf"):
        shutil.rmtree(work / d, ignore_errors=True)
    baseline = python_rss_baseline()
    ours = measure("loratools convert", [sys.executable, "-m", "loratools", "convert", str(base), "-o",
                                         str(work / "out-ours"), "--max-shard-size", "500MB"])
    nosync = measure("loratools convert --no-sync", [sys.executable, "-m", "loratools", "convert", str(base), "-o",
                                                     str(work / "out-ours-nosync"), "--max-shard-size", "500MB",
                                                     "--no-sync"])
    hf_code = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
               "m = M.from_pretrained(sys.argv[1], dtype=torch.float16); "
               "m.save_pretrained(sys.argv[2], max_shard_size='500MB')")
    theirs = measure("transformers load+save", [sys.executable, "-c", hf_code, str(base), str(work / "out-hf")])
    size = dir_bytes(base)
    doc = report(f"read-and-rewrite, {args.size} fp16", ours, theirs, size_bytes=size,
                 extra={"baseline_rss_mb": baseline, "largest_tensor_mb": largest})
    doc["no_sync"] = no_sync_report(nosync, theirs)
    over = ours.peak_rss_mb - baseline
    print(f"loratools RSS above import baseline: {over:.0f} MB (largest tensor {largest:.0f} MB, "
          f"checkpoint {size / 2**20:.0f} MB)")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
