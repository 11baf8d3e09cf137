"""Shared pieces of the benchmarks: generated Llama-style checkpoints and side-by-side measurement.

Every benchmark runs each contender in its own subprocess and reads that child's wall time, CPU time
and peak RSS (os.wait4's rusage), so the numbers cannot leak into each other. The contenders run
`--repeat` times, interleaved (ours, theirs, ours, theirs, ...) so that a change in the machine's load
hits both sides alike, each run after the same page-cache warm-up; the reports give min and median.

Note: a quiet parent.
    A child's peak RSS (wait4's ru_maxrss) starts from its parent's peak at fork/exec: the kernel
    carries the parent's high-water mark into the child's image. So the measuring process must stay
    small: it generates nothing (the inputs are made by a child, `prepare_in_child`) and imports no
    torch until every contender has run (this module imports torch only inside the generators).
    `report` prints the parent's own peak, the floor under every reading.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# hidden 2048, 12 layers, MLP 5632, vocab 32000: 0.75B parameters, 1.5 GB in fp16
SIZES = {
    # Llama-2-7B's shapes: 6.7B parameters, 13.5 GB in fp16 (benchmarks/scale.py; "7b" is the same model)
    "6.7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32),
    "7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32),
    # two of its layers (1.3 GB): the 7B model's tensors, hence its peak RSS, without its 13.5 GB of writes
    "7b-2layers": dict(hidden=4096, layers=2, intermediate=11008, vocab=32000, heads=32),
    "0.75b": dict(hidden=2048, layers=12, intermediate=5632, vocab=32000, heads=16),
    "0.35b": dict(hidden=2048, layers=4, intermediate=5632, vocab=32000, heads=16),
    "0.1b": dict(hidden=1024, layers=6, intermediate=2816, vocab=16000, heads=8),
    "tiny": dict(hidden=256, layers=2, intermediate=704, vocab=1000, heads=4),
}


def llama_shapes(hidden, layers, intermediate, vocab, heads):
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{n}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(hidden, layers, intermediate, vocab, heads, dtype="float16"):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": dtype, "dtype": dtype,
        "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
    }


def generate_llama(out: Path, size: str = "0.75b", dtype=None, seed: int = 0,
                   max_shard_size: int = 500 * 10**6, perturb=None) -> Path:
    """Write a random Llama-style checkpoint tensor by tensor (never the whole model in memory).

    `perturb(name, tensor) -> tensor` lets a caller derive a 'fine-tuned' twin with the same seed.
    Re-uses an existing directory with a matching marker, so repeated benchmark runs are cheap.
    dtype: a torch dtype (default float16).
    """
    import torch

    from loratools.io import ShardWriter, TensorSpec

    dtype = torch.float16 if dtype is None else dtype
    cfg = SIZES[size]
    marker = out / ".generated"
    tag = json.dumps({"size": size, "dtype": str(dtype), "seed": seed, "perturb": getattr(perturb, "tag", None)})
    if marker.exists() and marker.read_text() == tag:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    shapes = llama_shapes(**cfg)
    specs = [TensorSpec(n, dtype, s) for n, s in shapes.items()]
    w = ShardWriter(out, specs, max_shard_size=max_shard_size)
    g = torch.Generator().manual_seed(seed)
    for n, s in shapes.items():
        if len(s) == 1:
            t = torch.ones(s)
        else:
            t = torch.randn(s, generator=g) * (1.0 / math.sqrt(s[1]))
        if perturb is not None:
            t = perturb(n, t)
        w.write(n, t.to(dtype))
        del t
    w.close()
    (out / "config.json").write_text(json.dumps(llama_config(**cfg, dtype=str(dtype).removeprefix("torch.")), indent=2))
    marker.write_text(tag)
    return out


def generate_lora(out: Path, base_size: str = "0.75b", r: int = 16, alpha: int = 32, seed: int = 1,
                  targets=PROJ, base_name: str = "generated") -> Path:
    """A PEFT-format rank-r adapter on the given projections of a generated model (B non-zero)."""
    import torch

    from loratools.adapter import PREFIX, adapter_config, write_adapter

    cfg = SIZES[base_size]
    shapes = llama_shapes(**cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, s in shapes.items():
        mod = n.removesuffix(".weight")
        if len(s) == 2 and mod.rsplit(".", 1)[-1] in targets:
            out_f, in_f = s
            tensors[f"{PREFIX}{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
            tensors[f"{PREFIX}{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(out, adapter_config(r=r, lora_alpha=alpha, target_modules=list(targets),
                                      base_model_name_or_path=base_name), tensors)
    return out


def prepare_in_child() -> None:
    """Run this script again with `--prepare-only` appended, in a child that generates the inputs and
    exits (see `Note: a quiet parent`). Every script takes that flag and then only generates."""
    if subprocess.run([sys.executable, sys.argv[0], *sys.argv[1:], "--prepare-only"]).returncode != 0:
        raise SystemExit("FAIL: generating the inputs failed (see above)")


def add_common_args(ap, default_size: str = "0.75b") -> None:
    ap.add_argument("--size", default=default_size, choices=sorted(SIZES),
                    help="generated model: " + ", ".join(f"{k} (hidden {v['hidden']}, {v['layers']} layers)"
                                                         for k, v in SIZES.items()))
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each contender, interleaved (ours, theirs, ours, ...); min and median reported")
    ap.add_argument("--work", default="/tmp/loratools-bench")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)


@dataclass
class Run:
    name: str
    seconds: float
    peak_rss_mb: float
    returncode: int
    output: str
    cpu_seconds: float = 0.0


def measure(name: str, cmd: list[str], env: dict | None = None) -> Run:
    """Run cmd in a child process; wall time, CPU time (user + system) and the child's own peak RSS."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                         text=True)
    out_chunks = []
    # read output while waiting so a chatty child cannot block on a full pipe
    for line in p.stdout:
        out_chunks.append(line)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    run = Run(name, seconds, usage.ru_maxrss / 1024, p.returncode, "".join(out_chunks),
              usage.ru_utime + usage.ru_stime)
    if run.returncode != 0:
        print(run.output[-3000:], file=sys.stderr)
        raise SystemExit(f"FAIL: {name} failed with exit code {run.returncode}")
    return run


def warm(*dirs: Path) -> None:
    """Read the inputs once so that every run starts with them in the page cache (whoever ran first
    would otherwise pay the cold reads alone)."""
    for d in dirs:
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(1 << 24):
                        pass


@dataclass
class Contender:
    """One side of a comparison: its command, the inputs to warm before each run and the output
    directory to remove before each run (so every run writes from scratch)."""
    name: str
    cmd: list[str]
    inputs: tuple = ()
    output: Path | None = None
    env: dict | None = None


@dataclass
class Stats:
    """Every run of one contender; min and median of wall time, CPU time and peak RSS."""
    name: str
    runs: list = field(default_factory=list)
    parent_peak_mb: float = 0.0  # the measuring process's peak RSS when these runs were made

    def _vals(self, attr):
        return [getattr(r, attr) for r in self.runs]

    def min(self, attr="seconds"):
        return min(self._vals(attr))

    def median(self, attr="seconds"):
        return statistics.median(self._vals(attr))

    @property
    def last(self) -> Run:
        return self.runs[-1]

    def summary(self) -> dict:
        return {"name": self.name, "runs": len(self.runs),
                **{f"{a}_{k}": getattr(self, k)(a) for a in ("seconds", "cpu_seconds", "peak_rss_mb")
                   for k in ("min", "median")},
                "seconds_each": self._vals("seconds"), "peak_rss_mb_each": self._vals("peak_rss_mb")}


def run_interleaved(contenders: list[Contender], repeat: int) -> dict[str, Stats]:
    """Run the contenders `repeat` times in turn (a, b, c, a, b, c, ...), each run after warming its
    inputs and removing its output; returns name -> Stats."""
    stats = {c.name: Stats(c.name) for c in contenders}
    for i in range(repeat):
        for c in contenders:
            if c.output is not None:
                shutil.rmtree(c.output, ignore_errors=True)
            warm(*c.inputs)
            r = measure(c.name, c.cmd, c.env)
            stats[c.name].runs.append(r)
            print(f"  run {i + 1}/{repeat}  {c.name:34s} {r.seconds:8.2f} s {r.cpu_seconds:8.2f} CPU-s "
                  f"{r.peak_rss_mb:8.0f} MB", file=sys.stderr, flush=True)
    for s in stats.values():
        s.parent_peak_mb = parent_peak_mb()
    return stats


def parent_peak_mb() -> float:
    """This (measuring) process's own peak RSS: the floor under every child's reading."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(title: str, ours: Stats, theirs: Stats, *, size_bytes: int | None = None, extra: dict | None = None) -> dict:
    """Print min and median of each side and the ratios of the medians (and of the mins)."""
    speed = theirs.median() / ours.median()
    speed_min = theirs.min() / ours.min()
    mem = ours.median("peak_rss_mb") / theirs.median("peak_rss_mb")
    mem_min = ours.min("peak_rss_mb") / theirs.min("peak_rss_mb")
    n = len(ours.runs)
    lines = [f"== {title}",
             f"{n} runs each, interleaved; seconds and peak RSS as min / median",
             f"{'':34s}{'seconds':>18s}{'CPU-seconds':>18s}{'peak RSS MB':>16s}"]
    for s in (ours, theirs):
        lines.append(f"{s.name:34s}{s.min():9.2f}{s.median():9.2f}{s.min('cpu_seconds'):9.1f}"
                     f"{s.median('cpu_seconds'):9.1f}{s.min('peak_rss_mb'):8.0f}{s.median('peak_rss_mb'):8.0f}")
    lines.append(f"speed-up (theirs/ours): median {speed:.2f}x (min {speed_min:.2f}x)   "
                 f"RSS ratio (ours/theirs): median {mem:.3f} (min {mem_min:.3f})")
    if size_bytes:
        lines.append(f"checkpoint size: {size_bytes / 1e6:.0f} MB")
    lines.append(f"measuring parent's peak RSS during the runs (floor under each reading): {ours.parent_peak_mb:.0f} MB; "
                 f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n".join(lines), flush=True)
    return {"title": title, "ours": ours.summary(), "theirs": theirs.summary(), "speedup_median": speed,
            "speedup_min": speed_min, "rss_ratio_median": mem, "rss_ratio_min": mem_min,
            "parent_peak_rss_mb": ours.parent_peak_mb, **(extra or {})}


def no_sync_report(nosync: Stats, theirs: Stats) -> dict:
    """Print and return the `--no-sync` runs of ours against theirs. We fsync outputs by default and the
    other tools do not, so this is the like-for-like figure; every benchmark reports both."""
    speed = theirs.median() / nosync.median()
    speed_min = theirs.min() / nosync.min()
    print(f"{nosync.name} (no fsync, like save_pretrained): {nosync.min():.2f} / {nosync.median():.2f} s, "
          f"{nosync.median('peak_rss_mb'):.0f} MB median peak RSS, speed-up median {speed:.2f}x "
          f"(min {speed_min:.2f}x)", flush=True)
    return nosync.summary() | {"speedup_median": speed, "speedup_min": speed_min}


class Failures:
    """Checks that make a benchmark fail: each prints a FAIL line at once; `exit()` ends with status 1
    if any failed (after the report has been printed)."""

    def __init__(self):
        self.failed = []

    def check(self, ok: bool, what: str) -> bool:
        print(f"{'ok' if ok else 'FAIL'}: {what}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok

    def exit(self) -> None:
        if self.failed:
            print(f"FAIL: {len(self.failed)} check(s) failed: " + "; ".join(self.failed), flush=True)
            raise SystemExit(1)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def largest_tensor_mb(size: str, bytes_per_value: int = 2) -> float:
    return max(bytes_per_value * math.prod(s) for s in llama_shapes(**SIZES[size]).values()) / 2**20


def python_rss_baseline() -> float:
    """Peak RSS of a Python that only imports what loratools imports (the fixed cost)."""
    r = measure("baseline", [sys.executable, "-c", "import torch, loratools.cli"])
    return r.peak_rss_mb
