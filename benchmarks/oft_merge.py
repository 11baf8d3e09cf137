#!/usr/bin/env python
"""OFT/BOFT merge cost, and why it keeps PEFT's dense product (docs/adapter_types.md, "OFT and BOFT").

    python benchmarks/oft_merge.py [--size 4096] [--block 32]

Prints, for one random fp16 weight [size, size] and a random OFT adapter of blocks `--block` (PEFT's
default Neumann series), the time to build R, merge (W R^T with the dense R, as PEFT) and unmerge (with
torch.linalg.inv of the dense R, as PEFT); BOFT's rotation with 2 butterfly factors; then, for block sizes
16..256, whether a block-wise product (b/in of the work) has the dense product's bits on this machine.
Figures only (kind F): nothing fails.
"""
from __future__ import annotations

import argparse
import time

import torch

from loratools.peft_types import boft, oft


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()
    n, b = args.size, args.block
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(n, n, generator=g) * 0.02).half()
    stored = torch.randn(n // b, b * (b - 1) // 2, generator=g) * 0.05
    R, t_rot = _timed(lambda: oft.rotation(stored, n, oft.OftSettings()))
    acc = W.float()
    _, t_merge = _timed(lambda: oft.merge(acc, R))
    _, t_unmerge = _timed(lambda: oft.unmerge(acc, R))
    print(f"OFT {n} x {n}, b = {b}, {torch.get_num_threads()} threads: rotation {t_rot:.2f} s, merge {t_merge:.2f} s, "
          f"unmerge {t_unmerge:.2f} s; R holds {R.numel() * 4 / 2**20:.0f} MiB")
    _, t_boft = _timed(lambda: boft.rotation(torch.randn(2, n // b, b, b, generator=g) * 0.05))
    print(f"BOFT rotation, 2 butterfly factors of {n // b} blocks of {b}: {t_boft:.2f} s")

    m = min(n, 1024)
    Wm = W[:m, :m].float()
    for bs in (16, 32, 64, 128, 256):
        if m % bs:
            continue
        st = torch.randn(m // bs, bs * (bs - 1) // 2, generator=g) * 0.05
        dense = torch.mm(oft.rotation(st, m, oft.OftSettings()), Wm.t()).t()
        blocks = oft.cayley(st, bs, True, 5)
        blockwise = torch.cat([torch.mm(blocks[j], Wm[:, j * bs:(j + 1) * bs].t()).t() for j in range(m // bs)], 1)
        same = "the same bits as" if torch.equal(dense, blockwise) else "OTHER bits than"
        print(f"block-wise product, {m} x {m}, b = {bs}: {same} the dense one "
              f"({int((dense != blockwise).sum())} of {dense.numel()} float32 elements differ)")


if __name__ == "__main__":
    main()
