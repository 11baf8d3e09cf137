"""Bad input: one line naming the file (and tensor), exit 1 (2 for usage), no traceback unless --debug."""
import json
import shutil
import struct

import pytest

from conftest import FIXTURES, LLAMA, run_cli


def assert_one_line(result, code, *needles):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_truncated_shard(copy_fixture):
    d = copy_fixture("tiny-llama")
    shard = d / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    r = run_cli("inspect", d, expect=None)
    assert_one_line(r, 1, "model-00002-of-00003.safetensors", "truncated")


def test_corrupt_header(copy_fixture):
    d = copy_fixture("tiny-gpt2")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\x00\xff{x"
    f.write_bytes(bytes(data))
    assert_one_line(run_cli("inspect", d, expect=None), 1, "model.safetensors", "header")


def test_header_claiming_huge_tensor_fails_before_allocating(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}).encode()
    f = tmp_path / "huge.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert_one_line(run_cli("inspect", f, expect=None), 1, "huge.safetensors", "tensor w", "truncated")


def test_missing_shard(copy_fixture):
    d = copy_fixture("tiny-llama")
    (d / "model-00003-of-00003.safetensors").unlink()
    assert_one_line(run_cli("inspect", d, expect=None), 1, "model.safetensors.index.json",
                    "model-00003-of-00003.safetensors", "missing")


def test_index_disagrees_with_shards(copy_fixture):
    d = copy_fixture("tiny-llama")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    key = next(iter(idx["weight_map"]))
    other = next(v for v in sorted(set(idx["weight_map"].values())) if v != idx["weight_map"][key])
    idx["weight_map"][key] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert_one_line(run_cli("inspect", d, expect=None), 1, key, other)


def test_neither_checkpoint_nor_adapter(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line(run_cli("inspect", tmp_path, expect=None), 1, str(tmp_path), "neither a checkpoint")


def test_adapter_config_not_lora(copy_fixture):
    d = copy_fixture("llama-lora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "LOHA"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line(run_cli("inspect", d, expect=None), 1, "adapter_config.json", "LOHA", "LoRA")


def test_config_not_json(copy_fixture):
    d = copy_fixture("tiny-gpt2")
    (d / "config.json").write_text("{not json")
    assert_one_line(run_cli("inspect", d, expect=None), 1, "config.json", "not valid JSON")


def test_pickle_checkpoint_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_one_line(run_cli("inspect", tmp_path, expect=None), 1, "pytorch_model.bin", "convert")


def test_json_error_object_on_stdout(tmp_path):
    r = run_cli("inspect", tmp_path / "nope", "--json", expect=1)
    doc = json.loads(r.stdout)
    assert doc["error"]["type"] == "input" and doc["error"]["file"].endswith("nope")


def test_usage_error_exit_2_one_line():
    r = run_cli("convert", LLAMA, expect=None)
    assert_one_line(r, 2, "-o")
    r = run_cli("convert", LLAMA, "-o", "/tmp/x", "--max-shard-size", "lots", expect=None)
    assert_one_line(r, 2, "lots")


def test_debug_shows_traceback(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "loratools", "--debug", "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr
    p = subprocess.run([sys.executable, "-m", "loratools", "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
