"""Our safetensors reader (io/safetensors_format.read_tensor via Checkpoint.iter_tensors) against
safetensors' own `safe_open(..., framework="pt", backend="pread")` (safetensors >= 0.8) and its default
mmap backend: every tensor of one generated file, read into CPU tensors, page cache warm.

Each contender runs `--repeat` times, interleaved (ours, pread, mmap, ours, ...), timed in this process
around the read loop only (opening and header parsing included); min and median are printed. Peak RSS
is each contender's own child process (wait4's ru_maxrss), one read each, minus a child that only
imports torch.

    python benchmarks/read_safetensors.py                 # ~0.34 GB file (Llama shapes, 2 layers)
    python benchmarks/read_safetensors.py --repeat 9 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Llama-style shapes (hidden 2048, MLP 5632, vocab 16000), 2 layers: 0.34 GB of float16 in one file
SHAPES = dict(hidden=2048, layers=2, intermediate=5632, vocab=16000, heads=16)


def generate(path: Path) -> Path:
    import math

    import torch

    from benchmarks.common import llama_shapes
    from loratools.io import ShardWriter, TensorSpec

    marker = path.parent / ".generated-read"
    if path.exists() and marker.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(**SHAPES)
    w = ShardWriter(path.parent, [TensorSpec(n, torch.float16, s) for n, s in shapes.items()],
                    filename=path.name, max_shard_size=1 << 40)
    g = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) / math.sqrt(s[1])
        w.write(n, t.half())
    w.close()
    marker.write_text("ok")
    return path


def touch(t) -> int:
    """Read one byte per 4 KiB page, so a memory-mapped tensor is really read (a copy costs ~nothing more)."""
    return int(t.reshape(-1).view(torch_uint8())[::4096].sum()) + t.numel() * t.element_size()


def torch_uint8():
    import torch

    return torch.uint8


def read_ours(path: Path) -> int:
    from loratools.io import Checkpoint

    with Checkpoint(path) as ck:  # the same pattern as safe_open's below: one tensor alive at a time
        return sum(touch(ck.read(name)) for name in ck.keys())


def read_safe_open(path: Path, backend: str) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", backend=backend) as f:
        return sum(touch(f.get_tensor(name)) for name in f.offset_keys())


CONTENDERS = {
    "ours (readinto per tensor)": read_ours,
    "safe_open backend=pread": lambda p: read_safe_open(p, "pread"),
    "safe_open backend=mmap": lambda p: read_safe_open(p, "mmap"),
}


def peak_rss_mb(name: str | None, path: Path) -> float:
    """Peak RSS of a child that imports torch and then (name given) reads the file once."""
    code = ("import sys; sys.path.insert(0, %r); import torch; from benchmarks.read_safetensors import CONTENDERS; "
            "from pathlib import Path; " % str(ROOT)) + (f"CONTENDERS[{name!r}](Path({str(path)!r}))" if name else "")
    p = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"FAIL: {name or 'baseline'} child failed")
    return usage.ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--work", default="/tmp/loratools-bench")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    path = Path(a.work) / "read" / "model.safetensors"
    # Note: a quiet parent (see common.py): a child's peak RSS starts at its parent's, so the file is
    # generated and the peaks are taken in children before this process imports torch or reads anything.
    gen = ("import sys; sys.path.insert(0, %r); from pathlib import Path; "
           "from benchmarks.read_safetensors import generate; generate(Path(%r))" % (str(ROOT), str(path)))
    subprocess.run([sys.executable, "-c", gen], check=True)
    size = path.stat().st_size
    base = peak_rss_mb(None, path)
    rss = {name: peak_rss_mb(name, path) - base for name in CONTENDERS}
    for fn in CONTENDERS.values():  # page cache warm, code paths imported
        fn(path)
    times = {name: [] for name in CONTENDERS}
    for _ in range(a.repeat):
        for name, fn in CONTENDERS.items():
            t0 = time.perf_counter()
            assert fn(path) > 0
            times[name].append(time.perf_counter() - t0)
    doc = {"file_bytes": size, "repeat": a.repeat, "contenders": {}}
    for name, ts in times.items():
        doc["contenders"][name] = {"min_s": min(ts), "median_s": statistics.median(ts),
                                   "peak_rss_over_torch_mb": rss[name]}
        print(f"{name:28s} min {min(ts):.3f} s  median {statistics.median(ts):.3f} s  "
              f"({size / min(ts) / 1e9:.2f} GB/s)  peak RSS +{rss[name]:.0f} MB", flush=True)
    if a.json:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
