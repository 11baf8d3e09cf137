"""Claims of README.md and docs/*.md that no other test held (docs/claims.md, "Unbacked"): each test fails if
its claim becomes false. Small inputs; the whole file runs in well under a minute."""
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, GPT2, LLAMA, run_cli, tree_digest


def _without_prefix(src: Path, dst: Path, prefix: str, edit=None) -> Path:
    """`src` saved from its backbone alone: every key without `prefix` (the original `gpt2`'s `h.0...`)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            sd = {k.removeprefix(prefix): v for k, v in load_file(f).items()}
            save_file(edit(sd) if edit else sd, dst / f.name, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


# -- extract: a backbone-only checkpoint is named as the model transformers builds (docs/extract.md) -----------

def test_backbone_only_checkpoint_extracts_an_adapter_peft_loads_whole(tmp_path):
    """BASE and TUNED saved without GPT2LMHeadModel's `transformer.` prefix: the adapter's names carry it
    (key_layout adds it as transformers does on load), PEFT loads every key into GPT2LMHeadModel, and the
    PEFT model computes the fine-tune. Merging it back into the prefix-less base works too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _without_prefix(GPT2, tmp_path / "base", "transformer.")
    g = torch.Generator().manual_seed(0)

    def tune(sd):  # a rank-2 change of every attention/MLP weight: rank 4 recovers it up to bf16 rounding
        for k, v in sd.items():
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                u, w = torch.randn(v.shape[0], 2, generator=g), torch.randn(2, v.shape[1], generator=g)
                sd[k] = (v.float() + 0.05 * u @ w).to(v.dtype)
        return sd

    tuned = _without_prefix(GPT2, tmp_path / "tuned", "transformer.", tune)
    out = tmp_path / "adapter"
    run_cli("extract", base, tuned, "-o", out, "--rank", "4")
    names = list(safe_open(out / "adapter_model.safetensors", "pt").keys())
    assert names and all(n.startswith("base_model.model.transformer.h.") for n in names), names[:3]

    ids = torch.arange(1, 17).reshape(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            l_base = model(ids).logits
        pm = PeftModel.from_pretrained(model, out)
    loaded = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(loaded) == len(names)  # every file key is a LoRA parameter of the model...
    file = load_file(out / "adapter_model.safetensors")
    for n, p in loaded.items():  # ...and holds the file's values, not PEFT's initialisation
        key = n.replace(".default.", ".")
        assert torch.equal(p.detach().to(file[key].dtype), file[key]), n
    with torch.no_grad():
        l_peft = pm(ids).logits
        l_tuned = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)(ids).logits
    effect = float((l_tuned - l_base).norm() / l_tuned.norm())
    residual = float((l_peft - l_tuned).norm() / l_tuned.norm())
    assert effect > 1e-2 and residual < 0.05 * effect, (effect, residual)

    merged = tmp_path / "merged"
    run_cli("merge", base, out, "-o", merged, "--dtype", "float32")
    m = load_file(merged / "model.safetensors")
    t = load_file(tuned / "model.safetensors")
    assert set(m) == set(t)  # the base's stored names, no prefix added
    for k in m:
        if k.endswith("c_attn.weight"):
            assert (m[k] - t[k].float()).norm() < 0.05 * (t[k].float() - load_file(
                base / "model.safetensors")[k].float()).norm(), k


# -- every writing command: --no-sync skips every fsync; every file carries its provenance (README) -------------

from test_hardening import WRITING, _writing_commands  # noqa: E402  (one list of the writing commands)

_REAL_FSYNC = os.fsync


@pytest.fixture(scope="module")
def writing_inputs(tmp_path_factory):
    return _writing_commands(tmp_path_factory.mktemp("writing"))


@pytest.mark.parametrize("command", WRITING)
def test_no_sync_skips_every_fsync_and_every_file_records_its_provenance(writing_inputs, monkeypatch, tmp_path,
                                                                          command):
    """README: `--no-sync` skips every fsync and writes the same bytes; every safetensors file carries the
    `loratools` record (version, command, options, input digests), except the DoRA record of a merge, which
    carries its own `loratools_dora` record (each adapter's digest and weight)."""
    from loratools.io.provenance import sha256_file

    argv = writing_inputs[command]
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), _REAL_FSYNC(fd))[1])
    run_cli(*argv, "-o", tmp_path / "synced")
    synced = len(calls)
    calls.clear()
    run_cli(*argv, "-o", tmp_path / "unsynced", "--no-sync")
    assert synced > 2 and calls == [], (synced, len(calls))
    assert tree_digest(tmp_path / "synced") == tree_digest(tmp_path / "unsynced")

    out = tmp_path / "synced"
    files = sorted(out.rglob("*.safetensors"))
    assert len(files) > (command == "convert") and (command != "merge" or out / "loratools-dora" in
                                                    [f.parent for f in files])
    for f in files:
        meta = safe_open(f, "pt").metadata() or {}
        if f.parent.name == "loratools-dora":
            record = json.loads(meta["loratools_dora"])
            digests = {a["sha256"] for a in record["adapters"]}
            assert len(digests) == len(record["adapters"]) == argv.count(FIXTURES / "llama-dora") + argv.count(
                FIXTURES / "llama-lora"), record
            continue
        record = json.loads(meta["loratools"])
        assert record["command"] == argv[0] and record["version"] and "options" in record, (f, record)
        given = {str(p) for p in argv[1:] if isinstance(p, Path)}
        recorded = {d for role in record["inputs"].values() for d in role["files"].values()}
        for p in map(Path, given):  # the digest of every input weight file is recorded
            for w in (p.glob("*.safetensors") if p.is_dir() else [p]):
                assert sha256_file(w) in recorded, (f.name, w)


# -- merge: untouched tensors are copied file to file, never read (docs/merge.md "Output") ---------------------

def test_merge_reads_only_the_tensors_an_adapter_changes(tmp_path, monkeypatch):
    """Every base tensor the merge reads into memory is one whose output differs from the base; every other
    tensor goes through the writer's file-to-file copy and comes out with the base's bytes."""
    from loratools.io import Checkpoint
    from loratools.io import writer as writer_mod

    read, copied = [], []
    real_read, real_copy = Checkpoint.read, writer_mod.ShardWriter.copy_from

    def spy_read(self, name, *args, **kwargs):
        if Path(self.path).resolve() == LLAMA.resolve():
            read.append(name)
        return real_read(self, name, *args, **kwargs)

    def spy_copy(self, name, info):
        copied.append(name)
        return real_copy(self, name, info)

    monkeypatch.setattr(Checkpoint, "read", spy_read)
    monkeypatch.setattr(writer_mod.ShardWriter, "copy_from", spy_copy)
    out = tmp_path / "out"
    run_cli("merge", LLAMA, FIXTURES / "llama-lora", "-o", out)
    monkeypatch.undo()
    base = dict(Checkpoint(LLAMA).iter_tensors())
    merged = dict(Checkpoint(out).iter_tensors())
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and set(read) == changed, (sorted(set(read) - changed), sorted(changed - set(read)))
    assert set(copied) == set(base) - changed


# -- quantize: tensors transformers would drop are copied; bits per parameter (docs/quantize.md) ----------------

def test_quantize_copies_a_tensor_transformers_would_drop(tmp_path):
    from transformers import AutoModelForCausalLM

    from loratools.io import Checkpoint

    dtype = getattr(torch, json.loads((LLAMA / "config.json").read_text())["dtype"])
    extra = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    shard = sorted(base.glob("*.safetensors"))[-1]
    save_file({**load_file(shard), "extra.unused": extra}, shard, metadata={"format": "pt"})
    index = base / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"]["extra.unused"] = shard.name
        index.write_text(json.dumps(idx))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)
    assert "extra.unused" in info["unexpected_keys"]  # transformers drops it
    run_cli("quantize", base, "-o", tmp_path / "q", "--nf4")
    assert torch.equal(Checkpoint(tmp_path / "q").read("extra.unused"), extra)


def test_bits_per_quantized_parameter_is_4_127_plus_the_maps(tmp_path):
    """NF4, double quant, blocksize 64: 4 bits per code + an 8-bit absmax per 64 + a float32 absmax per
    256 blocks = 4.127 bits; the rest of each tensor's bytes are its maps and quant_state JSON, whose size does
    not grow with the tensor. The report's bits are the written bytes."""
    res = run_cli("quantize", LLAMA, "-o", tmp_path / "q", "--nf4", "--json")
    report = json.loads(res.stdout)
    f = safe_open(tmp_path / "q" / "model.safetensors", "pt")
    sizes = {}
    for k in f.keys():
        s = f.get_slice(k)
        sizes[k] = int(torch.tensor(s.get_shape()).prod()) * {"U8": 1, "F32": 4, "F16": 2, "BF16": 2}[s.get_dtype()]
    assert round(4 + 8 / 64 + 32 / (64 * 256), 3) == 4.127
    rows = report["tensors"]
    assert rows and report["double_quant"] and report["blocksize"] == 64
    for row in rows:
        n, name = row["parameters"], row["name"]
        blocks = -(-n // 64)
        data = {name: -(-n // 2), f"{name}.absmax": blocks, f"{name}.nested_absmax": 4 * -(-blocks // 256)}
        maps = {f"{name}.quant_map": 16 * 4, f"{name}.nested_quant_map": 256 * 4}
        for k, b in {**data, **maps}.items():
            assert sizes[k] == b, (k, sizes[k], b)
        state = [k for k in sizes if k.startswith(f"{name}.quant_state.")]
        assert len(state) == 1 and sizes[state[0]] < 512
        assert row["bytes_after"] == sum(data.values()) + sum(maps.values()) + sizes[state[0]]
        assert row["bits_per_parameter"] == row["bytes_after"] * 8 / n


# -- combine (docs/combine.md): abstention, refusals, target_modules, factor dtype -----------------------------

def _adapter(src: Path, dst: Path, tensors=None, config=None) -> Path:
    """A copy of adapter `src` with its tensors and/or config edited."""
    shutil.copytree(src, dst)
    if tensors:
        sd = tensors(load_file(dst / "adapter_model.safetensors"))
        save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config(cfg) or cfg))
    return dst


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> B·A in float64 (combine writes scale 1: lora_alpha = r for every module)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"] and not cfg["use_rslora"]
    sd = load_file(adapter / "adapter_model.safetensors")
    return {k.removesuffix(".lora_A.weight"): sd[k.replace("lora_A", "lora_B")].double() @ sd[k].double()
            for k in sd if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune"])
def test_a_module_missing_from_an_adapter_abstains(tmp_path, method):
    """llama-lora adapts no MLP module, llama-rslora does: combining them equals combining llama-rslora with a
    llama-lora that adapts the MLP modules by a zero delta (lora_B = 0), for the sign election too."""
    mlp = sorted({k.removesuffix(".lora_A.weight") for k in load_file(FIXTURES / "llama-rslora" /
                  "adapter_model.safetensors") if ".mlp." in k and k.endswith("lora_A.weight")})
    assert mlp

    def add_zero_mlp(sd):
        for m in mlp:
            sd[f"{m}.lora_A.weight"] = torch.randn(8, 64 if "down_proj" not in m else 128)
            sd[f"{m}.lora_B.weight"] = torch.zeros(128 if "down_proj" not in m else 64, 8)
        return sd

    zero = _adapter(FIXTURES / "llama-lora", tmp_path / "zero", add_zero_mlp,
                    lambda c: {**c, "target_modules": c["target_modules"] + ["down_proj", "gate_proj", "up_proj"]})
    extra = ["--density", "0.5"] if method != "linear" else []
    outs = []
    for i, first in enumerate((FIXTURES / "llama-lora", zero)):
        out = tmp_path / f"out{i}"
        run_cli("combine", first, FIXTURES / "llama-rslora", "-o", out, "--method", method,
                "--weight", "0.7", "--weight", "1.3", "--rank", "12", *extra)
        outs.append(_deltas(out))
    assert outs[0].keys() == outs[1].keys() and set(mlp) <= outs[0].keys()
    for m in outs[0]:  # linear truncates a longer (zero-padded) factor stack: equal up to float32 SVD rounding
        assert float((outs[1][m] - outs[0][m]).norm() / outs[0][m].norm()) < 1e-5, m


def test_differing_layer_replication_is_refused(tmp_path):
    rep = _adapter(FIXTURES / "llama-lora", tmp_path / "rep", config=lambda c: {**c, "layer_replication": [[0, 2]]})
    out = tmp_path / "out"
    r = run_cli("combine", rep, FIXTURES / "llama-rslora", "-o", out, "--method", "linear", expect=1)
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error:") and "layer_replication" in line and not out.exists()


def test_lora_bias_next_to_an_embedding_lora_is_refused(tmp_path):
    def with_bias(sd):
        for k in [k for k in sd if k.endswith("lora_B.weight")]:
            sd[k.replace(".weight", ".bias")] = torch.randn(sd[k].shape[0])
        return sd

    biased = _adapter(FIXTURES / "llama-lora", tmp_path / "bias", with_bias, lambda c: {**c, "lora_bias": True})
    run_cli("combine", biased, FIXTURES / "llama-rslora", "-o", tmp_path / "fine", "--method", "cat")  # bias alone: fine
    out = tmp_path / "out"
    r = run_cli("combine", biased, FIXTURES / "llama-embed", "-o", out, "--method", "cat", expect=1)
    line = r.stderr.strip()
    assert "\n" not in line and "lora_bias" in line and "embed" in line and not out.exists(), line


def test_target_modules_is_the_union_or_the_full_names(tmp_path):
    out = tmp_path / "union"
    run_cli("combine", FIXTURES / "llama-lora", FIXTURES / "llama-patterns", "-o", out, "--method", "cat")
    names = lambda a: set(json.loads((a / "adapter_config.json").read_text())["target_modules"])  # noqa: E731
    assert names(out) == names(FIXTURES / "llama-lora") | names(FIXTURES / "llama-patterns")
    regex = _adapter(FIXTURES / "llama-lora", tmp_path / "regex",
                     config=lambda c: {**c, "target_modules": r".*\.(q_proj|k_proj|v_proj|o_proj)"})
    out = tmp_path / "full"
    run_cli("combine", regex, FIXTURES / "llama-patterns", "-o", out, "--method", "cat")
    adapted = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for k in load_file(out / "adapter_model.safetensors") if k.endswith("lora_A.weight")}
    assert names(out) == adapted


def test_factors_are_written_in_the_inputs_common_dtype(tmp_path):
    def to_bf16(sd):
        return {k: v.to(torch.bfloat16) for k, v in sd.items()}

    a = _adapter(FIXTURES / "llama-lora", tmp_path / "a", to_bf16)
    b = _adapter(FIXTURES / "llama-rslora", tmp_path / "b", to_bf16)
    for inputs, want in (((a, b), torch.bfloat16), ((a, FIXTURES / "llama-rslora"), torch.float32)):
        out = tmp_path / f"out-{want}"
        run_cli("combine", *inputs, "-o", out, "--method", "linear")
        assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {want}


# -- README: --help examples, no trust_remote_code, the JSON error types ---------------------------------------

def _examples(help_text: str) -> list[list[str]]:
    import shlex

    lines = help_text.split("Example", 1)[1].split("\nOptions:", 1)[0].splitlines()[1:]
    joined, cur = [], ""
    for line in lines:
        cur += " " + line.strip().rstrip("\\")
        if not line.rstrip().endswith("\\"):
            joined.append(cur.strip())
            cur = ""
    return [shlex.split(j) for j in joined if j]


def test_every_command_help_gives_examples_that_parse(monkeypatch):
    """README: `loratools COMMAND --help` gives every option with an example. Each example names real
    options of its command and fixtures that exist; those whose inputs are all fixtures parse as given."""
    from loratools.cli import cli

    monkeypatch.chdir(FIXTURES.parent)
    assert len(cli.commands) >= 10
    for name, cmd in cli.commands.items():
        text = run_cli(name, "--help").stdout
        examples = _examples(text)
        assert any(e[:2] == ["loratools", name] for e in examples), (name, examples)
        for e in examples:
            assert e[0] == "loratools" and e[1] in cli.commands, e
            sub = cli.commands[e[1]]
            opts = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}
            assert all(t in opts for t in e[2:] if t.startswith("-") and not t[1:2].isdigit()), (e, opts)
            paths = [t for t in e[2:] if not t.startswith("-") and "/" in t]
            assert all(Path(t).exists() for t in paths if t.startswith("fixtures/")), e
            inputs = [t for i, t in enumerate(e[2:], 2) if t in paths and e[i - 1] not in ("-o", "--output")]
            if inputs and all(t.startswith("fixtures/") for t in inputs):
                sub.make_context(e[1], e[2:])  # options, counts, choices and input paths as click checks them


def test_no_code_from_a_checkpoint_runs(tmp_path):
    """README: no `trust_remote_code`. A checkpoint whose config.json points at custom code (auto_map) that
    would leave a marker when imported: every command that reads config.json runs without importing it."""
    base = tmp_path / "remote"
    shutil.copytree(LLAMA, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran"
    for mod in ("configuration_evil", "modeling_evil"):
        (base / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('{mod}')\n")
    runs = [("inspect", base), ("validate", base, FIXTURES / "llama-lora"),
            ("merge", base, FIXTURES / "llama-lora", "-o", tmp_path / "m"),
            ("quantize", base, "-o", tmp_path / "q"),
            ("extract", base, FIXTURES / "tiny-llama-tuned", "-o", tmp_path / "e", "--rank", "2")]
    for argv in runs:
        r = run_cli(*argv, expect=None)
        assert r.exit_code in (0, 1) and "Traceback" not in r.stderr, (argv, r.stderr)
    assert not marker.exists(), marker.read_text()


def test_every_documented_error_type_is_produced_and_no_other(monkeypatch, tmp_path):
    """README: the JSON error `type` is one of the listed values: the LoratoolsError kinds, and those of the
    command line's own failures (OSError, MemoryError, a bug, Ctrl-C), each produced here. click turns Ctrl-C
    (KeyboardInterrupt) into its Abort before loratools sees it: `aborted`, exit 1."""
    import re

    import loratools.inspect as inspect_mod
    from loratools import errors

    text = (FIXTURES.parent / "README.md").read_text()
    listed = set(re.findall(r"`(\w+)`", text.split("`type` is one of", 1)[1].split("\n\n", 1)[0]))

    def kinds(c):
        return {c.kind} | {k for s in c.__subclasses__() for k in kinds(s)}

    produced = kinds(errors.LoratoolsError) - {"error"}  # the base class is never raised
    codes = {}
    for exc in (OSError(5, "I/O error"), MemoryError(), RuntimeError("bug"), KeyboardInterrupt()):
        def boom(*a, _e=exc, **k):
            raise _e
        monkeypatch.setattr(inspect_mod, "inspect_path", boom)
        r = run_cli("inspect", LLAMA, "--json", expect=None)
        err = json.loads(r.stdout)["error"]
        assert err["exit_code"] == r.exit_code and "Traceback" not in r.stderr
        produced.add(err["type"])
        codes[err["type"]] = r.exit_code
    assert codes == {"os": 1, "memory": 1, "internal": 1, "aborted": 1}
    monkeypatch.undo()

    from loratools.io import writer as writer_mod

    def interrupted(self, name, tensor):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer_mod.ShardWriter, "write", interrupted)  # Ctrl-C while writing a tensor
    r = run_cli("convert", LLAMA, "-o", tmp_path / "out", "--dtype", "float32", "--json", expect=1)
    assert json.loads(r.stdout)["error"]["type"] == "aborted" and list(tmp_path.iterdir()) == []
    assert listed == produced, (sorted(listed - produced), sorted(produced - listed))


# -- validate: the logits reference is PEFT itself, not our maths (docs/validate.md) ----------------------------

def test_a_mistake_merge_and_validate_share_still_fails_the_logits(monkeypatch, tmp_path):
    """Every delta loratools computes scaled by 1.5, in this process, for merge and validate alike: the
    tensor checks agree with the wrong merge (they share the mistake), and the merged logits, compared with
    PEFT's own model of base + adapter, fail it."""
    import loratools.adapter as adapter_mod
    import loratools.lora_math as lora_math

    real = lora_math.peft_delta

    def wrong(B, A, scale, transposed, out=None):
        return real(B, A, scale * 1.5, transposed, out)

    monkeypatch.setattr(lora_math, "peft_delta", wrong)
    monkeypatch.setattr(adapter_mod, "peft_delta", wrong)
    merged = tmp_path / "merged"
    run_cli("merge", LLAMA, FIXTURES / "llama-lora", "-o", merged)
    r = run_cli("validate", LLAMA, FIXTURES / "llama-lora", "--merged", merged, "--json", expect=1)
    doc = json.loads(r.stdout)
    rows = doc["tensors"]["merged"]
    assert rows["checked"] > 0 and rows["failed"] == 0  # the tensor checks share the mistake and pass it
    assert [p["check"] for p in doc["problems"]] == ["logits"]
    merged_cmp = [c for c in doc["comparisons"] if c["name"] == "merged"]
    assert merged_cmp[0]["reference"].startswith("base + adapters (PEFT") and not merged_cmp[0]["passed"]
