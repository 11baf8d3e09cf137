#!/usr/bin/env python
"""LoftQ initialisation of a checkpoint: `loratools quantize --nf4 --loftq` vs PEFT's LoftQ path.

    flock /tmp/loratools-bench.lock python benchmarks/loftq.py [--size 0.75b] [--repeat 3] [--rank 16]
        [--iters 1] [--work /tmp/loratools-bench]
    python benchmarks/loftq.py --size tiny --repeat 1      # smoke test

Both contenders run in their own subprocess on the same generated Llama-style fp16 checkpoint, on the
CPU, `--repeat` times, interleaved:
  ours:   loratools quantize BASE -o OUT --nf4 --loftq --rank R --iters N   (NF4 double-quant base in
          the bitsandbytes format + OUT/loftq_init adapter, one weight at a time)
  theirs: PEFT's recipe (examples/loftq_finetuning/quantize_save_load.py): from_pretrained(BASE) in fp16,
          get_peft_model(model, LoraConfig(r=R, lora_alpha=R, target_modules=the 7 projections,
          init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=N))),
          save_pretrained(OUT/loftq_init) with init_lora_weights=True, unload(), save_pretrained(OUT):
          the base is saved dense (the dequantized values) and quantized by the user's 4-bit load.
          peft 0.21 runs LoftQ on CUDA/XPU only; its loftq_init is run with the device set to "cpu"
          (tests/peft_loftq_cpu.py), nothing else changed; and LoraConfig's scipy check (scipy is
          not installed here and no longer used by LoftQ) is passed by setting the fields afterwards.
Afterwards, for the first layer's seven modules, both pairs are compared: the error ||W - base - B·A||
relative to ||W|| of each (ours against the 4-bit base it wrote, theirs against its dense base) and the
relative difference of the two corrections B·A (they differ because PEFT quantizes without double
quantization in float32; ours quantizes in the written format; docs/quantize.md). A failure is a
correction that does not reduce the error (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import (PROJ, ROOT, Contender, Failures, add_common_args, dir_bytes, generate_llama,
                    largest_tensor_mb, prepare_in_child, python_rss_baseline, report, run_interleaved)

PEFT_CODE = """
import sys, torch
sys.path.insert(0, sys.argv[5])
from peft_loftq_cpu import patch_peft_lora_layers
patch_peft_lora_layers()
from transformers import AutoModelForCausalLM
from peft import LoftQConfig, LoraConfig, get_peft_model
src, dst, rank, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
cfg = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, target_modules=sys.argv[6].split(","))
# LoraConfig(init_lora_weights="loftq") refuses to be built without scipy, which peft 0.21's LoftQ no longer
# uses (it was for the NFQuantizer removed in 0.20): the two fields are set after the check.
cfg.init_lora_weights, cfg.loftq_config = "loftq", vars(LoftQConfig(loftq_bits=4, loftq_iter=iters))
lora_model = get_peft_model(model, cfg)
lora_model.base_model.peft_config["default"].init_lora_weights = True  # as PEFT's recipe: no LoftQ on reload
lora_model.save_pretrained(dst + "/loftq_init")
lora_model.unload().save_pretrained(dst)
"""


def compare(base: Path, ours: Path, theirs: Path, layer: int = 0) -> list[dict]:
    """Per module of one layer: each pair's relative error and the difference of the corrections."""
    from safetensors.torch import load_file

    from loratools.io import Checkpoint
    from loratools.quantized import read_dense

    ck_w, ck_o, ck_t = Checkpoint(base), Checkpoint(ours), Checkpoint(theirs)
    a_o, a_t = (load_file(d / "loftq_init" / "adapter_model.safetensors") for d in (ours, theirs))
    rows = []
    for name in sorted(n for n in ck_w.tensors if n.startswith(f"model.layers.{layer}.")
                       and n.rsplit(".", 2)[-2] in PROJ):
        module = name.removesuffix(".weight")
        w = ck_w.read(name).float()

        def factors(tensors):
            key = f"base_model.model.{module}.lora_"
            return tensors[key + "A.weight"].float(), tensors[key + "B.weight"].float()

        (A_o, B_o), (A_t, B_t) = factors(a_o), factors(a_t)
        d_o, d_t = read_dense(ck_o, name).float(), ck_t.read(name).float()
        rel = lambda x: float(x.norm() / w.norm())
        rows.append({"module": module, "ours_after": rel(w - d_o - B_o @ A_o), "theirs_after": rel(w - d_t - B_t @ A_t),
                     "ours_base": rel(w - d_o), "theirs_base": rel(w - d_t),
                     "correction_rel_diff": float((B_o @ A_o - B_t @ A_t).norm() / (B_t @ A_t).norm())})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.work)
    base = work / f"base-{args.size}"
    if args.prepare_only:
        generate_llama(base, args.size)
        return
    prepare_in_child()  # Note: a quiet parent (common.py)
    out_ours, out_peft = work / "loftq-ours", work / "loftq-peft"
    largest = largest_tensor_mb(args.size)
    baseline = python_rss_baseline()
    runs = run_interleaved([
        Contender("loratools quantize --loftq", [
            sys.executable, "-m", "loratools", "quantize", str(base), "-o", str(out_ours), "--nf4", "--loftq",
            "--rank", str(args.rank), "--iters", str(args.iters), "--device", "cpu", "--json", "--force"],
            (base,), out_ours),
        Contender("PEFT LoftQ (get_peft_model + save)", [
            sys.executable, "-c", PEFT_CODE, str(base), str(out_peft), str(args.rank), str(args.iters),
            str(ROOT / "tests"), ",".join(PROJ)], (base,), out_peft),
    ], args.repeat)
    ours, theirs = runs.values()
    summary = json.loads(ours.last.output[ours.last.output.index("{"):])
    rows = compare(base, out_ours, out_peft)
    total = summary["loftq"]["total"]
    doc = report(f"LoftQ rank {args.rank}, {args.iters} iteration(s), {args.size} fp16, CPU", ours, theirs,
                 size_bytes=dir_bytes(base),
                 extra={"baseline_rss_mb": baseline, "largest_tensor_mb": largest, "loftq_total": total,
                        "layer0": rows, "bytes_ours": dir_bytes(out_ours), "bytes_theirs": dir_bytes(out_peft)})
    print(f"loratools median RSS above import baseline ({baseline:.0f} MB): "
          f"{ours.median('peak_rss_mb') - baseline:.0f} MB (largest tensor {largest:.0f} MB, "
          f"checkpoint {dir_bytes(base) / 2**20:.0f} MB)")
    print(f"ours, all modules: rel. error plain NF4 {total['rel_error_before']:.5f} -> base + B·A "
          f"{total['rel_error_after']:.5f}")
    for r in rows:
        print(f"  {r['module']:34s} after: ours {r['ours_after']:.5f} theirs {r['theirs_after']:.5f}   "
              f"base: ours {r['ours_base']:.5f} theirs {r['theirs_base']:.5f}   "
              f"B·A rel. diff {r['correction_rel_diff']:.3g}")
    print(json.dumps(doc))
    checks = Failures()
    worse = [r["module"] for r in summary["loftq"]["modules"] if not r["rel_error_after"] < r["rel_error_before"]]
    checks.check(not worse, f"ours: the correction reduces the error of every module ({len(worse)} do not {worse[:3]})")
    worse = [r["module"] for r in rows if not r["theirs_after"] < r["theirs_base"]]
    checks.check(not worse, f"PEFT: its correction reduces the error of the layer-0 modules ({worse[:3]})")
    checks.exit()


if __name__ == "__main__":
    main()
