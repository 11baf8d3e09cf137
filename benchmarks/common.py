"""Shared pieces of the benchmarks: generated Llama-style checkpoints and side-by-side measurement.

Every benchmark runs each contender in its own subprocess and reads that child's wall time and peak
RSS (os.wait4's rusage), so the numbers cannot leak into each other.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loratools.io import ShardWriter, TensorSpec  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# hidden 2048, 12 layers, MLP 5632, vocab 32000: 0.75B parameters, 1.5 GB in fp16
SIZES = {
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


def generate_llama(out: Path, size: str = "0.75b", dtype=torch.float16, seed: int = 0,
                   max_shard_size: int = 500 * 10**6, perturb=None) -> Path:
    """Write a random Llama-style checkpoint tensor by tensor (never the whole model in memory).

    `perturb(name, tensor) -> tensor` lets a caller derive a 'fine-tuned' twin with the same seed.
    Re-uses an existing directory with a matching marker, so repeated benchmark runs are cheap.
    """
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


@dataclass
class Run:
    name: str
    seconds: float
    peak_rss_mb: float
    returncode: int
    output: str


def measure(name: str, cmd: list[str], env: dict | None = None) -> Run:
    """Run cmd in a child process; wall time and the child's own peak RSS."""
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
    run = Run(name, seconds, usage.ru_maxrss / 1024, p.returncode, "".join(out_chunks))
    if run.returncode != 0:
        print(run.output[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed with exit code {run.returncode}")
    return run


def report(title: str, ours: Run, theirs: Run, *, size_bytes: int | None = None, extra: dict | None = None) -> dict:
    speed = theirs.seconds / ours.seconds
    mem = ours.peak_rss_mb / theirs.peak_rss_mb
    lines = [f"== {title}",
             f"{'':28s}{'seconds':>10s}{'peak RSS MB':>14s}",
             f"{ours.name:28s}{ours.seconds:10.2f}{ours.peak_rss_mb:14.0f}",
             f"{theirs.name:28s}{theirs.seconds:10.2f}{theirs.peak_rss_mb:14.0f}",
             f"speed-up (theirs/ours): {speed:.2f}x   RSS ratio (ours/theirs): {mem:.3f}"]
    if size_bytes:
        lines.append(f"checkpoint size: {size_bytes / 1e6:.0f} MB")
    print("\n".join(lines), flush=True)
    doc = {"title": title, "ours": ours.__dict__ | {"output": None}, "theirs": theirs.__dict__ | {"output": None},
           "speedup": speed, "rss_ratio": mem, **(extra or {})}
    return doc


def no_sync_report(nosync: Run, theirs: Run) -> dict:
    """Print and return the `--no-sync` run of ours against theirs. We fsync outputs by default and the
    other tools do not, so this is the like-for-like figure; every benchmark reports both."""
    speed = theirs.seconds / nosync.seconds
    print(f"{nosync.name} (no fsync, like save_pretrained): {nosync.seconds:.2f} s, "
          f"{nosync.peak_rss_mb:.0f} MB peak RSS, speed-up {speed:.2f}x", flush=True)
    return nosync.__dict__ | {"output": None, "speedup": speed}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def python_rss_baseline() -> float:
    """Peak RSS of a Python that only imports what loratools imports (the fixed cost)."""
    r = measure("baseline", [sys.executable, "-c", "import torch, loratools.cli"])
    return r.peak_rss_mb
