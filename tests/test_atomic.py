"""Atomic outputs: refuse dangerous paths, never leave half-written results, clean up after kills."""
import errno
import os
from pathlib import Path

import pytest

from loratools.io import AtomicOutput
from loratools.io.atomic import OLD_TAG, TMP_TAG
from conftest import LLAMA, run_cli, tree_digest


def test_output_equal_to_or_inside_input_is_refused(copy_fixture):
    src = copy_fixture("tiny-llama")
    before = tree_digest(src)
    for out in (src, src / "sub", src / "a" / "b"):
        r = run_cli("convert", src, "-o", out, "--force", expect=1)
        assert "input" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert tree_digest(src) == before


def test_output_containing_input_is_refused_even_with_force(copy_fixture, tmp_path):
    src = copy_fixture("tiny-llama")
    r = run_cli("convert", src, "-o", tmp_path, "--force", expect=1)
    assert "contains the input" in r.stderr


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli("convert", LLAMA, "-o", out, expect=1)
    assert "already exists" in r.stderr and (out / "keep.txt").read_text() == "precious"
    run_cli("convert", LLAMA, "-o", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left


def test_failed_force_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RuntimeError):
        with AtomicOutput(out, [], force=True) as tmp:
            (tmp / "half.safetensors").write_bytes(b"xx")
            raise RuntimeError("killed mid-way")
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temporaries_from_dead_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    dead_pid = 2**22 + 12345  # above pid_max on Linux by default: never alive
    stale = tmp_path / f".out.loratools-tmp-{dead_pid}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    a = AtomicOutput(out, [])
    assert a.stale_removed == [stale] and not stale.exists()


def _only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_read_only_location_is_refused(monkeypatch, tmp_path):
    """Checked before any work. Root ignores permission bits, so the denial is simulated (os.access says no
    for the output's directory), which holds whoever runs the suite."""
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw))
    r = run_cli("convert", LLAMA, "-o", tmp_path / "out", expect=1)
    line = _only_line(r.stderr)
    assert str(tmp_path / "out") in line and "permission denied" in line
    assert list(tmp_path.iterdir()) == []


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("convert", LLAMA, "-o", tmp_path / "file" / "out", expect=1)
    assert "is not a directory" in _only_line(r.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "x"


def _fail_publishing(monkeypatch):
    """os.rename fails (EACCES) when it moves a finished temporary into place, and only then: the last step
    of every write, after all bytes are written and synced."""
    real_rename = os.rename
    calls = []

    def rename(src, dst, *a, **kw):
        calls.append((Path(src).name, Path(dst).name))
        if TMP_TAG in Path(src).name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_failed_publishing_rename_leaves_nothing(monkeypatch, tmp_path):
    calls = _fail_publishing(monkeypatch)
    r = run_cli("convert", LLAMA, "-o", tmp_path / "out", expect=1)
    line = _only_line(r.stderr)
    assert line.startswith(f"error: {tmp_path / 'out'}: could not move the finished output into place")
    assert "Permission denied" in line
    assert [dst for _, dst in calls] == ["out"]  # it did fail at the publishing step
    assert list(tmp_path.iterdir()) == []


def test_failed_publishing_with_force_keeps_the_old_output(monkeypatch, tmp_path):
    """--force moves the old output aside, then publishes the new one; when that second rename fails the old
    output is put back where it was (it used to stay in a hidden .out.loratools-old-* sibling)."""
    out = tmp_path / "out"
    run_cli("convert", LLAMA, "-o", out)
    (out / "keep.txt").write_text("precious")
    before = tree_digest(out)
    calls = _fail_publishing(monkeypatch)
    r = run_cli("convert", LLAMA, "-o", out, "--force", "--dtype", "float32", expect=1)
    assert "could not move the finished output into place" in _only_line(r.stderr)
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # old moved aside, the new one's rename failed, the old one moved back
    assert calls[0][1].startswith(f".out{OLD_TAG}") and [dst for _, dst in calls[1:]] == ["out", "out"]


_REAL_FSYNC = os.fsync


def _fsyncs(monkeypatch, tmp_path, *flags):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), _REAL_FSYNC(fd))[1])
    out = tmp_path / ("out" + "".join(flags))
    run_cli("convert", LLAMA, "-o", out, "--max-shard-size", "100KB", *flags)
    return calls, out


def test_outputs_are_synced_unless_no_sync(monkeypatch, tmp_path):
    """Every shard, side file and the directories are fsync'ed by default; --no-sync writes the same
    bytes with no fsync at all (and the next command in the same process syncs again)."""
    synced, a = _fsyncs(monkeypatch, tmp_path)
    shards = [p for p in a.iterdir() if p.suffix == ".safetensors"]
    assert len(shards) > 1 and len(synced) >= len(list(a.iterdir())) + 2  # + the two directories
    unsynced, b = _fsyncs(monkeypatch, tmp_path, "--no-sync")
    assert unsynced == []
    assert tree_digest(a) == tree_digest(b)
    again, _ = _fsyncs(monkeypatch, tmp_path, "--sync")
    assert len(again) == len(synced)


def test_no_sync_ends_with_its_command(monkeypatch, tmp_path):
    """`--no-sync` belongs to its command's output (io.OutputPath), not to the process: the next command
    without the flag and a library call both sync again."""
    from loratools.convert import convert_checkpoint

    _fsyncs(monkeypatch, tmp_path, "--no-sync")
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), _REAL_FSYNC(fd))[1])
    convert_checkpoint(LLAMA, tmp_path / "lib", max_shard_size=10**9)
    assert calls
    _fsyncs(monkeypatch, tmp_path, "--no-sync", "--force")
    synced, _ = _fsyncs(monkeypatch, tmp_path)
    assert synced
