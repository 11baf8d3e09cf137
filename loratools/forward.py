"""Reference forward passes for `validate`: build models from a checkpoint's own config.json with
transformers (local files only, no remote code), attach adapters through PEFT, run one deterministic
batch, and compare logits. Pure functions first (metrics, tolerances, the batch), model plumbing last.
"""
from __future__ import annotations

import gc
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import bnb_log
from .device import resolve_device
from .dtypes import FLOAT_DTYPES, declared_float_dtype
from .errors import InputError, UsageError

bnb_log.install()  # before anything here imports peft (which imports bitsandbytes): see bnb_log


# Note: the batch text.
#     A fixed, model-independent paragraph. With a tokenizer it gives realistic token statistics (the
#     positions where a trained model is confident); without one, token ids come from the seed alone.
BATCH_TEXT = (
    "The committee met on a grey Tuesday morning to decide what the new bridge should look like. "
    "Engineers argued for steel, the mayor wanted stone, and a schoolteacher asked whether anyone had "
    "measured how often the river floods. Nobody had. By noon they agreed to collect ten years of "
    "water levels, to price both designs, and to meet again in the spring. Outside, a fisherman "
    "mended his net and counted the boats that passed under the old wooden span: seven before lunch, "
    "four after, and one that did not come back until the lamps were lit. Numbers 0 1 2 3 4 5 6 7 8 9, "
    "punctuation (like this); quotes \"here\" and 'there' - and a URL: https://example.org/a?b=c."
)


# -- metrics (pure) ------------------------------------------------------------------------------------

def logit_metrics(ref: torch.Tensor, cand: torch.Tensor) -> dict:
    """Compare candidate logits C against reference logits R, both [batch, seq, vocab], in float32.

    max_abs is max |C − R| over every logit; rel_err ‖C − R‖_F / ‖R‖_F over the batch; cosine the mean over
    positions of cos(R[b, t, :], C[b, t, :]); top1 the fraction of positions whose arg-max agrees. Only
    max_abs and rel_err are gated (`judge`): with max_abs ≤ atol the top token can change only at near-ties.
    """
    if ref.shape != cand.shape:
        raise ValueError(f"logits of shape {list(cand.shape)} cannot be compared with {list(ref.shape)}")
    ref = ref.float()
    cand = cand.float()
    finite = bool(torch.isfinite(cand).all())
    d = cand - ref
    if not finite:
        d = torch.nan_to_num(d, nan=float("inf"))
    absd = d.abs()
    flat = int(absd.argmax())
    b, t, v = (int(i) for i in torch.unravel_index(torch.tensor(flat), absd.shape))
    ref_norm = float(ref.norm())
    cos = torch.nn.functional.cosine_similarity(ref, torch.nan_to_num(cand), dim=-1, eps=1e-12)
    return {
        "max_abs": float(absd.max()),
        "rel_err": float(d.norm()) / ref_norm if ref_norm > 0 else float(d.norm()),
        "cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
        "ref_max_abs": float(ref.abs().max()),
        "finite": finite,
        "worst": {"batch": b, "position": t, "token": v},
    }


def carried_fraction(base: torch.Tensor, adapted: torch.Tensor, tuned: torch.Tensor) -> dict:
    """How much of a fine-tune (base → tuned) base + adapter reproduces, measured on logits.

    residual = ‖adapted − tuned‖ / ‖base − tuned‖: 0 when the adapter reproduces the fine-tune, 1 when it
    changes nothing (or as much in a useless direction), > 1 when it moves away. carried = 1 − residual.
    """
    base, adapted, tuned = base.float(), adapted.float(), tuned.float()
    gap = float((base - tuned).norm())
    residual = float((adapted - tuned).norm()) / gap if gap > 0 else 0.0
    return {"finetune_rel_change": gap / max(float(tuned.norm()), 1e-30), "residual": residual,
            "carried": 1.0 - residual}


def dtype_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def coarsest(dtypes) -> torch.dtype:
    """The floating-point dtype with the largest eps among `dtypes` (non-float ones are ignored)."""
    floats = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(floats, key=dtype_eps) if floats else torch.float32


@dataclass
class Tolerance:
    """Pass when max_abs ≤ atol and rel_err ≤ rtol; atol may be relative to the reference's range."""

    rtol: float
    atol: float | None = None  # absolute, when the user gave one
    atol_rel: float | None = None  # else atol = atol_rel · max(1, max|R|)
    basis: str = ""

    def resolve_atol(self, ref_max_abs: float) -> float:
        if self.atol is not None:
            return self.atol
        return self.atol_rel * max(1.0, ref_max_abs)


# Note: default tolerances.
#     An exact comparison (a merged checkpoint against the unmerged PEFT model) differs only by rounding:
#     of the arithmetic in the compute dtype (eps_c) and of the merged weights to their stored dtype (eps_s),
#     eps = finfo(dtype).eps. rtol = 4·max(eps_c, eps_s), at least 1e-4; atol = 16·max(eps_c, eps_s)·max(1,
#     max|R|), at least 1e-3·max(1, max|R|): the floors leave room for float32 summation order in deep
#     models. A network amplifies the ≈ 0.3·eps_s rounding of float16 weights: a correct float16 merge of a
#     generated random 0.75B Llama gives rel_err ≈ 1.1·eps_s, the tiny fixtures 2e-5..1e-4, while the
#     adapters' whole effect on the logits (what a badly wrong merge changes) is 6-40%. A wrong scale on one
#     module of many can hide under a bfloat16 allowance; validate's tensor checks catch it.
#     A 4-bit model against its dense base carries NF4's own error (≈ 9% per weight, blockwise): rtol 0.25
#     and max_abs ≤ 0.5·max(1, max|R|) catch a broken quantization, not a mediocre one.

def exact_tolerance(compute: torch.dtype, storage: torch.dtype, *, atol: float | None = None,
                    rtol: float | None = None) -> Tolerance:
    """Rounding-level tolerance for a comparison that should agree up to rounding: arithmetic in the
    `compute` dtype, candidate weights stored in `storage` (see Note: default tolerances)."""
    ec, es = dtype_eps(compute), dtype_eps(storage)
    default_rtol = max(4 * ec, 4 * es, 1e-4)
    atol_rel = max(16 * ec, 16 * es, 1e-3)
    names = sorted({str(d).removeprefix("torch.") for d in (compute, storage)})
    return Tolerance(rtol=rtol if rtol is not None else default_rtol, atol=atol, atol_rel=atol_rel,
                     basis=f"rounding: compute {str(compute).removeprefix('torch.')}, weights "
                           f"{str(storage).removeprefix('torch.')}" if len(names) > 1 else f"rounding in {names[0]}")


def quantized_tolerance(*, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """A 4-bit model against its dense base: NF4/FP4's own error is allowed, a broken one is not."""
    return Tolerance(rtol=rtol if rtol is not None else 0.25, atol=atol, atol_rel=0.5, basis="4-bit quantization")


def fake_quantize_(model: torch.nn.Module, base, quant) -> list[str]:
    """Replace, in place, each weight of `model` (BASE loaded dense) that the checkpoint `quant` stores in
    4 bits by bitsandbytes' quantization of BASE's own tensor, dequantized: the same quant type,
    blocksize, double quantization and dtype as `quant` records (bnb4bit reproduces bitsandbytes' bytes).
    The model then computes what a correct 4-bit copy of BASE computes. Returns the names of the 4-bit
    weights that have no counterpart in BASE or in the model (the reference is incomplete if any).

    Names are matched as transformers loads them: with or without the model's `base_model_prefix`
    (a GPT-2 saved as `h.0...` is loaded as `transformer.h.0...`)."""
    from .qlora_base import requantize
    from .quantize import QuantFormat
    from .quantized import is_conv1d_weight, quant_states

    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""

    def spellings(n: str) -> list[str]:
        return [n, f"{prefix}.{n}", n.removeprefix(prefix + ".")] if prefix else [n]

    missing = []
    for name, qs in quant_states(quant).items():
        param = next((params[n] for n in spellings(name) if n in params), None)
        src = next((n for n in spellings(name) if n in base.tensors), None)
        if param is None or src is None or base.is_quantized:
            missing.append(name)
            continue
        w = base.read(src).to(param.device)
        conv1d = w.dim() == 2 and is_conv1d_weight(quant, name)
        dense = requantize(w, QuantFormat(qs.quant_type, qs.blocksize, qs.nested), dtype=qs.torch_dtype, conv1d=conv1d)
        with torch.no_grad():
            param.copy_(dense.to(param.dtype))
    return missing


def judge(metrics: dict, tol: Tolerance) -> dict:
    """metrics + the tolerances that applied + passed."""
    atol = tol.resolve_atol(metrics["ref_max_abs"])
    passed = metrics["finite"] and metrics["max_abs"] <= atol and metrics["rel_err"] <= tol.rtol
    return {**metrics, "atol": atol, "rtol": tol.rtol, "tolerance_basis": tol.basis, "passed": bool(passed)}


# -- the batch (pure given its inputs) ----------------------------------------------------------------

def make_batch(model_dir: Path | None, vocab_size: int, batch: int, seq_len: int, seed: int
               ) -> tuple[torch.Tensor, str]:
    """Token ids [batch, seq_len] and where they came from ("tokenizer" or "random").

    With a tokenizer.json beside the checkpoint, each row is BATCH_TEXT's tokens (repeated to length)
    starting at a seeded offset (row 0 at the start); otherwise ids are drawn uniformly from the seed.
    """
    g = torch.Generator().manual_seed(seed)
    tok_file = model_dir / "tokenizer.json" if model_dir is not None else None
    if tok_file is not None and tok_file.is_file():
        try:
            from tokenizers import Tokenizer

            ids = [i for i in Tokenizer.from_file(str(tok_file)).encode(BATCH_TEXT).ids if 0 <= i < vocab_size]
        except Exception:  # an unreadable tokenizer is not fatal: fall back to seeded ids
            ids = []
        if len(ids) >= 8:
            stream = torch.tensor(ids, dtype=torch.long).repeat(seq_len // len(ids) + 2)
            starts = torch.randint(0, len(ids), (batch,), generator=g)
            starts[0] = 0
            return torch.stack([stream[s:s + seq_len] for s in starts.tolist()]), "tokenizer"
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g, dtype=torch.long), "random"


# -- devices and dtypes --------------------------------------------------------------------------------


def config_dtype(config: dict | None) -> torch.dtype | None:
    return FLOAT_DTYPES.get(declared_float_dtype(config))


def resolve_compute_dtype(name: str, device: torch.device, config: dict | None) -> torch.dtype:
    """auto: the model's own dtype on CUDA, float32 on the CPU (fp16/bf16 matmuls there are slow and
    not what a CPU user runs)."""
    if name != "auto":
        if name not in FLOAT_DTYPES:
            raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, not {name!r}")
        return FLOAT_DTYPES[name]
    if device.type == "cuda":
        return config_dtype(config) or torch.float32
    return torch.float32


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


# -- model plumbing --------------------------------------------------------------------------------------

@contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and info logging while loading; restore them afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class Loaded:
    model: torch.nn.Module
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    seconds: float


def model_dir(path: str | Path) -> Path:
    """The directory transformers loads from: it needs config.json beside the weights."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    if not (d / "config.json").is_file():
        raise InputError("cannot build the model: no config.json beside the weights (forward passes need "
                         "the model's own config; use --static-only to skip them)", path=path)
    return d


def load_model(path: str | Path, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Loaded:
    """The class the checkpoint was saved from (config.json's architectures[0]: BertModel, T5ForConditional-
    Generation, ...; task_types.model_class), from a local directory, in eval mode on `device`.

    A 4-bit checkpoint is loaded through bitsandbytes from its own quantization_config. A weight the
    model has and the checkpoint lacks (and that is not tied to one it has) would be random: refused
    (InputError naming it), so no random head ever enters a comparison.
    """
    from transformers import AutoConfig

    from .task_types import model_class

    d = model_dir(path)
    t0 = time.perf_counter()
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(d, trust_remote_code=False, local_files_only=True)
            cls = model_class(config.to_dict())
            kwargs = dict(config=config, dtype=dtype, trust_remote_code=False, local_files_only=True,
                          output_loading_info=True)
            if device.type == "cuda":
                kwargs["device_map"] = {"": device.index if device.index is not None else 0}
            torch.manual_seed(seed)
            model, info = cls.from_pretrained(d, **kwargs)
        except Exception as e:  # transformers raises ValueError/OSError/RuntimeError/KeyError for bad dirs
            raise InputError(f"transformers cannot load this model: {type(e).__name__}: {e}", path=d) from None
    model.eval()
    if getattr(model, "is_quantized", False):
        _unify_dense_dtype(model, dtype)
    missing = sorted(info.get("missing_keys") or [])  # transformers lists no tied weight here
    if missing:
        raise InputError(f"{type(model).__name__} has {len(missing)} weight(s) this checkpoint does not store "
                         f"and would be random (first: {missing[0]}); refusing to compare with a random head",
                         path=d, tensor=missing[0])
    mism = info.get("mismatched_keys") or []
    return Loaded(model=model, missing=missing, unexpected=sorted(info.get("unexpected_keys") or []),
                  mismatched=sorted(str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in mism),
                  seconds=time.perf_counter() - t0)


def _unify_dense_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a 4-bit model's dense parameters (norms, embeddings, biases, head) to the compute dtype.

    Note: mixed dtypes after a 4-bit load.
        transformers 5 keeps a bitsandbytes model's non-quantized tensors in their stored dtype whatever
        `dtype=` says (and loads some biases in float32), so a bf16 GPT-2 saved in 4 bits and loaded with
        dtype=float32 fails in its first LayerNorm. The packed 4-bit weights are left alone: Linear4bit
        casts its input to its compute dtype and its output back.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, bnb.nn.Params4bit) or not p.is_floating_point() or p.dtype == dtype:
                continue
            p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype and name != "inv_freq":
                module._buffers[name] = b.to(dtype)


def attach_adapters(model: torch.nn.Module, adapters: list[Path], weights: list[float], *,
                    low_cpu_mem_usage: bool = False) -> torch.nn.Module:
    """A PeftModel with every adapter loaded and active (unmerged), each delta scaled by its weight.
    `low_cpu_mem_usage`: PEFT assigns the file's tensors instead of initialising the LoRA layers first
    (validate's streamed passes, whose base weights are placeholders until their block runs).

    Several active adapters add their outputs, i.e. the model computes with W + Σ wᵢ·ΔWᵢ, which is what
    `loratools merge` folds in. A weight multiplies PEFT's per-layer `scaling` (lora_alpha/r), as
    PEFT's own `scale_layer` does, so it scales the lora_B bias as well.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"adapter{i}" for i in range(len(adapters))]
    with quiet_transformers():
        try:
            pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0], is_trainable=False,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
            for name, path in zip(names[1:], adapters[1:]):
                pm.load_adapter(str(path), adapter_name=name, is_trainable=False, low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception as e:
            raise InputError(f"PEFT cannot load this adapter onto the base: {type(e).__name__}: {e}"
                             + task_type_hint(model, adapters), path=adapters[0] if len(adapters) == 1 else None) from None
        if len(names) > 1:
            pm.base_model.set_adapter(names)
    for name, path in zip(names, adapters):
        check_attached(pm, name, path)
    for name, w in zip(names, weights):
        if w == 1.0:
            continue
        for mod in pm.modules():
            if isinstance(mod, LoraLayer) and name in mod.scaling:
                mod.scaling[name] *= w
    pm.eval()
    return pm


def task_type_hint(model: torch.nn.Module, adapters: list[Path]) -> str:
    """'' or why PEFT's class for an adapter's task_type does not fit the model (a CAUSAL_LM adapter on a
    BertModel: PeftModelForCausalLM needs prepare_inputs_for_generation)."""
    import json

    from .task_types import task_type_of

    want, _ = task_type_of(model.config.to_dict())
    for path in adapters:
        try:
            have = json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type")
        except (OSError, ValueError):
            continue
        if have and have != want:
            return (f" (its task_type is {have}, the model is {type(model).__name__}, whose PEFT task type is "
                    f"{want}: set task_type to {json.dumps(want)} in {Path(path) / 'adapter_config.json'})")
    return ""


def layout_hint(module: str, model_modules) -> str:
    """Whether an adapter's module name that the model lacks is a prefix difference, and which, or no
    module of the model at all (an adapter for another model)."""
    for m in model_modules:
        if m and module.endswith("." + m):
            return f"; the model has it as {m}: the adapter adds the prefix {module[:-len(m)]!r}"
        if module and m.endswith("." + module):
            return f"; the model has it as {m}: the adapter lacks the prefix {m[:-len(module)]!r}"
    return "; the model has no module of that name under any prefix (an adapter for another model?)"


def attach_mismatch(saved: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(key, what is wrong) for the first difference between an adapter file's tensors (`saved`) and what
    the PeftModel holds for it in the same saved-key format (`held`), or None when they are the same.

    A file key PEFT holds nothing under is a module the adapter targets that PEFT did not wrap (another
    model, another layout); a key PEFT holds that the file lacks is a module PEFT wrapped with its own
    initialisation; a value that differs was not loaded."""
    for key in sorted(saved):
        if key not in held:
            return key, "is in the adapter file but PEFT attached nothing for it (the module is not wrapped)"
        if not torch.equal(saved[key].to(device=held[key].device, dtype=held[key].dtype), held[key]):
            return key, "was not loaded: PEFT's module holds other values than the adapter file"
    for key in sorted(held.keys() - saved.keys()):
        return key, "PEFT wrapped this module but the adapter file has no tensor for it (it would be PEFT's own init)"
    return None


def check_attached(pm: torch.nn.Module, adapter_name: str, path: Path) -> None:
    """Raise InputError unless the PeftModel holds exactly the adapter file's tensors for `adapter_name`.

    Note: why not trust PeftModel.from_pretrained.
        It loads with strict=False and only warns about missing LoRA keys: an adapter whose module
        names are not the model's (a CAUSAL_LM adapter on a BertLMHeadModel, another key layout) loads
        as no adapter at all, and the reference then equals the base. PEFT's own saved view of the
        loaded model (get_peft_model_state_dict, what save_pretrained would write) must equal the file,
        its keys converted as PEFT converts them on load (transformers 5's renamed and fused layouts).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(Path(path) / "adapter_model.safetensors"))
    try:  # PEFT renames an adapter's keys as transformers 5 renames the checkpoint's (LLaVA, MoE experts)
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
    except ImportError:  # a PEFT without the conversion loads the names as they are
        convert_peft_adapter_state_dict_for_transformers = None
    if convert_peft_adapter_state_dict_for_transformers is not None and hasattr(pm.config, "model_type"):
        saved = convert_peft_adapter_state_dict_for_transformers(
            model=pm, peft_config=pm.peft_config[adapter_name], adapter_state_dict=saved, adapter_name=adapter_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's save-time warnings (sharded-save hints) mean nothing here
        held = get_peft_model_state_dict(pm, adapter_name=adapter_name,
                                         save_embedding_layers=any(k.endswith(".base_layer.weight") for k in saved))
    bad = attach_mismatch(saved, {k: v.detach() for k, v in held.items()})
    if bad is not None:
        hint = ""
        if bad[0] not in held:
            key = bad[0].removeprefix("base_model.model.")
            module = key.split(".lora_")[0] if ".lora_" in key else key.rsplit(".", 1)[0]
            hint = layout_hint(module, [n for n, _ in pm.get_base_model().named_modules()])
        raise InputError(f"the adapter did not attach in the PEFT reference: {bad[1]}{hint}", path=path,
                         tensor=bad[0])


def decoder_inputs(ids: torch.Tensor, config) -> torch.Tensor:
    """An encoder-decoder's decoder_input_ids for the batch: the ids shifted right behind the decoder start
    token (teacher forcing, what training computes), so the decoder runs on every position."""
    start = next((v for v in (getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None))
                  if isinstance(v, int) and v >= 0), 0)
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def run_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`run_outputs`' tensor."""
    return run_outputs(model, ids)[0]


@torch.no_grad()
def run_outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(the model's natural output for the batch, [batch, positions, features] in float32 on the CPU, its name).

    "logits" where the model has a head ([b, seq, vocab]; a sequence classifier's [b, labels] as
    [b, 1, labels]), else a bare model's "last_hidden_state" (BertModel; a bare encoder-decoder's is its
    decoder's), else a question-answering model's "start_logits+end_logits" ([b, seq, 2]). An
    encoder-decoder gets `decoder_inputs`. A model that cannot run on token ids alone is an InputError."""
    device = next(p.device for p in model.parameters())
    config = model.config
    kwargs = {"input_ids": ids.to(device)}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = decoder_inputs(ids, config).to(device)
    if getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    try:
        out = model(**kwargs)
    except Exception as e:  # a model that needs more than token ids (Whisper's input_features, ...)
        raise InputError(f"{type(getattr(model, 'get_base_model', lambda: model)()).__name__} cannot run on a batch "
                         f"of token ids: {type(e).__name__}: {e}") from None
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            t = getattr(out, name).detach().float().cpu()
            return (t.unsqueeze(1) if t.dim() == 2 else t), name
    # question answering: start_logits and end_logits, [b, seq] each, compared as [b, seq, 2]
    parts = {k: v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point() and v.dim() == 2}
    if not parts or len({v.shape for v in parts.values()}) != 1:
        raise InputError(f"no output to compare: {type(model).__name__} returns {', '.join(out.keys())}")
    return torch.stack([v.detach().float().cpu() for v in parts.values()], dim=-1), "+".join(parts)


def free_memory() -> None:
    """Give a dropped model's memory back before the next one is loaded (callers `del` their references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def max_positions(config: dict | None) -> int | None:
    cfg = config or {}
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = cfg.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


def usable_positions(model: torch.nn.Module, config: dict | None) -> int | None:
    """How many positions a batch row may have: config.json's maximum, less what a learned position table
    reserves below its padding index (RoBERTa counts positions from pad_token_id + 1: 514 rows, 512 usable)."""
    limits = [max_positions(config)]
    for name, mod in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(mod, torch.nn.Embedding) and mod.padding_idx is not None:
            limits.append(mod.num_embeddings - mod.padding_idx - 1)
    limits = [n for n in limits if n]
    return min(limits) if limits else None


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


__all__ = ["BATCH_TEXT", "Loaded", "Tolerance", "attach_adapters", "carried_fraction", "coarsest", "config_dtype",
           "device_description", "dtype_eps", "exact_tolerance", "fake_quantize_", "free_memory", "judge",
           "load_model", "logit_metrics", "make_batch", "max_positions", "model_dir", "peak_memory",
           "quantized_tolerance", "resolve_compute_dtype", "resolve_device", "run_logits", "run_outputs", "usable_positions",
           "attach_mismatch", "check_attached", "decoder_inputs"]
