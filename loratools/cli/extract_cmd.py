import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import device_option, force_option, json_option, output_option
from .tables import human_bytes, kv_table, table
from .rank_options import energy_option, max_rank_option, rank_option, sv_ratio_option


@click.command("extract")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("tuned", type=click.Path(path_type=str))
@output_option
@rank_option("Fixed rank for every module (default 8 when no --energy / --sv-ratio is given).")
@energy_option("Per module, the smallest rank keeping this fraction of ‖ΔW‖² (e.g. 0.9).")
@sv_ratio_option
@max_rank_option
@click.option("--target-modules", multiple=True, metavar="PATTERN",
              help="Only these modules: a name or dotted suffix (q_proj, mlp.down_proj) or a glob "
                   "(layers.1*.q_proj). Repeat the flag, or separate with commas.")
@click.option("--include-embeddings", is_flag=True,
              help="Also extract embeddings (as PEFT embedding LoRA) and the output head (as LoRA Linear).")
@click.option("--modules-to-save", "modules_to_save", is_flag=True,
              help="Carry changed tensors LoRA cannot express (norms, biases) exactly: whole modules via PEFT "
                   "modules_to_save, biases of targeted modules via lora_bias.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="One lora_alpha for all modules (factors are scaled to match); default alpha = rank, scale 1.")
@click.option("--svd", type=click.Choice(["auto", "randomized", "full"]), default="auto", show_default=True,
              help="auto: randomized when the rank is a small fraction of the matrix, else exact.")
@device_option
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Dtype of the written factors (the maths is float32 whatever the inputs).")
@click.option("--report", "report_file", type=click.Path(path_type=str), default=None,
              help="Also write the report as JSON to this file.")
@force_option
@json_option
def command(base, tuned, output, rank, energy, sv_ratio, max_rank, target_modules, include_embeddings,
            modules_to_save, alpha, svd, device, dtype, report_file, force, as_json):
    """Extract a LoRA adapter from the difference of two checkpoints (TUNED − BASE), with its error.

    Every 2-D Linear / Conv1D weight that differs becomes a LoRA module of the chosen rank; the report
    gives each module's rank, retained energy and relative error ‖ΔW − BA‖/‖ΔW‖, and lists every
    changed tensor the adapter does not carry.

    \b
    Example:
      loratools extract fixtures/tiny-llama fixtures/tiny-llama-tuned -o /tmp/extracted --rank 8
      loratools extract BASE TUNED -o OUT --energy 0.9 --max-rank 64 --report report.json
    """
    start_digests(base, tuned)
    from ..extract import extract_checkpoint
    from ..io import Checkpoint

    patterns = [p for arg in target_modules for p in arg.replace(",", " ").split()]
    if rank is None and energy is None and sv_ratio is None:
        rank = 8
    total = len(Checkpoint(base).tensors)
    with bar("extract", total) as advance:
        report = extract_checkpoint(base, tuned, output, rank=rank, energy=energy, sv_ratio=sv_ratio,
                                    max_rank=max_rank, target_modules=patterns or None,
                                    include_embeddings=include_embeddings, modules_to_save=modules_to_save,
                                    alpha=alpha, svd=svd, device=device, dtype=dtype, force=force,
                                    on_tensor=lambda _: advance(), report=report_file)
    show_extract_report(report)
    if report.get("task_type_note"):
        info(f"note: {report['task_type_note']}")
    if as_json:
        print_json(report)


def show_extract_report(report: dict) -> None:
    rows = [[m["name"], m["kind"], "×".join(map(str, m["shape"])), m["rank"], m["svd"], m["retained_energy"],
             m["rel_error"]] for m in report["modules"]]
    table("LoRA modules", ["module", "kind", "shape", "rank", "svd", "retained energy", "rel. error"], rows)
    experts = [m for m in report["modules"] if m["kind"] == "experts"]
    if experts:  # MoE only: the spread of the per-expert error (each expert's numbers are in --json / --report)
        worst, name, e = max((x, m["name"], e) for m in experts for e, x in enumerate(m["expert_rel_errors"]))
        best = min(x for m in experts for x in m["expert_rel_errors"])
        info(f"experts: {len(experts)} expert parameters, rel. error per expert {best:.3g} to {worst:.3g} "
             f"(largest: {name} expert {e})")
    if report["modules_to_save"]:
        info(f"carried whole (modules_to_save): {', '.join(report['modules_to_save'])}")
    if report["lora_bias"]:
        info("bias changes of targeted modules carried as lora_B.bias (lora_bias)")
    if report["not_carried"]:
        table(f"changed but NOT carried by the adapter ({len(report['not_carried'])})",
              ["tensor", "shape", "‖Δ‖/‖W‖", "why"],
              [[n["name"], "×".join(map(str, n["shape"])), n["rel_change"], n["reason"]] for n in report["not_carried"]])
    t = report["totals"]
    kv_table("totals", [
        ("output", report["output"]),
        ("modules", t["modules"]),
        ("rank", f"{report['r']} (alpha {report['lora_alpha']})"),
        ("adapter", f"{t['adapter_parameters']:,} parameters, {human_bytes(t['adapter_bytes'])}"),
        ("dense delta", f"{t['delta_parameters']:,} parameters, {human_bytes(t['delta_bytes'])}"),
        ("size ratio", t["size_ratio"]),
        ("overall rel. error", t["rel_error"]),
        ("overall retained energy", t["retained_energy"]),
        ("identical tensors skipped", t["identical_tensors"]),
        ("module kinds from", report["module_kinds_from"]),
    ])
