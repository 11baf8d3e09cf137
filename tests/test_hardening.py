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


def big_checkpoint(path: Path, n: int = 16, shape=(512, 1024)) -> Path:
    """fp32 checkpoint of n 2 MiB tensors (its bfloat16 copy: 4 shards of 4 MiB at --max-shard-size 4MB)."""
    path.mkdir()
    specs = [TensorSpec(f"model.layers.{i}.mlp.up_proj.weight", torch.float32, shape) for i in range(n)]
    w = ShardWriter(path, specs, max_shard_size=16 * 2**20)
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


# The real CLI in a child process, with an audit hook that freezes it at a chosen point of writing its output,
# so the parent's SIGKILL lands mid-write every time, however fast the job (a timed kill can come too late).
# It pauses at the PAUSE_AT-th open-for-writing of a .safetensors file inside the temporary output
# (each file: 1 = created with a placeholder header, 2 = its tensor data being written, 3 = header being
# finalized), or at the rename that publishes the output if that comes first; it says where in MARKER.
PAUSING_CHILD = r"""
import os, sys, time
TAG, MARKER, PAUSE_AT = ".loratools-tmp-", sys.argv[1], int(sys.argv[2])
opened = [0]

def pause(what, path):
    with open(MARKER + ".part", "w") as f:
        f.write(f"{what} {path}")
    os.rename(MARKER + ".part", MARKER)
    time.sleep(600)

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = os.fsdecode(args[0]), args[1], args[2] or 0
        writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
        if TAG in path and writing and path.endswith(".safetensors"):
            opened[0] += 1
            if opened[0] == PAUSE_AT:
                pause("open", path)
    elif event in ("os.rename", "os.replace") and TAG in os.fsdecode(args[0]):
        pause("rename", os.fsdecode(args[0]))

sys.addaudithook(hook)
from loratools.cli import main
sys.argv = ["loratools"] + sys.argv[3:]
main()
"""


def start_and_kill(argv, out: Path, pause_at: int = 3) -> str:
    """Run `loratools argv -o out` until it pauses mid-write (see PAUSING_CHILD), SIGKILL it; assert that it
    really died there: killed by the signal, its temporary sibling of `out` present, `out` absent.
    Returns where it was paused ("open <file>" or "rename <dir>")."""
    marker = out.parent / f"pause-{uuid.uuid4().hex[:8]}"
    p = subprocess.Popen([sys.executable, "-c", PAUSING_CHILD, marker, str(pause_at), *map(str, argv), "-o", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert p.poll() is None, f"finished before pausing mid-write (rc {p.returncode}): {p.stderr.read()[-2000:]!r}"
        assert time.monotonic() < deadline, "never paused"
        time.sleep(0.01)
    where = marker.read_text()
    marker.unlink()
    temps = [x for x in out.parent.iterdir() if x.name.startswith(f".{out.name}.loratools-tmp-")]
    assert len(temps) == 1 and str(temps[0]) in where and not out.exists(), (where, temps)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    assert temps[0].exists() and not out.exists()  # the kill left the half-written temporary, nothing else
    return where


@pytest.mark.parametrize("pause_at", [2, 6, 11, 10**6], ids=["creating-shards", "mid-data", "finalizing", "renaming"])
def test_sigkill_leaves_nothing_half_written(big, tmp_path, pause_at):
    """convert of 16 tensors into 4 shards, killed at four points of its write (opens 1-4 create the shards,
    5-8 write their data, 9-12 finalize their headers, then the rename); the rerun cleans up."""
    out = tmp_path / "out"
    before = tree_digest(big)
    argv = ["convert", big, "--dtype", "bfloat16", "--max-shard-size", "5MB"]
    where = start_and_kill(argv, out, pause_at)
    assert where.startswith("rename" if pause_at > 12 else "open"), where
    leftovers = [x for x in tmp_path.iterdir() if x.name != "out"]
    # a rerun cleans up after the killed one and says so
    r = run_cli(*argv, "-o", out)
    assert leftovers and all(not x.exists() and str(x) in r.stderr for x in leftovers)
    assert [x.name for x in tmp_path.iterdir()] == ["out"]
    assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) == 4
    assert assert_complete_or_absent(out, 16) == "complete"
    assert tree_digest(big) == before


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


WRITING = ["convert", "merge", "merge-4bit-base", "unmerge", "quantize", "dequantize", "extract", "resize",
           "combine-dare"]


@pytest.fixture(scope="module")
def writing_inputs(tmp_path_factory):
    """The argv of every writing command, with the 4-bit and merged inputs made once; and a clean output of each."""
    d = tmp_path_factory.mktemp("writing")
    commands = _writing_commands(d)
    assert sorted(commands) == sorted(WRITING)
    return commands


@pytest.mark.parametrize("command", WRITING)
def test_sigkill_every_writing_command(writing_inputs, tmp_path, command):
    """Every command that writes, killed while writing (tensor data written, header not finalized): no output,
    the temporary is removed by a rerun, and the rerun's output is byte for byte an uninterrupted run's."""
    argv = writing_inputs[command]
    inputs = [Path(a) for a in argv if isinstance(a, Path)]
    before = {str(p): tree_digest(p) for p in inputs}
    out = tmp_path / "out"
    where = start_and_kill(argv, out)
    assert where.startswith("open") and where.endswith(".safetensors"), where
    r = run_cli(*argv, "-o", out)
    assert [x.name for x in tmp_path.iterdir()] == ["out"], "a temporary survived the rerun"
    ref = tmp_path.parent / f"{tmp_path.name}-ref"
    run_cli(*argv, "-o", ref)
    assert tree_digest(out) == tree_digest(ref)
    if (out / "adapter_config.json").exists():
        from loratools.adapter import load_adapter

        assert load_adapter(out).modules
    else:
        assert assert_complete_or_absent(out, len(Checkpoint(ref).tensors)) == "complete"
    assert {str(p): tree_digest(p) for p in inputs} == before


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
