#!/usr/bin/env python
"""The NF4 quantization kernel alone: loratools.bnb4bit against bitsandbytes' CPU path, one thread.

    python benchmarks/nf4_kernel.py [--shape 5632x2048] [--repeat 5] [--blocksize 64] [--fp4]
    python benchmarks/nf4_kernel.py --shape 704x256 --repeat 2      # smoke test

One random fp16 weight (default 5632x2048, a Llama MLP projection of the 0.75B benchmark model),
quantized in this process on one thread (OMP_NUM_THREADS=1 and torch.set_num_threads(1), set before
torch loads) by
  bitsandbytes  bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type, compress_statistics=False)
  ours          loratools.bnb4bit.quantize_4bit(w, blocksize, quant_type)
  ours+error    loratools.bnb4bit.quantize_weight_measured(..., double_quant=False): the same codes plus
                the exact error of what bitsandbytes will dequantize (what `loratools quantize` reports)
after one untimed call each (tables built, allocator warm), then `--repeat` times interleaved. Prints CPU
seconds (process time) and wall seconds, min and median, and the ratios of the medians. The packed codes
and the absmax of ours must equal bitsandbytes' byte for byte: otherwise FAIL (exit status 1).
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch and bitsandbytes load their thread pools
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import median  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

import bitsandbytes.functional as F  # noqa: E402

from loratools import bnb4bit  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="5632x2048", help="rows x columns of the fp16 weight")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--fp4", action="store_true")
    args = ap.parse_args()
    rows, cols = (int(x) for x in args.shape.lower().split("x"))
    qt = "fp4" if args.fp4 else "nf4"
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) / cols ** 0.5).half()
    contenders = {
        "bitsandbytes quantize_4bit": lambda: F.quantize_4bit(w, blocksize=args.blocksize, quant_type=qt,
                                                              compress_statistics=False),
        "loratools quantize_4bit": lambda: bnb4bit.quantize_4bit(w, args.blocksize, qt),
        "loratools + exact error": lambda: bnb4bit.quantize_weight_measured(
            w, quant_type=qt, blocksize=args.blocksize, double_quant=False),
    }
    results = {name: fn() for name, fn in contenders.items()}  # untimed first call each
    cpu = {n: [] for n in contenders}
    wall = {n: [] for n in contenders}
    for _ in range(args.repeat):
        for name, fn in contenders.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    print(f"== {qt} blocksize {args.blocksize}, one {rows}x{cols} fp16 weight, 1 thread, {args.repeat} runs "
          f"each, interleaved; min / median")
    print(f"{'':30s}{'CPU-seconds':>20s}{'wall seconds':>20s}")
    for n in contenders:
        print(f"{n:30s}{min(cpu[n]):10.3f}{median(cpu[n]):10.3f}{min(wall[n]):10.3f}{median(wall[n]):10.3f}")
    ref = "bitsandbytes quantize_4bit"
    for n in list(contenders)[1:]:
        print(f"{ref} / {n}: CPU median {median(cpu[ref]) / median(cpu[n]):.2f}x "
              f"(min {min(cpu[ref]) / min(cpu[n]):.2f}x), wall median {median(wall[ref]) / median(wall[n]):.2f}x")

    packed_b, state = results[ref]
    packed_o, absmax_o = results["loratools quantize_4bit"]
    stored, _, _ = results["loratools + exact error"]
    same = (torch.equal(packed_b.view(-1), packed_o.view(-1)) and torch.equal(state.absmax, absmax_o)
            and torch.equal(stored[""].view(-1), packed_b.view(-1)) and torch.equal(stored[".absmax"], state.absmax))
    print(f"{'ok' if same else 'FAIL'}: packed codes and absmax of ours equal bitsandbytes' byte for byte")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
