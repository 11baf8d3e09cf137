"""MLX-LM adapters (loratools/formats/mlx.py, `loratools convert --to mlx|peft`).

Always run: the output against MLX-LM's definition (mlx_lm/tuner: files, config, keys, shapes, and
y + scale·(x @ lora_a) @ lora_b rebuilt from the file equal to PEFT's delta), round trips PEFT -> MLX -> PEFT,
refusals and bad inputs. Where mlx_lm is importable (`pip install -e '.[mlx]'`, Linux CPU wheels exist):
mlx_lm itself loads our output on the tiny Llama and gives PEFT's logits, and an adapter mlx_lm made converts
to PEFT and gives mlx_lm's logits."""
import json

import pytest
import torch

from conftest import FIXTURES, LLAMA, run_cli, tree_digest

from loratools import formats
from loratools.adapter import load_adapter
from loratools.io.safetensors_format import read_header, read_tensor

# PEFT 0.21.2 warns that a rank/alpha pattern on a target_parameters entry matched nothing, and applies it
# (tests/test_moe_adapter.py); the MoE round trip below checks the result with PEFT's logits.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")

PLAIN = ["llama-lora", "llama-rslora", "llama-dora"]  # one scale, one rank: nothing folded
ALL = PLAIN + ["llama-patterns"]  # rank_pattern + alpha_pattern: scales folded, ranks padded


def _read(path):
    infos, _ = read_header(str(path))
    with open(path, "rb") as fh:
        return {k: read_tensor(i, fh) for k, i in infos.items()}


@pytest.fixture(scope="module")
def mlx_out(tmp_path_factory):
    """Each adapter converted to MLX once, through the command line."""
    root = tmp_path_factory.mktemp("mlx")
    for name in ALL:
        run_cli("convert", FIXTURES / name, "-o", root / name, "--to", "mlx")
    # its embedding is saved whole but equals the base's: with --base it is left out
    r = run_cli("convert", FIXTURES / "llama-embed", "-o", root / "llama-embed", "--to", "mlx", "--base", LLAMA)
    assert "equal the base's own bit for bit" in r.stderr
    return root


@pytest.mark.parametrize("name", ALL)
def test_mlx_output_is_mlx_lm_format(mlx_out, name):
    out, ref = mlx_out / name, load_adapter(FIXTURES / name)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    lp = cfg["lora_parameters"]
    assert cfg["fine_tune_type"] == ("dora" if ref.use_dora else "lora") and cfg["num_layers"] == -1
    assert lp["rank"] == max(m.r for m in ref.modules.values())
    scales = [m.scale for m in ref.modules.values()]
    assert lp["scale"] == max(set(scales), key=lambda s: (scales.count(s), s))  # most common; ties: larger
    assert set(lp["keys"]) == {n.split(".", 3)[3] for n in ref.modules}  # e.g. self_attn.q_proj, block-relative
    t = _read(out / "adapters.safetensors")
    leaves = ["lora_a", "lora_b"] + (["m"] if ref.use_dora else [])
    assert set(t) == {f"{n}.{leaf}" for n in ref.modules for leaf in leaves}
    R, S = lp["rank"], lp["scale"]
    for n, m in ref.modules.items():
        a, b = t[f"{n}.lora_a"], t[f"{n}.lora_b"]
        assert a.shape == (m.A.shape[1], R) and b.shape == (R, m.B.shape[0])
        assert torch.equal(a[:, :m.r], m.A.T) and not a[:, m.r:].any() and not b[m.r:].any()
        if m.scale == S:  # nothing folded: the same bits
            assert torch.equal(b[:m.r], m.B.T)
        # MLX's delta (tuner/lora.py fuse: (scale · lora_b.T) @ lora_a.T) is PEFT's
        mlx_delta = (S * b.float().T) @ a.float().T
        torch.testing.assert_close(mlx_delta, m.delta(), rtol=1e-6, atol=1e-7)
        if ref.use_dora:
            assert torch.equal(t[f"{n}.m"], m.magnitude)


@pytest.mark.parametrize("name", ALL + ["llama-embed"])
def test_round_trip_gives_the_same_delta(mlx_out, tmp_path, name):
    run_cli("convert", mlx_out / name, "-o", tmp_path / "back", "--to", "peft")
    a, b = load_adapter(FIXTURES / name), load_adapter(tmp_path / "back")
    assert list(a.modules) == list(b.modules)
    for n, m in a.modules.items():
        assert b.modules[n].r == m.r  # the zero padding is dropped again
        if name != "llama-patterns":  # a folded scale comes back in B, the others bit for bit
            assert b.modules[n].scale == m.scale and torch.equal(b.modules[n].delta(), m.delta()) and torch.equal(b.modules[n].A, m.A)
        else:
            torch.testing.assert_close(b.modules[n].delta(), m.delta(), rtol=1e-6, atol=1e-7)
        if m.magnitude is not None:
            assert torch.equal(b.modules[n].magnitude, m.magnitude)


@pytest.mark.parametrize("name,what", [("llama-mts", "not whole tensors"), ("llama-embed", "not whole tensors"),
                                       ("gpt2-lora", "fan_in_fan_out"), ("gpt2-bias", "fan_in_fan_out")])
def test_refuses_what_mlx_cannot_hold(tmp_path, name, what):
    r = run_cli("convert", FIXTURES / name, "-o", tmp_path / "o", "--to", "mlx", expect=1)
    assert what in r.stderr and "cannot convert to MLX-LM" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_bad_mlx_inputs(mlx_out, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(mlx_out / "llama-lora", src)
    w = src / "adapters.safetensors"
    # wrong orientation: lora_a stored (r, in), PEFT's way
    t = _read(w)
    key = next(k for k in t if k.endswith("lora_a"))
    t[key] = t[key].T.contiguous()
    from safetensors.torch import save_file
    save_file(t, str(w))
    before = tree_digest(src)
    r = run_cli("convert", src, "-o", tmp_path / "o", "--to", "peft", expect=1)
    assert tree_digest(src) == before
    assert "wrong orientation" in r.stderr and key in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # truncated file
    data = (mlx_out / "llama-lora" / "adapters.safetensors").read_bytes()
    w.write_bytes(data[: len(data) // 2])
    r = run_cli("convert", src, "-o", tmp_path / "o", "--to", "peft", expect=1)
    assert "adapters.safetensors" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a full fine-tune is not an adapter
    shutil.copy(mlx_out / "llama-lora" / "adapters.safetensors", w)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(cfg | {"fine_tune_type": "full"}))
    r = run_cli("convert", src, "-o", tmp_path / "o", "--to", "peft", expect=1)
    assert "full fine-tune" in r.stderr
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert formats.detect(src).name == "mlx"


def test_checkpoint_convert_unchanged_and_usage(tmp_path):
    r = run_cli("convert", FIXTURES / "llama-lora", "-o", tmp_path / "o", expect=2)
    assert "--to" in r.stderr
    run_cli("convert", LLAMA, "-o", tmp_path / "o", "--to", "mlx", expect=2)
    run_cli("convert", FIXTURES / "llama-lora", "-o", tmp_path / "o", "--to", "mlx", "--dtype", "float16", expect=2)
    assert not (tmp_path / "o").exists()


# -- the runtime itself ------------------------------------------------------------------------------------

IDS = [[1, 5, 9, 33, 100, 7, 2, 250, 17, 301]]


def _mlx_logits(adapter_dir):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(LLAMA)
    load_adapters(model, str(adapter_dir))
    model.set_dtype(mx.float32)
    import numpy as np
    return torch.from_numpy(np.array(model(mx.array(IDS)).astype(mx.float32)))


def _peft_logits(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0], model


@pytest.mark.parametrize("name", ["llama-patterns", "llama-dora", "llama-embed"])
def test_mlx_lm_loads_our_output_with_peft_logits(mlx_out, name):
    pytest.importorskip("mlx_lm", reason="mlx_lm not installed (pip install -e '.[mlx]')")
    got = _mlx_logits(mlx_out / name)[0]
    ref, model = _peft_logits(FIXTURES / name)
    with model.disable_adapter(), torch.no_grad():
        plain = model(torch.tensor(IDS)).logits[0]
    assert (ref - plain).abs().max() > 0.1  # the adapter matters at this tolerance
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


def test_adapter_made_by_mlx_lm_converts_with_its_logits(tmp_path):
    pytest.importorskip("mlx_lm", reason="mlx_lm not installed (pip install -e '.[mlx]')")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    # what mlx_lm's trainer saves (lora.py: save_config(args) + trainable parameters), after some "training"
    mx.random.seed(0)
    model, _ = load_model(LLAMA)
    model.freeze()
    config = {"fine_tune_type": "lora", "num_layers": 1,
              "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.v_proj", "mlp.up_proj"]}}
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    weights = {k: (mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    src = tmp_path / "mlx-made"
    src.mkdir()
    mx.save_safetensors(str(src / "adapters.safetensors"), weights)
    (src / "adapter_config.json").write_text(json.dumps(config | {"model": str(LLAMA)}))
    run_cli("convert", src, "-o", tmp_path / "peft", "--to", "peft")
    ad = load_adapter(tmp_path / "peft")
    assert sorted(ad.modules) == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.v_proj"]
    ref = _mlx_logits(src)[0]
    got, _ = _peft_logits(tmp_path / "peft")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


def test_inspect_describes_an_mlx_adapter(mlx_out):
    doc = json.loads(run_cli("inspect", mlx_out / "llama-patterns", "--json").stdout)
    ref = load_adapter(FIXTURES / "llama-patterns")
    assert doc["kind"] == "adapter" and doc["format"] == "mlx" and doc["peft_type"] == "LORA"
    assert {m["name"]: m["r"] for m in doc["modules"]} == {n: m.r for n, m in ref.modules.items()}
    assert any("zero-padded" in n for n in doc["format_notes"])
    assert json.loads(run_cli("inspect", FIXTURES / "llama-lora", "--json").stdout)["format"] == "peft"


# -- MoE: transformers' fused expert tensors (PEFT target_parameters) -> mlx_lm's SwitchGLU --------------------

@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny Mixtral saved by transformers and PEFT all-linear adapters on it (adapter 1 has rank/alpha
    patterns on the experts), converted to MLX with --base."""
    from test_moe_adapter import Case

    case = Case("mixtral", tmp_path_factory.mktemp("mixtral"))
    case.mlx = case.base_dir.parent / "mlx1"
    run_cli("convert", case.adapters[1], "-o", case.mlx, "--to", "mlx", "--base", case.base_dir)
    return case


def test_moe_to_mlx_is_switch_linear_format(mixtral, tmp_path):
    ref = load_adapter(mixtral.adapters[1])
    lp = json.loads((mixtral.mlx / "adapter_config.json").read_text())["lora_parameters"]
    R, S = lp["rank"], lp["scale"]
    assert {"block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.switch_mlp.up_proj",
            "block_sparse_moe.switch_mlp.down_proj", "block_sparse_moe.gate"} <= set(lp["keys"])
    t = _read(mixtral.mlx / "adapters.safetensors")
    for layer in (0, 1):
        pre = f"model.layers.{layer}.block_sparse_moe"
        gate_up = ref.modules[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = ref.modules[f"model.layers.{layer}.mlp.experts.down_proj"]
        E = gate_up.experts

        def delta(module):  # mlx_lm's LoRASwitchLinear.fuse: (scale · lora_b) @ lora_a per expert
            a, b = t[f"{pre}.switch_mlp.{module}.lora_a"], t[f"{pre}.switch_mlp.{module}.lora_b"]
            assert a.shape[:2] == (E, R) and b.shape[0] == E and b.shape[2] == R
            return (S * b.float()) @ a.float()

        torch.testing.assert_close(torch.cat([delta("gate_proj"), delta("up_proj")], dim=1), gate_up.delta(),
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(delta("down_proj"), down.delta(), rtol=1e-6, atol=1e-7)
        router = ref.modules[f"model.layers.{layer}.mlp.gate.weight"]
        a, b = t[f"{pre}.gate.lora_a"], t[f"{pre}.gate.lora_b"]
        torch.testing.assert_close((S * b.float().T) @ a.float().T, router.delta(), rtol=1e-6, atol=1e-7)
    # without the base the expert names are unknown: one line, nothing written
    r = run_cli("convert", mixtral.adapters[1], "-o", tmp_path / "o", "--to", "mlx", expect=1)
    assert "target_parameters" in r.stderr and "--base" in r.stderr and not (tmp_path / "o").exists()


def test_mlx_lm_loads_our_moe_output_with_peft_logits(mixtral):
    mx = pytest.importorskip("mlx.core", reason="mlx_lm not installed (pip install -e '.[mlx]')")
    pytest.importorskip("mlx_lm")
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    ids = [[3, 5, 9, 33, 10, 7, 2, 50, 17, 31]]
    model, _ = load_model(mixtral.base_dir)
    load_adapters(model, str(mixtral.mlx))
    model.set_dtype(mx.float32)
    got = torch.from_numpy(np.array(model(mx.array(ids)).astype(mx.float32)))
    pm = mixtral.peft_model(mixtral.adapters[1])
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits
    with pm.disable_adapter(), torch.no_grad():
        plain = pm(torch.tensor(ids)).logits
    assert (ref - plain).abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


def test_moe_round_trip_and_mlx_made_moe_adapter(mixtral, tmp_path):
    """PEFT -> MLX -> PEFT on the Mixtral gives every parameter's delta back and loads in PEFT with the same
    logits; an MLX MoE adapter whose gate_proj and up_proj have their own lora_a (as mlx_lm trains them) becomes
    a gate_up_proj LoRA of rank 2r with the same delta."""
    run_cli("convert", mixtral.mlx, "-o", tmp_path / "back", "--to", "peft", "--base", mixtral.base_dir)
    a, b = load_adapter(mixtral.adapters[1]), load_adapter(tmp_path / "back")
    assert sorted(a.modules) == sorted(b.modules)
    for n, m in a.modules.items():
        assert b.modules[n].r == m.r and b.modules[n].param == m.param
        torch.testing.assert_close(b.modules[n].delta(), m.delta(), rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[3, 5, 9, 33, 10, 7, 2, 50, 17, 31]])
    with torch.no_grad():
        ref = mixtral.peft_model(mixtral.adapters[1])(ids).logits
        got = mixtral.peft_model(tmp_path / "back")(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # untie gate_proj's and up_proj's lora_a
    src = tmp_path / "own-a"
    src.mkdir()
    (src / "adapter_config.json").write_text((mixtral.mlx / "adapter_config.json").read_text())
    t = _read(mixtral.mlx / "adapters.safetensors")
    key = "model.layers.0.block_sparse_moe.switch_mlp.up_proj.lora_a"
    t[key] = t[key] + 0.01
    from safetensors.torch import save_file
    save_file(t, str(src / "adapters.safetensors"))
    run_cli("convert", src, "-o", tmp_path / "own-a-peft", "--to", "peft", "--base", mixtral.base_dir)
    m = load_adapter(tmp_path / "own-a-peft").modules["model.layers.0.mlp.experts.gate_up_proj"]
    S = json.loads((src / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    pre = "model.layers.0.block_sparse_moe.switch_mlp"
    want = torch.cat([(S * t[f"{pre}.{p}.lora_b"].float()) @ t[f"{pre}.{p}.lora_a"].float()
                      for p in ("gate_proj", "up_proj")], dim=1)
    assert m.r == 2 * a.modules["model.layers.0.mlp.experts.gate_up_proj"].r
    torch.testing.assert_close(m.delta(), want, rtol=1e-6, atol=1e-7)
    # without the base: one line
    r = run_cli("convert", mixtral.mlx, "-o", tmp_path / "nobase", "--to", "peft", expect=1)
    assert "--base" in r.stderr and len(r.stderr.strip().splitlines()) == 1
