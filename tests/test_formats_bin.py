"""Legacy pickle adapters (`adapter_model.bin` / `pytorch_model.bin`): `convert` reads them with
torch.load(weights_only=True) and writes safetensors; a pickle that would run code is refused before it
runs; every other command still refuses the .bin file."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, LLAMA, run_cli, tree_digest


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    """llama-dora loaded by PEFT and saved by PEFT both ways: (pickle dir, safetensors dir)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bin")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA), FIXTURES / "llama-dora")
    model.save_pretrained(root / "pickle", safe_serialization=False)
    model.save_pretrained(root / "safe", safe_serialization=True)
    assert (root / "pickle" / "adapter_model.bin").is_file()
    assert not (root / "pickle" / "adapter_model.safetensors").exists()
    return root / "pickle", root / "safe"


def _evil_dir(tmp_path, marker, how):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(FIXTURES / "llama-lora" / "adapter_config.json", d)
    payload = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64), "x": Evil()}
    if how == "torch":
        torch.save(payload, d / "adapter_model.bin")
    else:
        with open(d / "adapter_model.bin", "wb") as f:
            pickle.dump(payload, f)
    return d


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.bin"])
def test_convert_bin_gives_peft_tensors_as_safetensors(peft_saved, tmp_path, name):
    pickled, safe = peft_saved
    src = tmp_path / "src"
    shutil.copytree(pickled, src)
    if name != "adapter_model.bin":
        (src / "adapter_model.bin").rename(src / name)
    before = tree_digest(src)
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out, "--to", "peft", "--json")
    assert json.loads(r.stdout)["from"] == "peft-bin"
    assert tree_digest(src) == before
    got = load_file(out / "adapter_model.safetensors")
    for ref in (torch.load(src / name, weights_only=True), load_file(safe / "adapter_model.safetensors")):
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True


def test_converted_bin_loads_in_peft(peft_saved, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_cli("convert", peft_saved[0], "-o", out, "--to", "peft")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA), out)
    ids = torch.tensor([[1, 5, 9, 2]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA), FIXTURES / "llama-dora")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_bin_converts_to_other_formats(peft_saved, tmp_path):
    out = tmp_path / "mlx"
    run_cli("convert", peft_saved[0], "-o", out, "--to", "mlx")
    assert (out / "adapters.safetensors").is_file()
    # the .bin file itself names the adapter too
    run_cli("convert", peft_saved[0] / "adapter_model.bin", "-o", tmp_path / "p", "--to", "peft")
    assert load_file(tmp_path / "p" / "adapter_model.safetensors").keys() == \
        load_file(peft_saved[1] / "adapter_model.safetensors").keys()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_pickle_that_runs_code_is_refused_before_running(tmp_path, how):
    marker = tmp_path / "marker"
    d = _evil_dir(tmp_path, marker, how)
    out = tmp_path / "out"
    r = run_cli("convert", d, "-o", out, "--to", "peft", expect=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapter_model.bin" in lines[0] and "pickle refused" in lines[0], r.stderr
    if how == "torch":
        assert "posix.system" in lines[0]  # names what it would have called
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("bad,needle", [
    ("truncated", "not a readable torch state dict"),
    ("not_tensor", "expected a state dict"),
    ("nan", "NaN/Inf"),
])
def test_bad_bin_one_line(peft_saved, tmp_path, bad, needle):
    src = tmp_path / "src"
    shutil.copytree(peft_saved[0], src)
    w = src / "adapter_model.bin"
    if bad == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        sd = torch.load(w, weights_only=True)
        key = next(iter(sd))
        if bad == "not_tensor":
            sd[key] = 3
        else:
            sd[key] = sd[key].clone()
            sd[key].view(-1)[0] = float("nan")
        torch.save(sd, w)
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out, "--to", "peft", expect=1)
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_other_commands_still_refuse_bin_and_name_convert(peft_saved, tmp_path):
    out = tmp_path / "merged"
    r = run_cli("merge", LLAMA, peft_saved[0], "-o", out, expect=1)
    assert "adapter_model.bin" in r.stderr and "convert" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
