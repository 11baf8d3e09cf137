"""Kill safety, disk full, determinism across commands: nothing lost, nothing half-written."""
import errno
import json
import shutil
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from loratools.io import Checkpoint, ShardWriter, TensorSpec
from conftest import LLAMA, run_cli, tree_digest


def big_checkpoint(path: Path, n: int = 32, shape=(1024, 2048)) -> Path:
    """fp32 checkpoint of n 8 MiB tensors: large enough that a rewrite takes a noticeable time."""
    path.mkdir()
    specs = [TensorSpec(f"model.layers.{i}.mlp.up_proj.weight", torch.float32, shape) for i in range(n)]
    w = ShardWriter(path, specs, max_shard_size=64 * 2**20)
    g = torch.Generator().manual_seed(0)
    for s in specs:
        w.write(s.name, torch.randn(shape, generator=g))
    w.close()
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return big_checkpoint(tmp_path_factory.mktemp("big") / "ck")


def loratools_cmd(*args):
    return [sys.executable, "-m", "loratools", *map(str, args)]


def assert_complete_or_absent(out: Path, expected_tensors: int):
    if not out.exists():
        return "absent"
    ck = Checkpoint(out)  # parses and checks every header against file sizes
    assert len(ck.tensors) == expected_tensors
    for _, t in ck.iter_tensors():
        pass
    return "complete"


def start_and_kill(cmd, parent: Path, delay: float):
    """Start cmd, wait until it has begun writing its temporary output, wait `delay` more, SIGKILL it."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(".loratools-tmp-" in x.name for x in parent.iterdir()):
        if p.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.5])
def test_sigkill_leaves_nothing_half_written(big, tmp_path, delay):
    out = tmp_path / "out"
    before = tree_digest(big)
    start_and_kill(loratools_cmd("convert", big, "-o", out, "--dtype", "bfloat16", "--max-shard-size", "32MB"),
                   tmp_path, delay)
    state = assert_complete_or_absent(out, 32)
    leftovers = [x for x in tmp_path.iterdir() if x.name != "out"]
    # a rerun cleans up after the killed one and says so
    r = subprocess.run(loratools_cmd("convert", big, "-o", out, "--dtype", "bfloat16", "--force"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for x in leftovers:
        assert not x.exists() and str(x) in r.stderr
    assert [x.name for x in tmp_path.iterdir()] == ["out"]
    assert assert_complete_or_absent(out, 32) == "complete"
    assert tree_digest(big) == before
    print(f"killed after {delay}s: output {state}, {len(leftovers)} temporary dirs cleaned by the rerun")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    except OSError:  # no mount(8) at all
        return False
    return r.returncode == 0


def test_small_filesystem_is_refused_before_any_work(tmp_path, monkeypatch):
    small = tmp_path / "small"
    mounted = _mount_tmpfs(small, "64k")
    if not mounted:
        # without mount privileges: the same refusal, with the filesystem reporting 64 KiB free
        import collections
        import shutil as sh

        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(sh, "disk_usage", lambda p: usage(65536, 0, 65536))
    try:
        r = run_cli("convert", LLAMA, "-o", small / "out", expect=1)
        assert "not enough space" in r.stderr and list(small.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(small)])


def test_disk_full_mid_write_fails_cleanly(tmp_path, monkeypatch):
    """ENOSPC on the n-th write (space taken by someone else meanwhile): clean error, no output, no temp."""
    import loratools.io.writer as writer

    calls = {"n": 0}
    real = os.pwrite

    def full_after_three(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full_after_three)
    r = run_cli("convert", LLAMA, "-o", tmp_path / "out", expect=1)
    assert "no space left" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_fails_cleanly(tmp_path):
    """A real OS-enforced limit (RLIMIT_FSIZE) hits our write path in a child process."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000)); "
            "from loratools.cli import main; sys.argv = ['loratools'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", code, "convert", str(LLAMA), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error:"), r.stderr
    assert list(tmp_path.iterdir()) == []


# -- every writing command: deterministic bytes, and SIGKILL-safe -------------------------------------------

from conftest import FIXTURES  # noqa: E402


def _writing_commands(tmp: Path) -> dict[str, list]:
    """argv (without -o) for every command that writes, on the fixtures; outputs of earlier steps feed later ones."""
    q = tmp / "q4"
    merged = tmp / "merged"
    if not q.exists():
        run_cli("quantize", FIXTURES / "tiny-llama", "-o", q, "--nf4")
    if not merged.exists():
        run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "llama-dora", FIXTURES / "llama-lora", "-o", merged,
                "--weight", "0.5", "--weight", "2")
    return {
        "convert": ["convert", FIXTURES / "tiny-gpt2", "--dtype", "float32", "--max-shard-size", "100KB"],
        "merge": ["merge", FIXTURES / "tiny-llama", FIXTURES / "llama-dora", FIXTURES / "llama-lora",
                  "--weight", "0.5", "--weight", "2"],
        "merge-4bit-base": ["merge", q, FIXTURES / "llama-lora"],
        "unmerge": ["unmerge", merged, FIXTURES / "llama-dora", FIXTURES / "llama-lora", "--weight", "0.5",
                    "--weight", "2"],
        "quantize": ["quantize", FIXTURES / "tiny-gpt2", "--nf4", "--blocksize", "128"],
        "dequantize": ["dequantize", q, "--dtype", "bfloat16"],
        "extract": ["extract", FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-tuned", "--energy", "0.9",
                    "--svd", "randomized"],
        "resize": ["resize", FIXTURES / "llama-patterns", "--rank", "3"],
        "combine-dare": ["combine", FIXTURES / "llama-lora", FIXTURES / "llama-rslora", "--method", "dare_ties",
                         "--density", "0.5", "--seed", "7", "--rank", "8"],
    }


def test_every_writing_command_is_deterministic(tmp_path):
    for name, argv in _writing_commands(tmp_path).items():
        a, b = tmp_path / f"{name}-a", tmp_path / f"{name}-b"
        run_cli(*argv, "-o", a)
        run_cli(*argv, "-o", b)
        assert tree_digest(a) == tree_digest(b), f"{name} is not deterministic"


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A generated 0.1B-parameter Llama (210 MB fp16) and a rank-16 adapter: a second or more per command."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import generate_llama, generate_lora

    d = tmp_path_factory.mktemp("medium")
    base = generate_llama(d / "base", "0.1b")
    lora = generate_lora(d / "lora", "0.1b", r=16)
    return base, lora


def _medium_inputs(base: Path, lora: Path) -> dict[str, Path]:
    """Outputs of earlier commands on the medium model that later commands take as input (made once)."""
    merged, q4 = base.parent / "merged", base.parent / "q4"
    if not merged.exists():
        run_cli("merge", base, lora, "-o", merged)
    if not q4.exists():
        run_cli("quantize", base, "-o", q4, "--nf4")
    return {"merged": merged, "q4": q4}


HEAVY = ["merge", "unmerge", "quantize", "dequantize", "extract", "resize", "combine", "convert"]


@pytest.mark.parametrize("command", HEAVY)
def test_sigkill_every_writing_command(medium, tmp_path, command):
    """Every command that writes, killed while writing: no output or a complete one, and a clean rerun."""
    base, lora = medium
    made = _medium_inputs(base, lora)
    argv = {"merge": ["merge", base, lora], "unmerge": ["unmerge", made["merged"], lora],
            "quantize": ["quantize", base, "--nf4"], "dequantize": ["dequantize", made["q4"]],
            "extract": ["extract", base, made["merged"], "--rank", "4", "--target-modules", "q_proj"],
            "resize": ["resize", lora, "--rank", "4"],
            "combine": ["combine", lora, lora, "--method", "linear", "--rank", "8"],
            "convert": ["convert", base, "--dtype", "float32"]}[command]
    before = tree_digest(base)
    out = tmp_path / "out"
    start_and_kill(loratools_cmd(*argv, "-o", out), tmp_path, 0.2)
    if out.exists() and command not in ("extract", "resize", "combine"):
        Checkpoint(out)  # complete: every header checks out against its file
    r = subprocess.run(loratools_cmd(*argv, "-o", out, "--force"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [x.name for x in tmp_path.iterdir()] == ["out"], "a temporary survived the rerun"
    assert tree_digest(base) == before


# -- integrity: recorded input digests, checked by validate -------------------------------------------------

def test_validate_checks_recorded_inputs(tmp_path):
    merged = tmp_path / "merged"
    run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "llama-lora", "-o", merged)
    doc = json.loads(run_cli("validate", FIXTURES / "tiny-llama", FIXTURES / "llama-lora", "--merged", merged,
                             "--static-only", "--json").stdout)
    assert doc["passed"] and any(n["check"] == "provenance" and "match" in n["message"] for n in doc["notes"])
    # the same merged file presented as coming from another adapter: the recorded digests say otherwise
    r = run_cli("validate", FIXTURES / "tiny-llama", FIXTURES / "llama-rslora", "--merged", merged,
                "--static-only", "--json", expect=1)
    doc = json.loads(r.stdout)
    prov = [p for p in doc["problems"] if p["check"] == "provenance"]
    assert prov and "adapters[0]" in prov[0]["message"]
    # a tampered base (one byte of one shard) is caught too
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "tiny-llama", base)
    shard = base / "model-00003-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    r = run_cli("validate", base, FIXTURES / "llama-lora", "--merged", merged, "--static-only", "--json", expect=1)
    assert any("model-00003-of-00003.safetensors" in p["message"] for p in json.loads(r.stdout)["problems"])


def test_validate_checks_quantized_provenance(tmp_path):
    q = tmp_path / "q"
    run_cli("quantize", FIXTURES / "tiny-gpt2", "-o", q, "--nf4")
    r = run_cli("validate", FIXTURES / "tiny-gpt2-tuned", "--quantized", q, "--static-only", "--json", expect=1)
    assert any(p["check"] == "provenance" for p in json.loads(r.stdout)["problems"])
