"""kohya / LyCORIS-style LoRA keys: PEFT -> kohya -> PEFT gives back the same config and factors bit for bit;
the kohya file applies PEFT's own delta (PEFT's get_delta_weight on the loaded PeftModel) under kohya's
rule up @ down * alpha / r; names are read back against the base's module list, and what cannot be read or
carried is refused in one line."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, GPT2, LLAMA, base_of, run_cli

from loratools import formats
from loratools.errors import FormatError, UnsupportedError, UsageError
from loratools.formats.kohya import DEFAULT_PREFIX, WEIGHTS_NAME, kohya_to_peft, peft_to_kohya

CARRIED = ["llama-lora", "llama-rslora", "llama-patterns", "llama-dora", "gpt2-lora"]


def _kohya(name, tmp_path):
    files = formats.read(FIXTURES / name)
    fmt = formats.get("kohya")
    fmt.check(files)
    out = tmp_path / name
    out.mkdir()
    assert fmt.write(files, out) == [WEIGHTS_NAME]
    return files, out / WEIGHTS_NAME


@pytest.mark.parametrize("name", CARRIED)
def test_round_trip_is_bit_identical(name, tmp_path):
    files, path = _kohya(name, tmp_path)
    assert formats.detect(path).name == "kohya" and formats.detect(path.parent).name == "kohya"
    back = formats.read(path, base=base_of(name))
    assert back.source == "kohya"
    assert back.config == files.config
    assert sorted(back.tensors) == sorted(files.tensors)
    for k, t in files.tensors.items():
        assert back.tensors[k].dtype == t.dtype and torch.equal(back.tensors[k], t), k


@pytest.mark.parametrize("name", CARRIED)
def test_kohya_rule_gives_peft_delta(name, tmp_path):
    """Without our metadata (a kohya tool's view: up @ down * alpha / r, DoRA's dora_scale as magnitude), the
    file reads back to an adapter whose per-module scale and delta are PEFT's."""
    files, path = _kohya(name, tmp_path)
    tensors = load_file(path)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)  # no metadata: the config is derived from the tensors alone
    back = formats.read(bare, base=base_of(name))
    ref, got = formats.parse(files), formats.parse(back)
    assert list(got.modules) == list(ref.modules)
    for n, m in ref.modules.items():
        key = f"{DEFAULT_PREFIX}_{n.replace('.', '_')}"
        down, up, alpha = tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"], tensors[key + ".alpha"]
        assert torch.equal(down, m.A) and torch.equal(up, m.B)
        assert float(alpha) / m.r == pytest.approx(m.scale, rel=1e-6)
        g = got.modules[n]
        assert (g.r, g.fan_in_fan_out) == (m.r, m.fan_in_fan_out)
        assert g.scale == pytest.approx(m.scale, rel=1e-6)
        torch.testing.assert_close(g.delta(), m.delta(), rtol=1e-6, atol=0)
        if m.magnitude is not None:
            assert tensors[key + ".dora_scale"].shape == (m.B.shape[0], 1)
            assert torch.equal(g.magnitude, m.magnitude)
    assert back.config["use_dora"] == files.config.get("use_dora", False)


def test_patterns_carried_per_module_and_peft_loads_them(tmp_path):
    """llama-patterns' rank_pattern/alpha_pattern become one alpha per module; read back without metadata, PEFT
    itself (PeftModel.from_pretrained) gives each module the delta it gives the original adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratools.adapter import write_adapter

    _, path = _kohya("llama-patterns", tmp_path)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)
    back = formats.read(bare, base=LLAMA)
    assert back.config["rank_pattern"] and back.config["alpha_pattern"]
    out = tmp_path / "peft"
    out.mkdir()
    write_adapter(out, back.config, back.tensors)

    def deltas(adapter):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32), adapter)
        return {n: mod.get_delta_weight("default") for n, mod in model.named_modules() if hasattr(mod, "lora_A")
                and "default" in mod.lora_A}

    ref, got = deltas(FIXTURES / "llama-patterns"), deltas(out)
    assert sorted(got) == sorted(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=0)


def test_names_need_the_base_and_must_match_one_module(tmp_path):
    _, path = _kohya("llama-lora", tmp_path)
    with pytest.raises(UsageError, match="needs the base"):
        formats.read(path)
    with pytest.raises(FormatError, match="matches no module of the base"):
        formats.read(path, base=GPT2)
    tensors, modules = load_file(path), formats.kohya.base_modules(LLAMA)[0]
    with pytest.raises(FormatError, match="matches 2 modules"):
        kohya_to_peft(tensors, None, modules + ["model.layers_0.self_attn.q_proj"])
    down = next(k for k in tensors if k.endswith(".lora_down.weight"))
    tensors.pop(down)
    with pytest.raises(FormatError, match="no lora_down.weight"):
        kohya_to_peft(tensors, None, modules)


@pytest.mark.parametrize("name,what", [("llama-embed", "saved whole"), ("llama-mts", "saved whole"),
                                       ("gpt2-bias", "lora_bias")])
def test_refuses_what_kohya_cannot_hold(name, what):
    files = formats.read(FIXTURES / name)
    with pytest.raises(UnsupportedError, match=what):
        formats.get("kohya").check(files)
    with pytest.raises(UnsupportedError, match=what):
        peft_to_kohya(files.config, files.tensors)


def test_refuses_an_embedding_factor():
    files = formats.read(FIXTURES / "llama-embed")
    factors = {k: t for k, t in files.tensors.items() if ".lora_" in k}
    with pytest.raises(UnsupportedError, match="cannot hold an embedding"):
        peft_to_kohya(files.config, factors)


def test_cli_both_ways_and_refusals(tmp_path):
    from conftest import tree_digest

    src = FIXTURES / "llama-patterns"
    before = tree_digest(src)
    run_cli("convert", src, "-o", tmp_path / "k", "--to", "kohya")
    r = run_cli("convert", tmp_path / "k", "-o", tmp_path / "p", "--to", "peft", expect=2)
    assert "--base" in r.stderr and not (tmp_path / "p").exists()
    run_cli("convert", tmp_path / "k", "-o", tmp_path / "p", "--to", "peft", "--base", LLAMA)
    back, ref = formats.read(tmp_path / "p"), formats.read(src)
    assert back.config["alpha_pattern"] == ref.config["alpha_pattern"]
    assert all(torch.equal(back.tensors[k], t) for k, t in ref.tensors.items())
    r = run_cli("convert", FIXTURES / "llama-mts", "-o", tmp_path / "m", "--to", "kohya", expect=1)
    assert "saved whole" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    assert tree_digest(src) == before


def test_foreign_kohya_file_fp16_alpha_and_missing_alpha():
    """As kohya's tools save: alpha in the weights' dtype, or no alpha at all (kohya's default alpha = r)."""
    files = formats.read(FIXTURES / "llama-lora")
    tensors, _ = peft_to_kohya(files.config, files.tensors)
    modules = formats.kohya.base_modules(LLAMA)[0]
    alphas = [k for k in tensors if k.endswith(".alpha")]
    tensors[alphas[0]] = tensors[alphas[0]].half()
    del tensors[alphas[1]]
    config, back = kohya_to_peft(tensors, None, modules)
    ad = formats.parse(formats.PeftFiles(config, back))
    no_alpha = alphas[1][len(DEFAULT_PREFIX) + 1: -len(".alpha")]
    for n, m in ad.modules.items():
        assert m.scale == (1.0 if n.replace(".", "_") == no_alpha else files.config["lora_alpha"] / files.config["r"])
