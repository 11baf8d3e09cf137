"""The dense view of a checkpoint: a bitsandbytes 4-bit checkpoint read as if it were dense.

`DenseView(ck)` is what merge, validate and the fit checks read a base through; `dense_specs` and
`read_dense` are its two primitives (dequantize uses them directly). A dense checkpoint passes through
unchanged. A packed 4-bit weight is dequantized on the fly, bit-identical to bitsandbytes'
`dequantize_4bit`.

Note: orientation of GPT-2 Conv1D weights.
    transformers quantizes a `Conv1D` weight (stored `[in, out]`) as the `[out, in]` weight of an
    `nn.Linear`, and its quant_state records `[out, in]`. The dense view is the layout of the original
    dense checkpoint, so such a weight is transposed back to `[in, out]` here, once: adapters trained on
    the dense model (`fan_in_fan_out=True`) and `GPT2LMHeadModel` both expect that. Which modules are
    Conv1D comes from config.json (hf_layout.py).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .bnb4bit import AUX_SUFFIXES, QUANT_STATE_PREFIX, QuantState, dequantize_weight
from .errors import FormatError
from .hf_layout import layout_for
from .io.checkpoint import Checkpoint, TensorInfo


def is_companion(name: str, packed) -> bool:
    """True for a tensor stored beside one of the `packed` 4-bit weights (absmax, maps, the quant_state JSON),
    not a weight of its own."""
    if QUANT_STATE_PREFIX in name:
        return name.split(QUANT_STATE_PREFIX)[0] in packed
    return any(name.endswith(suffix) and name[: -len(suffix)] in packed for suffix in AUX_SUFFIXES)


def quant_states(ck: Checkpoint) -> dict[str, QuantState]:
    """weight name -> parsed QuantState, for every packed 4-bit weight (cached on the checkpoint)."""
    if ck.parsed_quant_states is not None:
        return ck.parsed_quant_states
    out = {}
    for weight, raw in ck.quant_states.items():
        raw = {k: v for k, v in raw.items() if k != "_format"}
        try:
            qs = QuantState.from_dict(raw)
        except ValueError as e:
            raise FormatError(str(e), path=ck.path,
                              tensor=weight + QUANT_STATE_PREFIX + str(raw.get("quant_type"))) from None
        _check_stored(ck, weight, qs)
        out[weight] = qs
    ck.parsed_quant_states = out
    return out


def _check_stored(ck: Checkpoint, weight: str, qs: QuantState) -> None:
    for suffix, (dtype, shape) in qs.aux_specs().items():
        name = weight + suffix
        if suffix.startswith(QUANT_STATE_PREFIX):
            continue  # its length depends on how the JSON was spelled; it parsed, that is enough
        info = ck.tensors.get(name)
        if info is None:
            raise FormatError(f"4-bit weight lacks its {suffix.lstrip('.') or 'packed data'} tensor", path=ck.path,
                              tensor=name)
        if suffix == "":
            if info.dtype != torch.uint8 or info.nbytes != (qs.numel + 1) // 2:
                raise FormatError(f"packed 4-bit data should be {(qs.numel + 1) // 2} uint8 bytes for shape "
                                  f"{list(qs.shape)}, found {info.dtype_name} {list(info.shape)}", path=ck.path,
                                  tensor=name)
        elif info.dtype != dtype or tuple(info.shape) != shape:
            raise FormatError(f"expected {str(dtype).removeprefix('torch.')} {list(shape)}, found {info.dtype_name} "
                              f"{list(info.shape)}", path=ck.path, tensor=name)


def is_conv1d_weight(ck: Checkpoint, weight: str) -> bool:
    """True when a 4-bit checkpoint's weight belongs to a Conv1D module (quantized transposed)."""
    return layout_for(ck.config if ck.is_quantized else None).is_conv1d(weight.removesuffix(".weight"))


def dense_specs(ck: Checkpoint) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dense tensor names -> (dtype, shape), in file order; auxiliary 4-bit tensors omitted."""
    qstates = quant_states(ck) if ck.is_quantized else {}
    out = {}
    for name, info in ck.tensors.items():
        qs = qstates.get(name)
        if qs is not None:
            shape = qs.shape[::-1] if len(qs.shape) == 2 and is_conv1d_weight(ck, name) else qs.shape
            out[name] = (qs.torch_dtype, tuple(shape))
        elif is_companion(name, qstates):
            continue
        else:
            out[name] = (info.dtype, tuple(info.shape))
    return out


def read_quantized(ck: Checkpoint, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The stored tensors of one packed weight, suffix -> tensor ("" is the packed data)."""
    qs = quant_states(ck)[name]
    return {suffix: ck.read(name + suffix).to(device) for suffix in qs.aux_specs()
            if not suffix.startswith(QUANT_STATE_PREFIX)}


def read_dense(ck: Checkpoint, name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of the dense view: a packed 4-bit weight dequantized (bit-identical to
    bitsandbytes.functional.dequantize_4bit, in the quant_state dtype unless `dtype` is given), any
    other tensor as stored (on `device`)."""
    qstates = quant_states(ck) if ck.is_quantized else {}
    qs = qstates.get(name)
    if qs is None:
        if is_companion(name, qstates):
            raise FormatError("auxiliary 4-bit tensor, not part of the dense view", path=ck.path, tensor=name)
        return ck.read(name).to(device)
    w = dequantize_weight(read_quantized(ck, name, device), qs, dtype)
    if w.dim() == 2 and is_conv1d_weight(ck, name):
        w = w.t().contiguous()
    return w


def dense_shapes(ck: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as a dense model sees it (the shapes of `dense_specs`)."""
    return {name: tuple(shape) for name, (_, shape) in dense_specs(ck).items()}


class DenseView:
    """A checkpoint's tensors as a dense model sees them, one tensor at a time.

    Args:
        ck: a dense or bitsandbytes 4-bit checkpoint.
        device: where dequantized weights are computed and returned (other tensors are read to the CPU).

    Example:
        >>> view = DenseView(Checkpoint("fixtures/tiny-gpt2"))
        >>> view.read("transformer.h.0.attn.c_attn.weight").shape  # Conv1D [in, out], in 4 bits too
        torch.Size([64, 192])
    """

    def __init__(self, ck: Checkpoint, device: torch.device | str = "cpu"):
        self.ck = ck
        self.device = device
        self.quantized = ck.is_quantized
        self.specs = dense_specs(ck)  # name -> (dtype, shape), in file order
        self.shapes = {name: shape for name, (_, shape) in self.specs.items()}
        self.packed = set(quant_states(ck)) if self.quantized else set()  # names of the 4-bit weights

    def quant_state(self, name: str) -> QuantState | None:
        """The QuantState of a packed 4-bit weight (its dense values are dequantized); None for others."""
        return quant_states(self.ck).get(name) if name in self.packed else None

    def dtype(self, name: str) -> torch.dtype:
        """The dtype of the dense tensor: the quant_state's for a 4-bit weight, else the stored one."""
        return self.specs[name][0]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One dense tensor (`dtype` applies to a dequantized weight only; see read_dense)."""
        return read_dense(self.ck, name, device=self.device if name in self.packed else "cpu", dtype=dtype)

    def stored_as_is(self, name: str, dtype: torch.dtype) -> bool:
        """True when the dense tensor is the stored one, in `dtype`: it can be copied file to file."""
        info = self.ck.tensors.get(name)
        return info is not None and info.dtype == dtype and tuple(info.shape) == self.specs[name][1] and \
            name not in self.packed

    def iter_tensors(self, copy_as_is=lambda name: False) -> Iterator[tuple[str, torch.Tensor | TensorInfo]]:
        """(name, tensor) in file order; (name, TensorInfo) for the names `copy_as_is` selects, which a
        writer copies without reading them into memory. Closes the checkpoint at the end."""
        as_is = {name for name in self.specs if copy_as_is(name)}
        if not self.quantized:  # the next tensor is read while this one is worked on
            reads = self.ck.prefetched(n for n in self.specs if n not in as_is)
        for name in self.specs:
            if name in as_is:
                yield name, self.ck.tensors[name]
            elif self.quantized:
                # Dequantized in the quant_state dtype, bit-identical to bitsandbytes' dequantize_4bit:
                # the weights a QLoRA adapter was trained against, what `model.dequantize()` gives.
                yield name, read_dense(self.ck, name, device=self.device)
            else:
                got, tensor = next(reads)
                assert got == name
                yield name, tensor
                del tensor
        self.ck.close()

    def close(self) -> None:
        self.ck.close()
