"""`loratools convert ADAPTER --to lora ...`: the part of `convert` that writes a plain LoRA from what is not one
(loratools/lora_convert.py; docs/convert_lora.md). convert_cmd hands over whenever --to lora or one of its own
options is given."""
from __future__ import annotations

import click

from .console import info, print_json
from .tables import table


def convert_to_lora(adapter, output, *, to, initial, base, as_lora, rank, energy, sv_ratio, max_rank, force,
                    as_json) -> None:
    from ..errors import UsageError
    from ..ranks import check_ranges

    if to != "lora":
        raise UsageError("--initial, --energy, --sv-ratio and --max-rank apply with --to lora")
    if as_lora:
        raise UsageError("--as-lora re-factors DoRA modules for another format; --to lora writes the whole adapter "
                         "as LoRA already (drop --as-lora)")
    ctx = click.get_current_context()
    if any(ctx.get_parameter_source(p).name != "DEFAULT" for p in ("dtype", "max_shard_size")):
        raise UsageError("--dtype and --max-shard-size apply to checkpoints, not to adapters")
    check_ranges(rank=rank)
    from .. import lora_convert

    if initial is not None:
        report = lora_convert.convert_initial(adapter, initial, output, rank=rank, energy=energy, sv_ratio=sv_ratio,
                                              max_rank=max_rank, base=base, force=force)
    else:
        report = lora_convert.convert_typed(adapter, output, rank=rank, energy=energy, sv_ratio=sv_ratio,
                                            max_rank=max_rank, base=base, force=force)
    if as_json:
        print_json(report)
        return
    rows = report["modules"]
    table("modules as LoRA", ["module", "kind", "rank", "rel. error", "optimal", "svd"],
          [[r["module"], r["kind"], r["rank"], r["rel_error"], r["optimal_error"], r["svd"]] for r in rows])
    for note in report["notes"]:
        info(f"note: {note}")
    worst = max(rows, key=lambda r: r["rel_error"], default=None)
    tail = f", largest relative error {worst['rel_error']:.4g} ({worst['module']})" if worst else ""
    info(f"wrote {report['output']}: {len(rows)} modules as LoRA (r {report['r']}, alpha {report['lora_alpha']:g})"
         f"{tail}, {report['bytes']:,} bytes")
