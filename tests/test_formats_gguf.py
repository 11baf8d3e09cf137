"""GGUF LoRA (llama.cpp): what we write is what llama.cpp applies, by its own rule (lora_b @ lora_a · alpha / r
on tensors named and row-ordered as convert_hf_to_gguf names and orders the base), equals PEFT's delta per
module; plain adapters give llama.cpp's own convert_lora_to_gguf.py output tensor for tensor (where that
script is present: LORATOOLS_LLAMA_CPP=<llama.cpp source dir>, e.g. the llama-cpp-python sdist's
vendor/llama.cpp); GGUF -> PEFT restores the adapter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, LLAMA

gguf = pytest.importorskip("gguf")  # in the test extra; a bare install has no GGUF format

from loratools import formats
from loratools.adapter import write_adapter
from loratools.errors import FormatError, UnsupportedError, UsageError
from loratools.formats.gguf_lora import GgufArch, _permute_rows, fold_factor, peft_to_gguf, read_gguf, write_gguf

CARRIED = ["llama-lora", "llama-rslora", "llama-patterns", "llama-embed-lora"]
LLAMA_CPP = os.environ.get("LORATOOLS_LLAMA_CPP")
ARCH = GgufArch.from_config(json.loads((LLAMA / "config.json").read_text()))


def _files(name, tmp_path):
    """The fixture as PeftFiles; llama-embed-lora is llama-embed without the base embedding PEFT saved whole
    (neither llama.cpp nor we carry a full tensor), written out as a PEFT adapter for the converter."""
    if name != "llama-embed-lora":
        return formats.read(FIXTURES / name), FIXTURES / name
    files = formats.read(FIXTURES / "llama-embed")
    files.tensors = {k: t for k, t in files.tensors.items() if ".lora_" in k}
    d = tmp_path / name
    d.mkdir()
    write_adapter(d, files.config, files.tensors)
    return formats.read(d), d


def _write(files, tmp_path, name):
    out = tmp_path / f"{name}-gguf"
    out.mkdir()
    fmt = formats.get("gguf")
    fmt.check(files, LLAMA)
    assert fmt.write(files, out, LLAMA) == ["adapter.gguf"]
    return out / "adapter.gguf"


@pytest.mark.parametrize("name", CARRIED)
def test_gguf_applies_peft_delta(name, tmp_path):
    """Always runs: metadata keys, names, shapes, and llama.cpp's rule on our tensors against PEFT's delta."""
    files, _ = _files(name, tmp_path)
    path = _write(files, tmp_path, name)
    reader = gguf.GGUFReader(str(path))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert (field("general.type"), field("general.architecture"), field("adapter.type")) == ("adapter", "llama", "lora")
    alpha = field("adapter.lora.alpha")
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert alpha == files.config["lora_alpha"]
    tensors, _ = read_gguf(path)
    ad = formats.parse(files)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, ARCH.n_blocks)
    expected = {names.get_name(n + ".weight", try_suffixes=(".weight",)): m for n, m in ad.modules.items()}
    assert sorted(tensors) == sorted(f"{g}.{ab}" for g in expected for ab in ("lora_a", "lora_b"))
    for g, m in expected.items():
        a, b = tensors[g + ".lora_a"], tensors[g + ".lora_b"]
        r = m.r
        if g.startswith("token_embd"):
            assert a.shape == (m.A.shape[1], r) and torch.equal(a, m.A.float().T)
            applied = (b @ a.T * (alpha / r)).T  # [num_embeddings, dim], the embedding's layout
        else:
            assert a.shape == m.A.shape and torch.equal(a, m.A.float())
            applied = b @ a * (alpha / r)
        want = m.delta()
        heads = ARCH.qk_heads(m.name)
        if heads is not None:  # llama.cpp holds q/k rows in convert_hf_to_gguf's RoPE order
            want = _permute_rows(want, heads)
        torch.testing.assert_close(applied, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", CARRIED)
def test_round_trip(name, tmp_path):
    files, _ = _files(name, tmp_path)
    back = formats.read(_write(files, tmp_path, name).parent, base=LLAMA)
    assert back.source == "gguf" and back.config == files.config
    assert sorted(back.tensors) == sorted(files.tensors)
    ad = formats.parse(files)
    folded = any(fold_factor(m.scale, files.config["lora_alpha"], m.r) != 1.0 for m in ad.modules.values())
    assert folded == (name in ("llama-rslora", "llama-patterns"))
    for k, t in files.tensors.items():
        assert back.tensors[k].dtype == t.dtype
        if folded:  # B · f / f: within one rounding
            torch.testing.assert_close(back.tensors[k], t, rtol=2e-7 if t.dtype == torch.float32 else 1e-3, atol=0)
        else:
            assert torch.equal(back.tensors[k], t), k


def test_foreign_gguf_reads_as_llama_cpp_applies_it(tmp_path):
    """A GGUF without our KV (as llama.cpp's converter writes it): the config is what llama.cpp applies."""
    files, _ = _files("llama-patterns", tmp_path)
    tensors, kv, notes = peft_to_gguf(files.config, files.tensors, ARCH)
    assert notes and "folded into lora_b" in notes[0]
    path = tmp_path / "bare.gguf"
    write_gguf(path, "llama", tensors, {"alpha": kv["alpha"]})
    back = formats.read(path, base=LLAMA)
    assert not back.config["alpha_pattern"] and not back.config["use_rslora"]
    ref, got = formats.parse(files), formats.parse(back)
    for n, m in ref.modules.items():
        torch.testing.assert_close(got.modules[n].delta(), m.delta(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,what", [("llama-dora", "DoRA"), ("llama-mts", "saved whole"),
                                       ("llama-embed", "saved whole")])
def test_refuses_what_llama_cpp_cannot_apply(name, what):
    with pytest.raises(UnsupportedError, match=what):
        formats.get("gguf").check(formats.read(FIXTURES / name), LLAMA)


def test_needs_a_known_base_and_the_same_architecture(tmp_path):
    files, _ = _files("llama-lora", tmp_path)
    with pytest.raises(UsageError, match="needs the base"):
        formats.get("gguf").check(files)
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel"):
        formats.get("gguf").check(files, FIXTURES / "tiny-gpt2")
    tensors, kv, _ = peft_to_gguf(files.config, files.tensors, ARCH)
    other = tmp_path / "qwen2.gguf"
    write_gguf(other, "qwen2", tensors, kv)
    with pytest.raises(FormatError, match="for architecture 'qwen2', the base is 'llama'"):
        formats.read(other, base=LLAMA)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(_write(files, tmp_path, "t").read_bytes()[:300])
    with pytest.raises(FormatError, match="not a readable GGUF file"):
        formats.read(truncated, base=LLAMA)


def _convert_with_llama_cpp(adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    script = Path(LLAMA_CPP) / "convert_lora_to_gguf.py"
    subprocess.run([sys.executable, str(script), str(adapter), "--base", str(LLAMA), "--outfile", str(out)],
                   check=True, capture_output=True)
    return read_gguf(out)[0]


@pytest.mark.skipif(not (LLAMA_CPP and (Path(LLAMA_CPP) / "convert_lora_to_gguf.py").is_file()),
                    reason="llama.cpp's convert_lora_to_gguf.py not present (set LORATOOLS_LLAMA_CPP)")
@pytest.mark.parametrize("name", CARRIED)
def test_equals_llama_cpp_converter(name, tmp_path):
    """Tensor for tensor what llama.cpp's own converter writes, except lora_b where PEFT's scale is not
    alpha / r (rsLoRA, alpha_pattern): there the converter is wrong and ours is its lora_b times the factor."""
    files, adapter = _files(name, tmp_path)
    ours, _ = read_gguf(_write(files, tmp_path, name))
    ref = _convert_with_llama_cpp(adapter, tmp_path / "ref.gguf")
    assert sorted(ours) == sorted(ref)
    ad = formats.parse(files)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, ARCH.n_blocks)
    for n, m in ad.modules.items():
        g = names.get_name(n + ".weight", try_suffixes=(".weight",))
        assert torch.equal(ours[g + ".lora_a"], ref[g + ".lora_a"]), g
        f = fold_factor(m.scale, files.config["lora_alpha"], m.r)
        if f == 1.0:
            assert torch.equal(ours[g + ".lora_b"], ref[g + ".lora_b"]), g
        else:
            torch.testing.assert_close(ours[g + ".lora_b"], ref[g + ".lora_b"] * f, rtol=1e-6, atol=0)
    # and the converter's file reads back as the adapter llama.cpp applies: PEFT's, where nothing needed folding
    got = formats.parse(formats.read(tmp_path / "ref.gguf", base=LLAMA)).modules
    for n, m in ad.modules.items():
        if fold_factor(m.scale, files.config["lora_alpha"], m.r) == 1.0:
            torch.testing.assert_close(got[n].delta(), m.delta(), rtol=1e-6, atol=1e-8)


def test_refuses_nan(tmp_path):
    files, _ = _files("llama-lora", tmp_path)
    tensors, kv, _ = peft_to_gguf(files.config, files.tensors, ARCH)
    first = next(iter(tensors))
    tensors[first][0, 0] = float("nan")
    path = tmp_path / "nan.gguf"
    write_gguf(path, "llama", tensors, kv)
    with pytest.raises(FormatError, match="NaN") as e:
        formats.read(path, base=LLAMA)
    assert e.value.tensor == first and e.value.path == str(path)


def test_cli_both_ways_and_refusals(tmp_path):
    from conftest import run_cli, tree_digest

    src = FIXTURES / "llama-rslora"
    before = tree_digest(src)
    r = run_cli("convert", src, "-o", tmp_path / "g", "--to", "gguf", "--base", LLAMA)
    assert "folded into lora_b" in r.stderr
    record = json.loads(gguf.GGUFReader(str(tmp_path / "g" / "adapter.gguf")).fields["loratools"].contents())
    assert record["command"] == "convert" and "adapter" in record["inputs"]  # provenance, as on every output
    run_cli("convert", tmp_path / "g", "-o", tmp_path / "p", "--to", "peft", "--base", LLAMA)
    assert formats.read(tmp_path / "p").config == formats.read(src).config
    r = run_cli("convert", FIXTURES / "llama-dora", "-o", tmp_path / "d", "--to", "gguf", "--base", LLAMA, expect=1)
    assert "DoRA" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
    assert tree_digest(src) == before


# -- MoE: target_parameters experts -> llama.cpp's stacked _exps tensors ----------------------------------

@pytest.fixture(scope="session")
def mixtral(tmp_path_factory):
    from zoo import Case

    return Case("mixtral", tmp_path_factory.mktemp("gguf-mixtral"))


def _per_expert_adapter(files, out: Path) -> Path:
    """The same adapter as transformers 4 PEFT saved it for Mixtral (one Linear LoRA per expert w1/w2/w3 and on
    block_sparse_moe.gate): what llama.cpp's converter reads."""
    from loratools.adapter import PREFIX

    ad, t = formats.parse(files), {}
    for n, m in ad.modules.items():
        pairs = []
        if m.kind == "experts":
            A_e, B_e = m.expert_factors(m.A.dtype)
            mod = n.rsplit(".", 2)[0].replace(".mlp", ".block_sparse_moe")
            half = B_e.shape[1] // 2
            for e in range(m.experts):
                if m.param == "gate_up_proj":
                    pairs += [(f"{mod}.experts.{e}.w1", A_e[e], B_e[e, :half]), (f"{mod}.experts.{e}.w3", A_e[e], B_e[e, half:])]
                else:
                    pairs.append((f"{mod}.experts.{e}.w2", A_e[e], B_e[e]))
        elif m.param:  # the router's weight
            pairs.append((n[: -len(".weight")].replace(".mlp.", ".block_sparse_moe."), m.A, m.B))
        else:
            pairs.append((n, m.A, m.B))
        for mod, A, B in pairs:
            t[f"{PREFIX}{mod}.lora_A.weight"], t[f"{PREFIX}{mod}.lora_B.weight"] = A.contiguous(), B.contiguous()
    out.mkdir()
    write_adapter(out, {**files.config, "target_parameters": None}, t)
    return out


def test_moe_applies_peft_delta_per_expert(mixtral, tmp_path):
    files = formats.read(mixtral.adapter)
    arch = GgufArch.from_config(json.loads((mixtral.base / "config.json").read_text()))
    tensors, kv, notes = peft_to_gguf(files.config, files.tensors, arch)
    alpha = kv["alpha"]
    for n, m in formats.parse(files).modules.items():
        if m.kind != "experts":
            continue
        module, _, leaf = n.rpartition(".")
        want = m.delta()  # [E, out, in], PEFT's ParamWrapper delta
        halves = ([("gate_proj", slice(0, want.shape[1] // 2)), ("up_proj", slice(want.shape[1] // 2, None))]
                  if leaf == "gate_up_proj" else [(leaf, slice(None))])
        for name, rows in halves:
            g = arch.gguf_name(f"{module}.{name}")
            a, b = tensors[g + ".lora_a"], tensors[g + ".lora_b"]
            assert a.shape == (m.experts, m.r, want.shape[2]) and b.shape[:2] == (m.experts, want[:, rows].shape[1])
            torch.testing.assert_close(b @ a * (alpha / m.r), want[:, rows], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["adapter", "adapter2"])
def test_moe_round_trip(mixtral, tmp_path, which):
    files = formats.read(getattr(mixtral, which))
    out = tmp_path / "g"
    out.mkdir()
    formats.get("gguf").write(files, out, mixtral.base)
    back = formats.read(out, base=mixtral.base)
    assert back.config == files.config and sorted(back.tensors) == sorted(files.tensors)
    ref, got = formats.parse(files), formats.parse(back)
    for n, m in ref.modules.items():
        torch.testing.assert_close(got.modules[n].delta(), m.delta(), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not (LLAMA_CPP and (Path(LLAMA_CPP) / "convert_lora_to_gguf.py").is_file()),
                    reason="llama.cpp's convert_lora_to_gguf.py not present (set LORATOOLS_LLAMA_CPP)")
def test_moe_equals_llama_cpp_converter(mixtral, tmp_path):
    files = formats.read(mixtral.adapter)
    out = tmp_path / "g"
    out.mkdir()
    formats.get("gguf").write(files, out, mixtral.base)
    ours = read_gguf(out / "adapter.gguf")[0]
    adapter = _per_expert_adapter(files, tmp_path / "per-expert")
    script = Path(LLAMA_CPP) / "convert_lora_to_gguf.py"
    subprocess.run([sys.executable, str(script), str(adapter), "--base", str(mixtral.base), "--outfile",
                    str(tmp_path / "ref.gguf")], check=True, capture_output=True)
    ref = read_gguf(tmp_path / "ref.gguf")[0]
    assert sorted(ours) == sorted(ref)
    arch = GgufArch.from_config(json.loads((mixtral.base / "config.json").read_text()))
    for n, m in formats.parse(files).modules.items():
        f = fold_factor(m.scale, files.config["lora_alpha"], m.r)
        module = n.rpartition(".")[0]
        names = ([f"{module}.gate_proj", f"{module}.up_proj"] if m.param == "gate_up_proj"
                 else [module] if m.param == "weight" else [n])
        for g in (arch.gguf_name(x) for x in names):
            assert torch.equal(ours[g + ".lora_a"], ref[g + ".lora_a"]), g
            torch.testing.assert_close(ours[g + ".lora_b"], ref[g + ".lora_b"] * f, rtol=0, atol=0)


# -- other architectures: Qwen2/Qwen3 (no RoPE row permutation), Mistral (llama.cpp's llama) -----------------

@pytest.fixture(scope="session")
def zoo_case(tmp_path_factory):
    from zoo import Case

    cases = {}

    def get(family):
        if family not in cases:
            cases[family] = Case(family, tmp_path_factory.mktemp(f"gguf-{family}"))
        return cases[family]

    return get


def _ours(files, base, tmp_path):
    out = tmp_path / "ours"
    out.mkdir()
    formats.get("gguf").write(files, out, base)
    return read_gguf(out / "adapter.gguf")


def test_qwen3_applies_peft_delta(zoo_case, tmp_path):
    case = zoo_case("qwen3")
    files = formats.read(case.adapter)
    arch = GgufArch.from_config(json.loads((case.base / "config.json").read_text()))
    assert (arch.arch, arch.permute_qk) == ("qwen3", False)
    tensors, kv = _ours(files, case.base, tmp_path)
    mods = formats.parse(files).modules
    assert len(tensors) == 2 * len(mods)
    for n, m in mods.items():
        g = arch.gguf_name(n)
        torch.testing.assert_close(tensors[g + ".lora_b"] @ tensors[g + ".lora_a"] * (kv["alpha"] / m.r), m.delta(),
                                   rtol=1e-5, atol=1e-7)
    back = formats.read(tmp_path / "ours", base=case.base)
    assert back.config == files.config and all(torch.equal(back.tensors[k], t) for k, t in files.tensors.items())


@pytest.mark.skipif(not (LLAMA_CPP and (Path(LLAMA_CPP) / "convert_lora_to_gguf.py").is_file()),
                    reason="llama.cpp's convert_lora_to_gguf.py not present (set LORATOOLS_LLAMA_CPP)")
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_equal_llama_cpp_converter(zoo_case, tmp_path, family):
    case = zoo_case(family)
    files = formats.read(case.adapter)
    ours, _ = _ours(files, case.base, tmp_path)
    subprocess.run([sys.executable, str(Path(LLAMA_CPP) / "convert_lora_to_gguf.py"), str(case.adapter), "--base",
                    str(case.base), "--outfile", str(tmp_path / "ref.gguf")], check=True, capture_output=True)
    ref = read_gguf(tmp_path / "ref.gguf")[0]
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
