"""Options that change what a command does, each with a check that fails if the option were ignored.

Grouped by command; every output that several checks read is built once per module (the fixtures are tiny).
Where a real library defines the meaning (PEFT's merge, transformers' loading of a 4-bit config), the
check compares against it.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, GPT2, LLAMA, ROOT, run_cli
from loratools.adapter import load_adapter
from loratools.io import Checkpoint

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def tensors(path) -> dict[str, torch.Tensor]:
    return dict(Checkpoint(path).iter_tensors())


def config(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Outputs shared by several checks, built on first use: outputs(key, *argv) runs `loratools *argv -o OUT`
    once per key."""
    root = tmp_path_factory.mktemp("options")
    built = {}

    def get(key, *argv):
        if key not in built:
            out = root / key
            run_cli(*argv, "-o", out, "--no-sync")
            built[key] = out
        return built[key]

    return get


# -- global options -------------------------------------------------------------------------------------------

def test_version_is_the_package_version():
    import importlib.metadata
    import tomllib

    import loratools

    r = run_cli("--version")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert r.stdout.strip() == f"loratools, version {declared}"
    assert loratools.__version__ == declared == importlib.metadata.version("loratools")


def empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_debug_flag_reraises_with_the_traceback(tmp_path, monkeypatch):
    from loratools.errors import LoratoolsError

    monkeypatch.delenv("LORATOOLS_DEBUG", raising=False)
    d = empty_dir(tmp_path)
    r = run_cli("inspect", d, expect=1)  # without it: one line, no traceback
    assert r.stderr.startswith("error: ") and "neither" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(LoratoolsError, match="neither"):
        run_cli("inspect", d, "--debug")  # anywhere on the line
    with pytest.raises(LoratoolsError, match="neither"):
        run_cli("--debug", "inspect", d)


@pytest.mark.parametrize("value,raises", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_loratools_debug_environment_variable(tmp_path, monkeypatch, value, raises):
    from loratools.errors import LoratoolsError

    monkeypatch.setenv("LORATOOLS_DEBUG", value)
    d = empty_dir(tmp_path)
    if raises:
        with pytest.raises(LoratoolsError, match="neither"):
            run_cli("inspect", d)
    else:
        assert "Traceback" not in run_cli("inspect", d, expect=1).stderr


def test_loratools_debug_leaves_the_exception_to_python(tmp_path, monkeypatch):
    """What the entry point then does with it: the exception, not a one-line message, ends the run."""
    from click.testing import CliRunner

    from loratools.cli import cli
    from loratools.errors import LoratoolsError

    monkeypatch.setenv("LORATOOLS_DEBUG", "1")
    r = CliRunner().invoke(cli, ["inspect", str(empty_dir(tmp_path))])
    assert r.exit_code == 1 and isinstance(r.exception, LoratoolsError) and "error: " not in r.stderr


# -- inspect --------------------------------------------------------------------------------------------------

def test_inspect_all_modules_lists_every_module():
    """llama-patterns has per-module ranks and alphas: grouped, one row per (name, r, alpha) group; with
    --all-modules one row per module with its own r, alpha, scale and base shape."""
    doc = json.loads(run_cli("inspect", FIXTURES / "llama-patterns", "--json").stdout)
    grouped = run_cli("inspect", FIXTURES / "llama-patterns")
    every = run_cli("inspect", FIXTURES / "llama-patterns", "--all-modules")
    assert grouped.stdout == every.stdout == ""
    rows = [line for line in every.stderr.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == len(doc["modules"]) == 8
    for m, row in zip(doc["modules"], rows):
        cells = [c.strip() for c in row.split("│")]
        assert cells[0] == m["name"] and int(cells[2]) == m["r"] and float(cells[3]) == m["alpha"]
        assert float(cells[4]) == m["scale"] and json.loads(cells[5]) == m["base_shape"]
    assert not any(m["name"] in grouped.stderr for m in doc["modules"])  # grouped by short name
    assert "count" in grouped.stderr and "count" not in every.stderr


# -- quantize / dequantize ------------------------------------------------------------------------------------

@pytest.mark.parametrize("compute", ["float16", "float32"])
def test_quantize_compute_dtype_is_what_transformers_loads(outputs, compute):
    """--compute-dtype lands in the config (default bfloat16) and transformers' Linear4bit computes in it;
    the packed weights do not depend on it."""
    from transformers import AutoModelForCausalLM

    default = outputs("q-default", "quantize", LLAMA, "--nf4", "--device", "cpu")
    q = outputs(f"q-{compute}", "quantize", LLAMA, "--nf4", "--device", "cpu", "--compute-dtype", compute)
    assert config(default)["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    assert config(q)["quantization_config"]["bnb_4bit_compute_dtype"] == compute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(q)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.compute_dtype == FLOAT_DTYPES[compute]
    a, b = tensors(default), tensors(q)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_dtype(outputs, dtype):
    """Default: each weight in the dtype its quant_state records (float16 for tiny-llama); --dtype gives
    that dtype for the dequantized weights, with the values of the format's definition in it (and of
    bitsandbytes' dequantize_4bit where it agrees with the definition: test_quantize.check_dequantized)."""
    from test_quantize import bnb_dequantize, check_dequantized, record

    q = outputs("q-default", "quantize", LLAMA, "--nf4", "--device", "cpu")
    dflt = tensors(outputs("dq-default", "dequantize", q, "--device", "cpu"))
    out = tensors(outputs(f"dq-{dtype}", "dequantize", q, "--device", "cpu", "--dtype", dtype))
    want = FLOAT_DTYPES[dtype]
    qt = tensors(q)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert dflt[key].dtype == torch.float16 and out[key].dtype == want
    stored = {k[len(key):]: v for k, v in qt.items() if k == key or k.startswith(key + ".")}
    record([check_dequantized(stored, out[key], bnb_dequantize(stored, want), want, label=key)])
    base = tensors(LLAMA)
    for k, t in out.items():
        if k in base and base[k].dtype == torch.float16 and k not in qt:  # not quantized (norms, embeddings, head)
            assert t.dtype == torch.float16 and torch.equal(t, base[k]), k  # --dtype is for the weights only


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "auto"])
def test_convert_dtype(outputs, dtype):
    """tiny-gpt2 is bfloat16: each value casts every float tensor once (auto keeps it) and updates config."""
    out = outputs(f"convert-{dtype}", "convert", GPT2, "--dtype", dtype)
    src, got = tensors(GPT2), tensors(out)
    assert src.keys() == got.keys()
    want = FLOAT_DTYPES.get(dtype, torch.bfloat16)
    for k, t in src.items():
        assert got[k].dtype == want and torch.equal(got[k], t.to(want)), k
    assert config(out)["dtype"] == str(want).removeprefix("torch.")


# -- merge / unmerge ------------------------------------------------------------------------------------------

def test_merge_dtype_bfloat16_is_peft_in_float32_rounded_once(outputs):
    """fp16 base, --dtype bfloat16: every float tensor bfloat16, config says so, and each merged weight is
    PEFT's float32 merge rounded once to bfloat16 (untouched tensors: the base's values cast)."""
    from test_merge import peft_merged

    out = outputs("merge-bf16", "merge", LLAMA, FIXTURES / "llama-lora", "--device", "cpu", "--dtype", "bfloat16")
    ref = peft_merged(LLAMA, [FIXTURES / "llama-lora"], torch.float32)
    got = tensors(out)
    assert got.keys() == ref.keys() and config(out)["dtype"] == "bfloat16"
    for k, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[k].to(torch.bfloat16)), k


def test_merge_max_shard_size(outputs):
    """--max-shard-size 100KB: several shards with an index, none over the limit (tensor bytes), the base's
    tensor names in the base's order, the same values as the one-file output."""
    whole = outputs("merge-whole", "merge", LLAMA, FIXTURES / "llama-lora", "--device", "cpu")
    out = outputs("merge-sharded", "merge", LLAMA, FIXTURES / "llama-lora", "--device", "cpu",
                  "--max-shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for s in shards:
        assert sum(t.nbytes for t in load_file(out / s).values()) <= 100_000, s
    assert list(Checkpoint(out).tensors) == list(Checkpoint(LLAMA).tensors)
    a, b = tensors(whole), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unmerge_dtype(outputs, dtype):
    """--dtype float32: the float32 result of the subtraction, unrounded (rounding it to the merged dtype
    gives the default output bit for bit); bfloat16: that float32 result rounded once."""
    merged = outputs("merge-whole", "merge", LLAMA, FIXTURES / "llama-lora", "--device", "cpu")
    dflt = tensors(outputs("unmerge-default", "unmerge", merged, FIXTURES / "llama-lora", "--device", "cpu"))
    f32 = tensors(outputs("unmerge-float32", "unmerge", merged, FIXTURES / "llama-lora", "--device", "cpu",
                          "--dtype", "float32"))
    out_dir = outputs(f"unmerge-{dtype}", "unmerge", merged, FIXTURES / "llama-lora", "--device", "cpu",
                      "--dtype", dtype)
    out, want = tensors(out_dir), FLOAT_DTYPES[dtype]
    assert config(out_dir)["dtype"] == dtype and out.keys() == dflt.keys()
    changed = 0
    for k, t in out.items():
        assert dflt[k].dtype == torch.float16 and t.dtype == want, k
        assert torch.equal(f32[k].to(torch.float16), dflt[k]) and torch.equal(t, f32[k].to(want)), k
        changed += not torch.equal(f32[k], dflt[k].float())
    assert changed > 0  # the float32 output holds values the float16 one cannot


# -- extract / resize -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_extract_dtype_casts_the_float32_factors_once(outputs, dtype):
    args = ("extract", LLAMA, FIXTURES / "tiny-llama-tuned", "--rank", "4", "--device", "cpu")
    f32 = tensors(outputs("extract-float32", *args) / "adapter_model.safetensors")
    got = tensors(outputs(f"extract-{dtype}", *args, "--dtype", dtype) / "adapter_model.safetensors")
    assert got.keys() == f32.keys() and len(got) > 0
    for k, t in got.items():
        assert f32[k].dtype == torch.float32 and t.dtype == FLOAT_DTYPES[dtype], k
        assert torch.equal(t, f32[k].to(FLOAT_DTYPES[dtype])), k


def svd_ranks(adapter) -> dict[str, torch.Tensor]:
    """Singular values of each module's B·A in float64."""
    return {n: torch.linalg.svdvals(m.B.double() @ m.A.double()) for n, m in load_adapter(adapter).modules.items()}


def test_resize_sv_ratio_keeps_the_singular_values_above_the_ratio(outputs):
    src = FIXTURES / "llama-patterns"
    out = outputs("resize-sv3", "resize", src, "--sv-ratio", "3")
    got = load_adapter(out).modules
    ranks = {}
    for name, s in svd_ranks(src).items():
        ranks[name] = int((s >= s[0] / 3 * (1 - 1e-6)).sum())
        assert got[name].r == ranks[name], (name, got[name].r, s.tolist())
    assert len(set(ranks.values())) > 1 and min(ranks.values()) < max(m.r for m in load_adapter(src).modules.values())


def test_resize_max_rank_caps_every_module_and_report_is_the_json(outputs, tmp_path):
    src = FIXTURES / "llama-patterns"
    report = tmp_path / "report.json"
    out = tmp_path / "out"
    r = run_cli("resize", src, "-o", out, "--sv-ratio", "1000", "--max-rank", "3", "--report", report, "--json")
    doc = json.loads(report.read_text())
    assert doc == json.loads(r.stdout) and doc["kind"] == "resize"
    old = load_adapter(src).modules
    new = load_adapter(out).modules
    for m in doc["modules"]:
        want = min(3, old[m["name"]].r)
        assert m["rank"] == new[m["name"]].r == want and m["old_rank"] == old[m["name"]].r, m
    assert any(m.r > 3 for m in old.values())
    # the report's errors are those of the written factors
    for m in doc["modules"]:
        a, b = old[m["name"]], new[m["name"]]
        d = (a.B.double() @ a.A.double()) * a.scale
        e = (b.B.double() @ b.A.double()) * b.scale
        assert abs(float((d - e).norm() / d.norm()) - m["rel_error"]) < 1e-4, m


# -- validate -------------------------------------------------------------------------------------------------

def test_validate_atol_and_rtol_gate_the_merged_comparison(outputs):
    """A correct merge: --atol alone set below the measured error fails it (exit 1, the verdict names the
    limit) while the default rtol is met; --rtol alone likewise while the default atol is met. The JSON
    reports the tolerances used."""
    merged = outputs("merge-whole", "merge", LLAMA, FIXTURES / "llama-lora", "--device", "cpu")
    args = ("validate", LLAMA, FIXTURES / "llama-lora", "--merged", merged, "--device", "cpu", "--batch", "1",
            "--seq-len", "16", "--json")

    def merged_row(r):
        return next(c for c in json.loads(r.stdout)["comparisons"] if c["name"] == "merged")

    r = run_cli(*args, "--atol", "1e-9", expect=1)
    row = merged_row(r)
    assert row["atol"] == 1e-9 and not row["passed"] and row["max_abs"] > 1e-9
    assert row["rtol"] == 2**-8 and row["rel_err"] < row["rtol"]  # default for float16 weights, met
    assert "allowed 1e-09" in r.stderr.strip().splitlines()[-1]
    r = run_cli(*args, "--rtol", "1e-9", expect=1)
    row = merged_row(r)
    assert row["rtol"] == 1e-9 and not row["passed"] and row["rel_err"] > 1e-9
    assert 0 < row["max_abs"] < row["atol"]  # the default atol, met
