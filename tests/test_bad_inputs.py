"""Every case of the bad-input corpus: exit 1 or 2, one clear line on stderr (and a JSON error object with
--json), no traceback, no output or temporary left, inputs byte-identical afterwards."""
import json
from pathlib import Path

import pytest

from bad_inputs import CASES, undo_read_only
from conftest import run_cli, tree_digest


def out_path(argv):
    return Path(argv[argv.index("-o") + 1]) if "-o" in argv else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path):
    d = tmp_path / "case"
    d.mkdir()
    argv, inputs = case.build(d)
    before = {str(p): tree_digest(p) for p in inputs}
    out = out_path(argv)
    try:
        for extra in ([], ["--json"]) if case.json else ([],):
            r = run_cli(*argv, *extra, expect=None)
            assert r.exit_code == case.code, (r.exit_code, r.stderr)
            lines = r.stderr.strip().splitlines()
            if argv[0] == "validate":
                # validate's product is its report (on stderr, as every table); the verdict is the last line
                lines = lines[-1:]
            assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
            assert "Traceback" not in r.stderr
            for needle in case.needles:
                assert needle in lines[0], (needle, lines[0])
            if extra:
                err = json.loads(r.stdout)["error"]
                assert err["exit_code"] == case.code and err["message"]
            if out is not None and case.id != "output-exists":
                assert not out.exists(), f"{out} left behind"
            if out is not None:
                assert not [p for p in out.parent.iterdir() if ".loratools-" in p.name], "temporary left behind"
    finally:
        if case.id == "read-only-location":
            undo_read_only(d / "ro")
    assert {str(p): tree_digest(p) for p in inputs} == before, "an input was modified"
