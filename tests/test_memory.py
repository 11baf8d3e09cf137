"""Reading and rewriting holds a couple of tensors, not the checkpoint: peak RSS measured in a child process."""
import json
import os
import subprocess
import sys

import torch

from loratools.io import ShardWriter, TensorSpec

CHILD = r"""
import resource, sys, json
import torch, loratools.cli
from loratools.cli import cli
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = cli.main(sys.argv[1:], standalone_mode=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "base_kb": base, "peak_kb": peak}))
"""


def test_rewrite_peak_rss_is_a_few_tensors(tmp_path):
    n, shape = 48, (1024, 1024)  # 48 tensors of 4 MiB: a 192 MiB checkpoint, 48x one tensor
    src = tmp_path / "big"
    src.mkdir()
    specs = [TensorSpec(f"layer.{i}.weight", torch.float32, shape) for i in range(n)]
    w = ShardWriter(src, specs, max_shard_size=64 * 2**20)
    for i in range(n):
        w.write(f"layer.{i}.weight", torch.full(shape, float(i)))
    w.close()
    tensor_mb = 4.0
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", CHILD, "convert", str(src), "-o", str(out), "--dtype", "bfloat16",
                        "--max-shard-size", "64MiB"], capture_output=True, text=True, env={**os.environ})
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert doc["code"] == 0
    extra_mb = (doc["peak_kb"] - doc["base_kb"]) / 1024
    checkpoint_mb = n * tensor_mb
    print(f"peak RSS above imports: {extra_mb:.1f} MiB for a {checkpoint_mb:.0f} MiB checkpoint")
    # one tensor read + its cast copy, plus allocator slack; nowhere near the checkpoint
    assert extra_mb < 3 * tensor_mb + 24, extra_mb
