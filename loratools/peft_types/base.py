"""The interface every non-LoRA PEFT adapter type implements, and the reading of its files.

A type is one module in this package: a `TypedModule` subclass (one adapted base weight: its factors, the
base layout they imply, and PEFT's own merge/unmerge of that layer in float32) and a `PeftType` (its
peft_type, the saved leaf names it owns, and `parse`, which builds the modules from the saved tensors),
registered in peft_types/__init__.py. merge/unmerge reach a module through lora_math (Step.variant is
PEFT_TYPE for it: merge_weight hands the float32 base to `module.merge`), plan.py adds the bias of a type
that scales it (IA3), checks.py asks `fit` whether the base tensor fits.

Note: matching PEFT bit for bit.
    The reference is PEFT's merge_and_unload on the base loaded in float32, rounded once to the base dtype.
    Each type's `delta` / `merge` replays its layer's get_delta_weight / merge with the same ops in the same
    order on float32 copies of the saved tensors (as PEFT's float32 parameters hold them), so the float32
    result has PEFT's bits and the one rounding gives PEFT's output.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import FormatError
from ..lora_math import PEFT_TYPE

PREFIX = "base_model.model."


@dataclass(eq=False)
class TypedModule(ABC):
    """One adapted base weight of a non-LoRA PEFT type.

    The attributes after `fan_in_fan_out` let plan.py/checks.py/merge.py treat it where they treat a
    LoraModule (base key, no DoRA magnitude, no lora_bias, not an expert parameter); nothing reads A/B."""

    name: str  # the module path PEFT saved it under (`model.layers.0.self_attn.q_proj`)
    fan_in_fan_out: bool = False  # the base stores the weight [in, out] (GPT-2 Conv1D)

    peft_type = "?"  # class attribute: "LOHA", "LOKR", ...
    additive = True  # class attribute: W' = W + ΔW with ΔW independent of W (False: IA3, OFT)
    scales_bias = False  # PEFT's merge also changes this layer's bias (IA3 on a non-feed-forward layer)
    row_blocks = False  # delta/merge/unmerge take `rows` (a row block of the stored weight) with the same bits
    variant = PEFT_TYPE  # lora_math's strategy for these modules
    kind = "linear"
    magnitude = None
    bias = None
    param = None
    experts = 1
    experts_transposed = False

    # -- where it applies ----------------------------------------------------------------------------
    @property
    def base_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias"

    @property
    def key_path(self) -> str:
        return self.name

    @property
    def transposed(self) -> bool:
        return self.fan_in_fan_out

    @abstractmethod
    def features(self) -> tuple[int | None, int | None]:
        """(out_features, in_features) the factors imply; None where only the base can say (VeRA's in, IA3)."""

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The base weight's stored shape ([out, in], [in, out] with fan_in_fan_out); -1 where unknown."""
        out_f, in_f = (-1 if d is None else d for d in self.features())
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)

    def fit(self, shape: tuple[int, ...]) -> str | None:
        """None when a base weight of stored shape `shape` fits, else what the factors need (one phrase).
        A type whose factors leave a dimension open (VeRA, IA3) takes it from `shape` here."""
        want = self.base_shape
        if len(shape) == 2 and all(w in (-1, s) for w, s in zip(want, shape)):
            self.bind(tuple(shape))
            return None
        what = "Conv1D weight [in, out]" if self.fan_in_fan_out else "weight [out, in]"
        shape_text = "[" + ", ".join("?" if d == -1 else str(d) for d in want) + "]"
        return f"the adapter's {self.factor_text()} need a {what} of shape {shape_text}"

    def bind(self, shape: tuple[int, ...]) -> None:
        """Take the open dimensions from the base weight's stored shape (see fit)."""

    # -- the arithmetic (float32, the stored layout) -------------------------------------------------
    @abstractmethod
    def delta(self, base_w32: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
        """ΔW in float32 in the base weight's stored layout: what merge adds. Additive types ignore the base;
        multiplicative ones (IA3) return merge(base) − base and need it. `rows` (row_blocks types only):
        those rows of ΔW, with the bits of the whole one's (Note: row blocks of B @ A, lora_math.py)."""

    def merge(self, acc: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """PEFT's merge of this layer into the float32 weight `acc` (stored layout; with `rows`, that row block
        of it); may work in place. Returns the merged weight."""
        acc += self.delta(rows=rows)
        return acc

    def unmerge(self, acc: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """PEFT's unmerge of this layer from the float32 merged weight `acc` (or its row block `rows`)."""
        acc -= self.delta(rows=rows)
        return acc

    def __init_subclass__(cls, **kwargs):
        # A type that scales the bias (plan.py then plans the bias for it) must say how: merge_bias(acc32) and
        # unmerge_bias(acc32), PEFT's change of the layer's bias in float32. Checked when the type is defined.
        super().__init_subclass__(**kwargs)
        if cls.scales_bias and not all(callable(getattr(cls, f, None)) for f in ("merge_bias", "unmerge_bias")):
            raise TypeError(f"{cls.__name__} sets scales_bias but lacks merge_bias/unmerge_bias")

    # -- for inspect and error messages ---------------------------------------------------------------
    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's saved tensors by leaf name (`hada_w1_a`, ...)."""

    def factor_text(self) -> str:
        return "factors (" + ", ".join(f"{k} {list(t.shape)}" for k, t in self.tensors().items()) + ")"

    def describe(self) -> dict:
        """Type-specific numbers for inspect (r, alpha, scale where the type has them)."""
        return {}

    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())


@dataclass
class PeftType:
    """A registered adapter type: its peft_type, the leaf names of its saved per-module tensors, and
    `parse(parts, shared, cfg, where) -> {name: TypedModule}` (parts: module path -> leaf -> tensor; shared:
    the saved tensors outside any module, e.g. VeRA's `base_model.vera_A`; where: the weights file, for
    errors). parse raises FormatError/UnsupportedError naming the tensor on anything malformed."""

    name: str
    leaves: tuple[str, ...]
    parse: Callable[..., dict[str, TypedModule]]
    shared: tuple[str, ...] = ()  # full keys of tensors saved outside the modules
    config_keys: tuple[str, ...] = field(default=())  # config fields parse reads (documentation only)


def module_error(where, path: str, leaf: str, message: str, error=FormatError):
    """The one-line error for tensor `<PREFIX><path>.<leaf>` of the weights file `where`."""
    return error(message, path=where, tensor=f"{PREFIX}{path}.{leaf}" if leaf else f"{PREFIX}{path}")


def require(parts: dict[str, torch.Tensor], leaves, path: str, where, peft_type: str):
    """The tensors `leaves` of module `path`, refusing a missing one in one line."""
    missing = [leaf for leaf in leaves if leaf not in parts]
    if missing:
        have = ", ".join(sorted(parts)) or "none"
        raise module_error(where, path, missing[0], f"{peft_type} module {path} has no {missing[0]} tensor "
                                                    f"(it has {have})")
    return [parts[leaf].to(torch.float32) for leaf in leaves]


def check_2d(t: torch.Tensor, path: str, leaf: str, where, rows: int | None = None, cols: int | None = None):
    """Refuse a saved factor that is not 2-D or not [rows, cols] (None: any)."""
    want = f"[{'n' if rows is None else rows}, {'n' if cols is None else cols}]"
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise module_error(where, path, leaf, f"{leaf} has shape {list(t.shape)}, expected {want}")


def number(cfg: dict, key: str, where, *, positive: bool = True, default=None):
    """A numeric config field (refused in one line when missing or not a number)."""
    v = cfg.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (positive and v <= 0):
        raise FormatError(f"{key} must be a {'positive ' if positive else ''}number, found {v!r}", path=where)
    return v


class TypedBias:
    """A base bias that a peft_types module's merge also changes (IA3 scales a non-feed-forward layer's
    bias): plan.py's part for it, beside lora_math's WeightTensor / BiasTensor."""

    is_bias = True

    def merge(self, base, steps, device, out_dtype, ws=None):
        acc = base.to(device=device, dtype=torch.float32, copy=True)
        for s in steps:
            acc = s.module.merge_bias(acc)
        return acc.to(out_dtype), [None] * len(steps)

    def unmerge(self, merged, steps, norms, device, out_dtype, ws=None):
        acc = merged.to(device=device, dtype=torch.float32, copy=True)
        for s in reversed(steps):
            acc = s.module.unmerge_bias(acc)
        return acc.to(out_dtype)


TYPED_BIAS = TypedBias()


__all__ = ["PREFIX", "TYPED_BIAS", "PeftType", "TypedBias", "TypedModule", "check_2d", "module_error", "number",
           "require"]
