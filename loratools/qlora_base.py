"""Which base did an adapter see? The 16-bit weights, or their 4-bit (QLoRA) dequantization.

A QLoRA adapter is trained on deq(Q(W16)): transformers loads the 16-bit base, bitsandbytes quantizes
each nn.Linear weight to 4 bits, and every forward pass dequantizes it. Merging the adapter into the
pristine W16 gives W16 + ΔW, a model the adapter never saw; merging into deq(Q(W16)) gives what it was
trained with. This module holds the facts both `merge` and `validate` need: what an adapter was trained
on (`resolve`), the dequantized base itself (`requantize`, `RequantizedView`, `requantize_model_`),
and what the other choice costs per merged tensor (`OtherChoice`).

Note: what is detected, and what is not.
    PEFT writes no flag for QLoRA: a LoRA trained on a 4-bit model saves the same adapter_config.json
    as one trained in 16 bits. Detected: an adapter whose `base_model_name_or_path` names a local
    directory (as given, or relative to the adapter) whose config.json carries a bitsandbytes 4-bit
    `quantization_config`, i.e. the adapter was trained on (or extracted from) a saved 4-bit
    checkpoint; its quant type, blocksize, double quantization, dtype and set of 4-bit weights are then
    read from that checkpoint. When loratools wrote that checkpoint (`quantize`), its provenance
    record names the dense checkpoint it was quantized from, checked against the BASE given. Not
    detected: the common recipe of loading the 16-bit model id with a BitsAndBytesConfig (the adapter
    then names the 16-bit base, which is all anyone can see), or a 4-bit hub id that is not on disk
    (a name that looks 4-bit is reported as a hint, nothing more). `--trained-on nf4` says it.

Note: the 4-bit format when only the type is known.
    `--trained-on nf4` without a 4-bit checkpoint to read assumes what `loratools quantize` writes by
    default: blocksize 64 (transformers' only choice), double quantization on (the QLoRA recipe), the
    weights transformers would quantize for config.json's class, in config.json's dtype (the dtype
    transformers loads the base in before it quantizes). Double quantization moves the dequantized
    weights by about 1% of their own NF4 error.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .bnb4bit import QUANT_TYPES, dequantize_weight, quantize_weight, quantize_weight_measured
from .errors import InputError, UsageError
from .io import Checkpoint
from .io.checkpoint import TensorInfo
from .quantize import QuantFormat, plan_quantization
from .quantized import DenseView, is_conv1d_weight, quant_states

TRAINED_ON_CHOICES = ("auto", "fp", *QUANT_TYPES)  # "fp": the 16-bit (or 32-bit) weights themselves
DEFAULT_BLOCKSIZE = 64
DEFAULT_DOUBLE_QUANT = True
# Hub names that look like a 4-bit checkpoint (unsloth's "-bnb-4bit", "...-4bit", "nf4"): a hint only.
_LOOKS_4BIT = re.compile(r"(bnb[-_]?4bit|[-_]4bit|[-_]nf4|[-_]fp4)", re.IGNORECASE)


# -- the dequantized base (pure) --------------------------------------------------------------------

def _quantized(w: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype, conv1d: bool, mean_threads: int | None,
               workers: int | None):
    """(stored tensors, QuantState, ‖w − deq(Q(w))‖_F or None) of `w` cast to `dtype`, in the Linear layout.
    `workers` (an int): measure the error too, over that many chunk threads (bnb4bit._map_chunks)."""
    x = w.to(dtype)
    if conv1d:
        x = x.t().contiguous()
    if workers is None:
        stored, qs = quantize_weight(x, quant_type=fmt.quant_type, blocksize=fmt.blocksize,
                                     double_quant=fmt.double_quant, mean_threads=mean_threads)
        return stored, qs, None
    stored, qs, (err, _) = quantize_weight_measured(x, quant_type=fmt.quant_type, blocksize=fmt.blocksize,
                                                    double_quant=fmt.double_quant, workers=workers,
                                                    mean_threads=mean_threads)
    return stored, qs, math.sqrt(err)


def requantize(w: torch.Tensor, fmt: QuantFormat, *, dtype: torch.dtype, conv1d: bool = False,
               mean_threads: int | None = None) -> torch.Tensor:
    """deq(Q(w)): `w` cast to `dtype` (what transformers loads the base in), quantized by bitsandbytes'
    rule (bnb4bit.py: its bytes) and dequantized, in `dtype`. A Conv1D weight ([in, out]) is quantized
    as the [out, in] Linear weight transformers makes of it and returned in its own layout.
    `mean_threads`: the thread count of the double-quant offset's mean (bnb4bit.quantize_absmax)."""
    return requantize_measured(w, fmt, dtype=dtype, conv1d=conv1d, mean_threads=mean_threads, workers=None)[0]


def requantize_measured(w: torch.Tensor, fmt: QuantFormat, *, dtype: torch.dtype, conv1d: bool = False,
                        mean_threads: int | None = None, workers: int | None = 1) -> tuple[torch.Tensor, float | None]:
    """(requantize's result, ‖w − deq(Q(w))‖_F as bnb4bit measures it while encoding; None when `workers` is
    None)."""
    stored, qs, err = _quantized(w, fmt, dtype, conv1d, mean_threads, workers)
    out = dequantize_weight(stored, qs)
    return (out.t().contiguous() if conv1d else out), err


def requantization_error(w: torch.Tensor, fmt: QuantFormat, *, dtype: torch.dtype, conv1d: bool = False,
                         mean_threads: int | None = None, workers: int = 1) -> float:
    """‖w − deq(Q(w))‖_F without building deq(Q(w)) (the cost report of a merge into the 16-bit weights)."""
    return _quantized(w, fmt, dtype, conv1d, mean_threads, workers)[2]


def frobenius(x: torch.Tensor) -> float:
    """‖x‖_F: float32 norms of rows (short sums), summed in float64. As accurate as a float64 pass (1e-9
    relative on a 5632 x 2048 weight, where one float32 norm is off by 5e-4) at a hundredth of its time."""
    x = x.float()
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    return math.sqrt(float(torch.linalg.vector_norm(rows, dim=1).double().square().sum()))


# -- what an adapter was trained on ------------------------------------------------------------------

@dataclass(frozen=True)
class TrainedOn:
    """The base an adapter saw during training: "fp" (the dense weights) or a 4-bit type ("nf4"/"fp4")
    with its format. `targets`: weight name -> Conv1D?, the weights that were 4-bit (None: those
    transformers would quantize in BASE). `dtype`: the dtype they were quantized in (None: BASE's
    config dtype)."""

    kind: str
    source: str  # "option" | "adapter" (its base_model_name_or_path) | "base" (BASE is 4-bit) | "merged"
    #              (validate: the merged checkpoint's provenance record) | "none"
    how: str  # one line: how this is known
    fmt: QuantFormat | None = None
    checkpoint: str | None = None  # the 4-bit checkpoint the adapter names
    dtype: torch.dtype | None = None
    targets: dict[str, bool] | None = None
    notes: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.kind != "fp"

    @property
    def label(self) -> str:
        """NF4, FP4 or 16-bit."""
        return self.kind.upper() if self.quantized else "16-bit"

    def to_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "how": self.how, "checkpoint": self.checkpoint,
                "quant_type": self.fmt.quant_type if self.fmt else None,
                "blocksize": self.fmt.blocksize if self.fmt else None,
                "double_quant": self.fmt.double_quant if self.fmt else None,
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
                "notes": list(self.notes)}


def four_bit_config(config: dict | None) -> dict | None:
    """config.json's quantization_config when it is bitsandbytes 4-bit, else None."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return None
    return qc if (qc.get("load_in_4bit") or qc.get("_load_in_4bit")) else None


def _config(d: Path) -> dict | None:
    """A directory's config.json, or None when it is missing or unreadable (detection only reads, never fails)."""
    try:
        cfg = json.loads((Path(d) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def named_base(adapter_dir: Path) -> tuple[str | None, Path | None]:
    """(base_model_name_or_path as written, the local directory it names or None)."""
    try:
        name = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None, None
    if not isinstance(name, str) or not name:
        return None, None
    for cand in (Path(name), Path(adapter_dir) / name, Path(adapter_dir).parent / name):
        if (cand / "config.json").is_file():
            return name, cand
    return name, None


def _from_checkpoint(qdir: Path, base: Checkpoint | None, name: str) -> TrainedOn:
    """What a named 4-bit checkpoint says about the format and the quantized weights."""
    qc = four_bit_config(_config(qdir))
    quant_type = str(qc.get("bnb_4bit_quant_type") or "fp4")  # BitsAndBytesConfig's default type is fp4
    fmt = QuantFormat(quant_type, DEFAULT_BLOCKSIZE, bool(qc.get("bnb_4bit_use_double_quant", False)))
    notes, dtype, targets = [], None, None
    try:
        qck = Checkpoint(qdir)
        states = quant_states(qck)
    except (InputError, OSError):
        qck, states = None, {}
    if states:  # the weights themselves say it all: blocksize, nesting, dtype, which weights
        qs = next(iter(states.values()))
        fmt = QuantFormat(qs.quant_type, qs.blocksize, qs.nested)
        dtype = qs.torch_dtype
        targets = {n: is_conv1d_weight(qck, n) for n in states}
        notes += _provenance_note(qck, base)
    else:
        notes.append(f"{name} holds only its config (no 4-bit weights): blocksize {DEFAULT_BLOCKSIZE} and "
                     f"transformers' selection of weights are assumed")
    how = (f"the adapter's base_model_name_or_path {name} is a bitsandbytes 4-bit checkpoint "
           f"({fmt.quant_type}, blocksize {fmt.blocksize}, double quant {'on' if fmt.double_quant else 'off'})")
    return TrainedOn(fmt.quant_type, "adapter", how, fmt, str(qdir), dtype, targets, tuple(notes))


def _provenance_note(qck: Checkpoint, base: Checkpoint | None) -> list[str]:
    """What a loratools `quantize` record in the named 4-bit checkpoint says about BASE (a line, or none)."""
    from .io import read_provenance, verify_inputs

    rec = read_provenance(next(iter(qck.metadata.values()), {})) if qck.metadata else None
    if not rec or rec.get("command") != "quantize" or base is None:
        return []
    rows = verify_inputs(rec, {"checkpoint": base.path})
    if rows and all(r["ok"] for r in rows):
        return [f"its loratools provenance says it was quantized from the BASE given ({len(rows)} files match)"]
    return [f"its loratools provenance says it was quantized from another checkpoint than the BASE given "
            f"(SHA-256 differ): the dequantized base below is BASE's, not that checkpoint's"]


def detect(adapter_paths: list[Path], base: Checkpoint | None) -> TrainedOn:
    """What the adapters were trained on, as far as files tell (see Note: what is detected)."""
    if base is not None and base.is_quantized:
        return TrainedOn("fp", "base", "BASE is itself a 4-bit checkpoint: it is used dequantized, which is "
                         "what an adapter trained on it saw")
    found, hints = [], []
    for p in adapter_paths:
        name, qdir = named_base(p)
        if qdir is not None and four_bit_config(_config(qdir)):
            found.append(_from_checkpoint(qdir, base, name))
        elif name and qdir is None and _LOOKS_4BIT.search(name):
            hints.append(f"{p} names base {name!r}, which looks like a 4-bit checkpoint but is not on disk: "
                         f"give --trained-on nf4 if the adapter was trained on it")
    if found:
        first = found[0]
        if any((t.kind, t.fmt) != (first.kind, first.fmt) for t in found[1:]):
            hints.append("the adapters name 4-bit bases of different formats; the first one's is used")
        return TrainedOn(**{**first.__dict__, "notes": first.notes + tuple(hints)})
    return TrainedOn("fp", "none", "nothing in the adapters says they were trained on a 4-bit base (PEFT records "
                     "no QLoRA flag)", notes=tuple(hints))


def resolve(option: str | None, adapter_paths: list[Path], base: Checkpoint | None) -> TrainedOn:
    """`--trained-on auto|fp|nf4|fp4` against what the files say: "auto" (or None) is `detect`'s answer;
    an explicit 4-bit type takes the named checkpoint's format when it is of that type, else
    `loratools quantize`'s defaults (Note: the 4-bit format when only the type is known)."""
    option = option or "auto"
    if option not in TRAINED_ON_CHOICES:
        raise UsageError(f"--trained-on must be one of {', '.join(TRAINED_ON_CHOICES)}, not {option!r}")
    found = detect(adapter_paths, base)
    if option == "auto":
        return found
    if option == "fp":
        note = (f"detected {found.label} ({found.how}); --trained-on fp overrides it",) if found.quantized else ()
        return TrainedOn("fp", "option", "--trained-on fp", notes=found.notes + note)
    if base is not None and base.is_quantized:
        return TrainedOn("fp", "base", found.how, notes=(f"--trained-on {option}: BASE is already a 4-bit "
                                                         f"checkpoint, used dequantized as it is",))
    if found.quantized and found.kind == option:
        return TrainedOn(**{**found.__dict__, "source": "option", "how": f"--trained-on {option}; {found.how}"})
    fmt = QuantFormat(option, DEFAULT_BLOCKSIZE, DEFAULT_DOUBLE_QUANT)
    note = (f"the adapter names a {found.label} base; --trained-on {option} overrides it",) if found.quantized else ()
    return TrainedOn(option, "option", f"--trained-on {option} (blocksize {fmt.blocksize}, double quant on: "
                     f"loratools quantize's defaults)", fmt, notes=found.notes + note)


def record_trained_on(record: dict | None) -> TrainedOn | None:
    """The 4-bit base a loratools merge record says the adapters were trained on (MergeBase.options), or None."""
    opts = (record or {}).get("options") or {} if (record or {}).get("command") == "merge" else {}
    for key, verb in (("into_dequantized", "merge --into-dequantized"), ("trained_on", "merge --trained-on")):
        f = opts.get(key)
        if isinstance(f, dict) and f.get("quant_type") in QUANT_TYPES:
            fmt = QuantFormat(f["quant_type"], int(f.get("blocksize") or DEFAULT_BLOCKSIZE), bool(f.get("double_quant")))
            return TrainedOn(fmt.quant_type, "merged", f"the merged checkpoint's provenance record ({verb} "
                             f"{fmt.quant_type}, blocksize {fmt.blocksize}, double quant "
                             f"{'on' if fmt.double_quant else 'off'})", fmt)
    return None


# -- the dequantized base, read as a checkpoint --------------------------------------------------------

def quantized_weights(base: Checkpoint, trained: TrainedOn) -> dict[str, tuple[bool, torch.dtype]]:
    """BASE's weights that were 4-bit during training: name -> (Conv1D?, dtype they were quantized in).
    The named 4-bit checkpoint's own list when there is one, else what transformers quantizes."""
    specs = {n: i.dtype for n, i in base.tensors.items()}
    if trained.targets is not None:
        missing = [n for n in trained.targets if n not in specs]
        if missing:
            raise InputError(f"the 4-bit checkpoint the adapter was trained on ({trained.checkpoint}) quantized "
                             f"{len(missing)} weight(s) BASE does not have (first: {missing[0]}): another model?",
                             path=base.path, tensor=missing[0])
        return {n: (conv1d, trained.dtype or specs[n]) for n, conv1d in trained.targets.items()}
    plan = plan_quantization(base, None)
    return {n: (kind == "conv1d", plan.dtype or specs[n]) for n, kind in plan.targets.items()}


class RequantizedView(DenseView):
    """A dense checkpoint read as the model a QLoRA adapter was trained on: every weight that was 4-bit
    is deq(Q(W)) (`requantize`), the rest as stored. `errors` collects ‖W − deq(Q(W))‖_F of each weight
    read, for the cost report."""

    def __init__(self, ck: Checkpoint, trained: TrainedOn, device: torch.device | str = "cpu",
                 mean_threads: int | None = None, workers: int = 1):
        if ck.is_quantized:
            raise UsageError("BASE is already a 4-bit checkpoint: it is read dequantized as it is")
        super().__init__(ck, device)
        self.trained = trained
        self.targets = quantized_weights(ck, trained)
        self.mean_threads = mean_threads if mean_threads is not None else torch.get_num_threads()
        self.workers = workers  # chunk threads (merge runs torch single-threaded and passes its thread count)
        for n, (_, dtype) in self.targets.items():
            self.specs[n] = (dtype, self.specs[n][1])
        self.errors: dict[str, float] = {}

    def _requantized(self, name: str, w: torch.Tensor) -> torch.Tensor:
        conv1d, dtype = self.targets[name]
        out, self.errors[name] = requantize_measured(w.to(self.device), self.trained.fmt, dtype=dtype, conv1d=conv1d,
                                                     mean_threads=self.mean_threads, workers=self.workers)
        return out.cpu()

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = super().read(name, dtype)
        return self._requantized(name, w) if name in self.targets else w

    def stored_as_is(self, name: str, dtype: torch.dtype) -> bool:
        return name not in self.targets and super().stored_as_is(name, dtype)

    def iter_tensors(self, copy_as_is=lambda name: False) -> Iterator[tuple[str, torch.Tensor | TensorInfo]]:
        for name, t in super().iter_tensors(lambda n: n not in self.targets and copy_as_is(n)):
            yield name, self._requantized(name, t) if name in self.targets and isinstance(t, torch.Tensor) else t


def requantize_model_(model: torch.nn.Module, base: Checkpoint, trained: TrainedOn) -> list[str]:
    """Replace, in place, each weight of `model` (BASE loaded dense by transformers) that was 4-bit in
    training by deq(Q(W)) of BASE's own tensor. Returns the weights with no counterpart in the model
    (the reference is incomplete if any). Names are matched with and without the model's
    base_model_prefix, as transformers loads them."""
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""
    view = RequantizedView(base, trained)
    missing = []
    for name in view.targets:
        spellings = [name, f"{prefix}.{name}", name.removeprefix(prefix + ".")] if prefix else [name]
        param = next((params[n] for n in spellings if n in params), None)
        if param is None:
            missing.append(name)
            continue
        with torch.no_grad():
            param.copy_(view.read(name).to(device=param.device, dtype=param.dtype))
    view.close()
    return missing


# -- what the other choice would have cost (merge) ------------------------------------------------------

@dataclass
class OtherChoice:
    """Per merged weight that was 4-bit in training: ‖W16 − deq(Q(W16))‖_F / ‖ΔW‖_F, how far the other
    base lies from the one merged into, in units of the adapter's own change to that weight."""

    rows: list[dict] = field(default_factory=list)

    def add(self, tensor: str, requant_error: float, delta_norm: float) -> None:
        ratio = requant_error / delta_norm if delta_norm > 0 else None
        self.rows.append({"tensor": tensor, "requant_error_norm": requant_error, "delta_norm": delta_norm,
                          "ratio": ratio})

    def summary(self) -> dict:
        ratios = sorted(r["ratio"] for r in self.rows if r["ratio"] is not None)
        worst = max((r for r in self.rows if r["ratio"] is not None), key=lambda r: r["ratio"], default=None)
        median = None
        if ratios:
            mid = len(ratios) // 2
            median = ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])
        return {"metric": "‖W16 − deq(Q(W16))‖_F / ‖ΔW‖_F per merged weight", "tensors": len(self.rows),
                "median": median, "max": ratios[-1] if ratios else None,
                "max_tensor": worst["tensor"] if worst else None, "rows": self.rows}


def delta_norm(p, w: torch.Tensor, dev, ws) -> float:
    """‖merge(w) − w‖_F of a planned tensor, in float32 before any rounding: the adapters' change to it
    (ΔW for LoRA; for DoRA the whole change, magnitude included)."""
    merged32, _ = p.part.merge(w, p.steps, dev, torch.float32, ws)
    merged32 -= w.to(device=merged32.device, dtype=torch.float32)
    return frobenius(merged32)


def merge_line(qlora: dict) -> str:
    """The one line `merge` prints about a QLoRA adapter (also in --json as qlora.line)."""
    t = qlora["trained_on"]
    kind = (t["quant_type"] or "4-bit").upper()
    into = qlora["folded_into"]
    cost = qlora.get("other_choice") or {}
    if into == "4-bit base":
        return ("QLoRA: folded into the 4-bit BASE's dequantized weights, what an adapter trained on it saw (the "
                "16-bit weights are not given: the other choice's cost is not measured)")
    how = {"adapter": "detected from the adapter's base", "option": "--trained-on"}.get(t["source"], t["source"])
    if qlora.get("cost_error"):
        stats = f"the other choice's cost is not measured: {qlora['cost_error']}"
    elif cost.get("tensors"):
        stats = (f"the other base differs by ‖W16 − deq(Q(W16))‖/‖ΔW‖ = median {_g(cost['median'])}, max "
                 f"{_g(cost['max'])} ({cost['max_tensor']}) over {cost['tensors']} merged weights")
    else:
        stats = "no merged weight was 4-bit in training, so the other base gives the same merge"
    if into == "16-bit":
        return (f"QLoRA ({kind}, {how}): folded into the 16-bit weights; the adapter was trained on their {kind} "
                f"dequantization; {stats}; `--into-dequantized {t['quant_type']}` merges into what it saw")
    return (f"QLoRA ({kind}, {how}): folded into the {kind} dequantization of the 16-bit weights, what the adapter "
            f"was trained on; {stats}")


# -- merge: which base the adapters are folded into ---------------------------------------------------

class MergeBase:
    """How `merge` reads BASE for adapters that may have been trained on a 4-bit base.

    `into_dequantized` (a 4-bit type, or None) merges into deq(Q(W16)) instead of W16: every weight that
    was 4-bit in training is read requantized (RequantizedView), all of them, not only those the
    adapters touch, as in a model loaded 4-bit and dequantized. When the adapters are QLoRA (detected,
    `--trained-on`, or implied by `into_dequantized`), `observe` measures what the other choice would
    have cost for each merged weight; otherwise it does nothing and costs nothing.
    """

    def __init__(self, ck: Checkpoint, adapter_paths: list[Path], trained_on: str | None,
                 into_dequantized: str | None, device: torch.device):
        if into_dequantized is not None:
            if into_dequantized not in QUANT_TYPES:
                raise UsageError(f"--into-dequantized must be one of {', '.join(QUANT_TYPES)}, not "
                                 f"{into_dequantized!r}")
            if ck.is_quantized:
                raise UsageError("--into-dequantized: BASE is already a 4-bit checkpoint, which merge reads "
                                 "dequantized anyway; give the 16-bit base to requantize it")
            if trained_on not in (None, "auto", into_dequantized):
                raise UsageError(f"--trained-on {trained_on} contradicts --into-dequantized {into_dequantized}")
            trained_on = into_dequantized
        self.trained = resolve(trained_on, adapter_paths, ck)
        self.device = device
        self.into = ("4-bit base" if ck.is_quantized else "dequantized" if into_dequantized else "16-bit")
        self.qlora = self.trained.quantized  # (a 4-bit BASE resolves to "fp": it is read dequantized as it is)
        self.mean_threads = torch.get_num_threads()  # before merge goes single-threaded (double-quant offset)
        self.workers = self.mean_threads if device.type == "cpu" else 1  # chunk threads, as quantize uses
        self.view = RequantizedView(ck, self.trained, device, self.mean_threads, self.workers) if into_dequantized \
            else DenseView(ck, device)
        self.cost_error = None
        try:
            self.targets = (self.view.targets if into_dequantized else
                            quantized_weights(ck, self.trained) if self.qlora and not ck.is_quantized else {})
        except InputError as e:  # the 16-bit merge itself does not need them: say why the cost is missing
            self.targets, self.cost_error = {}, e.one_line()
        self.cost = OtherChoice()

    def observe(self, p, w: torch.Tensor, ws) -> None:
        """Measure one planned tensor (read as `w`, as merged into) for the cost report."""
        if not self.targets or p is None or not p.steps or p.is_bias or p.replacement is not None \
                or p.source not in self.targets:
            return
        if isinstance(self.view, RequantizedView):
            err = self.view.errors[p.source]
        else:
            conv1d, dtype = self.targets[p.source]
            err = requantization_error(w.to(self.device), self.trained.fmt, dtype=dtype, conv1d=conv1d,
                                       mean_threads=self.mean_threads, workers=self.workers)
        self.cost.add(p.key, err, delta_norm(p, w, self.device, ws))

    def options(self) -> dict:
        """What the provenance record adds: the 4-bit format merged into (`into_dequantized`), or the one a
        QLoRA adapter was trained on (`trained_on`); nothing for a plain merge, whose bytes stay as they were.
        validate reads either back (record_trained_on)."""
        if not self.trained.quantized:
            return {}
        f = self.trained.fmt
        fmt = {"quant_type": f.quant_type, "blocksize": f.blocksize, "double_quant": f.double_quant}
        return {"into_dequantized": fmt} if isinstance(self.view, RequantizedView) else {"trained_on": fmt}

    def summary(self) -> dict | None:
        """The summary's "qlora" object: None for a 16-bit merge of adapters nothing says saw a 4-bit base."""
        if not self.qlora and self.into == "16-bit":
            return None
        doc = {"trained_on": self.trained.to_json(), "folded_into": self.into,
               "other_choice": self.cost.summary() if self.into != "4-bit base" else None,
               "cost_error": self.cost_error}
        doc["line"] = merge_line(doc)
        return doc


def _g(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


__all__ = ["DEFAULT_BLOCKSIZE", "DEFAULT_DOUBLE_QUANT", "MergeBase", "OtherChoice", "RequantizedView", "TRAINED_ON_CHOICES",
           "TrainedOn", "delta_norm", "detect", "four_bit_config", "frobenius", "merge_line", "named_base",
           "quantized_weights", "record_trained_on", "requantization_error", "requantize", "requantize_measured",
           "requantize_model_", "resolve"]
