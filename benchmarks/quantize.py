#!/usr/bin/env python
"""4-bit quantization of a checkpoint: `loratools quantize` vs transformers' load-quantize-save path.

    flock /tmp/loratools-bench.lock python benchmarks/quantize.py [--size 0.75b] [--work /tmp/loratools-bench]
        [--fp4] [--no-double-quant] [--blocksize 64] [--device cpu|cuda]

Both contenders run in their own subprocess on the same generated Llama-style fp16 checkpoint:
  ours:   loratools quantize BASE -o OUT --nf4 --blocksize 64 --double-quant --compute-dtype bfloat16
  theirs: AutoModelForCausalLM.from_pretrained(BASE, quantization_config=BitsAndBytesConfig(
              load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype=torch.bfloat16)).save_pretrained(OUT)
and the two outputs are then compared tensor by tensor (byte parity), so the speed-up is for the same
bytes. Prints wall time, peak RSS, their ratios, and our RSS above the import baseline next to the
largest tensor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
from pathlib import Path

from common import SIZES, dir_bytes, generate_llama, llama_shapes, measure, python_rss_baseline, no_sync_report, report


def measure_cpu(name: str, cmd: list[str]):
    """common.measure, plus the child's CPU seconds (user + system): on a shared machine wall time
    depends on the neighbours' load, CPU time much less."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = measure(name, cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run, cpu

HF_CODE = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
src, dst, quant_type, double_quant, blocksize, device = sys.argv[1:7]
if int(blocksize) != 64:  # BitsAndBytesConfig has no blocksize: make bitsandbytes' Params4bit use it
    import bitsandbytes as bnb
    new = bnb.nn.Params4bit.__new__
    bnb.nn.Params4bit.__new__ = lambda cls, *a, **kw: new(cls, *a, **{**kw, "blocksize": int(blocksize)})
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                         bnb_4bit_use_double_quant=double_quant == "1", bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map=device)
model.save_pretrained(dst)
"""


def compare(a: Path, b: Path) -> dict:
    """Tensor-by-tensor byte comparison of two checkpoints (names, dtypes, shapes, bytes)."""
    from loratools.io import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    names = set(ca.keys())
    differ = [n for n in sorted(names & set(cb.keys()))
              if (ca.info(n).dtype, ca.info(n).shape) != (cb.info(n).dtype, cb.info(n).shape)
              or not bytes(ca.read(n).view(-1).view(__import__("torch").uint8).numpy()) ==
              bytes(cb.read(n).view(-1).view(__import__("torch").uint8).numpy())]
    return {"tensors": len(names), "only_in_ours": sorted(names - set(cb.keys())),
            "only_in_theirs": sorted(set(cb.keys()) - names), "differing": differ}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.75b", choices=sorted(SIZES))
    ap.add_argument("--work", default="/tmp/loratools-bench")
    ap.add_argument("--fp4", action="store_true")
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    work = Path(args.work)
    base = generate_llama(work / f"base-{args.size}", args.size)
    out_ours, out_hf = work / "quantize-ours", work / "quantize-hf"
    for d in (out_ours, out_hf):
        shutil.rmtree(d, ignore_errors=True)
    quant_type = "fp4" if args.fp4 else "nf4"
    double_quant = not args.no_double_quant
    largest = max(2 * math.prod(s) for s in llama_shapes(**SIZES[args.size]).values()) / 2**20
    baseline = python_rss_baseline()

    def ours_cmd(out, *extra):
        return [sys.executable, "-m", "loratools", "quantize", str(base), "-o", str(out), f"--{quant_type}",
                "--blocksize", str(args.blocksize), "--double-quant" if double_quant else "--no-double-quant",
                "--device", args.device, "--json", "--force", *extra]

    ours, ours_cpu = measure_cpu("loratools quantize", ours_cmd(out_ours))
    nosync, _ = measure_cpu("loratools quantize --no-sync", ours_cmd(work / "quantize-ours-nosync", "--no-sync"))
    theirs, theirs_cpu = measure_cpu("transformers load+quantize+save", [
        sys.executable, "-c", HF_CODE, str(base), str(out_hf), quant_type, "1" if double_quant else "0",
        str(args.blocksize), args.device])
    summary = json.loads(ours.output[ours.output.index("{"):])
    parity = compare(out_ours, out_hf)
    doc = report(f"quantize {quant_type} blocksize {args.blocksize} double-quant {double_quant}, "
                 f"{args.size} fp16, device {args.device}", ours, theirs, size_bytes=dir_bytes(base),
                 extra={"baseline_rss_mb": baseline, "largest_tensor_mb": largest, "parity": parity,
                        "cpu_seconds_ours": ours_cpu, "cpu_seconds_theirs": theirs_cpu,
                        "cpu_speedup": theirs_cpu / ours_cpu, "load_average": os.getloadavg(),
                        "rel_rms_error": summary["total"]["rel_rms_error"],
                        "bits_per_quantized_parameter": summary["total"]["bits_per_quantized_parameter"],
                        "bytes_after": summary["total"]["bytes_after"]})
    doc["no_sync"] = no_sync_report(nosync, theirs)
    print(f"CPU seconds (user+sys): ours {ours_cpu:.1f}, theirs {theirs_cpu:.1f} ({theirs_cpu / ours_cpu:.2f}x); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"loratools RSS above import baseline: {ours.peak_rss_mb - baseline:.0f} MB "
          f"(largest tensor {largest:.0f} MB, checkpoint {dir_bytes(base) / 2**20:.0f} MB)")
    print(f"byte parity: {parity['tensors']} tensors, {len(parity['differing'])} differ, "
          f"{len(parity['only_in_ours'])} only in ours, {len(parity['only_in_theirs'])} only in theirs")
    print(f"total relative RMS error {summary['total']['rel_rms_error']:.5f}, "
          f"{summary['total']['bits_per_quantized_parameter']:.3f} bits per quantized parameter")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
