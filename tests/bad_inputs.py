"""The bad-input corpus: each case builds its broken inputs from the fixtures (no hand-copied bytes) and
says how loratools must answer. Used by tests/test_bad_inputs.py; run it directly to materialize every
case under a folder for manual poking:

    python tests/bad_inputs.py /tmp/corpus
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"


@dataclass
class Case:
    id: str
    build: Callable[[Path], tuple[list[str], list[Path]]]  # (argv, inputs that must stay untouched)
    code: int  # expected exit code
    needles: tuple[str, ...] = ()  # substrings the one-line error must contain
    json: bool = True  # the command takes --json


def cp(name: str, d: Path) -> Path:
    dst = d / name
    shutil.copytree(FIX / name, dst)
    return dst


def edit_json(path: Path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_tensor(path: Path, key_part: str, fn):
    """Rewrite one safetensors file with fn applied to the first tensor whose key contains key_part."""
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = fn(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})
    return key


# -- builders ------------------------------------------------------------------------------------------------

def truncated_shard(d):
    b = cp("tiny-llama", d)
    s = b / "model-00002-of-00003.safetensors"
    s.write_bytes(s.read_bytes()[:-1000])
    return ["merge", b, FIX / "llama-lora", "-o", d / "out"], [b]


def corrupt_header(d):
    b = cp("tiny-gpt2", d)
    f = b / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbag"
    f.write_bytes(bytes(data))
    return ["convert", b, "-o", d / "out"], [b]


def huge_header(d):
    f = d / "huge.safetensors"
    h = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}}).encode()
    f.write_bytes(struct.pack("<Q", len(h)) + h + bytes(64))
    return ["convert", f, "-o", d / "out"], [f]


def missing_shard(d):
    b = cp("tiny-llama", d)
    (b / "model-00003-of-00003.safetensors").unlink()
    return ["merge", b, FIX / "llama-lora", "-o", d / "out"], [b]


def index_disagrees(d):
    b = cp("tiny-llama", d)
    edit_json(b / "model.safetensors.index.json",
              lambda i: i["weight_map"].update({"model.norm.weight": "model-00001-of-00003.safetensors"}))
    return ["convert", b, "-o", d / "out"], [b]


def config_not_json(d):
    b = cp("tiny-llama", d)
    (b / "config.json").write_text('{"model_type": "llama",')
    return ["merge", b, FIX / "llama-lora", "-o", d / "out"], [b]


def rank_disagrees(d):
    a = cp("llama-lora", d)
    edit_json(a / "adapter_config.json", lambda c: c.update(r=4))
    return ["merge", FIX / "tiny-llama", a, "-o", d / "out"], [a]


def other_architecture(d):
    return ["merge", FIX / "tiny-gpt2", FIX / "llama-lora", "-o", d / "out"], []


def nan_in_adapter(d):
    a = cp("llama-lora", d)
    edit_tensor(a / "adapter_model.safetensors", "layers.1.self_attn.v_proj.lora_B",
                lambda t: t.index_fill(0, torch.tensor([3]), float("nan")))
    return ["merge", FIX / "tiny-llama", a, "-o", d / "out"], [a]


def inf_in_base(d):
    b = cp("tiny-gpt2", d)
    edit_tensor(b / "model.safetensors", "h.1.attn.c_attn.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    return ["merge", b, FIX / "gpt2-lora", "-o", d / "out"], [b]


def non_lora_adapter(d):
    a = cp("llama-lora", d)
    edit_json(a / "adapter_config.json", lambda c: c.update(peft_type="LOKR"))
    return ["merge", FIX / "tiny-llama", a, "-o", d / "out"], [a]


def missing_adapter_weights(d):
    a = cp("llama-lora", d)
    (a / "adapter_model.safetensors").unlink()
    return ["merge", FIX / "tiny-llama", a, "-o", d / "out"], [a]


def pickle_base(d):
    b = d / "pt-model"
    b.mkdir()
    shutil.copy(FIX / "tiny-llama" / "config.json", b)
    (b / "pytorch_model.bin").write_bytes(b"\x80\x04\x95not a real pickle")
    return ["merge", b, FIX / "llama-lora", "-o", d / "out"], [b]


def neither(d):
    e = d / "empty"
    e.mkdir()
    (e / "README.txt").write_text("nothing here")
    return ["inspect", e], [e]


def extract_shapes_differ(d):
    return ["extract", FIX / "tiny-llama", FIX / "tiny-gpt2-tuned", "-o", d / "out", "--rank", "4"], []


def extract_rank_zero(d):
    return ["extract", FIX / "tiny-llama", FIX / "tiny-llama-tuned", "-o", d / "out", "--rank", "0"], []


def resize_negative_rank(d):
    return ["resize", FIX / "llama-lora", "-o", d / "out", "--rank", "-3"], []


def extract_rank_too_large(d):
    return ["extract", FIX / "tiny-llama", FIX / "tiny-llama-tuned", "-o", d / "out", "--rank", "100000"], []


def merge_weight_count(d):
    return ["merge", FIX / "tiny-llama", FIX / "llama-lora", FIX / "llama-rslora", "-o", d / "out",
            "--weight", "0.5"], []


def combine_weight_count(d):
    return ["combine", FIX / "llama-lora", FIX / "llama-rslora", "-o", d / "out", "--method", "cat",
            "--weight", "1", "--weight", "2", "--weight", "3"], []


def combine_density_zero(d):
    return ["combine", FIX / "llama-lora", FIX / "llama-rslora", "-o", d / "out", "--method", "ties",
            "--rank", "8", "--density", "0"], []


def combine_density_above_one(d):
    return ["combine", FIX / "llama-lora", FIX / "llama-rslora", "-o", d / "out", "--method", "dare_linear",
            "--rank", "8", "--density", "1.5"], []


def combine_unknown_method(d):
    return ["combine", FIX / "llama-lora", FIX / "llama-rslora", "-o", d / "out", "--method", "average"], []


def output_inside_input(d):
    b = cp("tiny-llama", d)
    return ["merge", b, FIX / "llama-lora", "-o", b / "merged"], [b]


def output_exists(d):
    out = d / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return ["quantize", FIX / "tiny-llama", "-o", out, "--nf4"], [out]


def read_only_location(d):
    ro = d / "ro"
    ro.mkdir()
    make_read_only(ro)
    return ["convert", FIX / "tiny-gpt2", "-o", ro / "out"], []


def quantized_where_dense(d):
    q = quantized_fixture(d)
    return ["extract", q, FIX / "tiny-llama-tuned", "-o", d / "out", "--rank", "4"], [q]


def dense_where_quantized(d):
    return ["dequantize", FIX / "tiny-llama", "-o", d / "out"], []


def quantize_quantized(d):
    q = quantized_fixture(d)
    return ["quantize", q, "-o", d / "out", "--nf4"], [q]


def validate_wrong_adapter(d):
    return ["validate", FIX / "tiny-gpt2", FIX / "llama-lora"], []


def resize_dora(d):
    return ["resize", FIX / "llama-dora", "-o", d / "out", "--rank", "2"], []


def combine_different_bases(d):
    return ["combine", FIX / "llama-lora", FIX / "gpt2-lora", "-o", d / "out", "--method", "cat"], []


# -- helpers for cases that need privileges or a 4-bit checkpoint -------------------------------------------

_QUANTIZED: dict[str, Path] = {}


def quantized_fixture(d: Path) -> Path:
    """A 4-bit copy of tiny-llama written by loratools itself (cached per session)."""
    if "q" not in _QUANTIZED or not _QUANTIZED["q"].exists():
        from click.testing import CliRunner

        from loratools.cli import cli

        q = Path(d).parent / "_shared-q4"
        if not q.exists():
            r = CliRunner().invoke(cli, ["quantize", str(FIX / "tiny-llama"), "-o", str(q), "--nf4"])
            assert r.exit_code == 0, r.stderr
        _QUANTIZED["q"] = q
    dst = d / "q4"
    shutil.copytree(_QUANTIZED["q"], dst)
    return dst


def make_read_only(path: Path):
    """Read-only for whoever runs the tests: permission bits for users, a read-only bind mount for root."""
    import os
    import subprocess

    if os.geteuid() != 0:
        path.chmod(0o500)
        return
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0
    if not ok:
        raise RuntimeError("cannot make a read-only location as root without mount privileges")


def undo_read_only(path: Path):
    import os
    import subprocess

    if os.geteuid() != 0:
        path.chmod(0o700)
    else:
        subprocess.run(["umount", str(path)], capture_output=True)


CASES = [
    Case("truncated-shard", truncated_shard, 1, ("model-00002-of-00003.safetensors", "truncated")),
    Case("corrupt-header", corrupt_header, 1, ("model.safetensors", "header")),
    Case("huge-header", huge_header, 1, ("huge.safetensors", "tensor w", "truncated", "4398046511200")),
    Case("missing-shard", missing_shard, 1, ("model-00003-of-00003.safetensors", "missing")),
    Case("index-disagrees", index_disagrees, 1, ("model.norm.weight", "index")),
    Case("config-not-json", config_not_json, 1, ("config.json", "not valid JSON")),
    Case("adapter-rank-disagrees", rank_disagrees, 1,
         ("llama-lora/adapter_model.safetensors", "self_attn.k_proj", "r=4", "rank 8")),
    Case("adapter-other-architecture", other_architecture, 1, ("llama-lora", "tiny-gpt2",
                                                          "model.layers.0.self_attn.k_proj.weight", "[32, 64]")),
    Case("nan-in-adapter", nan_in_adapter, 1,
         ("adapter_model.safetensors", "layers.1.self_attn.v_proj.lora_B.weight", "NaN")),
    Case("inf-in-base", inf_in_base, 1, ("tiny-gpt2", "h.1.attn.c_attn.weight", "Inf")),
    Case("non-lora-adapter", non_lora_adapter, 1, ("adapter_config.json", "LOKR", "LORA")),
    Case("missing-adapter-weights", missing_adapter_weights, 1, ("llama-lora", "adapter_model.safetensors")),
    Case("pickle-base", pickle_base, 1, ("pytorch_model.bin", "convert")),
    Case("neither-checkpoint-nor-adapter", neither, 1,
         ("empty", "neither", "model.safetensors", "adapter_config.json")),
    Case("extract-shapes-differ", extract_shapes_differ, 1, ("tiny-gpt2-tuned", "'llama'", "'gpt2'")),
    Case("extract-rank-zero", extract_rank_zero, 2, ("--rank", "0")),
    Case("resize-negative-rank", resize_negative_rank, 2, ("--rank", "-3")),
    Case("extract-rank-too-large", extract_rank_too_large, 2, ("--rank 100000", "rank 64")),
    Case("merge-weight-count", merge_weight_count, 2, ("--weight", "1 times", "2 adapter")),
    Case("combine-weight-count", combine_weight_count, 2, ("3 --weight", "2 adapters")),
    Case("combine-density-zero", combine_density_zero, 2, ("--density", "(0, 1]", "got 0.0")),
    Case("combine-density-above-one", combine_density_above_one, 2, ("--density", "(0, 1]", "got 1.5")),
    Case("combine-unknown-method", combine_unknown_method, 2, ("--method", "'average'", "dare_ties")),
    Case("combine-different-bases", combine_different_bases, 1, ("gpt2-lora", "llama-lora", "tiny-gpt2", "tiny-llama")),
    Case("output-inside-input", output_inside_input, 1, ("tiny-llama/merged", "inside the input")),
    Case("output-exists", output_exists, 1, ("/out", "already exists", "--force")),
    Case("read-only-location", read_only_location, 1, ("ro/out", "cannot write", "permission denied")),
    Case("quantized-where-dense-needed", quantized_where_dense, 1, ("q4", "4-bit", "dequantize")),
    Case("dense-where-quantized-needed", dense_where_quantized, 1, ("tiny-llama", "not a 4-bit")),
    Case("quantize-already-quantized", quantize_quantized, 1, ("q4", "already a 4-bit")),
    Case("validate-wrong-adapter", validate_wrong_adapter, 1,
         ("llama-lora", "tiny-gpt2", "model.layers.0.self_attn.k_proj", "[32, 64]")),
    Case("resize-dora", resize_dora, 1, ("llama-dora", "model.layers.0.mlp.up_proj", "DoRA")),
]


if __name__ == "__main__":
    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        d = dest / case.id
        d.mkdir()
        argv, _ = case.build(d)
        print(case.id, "->", "loratools " + " ".join(map(str, argv)), f"(expect exit {case.code})")
