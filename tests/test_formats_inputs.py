"""Every command takes every adapter format: merge, unmerge, validate, combine, resize and inspect read an MLX-LM
directory, a kohya file or directory and a GGUF LoRA file directly (loratools.adapter.load_adapter reads them
through loratools.formats into PEFT's form).

The reference is the same command on the PEFT original. Merges are bit-identical wherever the converted
files hold the original factors; where a format has one scale per adapter and a module's other scale was
folded into lora_b in float32 ("odd" below: rsLoRA with alpha_pattern ratios that are not powers of two),
the bound is one rounding of the float16 output: |merged - reference| <= 2^-10·|reference| + 2^-24 (the
fold changes ΔW by a few float32 ulps, which can move a float16 result to its neighbour, no further).
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, LLAMA, run_cli

from loratools.adapter import CONFIG_NAME, load_adapter

FORMATS = ["mlx", "kohya", "gguf"]
NEEDS_BASE = ["kohya", "gguf"]  # their names are read back against the base's module list / architecture
pytest.importorskip("gguf")  # in the test extra; the GGUF LoRA format needs it


def _weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _input(d, fmt):
    """The converted adapter as a user gives it: the MLX directory, the kohya file, the GGUF file."""
    return d if fmt == "mlx" else next(d.iterdir())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """PEFT originals (llama-patterns; "odd", whose scales MLX and GGUF must fold into lora_b inexactly),
    each converted to every format, and the PEFT originals' merges."""
    root = tmp_path_factory.mktemp("inputs")
    odd = root / "odd"
    shutil.copytree(FIXTURES / "llama-patterns", odd)
    cfg = json.loads((odd / CONFIG_NAME).read_text())
    cfg.update(use_rslora=True, alpha_pattern={"layers.0.mlp.gate_proj": 3, "v_proj": 7})
    (odd / CONFIG_NAME).write_text(json.dumps(cfg))
    sources = {"llama-patterns": FIXTURES / "llama-patterns", "odd": odd}
    conv, notes = {}, {}
    for name, src in sources.items():
        run_cli("merge", LLAMA, src, "-o", root / f"ref-{name}")
        for fmt in FORMATS:
            r = run_cli("convert", src, "-o", root / f"{name}.{fmt}", "--to", fmt, "--base", LLAMA, "--json")
            conv[name, fmt] = _input(root / f"{name}.{fmt}", fmt)
            notes[name, fmt] = json.loads(r.stdout)["notes"]
    return root, sources, conv, notes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["llama-patterns", "odd"])
def test_merge_of_converted_equals_merge_of_peft(work, name, fmt):
    root, _, conv, notes = work
    out = root / f"m-{name}-{fmt}"
    run_cli("merge", LLAMA, conv[name, fmt], "-o", out)
    got, ref = _weights(out), _weights(root / f"ref-{name}")
    assert sorted(got) == sorted(ref)
    folded = any("folded" in n for n in notes[name, fmt])
    if name == "odd" and fmt in ("mlx", "gguf"):
        assert folded, notes[name, fmt]  # the case this fixture exists for
    changed = 0
    for k, t in ref.items():
        if folded:
            diff = (got[k].float() - t.float()).abs()
            assert bool((diff <= t.float().abs() * 2 ** -10 + 2 ** -24).all()), (k, float(diff.max()))
            changed += int((diff > 0).sum())
        else:
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert changed <= sum(t.numel() for t in ref.values()) // 100  # a rounding neighbour, rarely
    # provenance records the input as the user gave it (the file for kohya and GGUF)
    doc = json.loads(run_cli("inspect", out, "--json").stdout)
    assert doc["provenance"]["inputs"]["adapters[0]"]["name"] == conv[name, fmt].name


@pytest.mark.parametrize("fmt", FORMATS)
def test_validate_passes_the_merge_given_the_converted_adapter(work, fmt):
    root, _, conv, _ = work
    out = root / f"v-{fmt}"
    run_cli("merge", LLAMA, conv["llama-patterns", fmt], "-o", out)
    r = run_cli("validate", LLAMA, conv["llama-patterns", fmt], "--merged", out, "--batch", "2", "--seq-len", "16",
                "--json")
    doc = json.loads(r.stdout)
    assert doc["passed"] and doc["adapters"][0]["path"] == str(conv["llama-patterns", fmt])
    assert "loratools-validate-" not in r.stdout  # the temporary PEFT copy is never what the report names
    assert any(n["check"] == "provenance" and "match the files given" in n["message"] for n in doc["notes"])
    # a merge of another adapter is told apart (its provenance names other input files)
    r = run_cli("validate", LLAMA, conv["llama-patterns", fmt], "--merged", root / "ref-odd", "--static-only",
                "--json", expect=1)
    doc = json.loads(r.stdout)
    assert not doc["passed"] and any(p["check"] == "provenance" for p in doc["problems"])


def test_unmerge_takes_a_converted_adapter(work):
    root, _, conv, _ = work
    merged = root / "m-llama-patterns-kohya"
    if not merged.exists():
        run_cli("merge", LLAMA, conv["llama-patterns", "kohya"], "-o", merged)
    out = root / "unmerged"
    run_cli("unmerge", merged, conv["llama-patterns", "gguf"], "-o", out)
    back, base = _weights(out), _weights(LLAMA)
    for k, t in base.items():  # base + ΔW - ΔW, each rounded to float16 once: within one float16 step
        diff = (back[k].float() - t.float()).abs()
        assert bool((diff <= t.float().abs() * 2 ** -9 + 2 ** -14).all()), k


def test_combine_and_resize_accept_every_format(work):
    root, sources, conv, _ = work
    src = sources["llama-patterns"]
    inputs = [conv["llama-patterns", f] for f in FORMATS]
    run_cli("combine", *inputs, "-o", root / "c-conv", "--method", "cat", "--base", LLAMA)
    run_cli("combine", src, src, src, "-o", root / "c-peft", "--method", "cat")
    _same_deltas(root / "c-conv", root / "c-peft")
    doc = json.loads(run_cli("inspect", root / "c-conv", "--json").stdout)
    rec = doc["provenance"]["inputs"]  # the inputs as given, and the base that named the kohya/GGUF modules
    assert [rec[f"adapters[{i}]"]["name"] for i in range(3)] == [p.name for p in inputs] and "base" in rec
    run_cli("resize", src, "-o", root / "r-peft", "--rank", "2")
    for fmt in FORMATS:
        run_cli("resize", conv["llama-patterns", fmt], "-o", root / f"r-{fmt}", "--rank", "2", "--base", LLAMA)
        _same_deltas(root / f"r-{fmt}", root / "r-peft")


def _same_deltas(got, ref):
    """Each module's ΔW (B·A·scale) bit for bit. The factors themselves may differ: MLX-LM read back holds a
    folded scale in lora_b (by a power of two in llama-patterns, so the products are exact)."""
    a, b = load_adapter(got), load_adapter(ref)
    assert sorted(a.modules) == sorted(b.modules)
    for n, m in b.modules.items():
        assert a.modules[n].r == m.r and torch.equal(a.modules[n].delta(), m.delta()), (got, n)


def test_inspect_describes_every_format(work):
    _, sources, conv, _ = work
    ref = json.loads(run_cli("inspect", sources["llama-patterns"], "--json").stdout)
    for fmt in FORMATS:
        given = conv["llama-patterns", fmt]
        for path in [given] + ([given.parent] if given.is_file() else []):  # the file, or its directory
            args = ["--base", LLAMA] if fmt in NEEDS_BASE else []
            doc = json.loads(run_cli("inspect", path, "--json", *args).stdout)
            assert (doc["kind"], doc["format"], doc["path"]) == ("adapter", fmt, str(path))
            # (MLX-LM holds one scale: a module's other scale is in its lora_b, so only r is compared there)
            keep = (lambda m: (m["name"], m["r"])) if fmt == "mlx" else (lambda m: (m["name"], m["r"], m["scale"]))
            assert [keep(m) for m in doc["modules"]] == [keep(m) for m in ref["modules"]]
            assert set(ref) <= set(doc)  # the JSON only gains fields


@pytest.mark.parametrize("fmt", NEEDS_BASE)
def test_without_base_one_line_and_nothing_written(work, fmt):
    root, _, conv, _ = work
    path = conv["llama-patterns", fmt]
    for args in (["combine", path, path, "-o", root / "x", "--method", "cat"],
                 ["resize", path, "-o", root / "x", "--rank", "2"],
                 ["inspect", path], ["inspect", path.parent]):
        r = run_cli(*args, expect=2)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--base" in lines[0] and str(path.parent) in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr and not (root / "x").exists()


def test_an_adapter_for_another_base_one_line_and_nothing_written(work):
    """A kohya file read against a base without its modules (GPT-2's names): one line naming the file, exit 1."""
    from conftest import GPT2

    root, _, conv, _ = work
    path = conv["llama-patterns", "kohya"]
    for args in (["merge", GPT2, path, "-o", root / "y"],
                 ["validate", GPT2, path, "--static-only"],
                 ["resize", path, "-o", root / "y", "--rank", "2", "--base", GPT2]):
        r = run_cli(*args, expect=1)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (root / "y").exists()
