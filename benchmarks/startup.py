#!/usr/bin/env python
"""Start-up costs: `loratools COMMAND --help` (no torch) against importing torch and the command line.

    python benchmarks/startup.py [--repeat 5]

Each in its own process, `--repeat` times interleaved; prints wall time, CPU time and peak RSS, min and
median:
  loratools merge --help               the command line alone (torch is imported only once a command runs)
  import torch, loratools.cli          what every command pays before its first tensor
A `--help` that imports torch is a FAIL (exit status 1).
"""
from __future__ import annotations

import argparse
import sys

from common import Contender, Failures, run_interleaved

PROBE = "import runpy, sys; sys.argv = ['loratools', 'merge', '--help']\ntry:\n    runpy.run_module('loratools', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('TORCH_IMPORTED', 'torch' in sys.modules)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    runs = run_interleaved([
        Contender("loratools merge --help", [sys.executable, "-m", "loratools", "merge", "--help"]),
        Contender("import torch, loratools.cli", [sys.executable, "-c", "import torch, loratools.cli"]),
        Contender("--help, probing for torch", [sys.executable, "-c", PROBE]),
    ], args.repeat)
    print(f"== start-up, {args.repeat} runs each, interleaved; min / median")
    print(f"{'':34s}{'seconds':>18s}{'CPU-seconds':>18s}{'peak RSS MB':>16s}")
    for s in runs.values():
        print(f"{s.name:34s}{s.min():9.2f}{s.median():9.2f}{s.min('cpu_seconds'):9.2f}{s.median('cpu_seconds'):9.2f}"
              f"{s.min('peak_rss_mb'):8.0f}{s.median('peak_rss_mb'):8.0f}")
    checks = Failures()
    probe = runs["--help, probing for torch"].last.output
    checks.check("TORCH_IMPORTED False" in probe, "`loratools merge --help` does not import torch")
    checks.exit()


if __name__ == "__main__":
    main()
