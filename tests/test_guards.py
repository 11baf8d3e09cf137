"""Guards added by the mutation runs of docs/claims.md: each fails on a deliberate mutation of a core path
that the rest of the suite let through (e3, e4 there).
"""
import os
from pathlib import Path

import pytest

from conftest import FIXTURES, LLAMA, run_cli


def _inode(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _record_syncs_and_renames(monkeypatch) -> list[tuple]:
    """Events in order: ("fsync", inode) and ("rename", src, dst), recorded after each call succeeds."""
    events: list[tuple] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        real_fsync(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))

    def renamer(real):
        def rename(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            events.append(("rename", Path(src), Path(dst)))
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    return events


COMMANDS = {
    "convert-sharded": ["convert", LLAMA, "--max-shard-size", "100KB"],  # shards, index, side files
    "merge-dora": ["merge", LLAMA, FIXTURES / "llama-dora"],  # a subdirectory (loratools-dora/)
    "resize-report": ["resize", FIXTURES / "llama-patterns", "--rank", "3", "--report", "REPORT"],  # adapter + report
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_file_and_directory_is_synced_before_the_rename(tmp_path, monkeypatch, command):
    """README: every file and directory of an output is fsync'ed before the rename. Syncing the directories
    after the rename instead (the same number of fsync calls, so test_atomic's count passes) fails here:
    every fsync is recorded by inode (a rename keeps inodes), so the order is checked for each file and
    directory of the output and a --report file; the parent directory is synced after the rename."""
    report = tmp_path / "report.json"
    argv = [report if a == "REPORT" else a for a in COMMANDS[command]]
    out = tmp_path / "out"
    events = _record_syncs_and_renames(monkeypatch)
    run_cli(*argv, "-o", out)
    publish = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == out]
    assert len(publish) == 1, "the output was not renamed into place exactly once"
    before = {e[1] for e in events[:publish[0]] if e[0] == "fsync"}
    after = {e[1] for e in events[publish[0] + 1:] if e[0] == "fsync"}
    paths = [out, *sorted(out.rglob("*"))]
    if command == "merge-dora":
        assert (out / "loratools-dora").is_dir()
    if command == "resize-report":
        paths.append(report)
    unsynced = [str(p.relative_to(tmp_path)) for p in paths if _inode(p) not in before]
    assert not unsynced, f"not synced before the output was renamed into place: {unsynced}"
    assert _inode(tmp_path) in after, "the parent directory was not synced after the rename"


def test_killed_force_replace_keeps_the_previous_output_and_the_next_run_restores_it(tmp_path):
    """README: `--force` replaces an output only after the new one is complete, and a kill at any point
    leaves no OUT or the complete previous one. Killed between moving the old output aside and renaming the
    new one in, the previous output must survive whole in its `.OUT.loratools-old-…` sibling, and the next
    run must put it back (and say so) rather than delete it as a stale temporary. Deleting it instead
    passed every other test (mutation e4 of docs/claims.md)."""
    from test_hardening import start_and_kill
    from conftest import tree_digest

    out = tmp_path / "out"
    run_cli("convert", LLAMA, "-o", out)
    previous = tree_digest(out)
    argv = ["convert", LLAMA, "--dtype", "bfloat16", "--force"]
    where = start_and_kill(argv, out, pause_at=10**6)  # paused at the rename that publishes the new output
    assert where.startswith("rename"), where
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.loratools-old-")]
    assert len(aside) == 1 and tree_digest(aside[0]) == previous, "the previous output did not survive the kill"
    r = run_cli(*argv, "-o", out)
    assert f"restored {out} from {aside[0]}" in r.stderr, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    fresh = tmp_path.parent / f"{tmp_path.name}-fresh"
    run_cli(*argv[:-1], "-o", fresh)
    assert tree_digest(out) == tree_digest(fresh)  # then replaced by the complete new output


def test_a_tensor_saved_whole_by_one_adapter_and_adapted_by_another_is_refused(tmp_path):
    """docs/merge.md and docs/combine.md: one adapter replacing a tensor whole (modules_to_save) while another
    puts LoRA on it is refused, in either order, in one line, nothing written. Dropping merge's refusal
    (plan.py) passed every other test (mutation c3 of docs/claims.md): no fixture puts LoRA on lm_head."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], init_lora_weights=False))
        head = tmp_path / "head-lora"
        pm.save_pretrained(head, save_embedding_layers=False)  # LoRA on lm_head only, no saved copy of it
    mts = FIXTURES / "llama-mts"  # saves lm_head whole
    out = tmp_path / "out"
    for argv, needle in ((["merge", LLAMA, mts, head], "adapts it with LoRA"),
                         (["merge", LLAMA, head, mts], "adapts it with LoRA"),
                         (["combine", mts, head, "--method", "cat"], "adapted with LoRA")):
        r = run_cli(*argv, "-o", out, expect=1)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "lm_head.weight" in lines[0] and "modules_to_save" in lines[0], r.stderr
        assert needle in lines[0], lines[0]
        assert [p.name for p in tmp_path.iterdir()] == ["head-lora"], "something was written"
