import click

from ..io.provenance import start_digests
from .console import print_json
from .options import force_option, json_option, output_option
from .tables import expert_cell, human_bytes, kv_table, table
from .rank_options import energy_option, max_rank_option, rank_option, sv_ratio_option


@click.command("resize")
@click.argument("adapter", type=click.Path(path_type=str))
@output_option
@rank_option("New rank for every module (a module never grows past its current rank: that is lossless).")
@energy_option("Per module, the smallest rank keeping this fraction of the adapter's ‖ΔW‖².")
@sv_ratio_option
@max_rank_option
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="The base checkpoint, for adapters whose format needs it to be read (kohya, GGUF LoRA: their "
                   "module names; MLX-LM MoE experts).")
@click.option("--report", "report_file", type=click.Path(path_type=str), default=None,
              help="Also write the report as JSON to this file.")
@force_option
@json_option
def command(adapter, output, rank, energy, sv_ratio, max_rank, base, report_file, force, as_json):
    """Re-rank a LoRA adapter: the optimal truncation of its own delta, without forming it.

    Each module's B·A is recompressed through QR of the factors and an SVD of the small core; the
    output has alpha = rank (scale 1). DoRA adapters are refused (their magnitudes depend on the base).
    ADAPTER may be in any format `loratools convert` reads (kohya and GGUF LoRA need --base).

    \b
    Example:
      loratools resize fixtures/llama-lora -o /tmp/llama-lora-r4 --rank 4
      loratools resize ADAPTER -o OUT --energy 0.95 --report resize.json
    """
    start_digests(adapter, *([base] if base else []))
    from ..resize import resize_adapter

    report = resize_adapter(adapter, output, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank,
                            force=force, report=report_file, base=base)
    moe = any(m.get("experts") for m in report["modules"])  # MoE expert tensors: per-expert errors too
    table("resized modules", ["module", "kind", "rank", "new rank", "retained energy", "rel. error"]
          + (["per expert"] if moe else []),
          [[m["name"], m["kind"], m["old_rank"], m["rank"], m["retained_energy"], m["rel_error"]]
           + ([expert_cell(m)] if moe else []) for m in report["modules"]])
    t = report["totals"]
    kv_table("totals", [
        ("output", report["output"]),
        ("modules", t["modules"]),
        ("rank", f"{report['r']} (alpha {report['lora_alpha']}, scale 1)"),
        ("parameters", f"{t['old_parameters']:,} -> {t['parameters']:,}"),
        ("size", f"{human_bytes(t['old_bytes'])} -> {human_bytes(t['bytes'])}"),
        ("overall rel. error", t["rel_error"]),
        ("saved tensors copied", len(report["saved_tensors"])),
    ])
    if as_json:
        print_json(report)
