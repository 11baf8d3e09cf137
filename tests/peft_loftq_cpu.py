"""PEFT's own LoftQ on the CPU, for the tests and benchmarks/loftq.py.

peft 0.21's `loftq_init` hard-codes its compute device (`"xpu" if is_xpu_available() else "cuda"`), so
PEFT's LoftQ cannot run on a machine without an accelerator at all. The function here is PEFT's source,
compiled in PEFT's module namespace with that one line changed to "cpu": every other step (bitsandbytes'
Params4bit quantization without double quant, dequantize_4bit, the SVD) is PEFT's code as installed.
"""
from __future__ import annotations

import inspect

from peft.utils import loftq_utils

_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


def _cpu_loftq_init():
    src = inspect.getsource(loftq_utils.loftq_init)
    if _DEVICE_LINE not in src:  # a PEFT that changed this function: the shim must be re-checked
        raise RuntimeError("peft.utils.loftq_utils.loftq_init no longer has the device line this shim replaces")
    namespace = dict(vars(loftq_utils))
    exec(compile(src.replace(_DEVICE_LINE, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


peft_loftq_init = _cpu_loftq_init()


def patch_peft_lora_layers() -> None:
    """Make `get_peft_model(..., LoraConfig(init_lora_weights="loftq"))` use the CPU loftq_init."""
    import peft.tuners.lora.layer as layer

    layer.loftq_init = peft_loftq_init
