"""bitsandbytes' import-time notice about an optional package, kept off users' screens.

On CPUs with AVX-512 BF16, importing bitsandbytes 0.50 tries `from kernels import get_kernel` (an optional
Hugging Face package with a faster CPU 4-bit matmul) and, when the package is absent, logs "Failed to load
CPU gemm_4bit_forward from kernels-community: No module named 'kernels'..." on the logger of
`bitsandbytes.backends.cpu.ops`. bitsandbytes then uses its own kernel; nothing is wrong. The import is not
ours to defer: `import peft` imports bitsandbytes whenever it is installed, so `validate` would print the
line to users who never asked for 4 bits. This filter drops exactly that record when the cause is the
package being absent; the same line with any other cause (the package present but failing), and every
other bitsandbytes message, still shows.
"""
from __future__ import annotations

import logging

LOGGER = "bitsandbytes.backends.cpu.ops"  # logging.getLogger(__name__) in bitsandbytes/backends/cpu/ops.py
NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _absent_kernels_package(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    cause = args[0] if args else None
    return (str(record.msg).startswith(NOTICE) and isinstance(cause, ModuleNotFoundError)
            and (cause.name or "").split(".")[0] == "kernels")


def _keep(record: logging.LogRecord) -> bool:
    return not _absent_kernels_package(record)


def install() -> None:
    """Attach the filter to bitsandbytes' CPU-ops logger (without importing bitsandbytes); idempotent."""
    logger = logging.getLogger(LOGGER)
    if _keep not in logger.filters:
        logger.addFilter(_keep)
