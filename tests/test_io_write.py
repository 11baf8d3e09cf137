"""The shard writer and the read-and-rewrite path (convert)."""
import json

import pytest
import torch
from safetensors import safe_open

from loratools.io import Checkpoint, ShardWriter, TensorSpec, parse_size
from conftest import FIXTURES, GPT2, LLAMA, run_cli, tree_digest


def random_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(17, 9, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(33, generator=g).to(torch.float16),
        "c": torch.randint(0, 255, (5, 3, 2), generator=g, dtype=torch.uint8),
        "d": torch.randn(128, 64, generator=g),
        "e.empty": torch.zeros(0, 4),
        "f.int": torch.arange(10, dtype=torch.int64),
    }


@pytest.mark.parametrize("budget", [10**9, 4000, 1])
def test_write_read_round_trip_bit_exact(tmp_path, budget):
    tensors = random_tensors()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    w = ShardWriter(tmp_path, specs, max_shard_size=budget, metadata={"note": "x"})
    for k in reversed(list(tensors)):  # arrival order does not matter
        w.write(k, tensors[k])
    files = w.close()
    if budget == 10**9:
        assert files == ["model.safetensors"]
    else:
        assert files[-1] == "model.safetensors.index.json" and len(files) > 2
        index = json.loads((tmp_path / files[-1]).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    ck = Checkpoint(tmp_path)
    for k, t in ck.iter_tensors():
        assert t.dtype == tensors[k].dtype and torch.equal(t, tensors[k])
    # and the reference library agrees, including the metadata
    for shard in ck.shards:
        with safe_open(shard, "pt") as h:
            assert h.metadata() == {"format": "pt", "note": "x"}
            for k in h.keys():
                assert torch.equal(h.get_tensor(k), tensors[k])


def test_final_metadata_keeps_offsets(tmp_path):
    tensors = random_tensors()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    w = ShardWriter(tmp_path, specs, reserve_metadata=200)
    for k, t in tensors.items():
        w.write(k, t)
    w.close(final_metadata={"digest": "f" * 64})
    with safe_open(tmp_path / "model.safetensors", "pt") as h:
        assert h.metadata()["digest"] == "f" * 64 and "~reserve" not in h.metadata()
        assert torch.equal(h.get_tensor("d"), tensors["d"])


def test_writer_rejects_unplanned_and_missing(tmp_path):
    from loratools.errors import LoratoolsError

    w = ShardWriter(tmp_path, [TensorSpec("x", torch.float32, (2,))])
    with pytest.raises(LoratoolsError):
        w.write("x", torch.zeros(3))
    with pytest.raises(LoratoolsError):
        w.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100KB") == 100_000
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("src", [LLAMA, GPT2])
def test_convert_round_trip_is_bit_exact_and_copies_side_files(tmp_path, src):
    out = tmp_path / "out"
    run_cli("convert", src, "-o", out, "--max-shard-size", "60KB")
    a, b = Checkpoint(src), Checkpoint(out)
    assert b.layout == "sharded" and len(b.shards) > 1
    assert a.keys() == b.keys() or set(a.keys()) == set(b.keys())
    for k, t in a.iter_tensors():
        assert torch.equal(t, b.read(k))
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()
    prov = json.loads(b.metadata[b.shards[0].name]["loratools"])
    assert prov["command"] == "convert" and str(tmp_path) not in json.dumps(prov)


def test_convert_is_deterministic(tmp_path):
    run_cli("convert", LLAMA, "-o", tmp_path / "a", "--dtype", "bfloat16")
    run_cli("convert", LLAMA, "-o", tmp_path / "b", "--dtype", "bfloat16")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_converted_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    run_cli("convert", LLAMA, "-o", out, "--dtype", "bfloat16", "--max-shard-size", "50KB")
    ref = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(out)
    assert got.dtype == torch.bfloat16
    sd_ref, sd_got = ref.state_dict(), got.state_dict()
    for k in sd_ref:
        assert torch.equal(sd_ref[k].to(torch.bfloat16), sd_got[k]), k


def test_provenance_records_input_digests_and_verifies(tmp_path):
    import hashlib

    from loratools.io import read_provenance, verify_inputs

    out = tmp_path / "out"
    run_cli("convert", LLAMA, "-o", out)
    ck = Checkpoint(out)
    record = read_provenance(ck.metadata["model.safetensors"])
    files = record["inputs"]["checkpoint"]["files"]
    assert set(files) == {p.name for p in LLAMA.iterdir() if p.suffix == ".safetensors"} | {"model.safetensors.index.json"}
    for name, digest in files.items():
        assert digest == hashlib.sha256((LLAMA / name).read_bytes()).hexdigest()
    assert all(r["ok"] for r in verify_inputs(record, {"checkpoint": LLAMA}))
    assert not all(r["ok"] for r in verify_inputs(record, {"checkpoint": GPT2}))
    doc = json.loads(run_cli("inspect", out, "--json").stdout)
    assert doc["provenance"]["inputs"]["checkpoint"]["files"] == files


def test_early_digests_are_used_only_for_unchanged_files(tmp_path):
    """start_digests (what the CLI calls before importing torch) hands its digest to the provenance
    record when the file is untouched, and the file is hashed again when it changed meanwhile."""
    import hashlib
    import importlib
    import os

    mod = importlib.import_module("loratools.io.provenance")  # the module (loratools.io.provenance is the function)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 1000)
    mod.start_digests(a, b)
    assert mod.EARLY_DIGESTS.holds(a) and mod.EARLY_DIGESTS.holds(b)
    mod.EARLY_DIGESTS.wait()
    b.write_bytes(b"z" * 1001)  # changed after its early digest was taken
    os.utime(b, ns=(1, 1))
    meta = mod.provenance("test", {}, {"one": a, "two": b}).final_metadata()
    files = json.loads(meta["loratools"])["inputs"]
    assert files["one"]["files"]["a.safetensors"] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert files["two"]["files"]["b.safetensors"] == hashlib.sha256(b"z" * 1001).hexdigest()
    assert not mod.EARLY_DIGESTS.holds(a) and not mod.EARLY_DIGESTS.holds(b)  # consumed once


def test_command_line_starts_without_torch():
    """`loratools --help` and the start of every command (argument parsing, early digests) do not
    import torch, which takes ~2 s; the commands import it after start_digests."""
    import subprocess
    import sys

    code = ("import sys, loratools.cli, loratools.io, loratools.io.provenance, loratools.io.durability, "
            "loratools.io.sizes; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_adapter_output_path_reports_bytes_and_stages_the_report(tmp_path):
    """write_adapter_dir (extract, resize, combine): the summary counts the bytes of every written file and
    the stale temporaries it removed; the --report file appears only with the output, never inside it,
    and a failure before the output is complete leaves neither (no temporary either)."""
    from loratools.adapter import load_adapter
    from loratools.io import OutputPath, Durability
    from loratools.io.output import write_adapter_dir
    from loratools.errors import OutputError

    src = FIXTURES / "llama-lora"
    config = json.loads((src / "adapter_config.json").read_text())
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = tmp_path / "out"
    (tmp_path / f".out.loratools-tmp-{2**22 + 12345}-deadbeef").mkdir()  # left by a killed run (no such pid)

    def boom(summary, sizes):
        raise RuntimeError("report failed")

    with pytest.raises(RuntimeError):
        write_adapter_dir(out, inputs=[src], force=False, config=config, tensors=tensors, report_doc=boom,
                          report=tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the stale one is gone too, and nothing is left
    with pytest.raises(OutputError, match="--report"):
        write_adapter_dir(out, inputs=[src], force=False, config=config, tensors=tensors, report=out / "r.json")
    doc = write_adapter_dir(OutputPath(str(out), Durability(sync=False)), inputs=[src], force=False,
                            config=config, tensors=tensors, report=tmp_path / "r.json",
                            report_doc=lambda summary, sizes: {**summary, "sizes": sizes})
    assert doc["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert doc["bytes"] == sum((out / f).stat().st_size for f in doc["files"]) == sum(doc["sizes"].values())
    assert json.loads((tmp_path / "r.json").read_text()) == doc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.json"]
    assert load_adapter(out).config["r"] == config["r"]


def test_resize_reports_bytes_and_stale_temporaries(tmp_path):
    """resize (like extract and combine) now returns what the checkpoint commands do: bytes, removed temporaries."""
    stale = tmp_path / f".r.loratools-tmp-{2**22 + 54321}-deadbeef"
    stale.mkdir()
    doc = json.loads(run_cli("resize", FIXTURES / "llama-lora", "-o", tmp_path / "r", "--rank", 2, "--json").stdout)
    assert doc["stale_removed"] == [str(stale)] and not stale.exists()
    assert doc["bytes"] == sum((tmp_path / "r" / f).stat().st_size for f in doc["files"])
    assert doc["totals"]["bytes"] == (tmp_path / "r" / "adapter_model.safetensors").stat().st_size
