#!/usr/bin/env python
"""`loratools extract` (randomized SVD, streamed) vs the peers' full-SVD extraction, side by side.

    flock /tmp/loratools-bench.lock python benchmarks/extract.py [--size 0.75b] [--rank 16] [--device auto]

The pair: a generated Llama-style base and its 'fine-tuned' twin, which adds to every projection a
synthetic delta with a decaying spectrum, U·diag(σᵢ)·Vᵀ with σᵢ = σ₀/i over 64 directions, plus
Gaussian noise at 2% of its norm (‖ΔW‖ ≈ 0.1‖W‖). Embeddings, head and norms are unchanged, so both
contenders extract the same 84 modules (0.75b). Each contender runs in its own subprocess: wall time,
peak RSS, and the per-module relative error (ours from our report; the full SVD's is the optimum).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch

from common import PROJ, SIZES, dir_bytes, generate_llama, llama_shapes, measure, python_rss_baseline, report

HERE = Path(__file__).resolve().parent


def synthetic_finetune(name: str, w: torch.Tensor) -> torch.Tensor:
    """W + U diag(σ₀/i) Vᵀ (64 directions) + 2% noise on each projection; other tensors unchanged."""
    if w.dim() != 2 or name.rsplit(".", 2)[-2] not in PROJ:
        return w
    m, n = w.shape
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    k = 64
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    sigma = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    target = 0.1 * float(w.norm())
    sigma *= target / float(sigma.norm())
    noise = torch.randn(m, n, generator=g)
    noise *= 0.02 * target / float(noise.norm())
    return w + (U * sigma) @ V.T + noise


synthetic_finetune.tag = "extract-bench: sigma0/i over 64 dirs, |dW|=0.1|W|, 2% noise, v1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.75b", choices=sorted(SIZES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--work", default="/tmp/loratools-bench")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    base, tuned = work / f"base-{args.size}", work / f"extract-tuned-{args.size}"
    if args.generate_only:
        generate_llama(base, args.size)
        generate_llama(tuned, args.size, perturb=synthetic_finetune)
        return
    # Note: generate in a child. A child's peak RSS (wait4's ru_maxrss) starts from its parent's peak at
    # fork/exec, so a parent that once held the generated tensors would inflate every contender's figure.
    subprocess.run([sys.executable, __file__, "--generate-only", "--size", args.size, "--work", str(work)],
                   check=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    outs = {k: work / f"extract-out-{k}" for k in ("ours", "theirs")}
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
    rep_ours, rep_theirs = work / "extract-report-ours.json", work / "extract-report-theirs.json"
    # Warm the bytecode caches of what each contender imports (a fresh image may have none; an installed
    # environment has them), so that neither run pays one-off compilation.
    measure("warm-up", [sys.executable, "-c", "import torch, safetensors, loratools.cli, loratools.extract; "
                        "import transformers.models.llama.modeling_llama"])
    baseline = python_rss_baseline()
    ours = measure("loratools extract (rand.)", [sys.executable, "-m", "loratools", "extract", str(base), str(tuned),
                                                 "-o", str(outs["ours"]), "--rank", str(args.rank), "--device", device,
                                                 "--report", str(rep_ours)])
    theirs = measure("full SVD per module", [sys.executable, str(HERE / "extract_fullsvd.py"), str(base), str(tuned),
                                             "-o", str(outs["theirs"]), "--rank", str(args.rank), "--device", device,
                                             "--report", str(rep_theirs)])
    mine = {m["name"]: m for m in json.loads(rep_ours.read_text())["modules"]}
    opt = {m["name"]: m for m in json.loads(rep_theirs.read_text())["modules"]}
    assert set(mine) == set(opt), (sorted(set(mine) ^ set(opt)))[:5]
    ratios = {n: mine[n]["rel_error"] / opt[n]["rel_error"] for n in opt}
    worst = max(ratios, key=ratios.get)
    largest = max(2 * math.prod(s) for s in llama_shapes(**SIZES[args.size]).values()) / 2**20
    doc = report(f"extract rank {args.rank}, {args.size} fp16 pair, device {device}", ours, theirs,
                 size_bytes=dir_bytes(base) + dir_bytes(tuned),
                 extra={"modules": len(opt), "baseline_rss_mb": baseline, "largest_tensor_mb": largest,
                        "worst_error_ratio": ratios[worst], "worst_module": worst,
                        "mean_rel_error_ours": sum(m["rel_error"] for m in mine.values()) / len(mine),
                        "mean_rel_error_optimal": sum(m["rel_error"] for m in opt.values()) / len(opt),
                        "svd_paths": sorted({m["svd"] for m in mine.values()})})
    print(f"modules: {len(opt)}; relative error, mean: ours {doc['mean_rel_error_ours']:.5f}, "
          f"optimal (full SVD) {doc['mean_rel_error_optimal']:.5f}; worst module ours/optimal = "
          f"{ratios[worst]:.5f} ({worst})")
    print(f"loratools RSS above import baseline ({baseline:.0f} MB): {ours.peak_rss_mb - baseline:.0f} MB "
          f"(largest tensor {largest:.0f} MB fp16)")
    (work / f"extract-bench-{args.size}-{device}.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
