"""Byte-level fingerprint of every writing command's output on the shipped fixtures.

Used to prove that a refactor changed no output: run with `--save FILE` before, `--check FILE` after.
Each line is `<case> <file> <sha256>`; provenance records hold no paths or times, so the bytes are
deterministic (same inputs and flags, same output bytes).

    python benchmarks/golden.py --save /tmp/golden.txt
    python benchmarks/golden.py --check /tmp/golden.txt
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
F = ROOT / "fixtures"

# (case name, argv after `loratools`, with {out} and {tmp} placeholders); order matters where a case
# reads an earlier case's output.
CASES = [
    ("merge-llama", ["merge", F / "tiny-llama", F / "llama-lora", "-o", "{tmp}/merge-llama"]),
    ("merge-multi", ["merge", F / "tiny-llama", F / "llama-lora", F / "llama-rslora", "--weight", "0.7",
                     "--weight", "0.3", "-o", "{tmp}/merge-multi", "--dtype", "bfloat16"]),
    ("merge-patterns", ["merge", F / "tiny-llama", F / "llama-patterns", "-o", "{tmp}/merge-patterns"]),
    ("merge-dora", ["merge", F / "tiny-llama", F / "llama-dora", "-o", "{tmp}/merge-dora"]),
    ("merge-embed", ["merge", F / "tiny-llama", F / "llama-embed", "-o", "{tmp}/merge-embed"]),
    ("merge-mts", ["merge", F / "tiny-llama", F / "llama-mts", "-o", "{tmp}/merge-mts"]),
    ("merge-gpt2", ["merge", F / "tiny-gpt2", F / "gpt2-lora", "-o", "{tmp}/merge-gpt2"]),
    ("merge-gpt2-bias", ["merge", F / "tiny-gpt2", F / "gpt2-bias", "-o", "{tmp}/merge-gpt2-bias"]),
    ("unmerge-llama", ["unmerge", "{tmp}/merge-llama", F / "llama-lora", "-o", "{tmp}/unmerge-llama"]),
    ("unmerge-dora", ["unmerge", "{tmp}/merge-dora", F / "llama-dora", "-o", "{tmp}/unmerge-dora"]),
    ("unmerge-gpt2", ["unmerge", "{tmp}/merge-gpt2-bias", F / "gpt2-bias", "-o", "{tmp}/unmerge-gpt2"]),
    ("quantize-llama", ["quantize", F / "tiny-llama", "-o", "{tmp}/q-llama", "--nf4"]),
    ("quantize-gpt2", ["quantize", F / "tiny-gpt2", "-o", "{tmp}/q-gpt2", "--nf4"]),
    ("dequantize-llama", ["dequantize", "{tmp}/q-llama", "-o", "{tmp}/dq-llama"]),
    ("merge-nf4", ["merge", "{tmp}/q-llama", F / "llama-lora", "-o", "{tmp}/merge-nf4"]),
    ("merge-nf4-gpt2", ["merge", "{tmp}/q-gpt2", F / "gpt2-lora", "-o", "{tmp}/merge-nf4-gpt2"]),
    ("extract-llama", ["extract", F / "tiny-llama", F / "tiny-llama-tuned", "-o", "{tmp}/ex-llama", "--rank", "8"]),
    ("extract-gpt2", ["extract", F / "tiny-gpt2", F / "tiny-gpt2-tuned", "-o", "{tmp}/ex-gpt2", "--rank", "4"]),
    ("resize", ["resize", F / "llama-lora", "-o", "{tmp}/resize", "--rank", "4"]),
    ("combine-linear", ["combine", F / "llama-lora", F / "llama-rslora", "-o", "{tmp}/c-linear",
                        "--method", "linear", "--rank", "8"]),
    ("combine-cat", ["combine", F / "llama-lora", F / "llama-rslora", "-o", "{tmp}/c-cat", "--method", "cat",
                     "--weight", "1", "--weight", "0.5"]),
    ("combine-ties", ["combine", F / "llama-lora", F / "llama-rslora", "-o", "{tmp}/c-ties",
                      "--method", "ties", "--density", "0.5", "--rank", "8"]),
    ("combine-dare", ["combine", F / "llama-lora", F / "llama-rslora", "-o", "{tmp}/c-dare",
                      "--method", "dare_ties", "--density", "0.5", "--rank", "8", "--seed", "1"]),
    ("convert", ["convert", F / "tiny-llama", "-o", "{tmp}/convert", "--dtype", "bfloat16"]),
]


def run(tmp: Path) -> list[str]:
    lines = []
    exe = str(Path(sys.executable).with_name("loratools"))
    for name, argv in CASES:
        args = [str(a).replace("{tmp}", str(tmp)) for a in argv]
        r = subprocess.run([exe, *args, "--no-sync"], capture_output=True, text=True)
        if r.returncode != 0:
            lines.append(f"{name} EXIT {r.returncode} {r.stderr.strip().splitlines()[-1:]}")
            continue
        out = Path(args[args.index("-o") + 1])
        for f in sorted(p for p in out.rglob("*") if p.is_file()):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            lines.append(f"{name} {f.relative_to(out)} {digest}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--check")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines = run(Path(tmp))
    if a.save:
        Path(a.save).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} files fingerprinted -> {a.save}")
        return 0
    want = Path(a.check).read_text().splitlines()
    bad = sorted(set(want) ^ set(lines))
    for line in bad:
        print(("- " if line in want else "+ ") + line)
    print(f"{len(lines)} files, {len(bad)} lines differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
