"""`loratools convert ADAPTER -o OUT --to FORMAT`: rewrite an adapter in another file format.

The input's format is detected (loratools.formats), the adapter goes through PEFT's form in memory, and the
target format first says whether it can hold it (one line, exit 1, nothing written) before the output is
written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import formats
from .errors import InputError, UnsupportedError, UsageError
from .io.atomic import AtomicOutput, check_output_path
from .io.durability import durability_of
from .io.provenance import provenance


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter in a registered format, or a PEFT adapter saved as a pickle (not a
    checkpoint)."""
    from .formats.legacy_bin import bin_file

    return formats.detect(path) is not None or bin_file(Path(path)) is not None


# The refusal of a DoRA module or a tensor saved whole names the way out (one line still).
AS_LORA_HINT = "; --as-lora --rank R --base BASE writes it as plain LoRA (lossy, the error reported per module)"


def _as_lora_would_carry(files, message: str) -> bool:
    """Whether a target's refusal is about what --as-lora re-factors: a DoRA magnitude, or a tensor saved
    whole (modules_to_save)."""
    from .adapter import KeyKind, classify_key

    if files.config.get("use_dora") and "DoRA" in message:
        return True
    saved = any(classify_key(k).kind is KeyKind.SAVED for k in files.tensors)
    return saved and ("saved whole" in message or "whole tensors" in message)


def _check_fits(files, base: Path) -> None:
    """One line when the adapter does not fit the `base` given with --base: every target format that reads
    the base (tied head, MoE names, GGUF arch) assumes it is the adapter's."""
    from .checks import refuse_unless_fits

    refuse_unless_fits(formats.parse(files), base)


def _read(adapter: Path, base: Path | None):
    """(source format name, PeftFiles): a pickle-weights PEFT adapter through legacy_bin (convert is the one
    command that reads it, weights_only), anything else through its detected format."""
    from .formats.legacy_bin import bin_file, read_bin_adapter

    if bin_file(adapter) is not None:
        return "peft-bin", read_bin_adapter(adapter)
    src = formats.detect(adapter)
    if src is None:
        raise InputError(f"not an adapter in a known format ({', '.join(formats.names())})", path=adapter)
    return src.name, src.read(adapter, base)


def convert_adapter(adapter: str | os.PathLike, output: str | os.PathLike, *, to: str,
                    base: str | os.PathLike | None = None, force: bool = False, as_lora: bool = False,
                    rank: int | None = None, on_module=None) -> dict:
    """Convert the adapter at `adapter` into format `to` at `output`.

    Args:
        adapter: an adapter file or directory in any registered format.
        output: the directory to create (an io.OutputPath carries its durability); refused if it exists
            unless `force`.
        to: a registered format name (formats.names()).
        base: the base checkpoint, for formats that need its module list (kohya) or its config, and for
            `as_lora`; when given, the adapter must fit it (MismatchError otherwise).
        as_lora, rank: re-factor every DoRA module as a plain LoRA of rank `rank` (formats/lossy.py: the
            effective delta on `base`, truncated; lossy, measured). Without it a target that cannot hold
            DoRA refuses the adapter.
        on_module: called with each re-factored module's name (progress).
    Returns:
        {"kind": "adapter_convert", "output", "from", "to", "files", "bytes", "modules", "notes",
        "stale_removed", "lossy"}; notes list every exact transformation made (scales folded, ranks padded);
        lossy is null, or one row per re-factored module (module, base_tensor, rank, rel_error,
        optimal_error, svd, delta_norm).
    Example:
        >>> convert_adapter("fixtures/llama-lora", "/tmp/llama-lora-mlx", to="mlx")["files"]
        ['adapter_config.json', 'adapters.safetensors']
    """
    target = formats.get(to)
    if rank is not None and not as_lora:
        raise UsageError("--rank applies with --as-lora (convert is otherwise exact)")
    if not Path(adapter).exists():
        raise InputError("no such file or directory", path=adapter)
    base_path = Path(base) if base is not None else None
    src_name, files = _read(Path(adapter), base_path)
    lossy = None
    if as_lora:
        from .formats.lossy import as_plain_lora, check_rank

        check_rank(rank)
        files, lossy = as_plain_lora(files, base_path, rank, on_module=on_module)
    modules = len(formats.parse(files).modules)  # a read that is no valid adapter fails before any output
    if base_path is not None:
        _check_fits(files, base_path)
    try:
        target.check(files, base_path)  # before any output exists
    except UnsupportedError as e:
        if not as_lora and _as_lora_would_carry(files, e.message):
            e.message += AS_LORA_HINT
        raise
    inputs = [adapter] + ([base] if base is not None else [])
    check_output_path(output, inputs, force)
    options = {"to": to, "from": src_name, **({"as_lora": True, "rank": rank} if as_lora else {})}
    meta = provenance("convert", options, {"adapter": adapter, **({"base": base} if base is not None else {})})
    durability = durability_of(output)
    atomic = AtomicOutput(output, inputs, force, durability)
    with atomic as tmp:
        written = target.write(files, tmp, base_path, provenance=meta, durability=durability)
        nbytes = sum((tmp / f).stat().st_size for f in written)
    return {"kind": "adapter_convert", "output": str(atomic.out), "from": src_name, "to": target.name,
            "files": sorted(written), "bytes": nbytes, "modules": modules,
            "notes": list(files.notes), "stale_removed": [str(p) for p in atomic.stale_removed], "lossy": lossy}
