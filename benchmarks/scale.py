#!/usr/bin/env python
"""Every streaming command at scale against the physical floor: the copy+sync of the same bytes.

    flock /tmp/loratools-bench.lock python benchmarks/scale.py --size 0.75b --threads 1 2 --repeat 3
    flock /tmp/loratools-bench.lock python benchmarks/scale.py --size 7b --threads 1 2 --repeat 1 [--peers]
    python benchmarks/scale.py --size 0.75b --threads 1 2 4 8 16 --device cuda   # a GPU machine
    python benchmarks/scale.py --size tiny --repeat 1        # smoke test, seconds

For a generated Llama-style fp16 checkpoint (common.py; `7b` has Llama-2-7B's shapes, 13.5 GB, written
tensor by tensor, never whole in memory) and a rank-16 adapter on all seven projections, runs
  merge       BASE ADAPTER -> MERGED          unmerge   MERGED ADAPTER -> BASE'
  quantize    BASE -> NF4 (double quant)      dequantize NF4 -> dense
  extract     BASE MERGED -> rank-16 adapter  convert   BASE -> bfloat16
  validate    BASE ADAPTER --merged MERGED --static-only (streams both checkpoints; no output)
each in its own process (wall time, CPU time and peak RSS from wait4, common.py), once per `--threads N`
(LORATOOLS_THREADS=N: the threads that share the per-element work, loratools/parallel.py; the reader,
writer and hashing threads run besides), and, interleaved with them, the floor: a torch-free child that
reads the command's input weight files and writes as many bytes as the command wrote, in 16 MiB chunks,
with the same write-back and fsync (none with --no-sync). The ratio command / floor is what issue #19's
targets are stated in (merge, unmerge <= 1.3x; quantize, dequantize <= 1.5x; RSS < 1 GB at 6.7B).
With `--peers`, the other tools run too where they exist (PEFT merge_and_unload + save_pretrained,
transformers + bitsandbytes load_in_4bit + save_pretrained, transformers load + save in bfloat16); they
hold the whole model in memory (~14 GB at 6.7B), so they only run when asked.

Every run's output is fingerprinted (SHA-256 of its files, outside the timing): the outputs of one
command must be byte-identical for every thread count and every repeat, or the benchmark FAILs (exit 1).
The page cache is warmed before every run; `--repeat` runs are interleaved (command at each thread count,
floor, peer, next command, ...) and reported as min and median.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from common import (SIZES, Contender, Failures, dir_bytes, generate_llama, generate_lora, measure,
                    parent_peak_mb, prepare_in_child, python_rss_baseline, Stats, warm)

ROOT = Path(__file__).resolve().parents[1]

# Each command: (inputs it reads, the output other commands read or None, target ratio to the floor)
OPS = ["merge", "unmerge", "quantize", "dequantize", "extract", "convert", "validate"]
TARGET = {"merge": 1.3, "unmerge": 1.3, "quantize": 1.5, "dequantize": 1.5}

FLOOR_CODE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from loratools.io.durability import Durability  # torch-free
ins, out_dir, nbytes, sync = sys.argv[2].split(os.pathsep), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
dur = Durability(sync)
CHUNK, SHARD = 16 << 20, 500 * 10**6
buf = bytearray(CHUNK)
view = memoryview(buf)
fds, fd, off, written = [], None, 0, 0

def put(data):
    global fd, off, written
    while data and written < nbytes:
        if fd is None or off >= SHARD:
            fd = os.open(os.path.join(out_dir, f"part-{len(fds):05d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fds.append(fd)
            off = 0
        n = min(len(data), nbytes - written, SHARD - off)
        k = os.pwrite(fd, data[:n], off)
        dur.start_writeback(fd, off, k)
        off += k
        written += k
        data = data[k:]

if nbytes:
    os.makedirs(out_dir)
last = 0
for path in ins:
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(view)):
            put(view[:k])
            last = k
while written < nbytes:  # an output larger than its inputs (dequantize): the last chunk again
    put(view[:last or CHUNK])
for fd in fds:
    dur.fsync(fd)
    os.close(fd)
if nbytes:
    dur.fsync_path(out_dir)
"""

PEER_CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2], max_shard_size="500MB")
"""


def paths(work: Path, size: str) -> dict[str, Path]:
    tag = "6.7b" if size == "7b" else size  # one generated model for both names
    return {"base": work / f"base-{tag}", "lora": work / f"lora16-{tag}", "merged": work / f"scale-merged-{tag}",
            "nf4": work / f"scale-nf4-{tag}", "out": work / f"scale-out-{tag}", "floor": work / f"scale-floor-{tag}",
            "peer": work / f"scale-peer-{tag}"}


def weight_files(*dirs: Path) -> list[Path]:
    return [f for d in dirs for f in sorted(Path(d).rglob("*.safetensors"))]


def op_spec(op: str, p: dict[str, Path]) -> tuple[list[str], list[Path], Path]:
    """(argv after `loratools`, the directories it reads, where it writes)."""
    out = p["out"]
    return {
        "merge": (["merge", p["base"], p["lora"], "-o", p["merged"]], [p["base"], p["lora"]], p["merged"]),
        "unmerge": (["unmerge", p["merged"], p["lora"], "-o", out], [p["merged"], p["lora"]], out),
        "quantize": (["quantize", p["base"], "-o", p["nf4"], "--nf4"], [p["base"]], p["nf4"]),
        "dequantize": (["dequantize", p["nf4"], "-o", out], [p["nf4"]], out),
        "extract": (["extract", p["base"], p["merged"], "-o", out, "--rank", "16"], [p["base"], p["merged"]], out),
        "convert": (["convert", p["base"], "-o", out, "--dtype", "bfloat16"], [p["base"]], out),
        "validate": (["validate", p["base"], p["lora"], "--merged", p["merged"], "--static-only"],
                     [p["base"], p["lora"], p["merged"]], None),
    }[op]


def peer_cmd(op: str, p: dict[str, Path]) -> list[str] | None:
    sys.path.insert(0, str(Path(__file__).parent))
    if op == "merge":
        from merge import PEFT_CODE
        return [sys.executable, "-c", PEFT_CODE, str(p["base"]), str(p["lora"]), str(p["peer"])]
    if op == "quantize":
        from quantize import HF_CODE
        return [sys.executable, "-c", HF_CODE, str(p["base"]), str(p["peer"]), "nf4", "1", "64", "cpu"]
    if op == "convert":
        return [sys.executable, "-c", PEER_CONVERT, str(p["base"]), str(p["peer"])]
    return None


def fingerprint(d: Path | None) -> str:
    """SHA-256 over the output's files (names and bytes)."""
    if d is None:
        return "-"
    h = hashlib.sha256()
    for f in sorted(x for x in Path(d).rglob("*") if x.is_file()):
        h.update(str(f.relative_to(d)).encode())
        with open(f, "rb", buffering=0) as fh:
            while b := fh.read(1 << 24):
                h.update(b)
    return h.hexdigest()


def run_once(name: str, cmd: list[str], inputs: list[Path], output: Path | None, env=None):
    if output is not None:
        shutil.rmtree(output, ignore_errors=True)
    warm(*inputs)
    return measure(name, [str(c) for c in cmd], env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="0.75b", choices=sorted(SIZES))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="LORATOOLS_THREADS values to run each command with (default: 1 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS,
                    help="commands to run (unmerge, extract and validate read merge's output, dequantize "
                         "quantize's: give those too)")
    ap.add_argument("--peers", action="store_true", help="also run the other tools (whole model in memory)")
    ap.add_argument("--no-sync", action="store_true", help="no fsync, for ours and for the floor")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where loratools computes (every command but convert takes --device); default cpu")
    ap.add_argument("--work", default="/tmp/loratools-bench")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = paths(Path(args.work), args.size)
    if args.prepare_only:
        tag = "6.7b" if args.size == "7b" else args.size
        generate_llama(p["base"], tag)
        generate_lora(p["lora"], tag, r=16, alpha=32, base_name=str(p["base"]))
        return
    for op, need in (("unmerge", "merge"), ("extract", "merge"), ("validate", "merge"), ("dequantize", "quantize")):
        if op in args.ops and need not in args.ops and not (p["merged"] if need == "merge" else p["nf4"]).exists():
            ap.error(f"{op} reads {need}'s output: add {need} to --ops")
    args.ops = [op for op in OPS if op in args.ops]  # dependency order
    args.threads = list(dict.fromkeys(args.threads))  # `1 2 $(nproc)` on a 2-core machine: each once
    prepare_in_child()  # Note: a quiet parent (common.py): the generators run in a child
    sync = [] if not args.no_sync else ["--no-sync"]
    baseline = python_rss_baseline()
    stats: dict[tuple[str, str], Stats] = {}
    digests: dict[str, set] = {}
    out_bytes: dict[str, int] = {}
    for i in range(args.repeat):
        for op in args.ops:
            argv, inputs, output = op_spec(op, p)
            shards = ["--max-shard-size", "500MB"] if op not in ("extract", "validate") else []
            device = ["--device", args.device] if op != "convert" else []
            cmd = [sys.executable, "-m", "loratools", *argv, *shards, *device, *(["--force"] if output else []),
                   *(sync if output else [])]
            for n in args.threads:
                key = (op, f"loratools, {n} thread{'s' if n > 1 else ''}")
                r = run_once(key[1], cmd, inputs, output, {"LORATOOLS_THREADS": str(n), "PYTHONPATH": str(ROOT)})
                stats.setdefault(key, Stats(key[1])).runs.append(r)
                digests.setdefault(op, set()).add(fingerprint(output))
                out_bytes[op] = dir_bytes(output) if output is not None else 0
                print(f"  run {i + 1}/{args.repeat}  {op:10s} {key[1]:22s} {r.seconds:8.2f} s {r.cpu_seconds:7.2f} CPU-s "
                      f"{r.peak_rss_mb:7.0f} MB", file=sys.stderr, flush=True)
            if output is not None and output not in (p["merged"], p["nf4"]):
                shutil.rmtree(output, ignore_errors=True)  # disk: only what later commands read is kept
            floor = [sys.executable, "-c", FLOOR_CODE, str(ROOT),
                     os.pathsep.join(str(f) for f in weight_files(*inputs)), str(p["floor"]), str(out_bytes[op]),
                     "0" if args.no_sync else "1"]
            r = run_once("floor", floor, inputs, p["floor"])
            shutil.rmtree(p["floor"], ignore_errors=True)
            stats.setdefault((op, "floor"), Stats("floor")).runs.append(r)
            print(f"  run {i + 1}/{args.repeat}  {op:10s} {'copy+sync floor':22s} {r.seconds:8.2f} s", file=sys.stderr,
                  flush=True)
            peer = peer_cmd(op, p) if args.peers else None
            if peer is not None:
                r = run_once("peer", peer, inputs, p["peer"])
                shutil.rmtree(p["peer"], ignore_errors=True)
                stats.setdefault((op, "peer"), Stats("peer")).runs.append(r)
                print(f"  run {i + 1}/{args.repeat}  {op:10s} {'peer':22s} {r.seconds:8.2f} s {r.peak_rss_mb:7.0f} MB",
                      file=sys.stderr, flush=True)
    report(args, stats, digests, out_bytes, baseline, p)


def report(args, stats, digests, out_bytes, baseline, p) -> None:
    checks = Failures()
    size = dir_bytes(p["base"])
    print(f"== scale: {args.size} fp16 Llama-style ({size / 1e9:.2f} GB), rank-16 adapter on 7 projections, "
          f"device {args.device}; "
          f"{args.repeat} interleaved runs, min / median; {'no fsync' if args.no_sync else 'durable (fsync)'}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; import baseline {baseline:.0f} MB RSS; "
          f"measuring parent's peak {parent_peak_mb():.0f} MB")
    head = f"{'command':11s}{'who':24s}{'seconds':>16s}{'CPU-s':>8s}{'RSS MB':>8s}{'x floor':>9s}{'target':>8s}"
    print(head)
    rows = []
    for op in args.ops:
        floor = stats[(op, "floor")]
        for (o, who), s in stats.items():
            if o != op:
                continue
            ratio = s.median() / floor.median() if floor.median() > 0 else float("nan")
            target = TARGET.get(op) if who.startswith("loratools") else None
            print(f"{op:11s}{who:24s}{s.min():8.2f}{s.median():8.2f}{s.median('cpu_seconds'):8.1f}"
                  f"{s.median('peak_rss_mb'):8.0f}{ratio:9.2f}{('<= %.1f' % target) if target else '':>8s}")
            rows.append({"op": op, "who": who, "ratio_to_floor_median": ratio, "target": target,
                         "output_bytes": out_bytes.get(op), **s.summary()})
        if (op, "peer") in stats:
            ours = min((s for (o, w), s in stats.items() if o == op and w.startswith("loratools")),
                       key=lambda s: s.median())
            peer = stats[(op, "peer")]
            print(f"{'':11s}peer / fastest loratools: {peer.median() / ours.median():.2f}x time, "
                  f"{peer.median('peak_rss_mb') / ours.median('peak_rss_mb'):.1f}x RSS")
        checks.check(len(digests[op]) == 1, f"{op}: one output for every thread count and repeat "
                                            f"({len(digests[op])} distinct)")
    for op, target in TARGET.items():
        for (o, who), s in stats.items():
            if o == op and who.startswith("loratools"):
                ratio = s.median() / stats[(op, "floor")].median()
                print(f"target {op} <= {target}x floor, {who}: {'met' if ratio <= target else 'MISSED'} ({ratio:.2f}x)")
    worst = max(s.median("peak_rss_mb") for (o, w), s in stats.items() if w.startswith("loratools"))
    print(f"largest median peak RSS of loratools: {worst:.0f} MB (target < 1024 MB at 6.7B: "
          f"{'met' if worst < 1024 else 'MISSED'})")
    doc = {"size": args.size, "device": args.device, "bytes": size, "repeat": args.repeat, "threads": args.threads, "sync": not args.no_sync,
           "cores": os.cpu_count(), "baseline_rss_mb": baseline, "rows": rows}
    print(json.dumps(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    checks.exit()


if __name__ == "__main__":
    main()
