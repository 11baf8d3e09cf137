"""The zoo (tests/zoo.py): every command, through the CLI, on tiny models of each transformers family, held to
the libraries' own results (PEFT's merge in float32 rounded once, PEFT's loaded layers and logits,
transformers' own 4-bit save). Each model and adapter is built once per session; outputs one command makes
(the merge) are shared with the commands that take them (unmerge, validate, extract).

Test ids are `test_<command>[<family>]`: `python tests/zoo.py` turns a run into docs/architectures.md.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from test_merge import round_trip_stats
from zoo import FAMILIES, Zoo, auto_class, quiet, tokens

ALL = list(FAMILIES)


def runs(command: str) -> list[str]:
    """The families the zoo runs `command` on (the others' rows give the reason: Family.not_run_reason)."""
    return [f for f in ALL if FAMILIES[f].not_run_reason(command) is None]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """LORATOOLS_ZOO_CACHE keeps the built models between sessions (they are deterministic)."""
    cache = os.environ.get("LORATOOLS_ZOO_CACHE")
    return Zoo(Path(cache) if cache else tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def outputs(tmp_path_factory):
    """CLI outputs shared between tests: made once per (family, command, inputs)."""
    made: dict = {}
    root = tmp_path_factory.mktemp("zoo-out")

    def get(case, command: str, *args, extra=()):
        key = (case.name, command, tuple(map(str, args)), tuple(map(str, extra)))
        if key not in made:
            out = root / f"{case.name}-{command}-{len(made)}"
            run_cli(command, *args, "-o", out, *extra)
            made[key] = out
        return made[key]

    return get


def merged(outputs, case, adapter):
    return outputs(case, "merge", case.base, adapter, extra=("--device", "cpu"))


def peft_layers(pm) -> dict[str, tuple]:
    """PEFT's LoRA layers by module name: (r, alpha, scaling, use_dora, experts) of adapter `a0`. A
    target_parameters layer (ParamWrapper, nested one per parameter) is named `<module>.<parameter>`, its
    experts counted; a module's own LoRA has 1."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for n, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "a0" in mod.r:
            name, experts = n.removeprefix("base_model.model."), 1
            if isinstance(mod, ParamWrapper):
                name, experts = f"{name.replace('.base_layer', '')}.{mod.parameter_name}", mod.num_experts
            out[name] = (mod.r["a0"], mod.lora_alpha["a0"], mod.scaling["a0"], bool(mod.use_dora["a0"]), experts)
    return out


def compare_bits(ours_dir: Path, ref: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bit-identical elements / elements; the tensor names must be the same as transformers saves."""
    from loratools.io import Checkpoint

    ours = dict(Checkpoint(ours_dir).iter_tensors())
    assert ours.keys() == ref.keys(), sorted(ours.keys() ^ ref.keys())
    same = total = 0
    for name, t in ours.items():
        r = ref[name]
        assert (t.dtype, t.shape) == (r.dtype, r.shape), name
        same += int((t.view(torch.int16 if t.element_size() == 2 else torch.int32)
                     == r.view(torch.int16 if r.element_size() == 2 else torch.int32)).sum())
        total += t.numel()
    return same, total


def assert_loads_as_saved(pm, adapter_dir: Path, name="a0"):
    """PEFT loaded every tensor of the adapter file into a layer and nothing else: its own saved view of the
    loaded model is the file, key for key and value for value (a module PEFT skipped would be missing)."""
    from peft.utils import get_peft_model_state_dict

    saved = load_file(adapter_dir / "adapter_model.safetensors")
    view = get_peft_model_state_dict(pm, adapter_name=name)
    assert view.keys() == saved.keys(), sorted(view.keys() ^ saved.keys())
    for k, v in saved.items():
        assert torch.equal(view[k].to(v.dtype).cpu(), v), k


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_4bit(case, dst: Path) -> Path:
    """transformers' own 4-bit model of the base (nf4, double quant, bfloat16 compute: loratools' defaults),
    saved by transformers."""
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    with quiet():
        auto_class(case.family.model_class).from_pretrained(case.base, quantization_config=cfg).save_pretrained(dst)
    return dst


def portable_4bit(model):
    """The 4-bit model computing as on every CPU: bitsandbytes repacks a weight for its AVX512-BF16 CPU kernel
    at the first forward where the CPU has it, and that repacking asserts on a layer with fewer outputs than
    its block (a 3-label classifier: 'N must be divisible by block_n'); elsewhere the plain 4-bit matmul."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def load_checked(case, path: Path, **kw):
    """from_pretrained of the row's class, asserting no missing, unexpected or mismatched key."""
    with quiet():
        model, info = auto_class(case.family.model_class).from_pretrained(path, output_loading_info=True, **kw)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


# -- inspect -------------------------------------------------------------------------------------------------

def check_inspect(case, adapter, dora: bool):
    doc = json.loads(run_cli("inspect", adapter, "--json").stdout)
    ours = {m["name"]: m for m in doc["modules"]}
    theirs = peft_layers(case.peft([adapter])[0])
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())
    for name, (r, alpha, scaling, use_dora, experts) in theirs.items():
        m = ours[name]
        assert (m["r"], m["alpha"], bool(m["dora"]), m["experts"]) == (r, alpha, use_dora, experts), name
        assert m["scale"] == pytest.approx(scaling, rel=1e-12), name
        assert use_dora == dora
    return len(ours)


@pytest.mark.parametrize("family", runs("inspect"))
def test_inspect(zoo, family, record_property):
    case = zoo.get(family)
    n = check_inspect(case, case.adapter, dora=False)
    check_inspect(case, case.adapter2, dora=False)  # rsLoRA, rank_pattern, alpha_pattern
    doc = json.loads(run_cli("inspect", case.base, "--json").stdout)
    model = case.load_base()
    assert (doc["architecture"], doc["model_type"]) == (type(model).__name__, model.config.model_type)
    # tied weights stored and counted once; a persistent buffer stored with them (BART's final_logits_bias) too
    from loratools.io import Checkpoint

    stored = set(Checkpoint(case.base).keys())
    buffers = sum(b.numel() for n, b in model.named_buffers() if n in stored)
    assert doc["parameters"] == model.num_parameters() + buffers
    experts = [m for m in json.loads(run_cli("inspect", case.adapter, "--json").stdout)["modules"]
               if m["kind"] == "experts"]
    record_property("note", f"{n} LoRA modules" + (f" ({len(experts)} on {experts[0]['experts']} experts each)"
                                                  if experts else ""))


# -- merge ---------------------------------------------------------------------------------------------------

def check_merge(zoo, outputs, family, adapter_attr):
    case = zoo.get(family)
    adapter = getattr(case, adapter_attr)
    out = merged(outputs, case, adapter)
    same, total = compare_bits(out, case.peft_merged(adapter))
    assert same == total, f"{total - same} of {total} elements differ from PEFT's float32 merge rounded once"
    return case, out, total


@pytest.mark.parametrize("family", runs("merge"))
def test_merge(zoo, outputs, family, record_property):
    case, out, total = check_merge(zoo, outputs, family, "adapter")
    # loaded by transformers (no missing/unexpected keys), it computes what the unmerged PEFT model computes,
    # up to the rounding of the merged weights
    ours = load_checked(case, out, dtype=torch.float32)
    want = case.peft_logits([case.adapter])
    base = case.logits(case.load_base(torch.float32))
    err, effect = float((case.logits(ours) - want).abs().max()), float((base - want).abs().max())
    assert effect > 0.03 * float(want.abs().max())  # the adapter moves the logits: the check can fail
    assert err <= 0.02 * effect, (err, effect)
    record_property("note", f"{total} elements bit-identical; max |Δlogit| vs unmerged PEFT {err:.1e} "
                            f"(adapter moves them {effect:.2f})")


# -- unmerge -------------------------------------------------------------------------------------------------

def check_round_trip(outputs, case, adapter):
    out = merged(outputs, case, adapter)
    back = outputs(case, "unmerge", out, adapter)
    s = round_trip_stats(case.base, out, back)
    assert s["total"] > 0 and s["bound"] == s["total"], s  # |W' - W| <= ulp(merged) + ulp(W') everywhere
    assert s["fine_one_ulp"] == s["fine"], s  # 1 ulp of W wherever the merged value is no coarser than W
    return s


def assert_refused(case, command: str, args, tmp_path: Path, record_property):
    """`command` on this family's case: the one line its row expects, exit 1, nothing written."""
    words, why = case.family.refuses[command]
    dst = tmp_path / "out"
    line = run_cli(command, *args, "-o", dst, expect=1).stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and words in line, line
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if ".loratools-tmp-" in p.name]
    record_property("cell", "refused")
    record_property("note", why)


@pytest.mark.parametrize("family", runs("unmerge"))
def test_unmerge(zoo, outputs, family, tmp_path, record_property):
    case = zoo.get(family)
    if "unmerge" in case.family.refuses:
        return assert_refused(case, "unmerge", (merged(outputs, case, case.adapter), case.adapter), tmp_path,
                              record_property)
    s = check_round_trip(outputs, zoo.get(family), zoo.get(family).adapter)
    record_property("note", f"{s['exact'] / s['total']:.0%} of changed elements bit-exact, "
                            f"{s['one_ulp'] / s['total']:.0%} within 1 ulp")


# -- validate ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", runs("validate"))
def test_validate(zoo, outputs, family, tmp_path, record_property):
    case = zoo.get(family)
    out = merged(outputs, case, case.adapter)
    opts = ("--batch", "2", "--seq-len", "12")
    run_cli("validate", case.base, case.adapter, "--merged", out, *opts)
    # one module's ΔW scaled 1.5x: failed, and that tensor named. The first module LoRA'd as a Linear, and on
    # a MoE the first expert parameter's first stored tensor (Mixtral: expert 0's w2; GPT-OSS: the whole
    # fused parameter), each under the name the checkpoint stores it by (LLaVA: language_model.model.*)
    from loratools.io import Checkpoint
    from loratools.key_layout import checkpoint_layout

    layout = checkpoint_layout(Checkpoint(case.base))
    modules = json.loads(run_cli("inspect", case.adapter, "--json").stdout)["modules"]
    module = sorted(m["name"] for m in modules if m["kind"] == "linear" and not m["name"].endswith(".weight"))[0]
    keys = [layout.stored_name(f"{module}.weight")]
    experts = sorted(m["name"] for m in modules if m["kind"] == "experts")
    if experts:
        keys.append(layout.params[experts[0]][0].stored)
    for i, key in enumerate(keys):
        assert_scaled_module_named(case, out, key, tmp_path / f"bad{i}")
    record_property("note", "1.5x on " + " and on ".join(keys) + " named")


def assert_scaled_module_named(case, merged_dir: Path, key: str, bad: Path):
    """validate fails `merged_dir` with the delta of stored tensor `key` scaled 1.5x, naming `key`."""
    from loratools.io import Checkpoint

    shutil.copytree(merged_dir, bad)
    [shard] = [p for p in bad.glob("*.safetensors")]
    tensors = load_file(shard)
    w = Checkpoint(case.base).read(key).float()
    tensors[key] = (w + 1.5 * (tensors[key].float() - w)).to(tensors[key].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    r = run_cli("validate", case.base, case.adapter, "--merged", bad, "--static-only", expect=1)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and key in last and "1.5x" in last, last


# -- quantize ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", runs("quantize"))
def test_quantize(zoo, outputs, family, tmp_path, record_property):
    """Our --nf4 checkpoint holds transformers' own 4-bit save byte for byte, and loaded by transformers it
    gives that model's outputs (the same bitsandbytes kernels run on both, so this holds on CPUs where
    bitsandbytes' CPU dequantization is wrong; the format itself is tested in tests/test_quantize.py)."""
    from test_quantize import eager_bitsandbytes, raw_bytes

    from loratools.io import Checkpoint

    case = zoo.get(family)
    out = tmp_path / "q"
    with eager_bitsandbytes():
        ref = hf_4bit(case, tmp_path / "hf")
        theirs = portable_4bit(load_checked(case, ref))
        if not case.family.quantizes:
            assert not [m for m in theirs.modules() if "4bit" in type(m).__name__]  # transformers left it dense
            r = run_cli("quantize", case.base, "-o", out, "--nf4", expect=1)
            line = r.stderr.strip()
            assert "\n" not in line and "no weight to quantize" in line and not out.exists(), line
            record_property("cell", "nothing to quantize")
            record_property("note", "transformers' 4-bit load quantizes no weight; refused in one line, "
                                    "nothing written")
            return
        out = outputs(case, "quantize", case.base, extra=("--nf4",))
        ours_ck, ref_ck = Checkpoint(out), Checkpoint(ref)
        assert set(ours_ck.keys()) == set(ref_ck.keys()), sorted(set(ours_ck.keys()) ^ set(ref_ck.keys()))
        for name in ref_ck.keys():
            assert raw_bytes(ours_ck.read(name)) == raw_bytes(ref_ck.read(name)), name
        ours = portable_4bit(load_checked(case, out))
        assert ours.is_loaded_in_4bit
        assert torch.equal(case.logits(ours), case.logits(theirs))
    packed = sum(1 for k in ref_ck.keys() if k.endswith(".weight.quant_state.bitsandbytes__nf4"))
    assert packed > 0
    record_property("note", f"{packed} linear weights quantized, bytes equal to transformers'")


# -- merge into the 4-bit base (QLoRA) ----------------------------------------------------------------------

@pytest.mark.parametrize("family", runs("qlora"))
def test_qlora(zoo, outputs, family, record_property):
    """merge NF4-BASE ADAPTER --dtype <the family's dtype>: bit-identical to PEFT merging into transformers'
    dequantization of that 4-bit model (float32, rounded once). transformers' dequantize() turns GPT-2's
    Conv1D into nn.Linear, so its saved weights are the transpose of the checkpoint's for those."""
    from peft import PeftModel
    from test_quantize import eager_bitsandbytes
    from transformers.pytorch_utils import Conv1D

    from loratools.io import Checkpoint

    case = zoo.get(family)
    dtype = str(case.family.dtype).removeprefix("torch.")
    q = outputs(case, "quantize", case.base, extra=("--nf4",))
    out = outputs(case, "merge", q, case.adapter, extra=("--device", "cpu", "--dtype", dtype))
    conv1d = {f"{n}.weight" for n, m in case.load_base().named_modules() if isinstance(m, Conv1D)}
    with eager_bitsandbytes(), quiet(), tempfile.TemporaryDirectory() as d:
        model = auto_class(case.family.model_class).from_pretrained(q).dequantize().float()
        PeftModel.from_pretrained(model, case.adapter).merge_and_unload().to(case.family.dtype).save_pretrained(d)
        ref = {k: (v.T.contiguous() if k in conv1d else v.clone()) for k, v in Checkpoint(d).iter_tensors()}
    same, total = compare_bits(out, ref)
    assert same == total, f"{total - same} of {total} elements differ from PEFT on the dequantized model"
    assert not Checkpoint(out).is_quantized
    record_property("note", f"{total} elements bit-identical (--dtype {dtype})")


# -- extract -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", runs("extract"))
def test_extract(zoo, outputs, family, record_property):
    """From PEFT's merge (ours is bit-identical to it) back to an adapter at its rank: PEFT loads every tensor,
    and the adapter it gives acts as the one that made the merge. The tuned weights are rounded to the
    stored dtype, so the reference is the merged checkpoint itself: the extracted adapter must be as close
    to it as the original adapter is (both differ from it only by that rounding)."""
    case = zoo.get(family)
    tuned = merged(outputs, case, case.adapter)
    # at the adapter's largest rank (PEFT gives a MoE's fused gate_up_proj 2r); a head the adapter saved whole
    # (modules_to_save) is carried whole, as its user would ask
    doc = json.loads(run_cli("inspect", case.adapter, "--json").stdout)
    rank = max(m["r"] for m in doc["modules"])
    ex = outputs(case, "extract", case.base, tuned,
                 extra=("--rank", rank, *(("--modules-to-save",) if doc["modules_to_save"] else ())))
    cfg = json.loads((ex / "adapter_config.json").read_text())
    pm, names = case.peft([ex])
    assert_loads_as_saved(pm, ex)
    got = case.logits(pm)
    tuned_logits = case.logits(case.load_base(torch.float32, path=tuned))
    orig = case.peft_logits([case.adapter])
    err_orig = float((orig - tuned_logits).abs().max())
    err = float((got - tuned_logits).abs().max())
    effect = float((case.logits(case.load_base(torch.float32)) - tuned_logits).abs().max())
    assert err <= max(2 * err_orig, 1e-3 * effect), (err, err_orig, effect)
    note = f"max |Δlogit| vs tuned {err:.1e} (the adapter itself: {err_orig:.1e})"
    heads = [m for m in json.loads(run_cli("inspect", ex, "--json").stdout)["modules"]
             if m["name"].rsplit(".", 1)[-1] in ("classifier", "score")]
    if heads and case.family.task_type == "SEQ_CLS":
        # the fine-tuned head changed, so extract gives it a LoRA; PEFT's SEQ_CLS class would replace it by a
        # copy saved whole and refuse that LoRA: task_type null, the plain PeftModel (task_types.py)
        assert cfg["task_type"] is None, cfg["task_type"]
        note += f"; task_type null: the head {heads[0]['name']} carries a LoRA, which PEFT's SEQ_CLS class refuses"
    else:
        assert cfg["task_type"] == case.family.task_type
    record_property("note", note)


# -- combine -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", runs("combine"))
def test_combine(zoo, outputs, family, tmp_path, record_property):
    case = zoo.get(family)
    w = (0.7, -0.4)
    if "combine" in case.family.refuses:
        return assert_refused(case, "combine", (case.adapter, case.adapter2, "--method", "cat", "--weight", w[0],
                                                "--weight", w[1]), tmp_path, record_property)
    out = outputs(case, "combine", case.adapter, case.adapter2,
                  extra=("--method", "cat", "--weight", w[0], "--weight", w[1]))
    pm, _ = case.peft([out])
    assert_loads_as_saved(pm, out)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == case.family.task_type
    got = case.logits(pm)
    want = case.peft_logits([case.adapter, case.adapter2], list(w))
    err = rel_err(got, want)
    assert err <= 1e-5, err
    record_property("note", f"max rel |Δlogit| vs PEFT with both adapters {err:.1e}")


# -- DoRA ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", runs("dora"))
def test_dora(zoo, outputs, family, record_property):
    case = zoo.get(family)
    check_inspect(case, case.dora, dora=True)
    _, _, total = check_merge(zoo, outputs, family, "dora")
    if "unmerge" in case.family.refuses:
        record_property("note", f"{total} elements bit-identical; no round trip: {case.family.refuses['unmerge'][1]}")
        return
    s = check_round_trip(outputs, case, case.dora)
    record_property("note", f"{total} elements bit-identical; round trip {s['exact'] / s['total']:.0%} bit-exact")


# -- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", runs("refusal"))
def test_refusal(zoo, family, tmp_path, record_property):
    """Another family's adapter (other module names) on this base: one line naming a module, exit 1,
    nothing written (not even the temporary)."""
    case = zoo.get(family)
    names = {m["name"] for m in json.loads(run_cli("inspect", case.adapter, "--json").stdout)["modules"]}
    other = next(zoo.get(f) for f in ("gpt2", "llama")
                 if not names & {m["name"] for m in
                                 json.loads(run_cli("inspect", zoo.get(f).adapter, "--json").stdout)["modules"]})
    out = tmp_path / "out"
    r = run_cli("merge", case.base, other.adapter, "-o", out, expect=1)
    line = r.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".loratools-tmp-" in p.name]
    named = [n for n in {m["name"] for m in json.loads(run_cli("inspect", other.adapter, "--json").stdout)["modules"]}
             if n in line]
    assert named, line
    record_property("note", f"{other.name}'s adapter refused, naming {named[0]}")


def test_docs_table_lists_every_family():
    """docs/architectures.md is generated from this test (python tests/zoo.py): a row added to the zoo
    without regenerating it is caught here."""
    from zoo import DOC

    rows = {line.split("|")[1].strip() for line in DOC.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| family") and not line.startswith("| ---")}
    assert rows == set(FAMILIES), sorted(rows ^ set(FAMILIES))
