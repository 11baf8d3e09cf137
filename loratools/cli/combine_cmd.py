import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import device_option, force_option, json_option, output_option
from .tables import expert_cell, kv_table, table
from .rank_options import energy_option, rank_option


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@output_option
@click.option("--method", required=True,
              type=click.Choice(["cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
              help="cat: exact sum, rank Σr. linear: exact sum truncated optimally to --rank/--energy "
                   "(lossless without them). ties, dare_linear, dare_ties, magnitude_prune: PEFT's task "
                   "arithmetic on the dense deltas, then the best rank-R approximation.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Weight of each adapter, once per adapter in order (default 1 each; negative subtracts).")
@rank_option("Output rank (linear: a cap, default lossless Σr; task-arithmetic methods: default the largest "
             "input rank).")
@energy_option("Smallest rank per module keeping this fraction of ‖ΔW‖² (with --rank as a cap).")
@click.option("--density", type=float, help="Fraction of each delta kept by ties / dare_* / magnitude_prune, "
                                            "in (0, 1].")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]),
              help="Sign election of ties / dare_ties (default total).")
@click.option("--seed", type=int, help="Seed of the DARE masks (default 0); same seed, same bytes.")
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="The base checkpoint, for adapters whose format needs it to be read (kohya, GGUF LoRA: their "
                   "module names; MLX-LM MoE experts).")
@device_option
@click.option("--report", type=click.Path(path_type=str), help="Also write the JSON report to this file.")
@force_option
@json_option
def command(adapters, output, method, weights, rank, energy, density, majority_sign, seed, base, device, report,
            force, as_json):
    """Combine LoRA adapters of one base model into one PEFT adapter (weighted sum or task arithmetic).

    Adapters may be in any format `loratools convert` reads (PEFT, MLX-LM, kohya, GGUF LoRA; kohya and
    GGUF need --base).

    cat and linear are exact sums Σ wᵢ·ΔWᵢ (linear then truncates optimally from the factors, never
    forming a dense matrix); the report gives each module's rank, retained energy and relative error.

    \b
    Examples:
      loratools combine fixtures/llama-lora fixtures/llama-rslora -o /tmp/mix --method linear --rank 8
      loratools combine A B C -o /tmp/mix --method cat --weight 1 --weight 0.5 --weight -0.25
      loratools combine A B -o /tmp/mix --method dare_ties --density 0.5 --rank 16 --seed 1 --json
    """
    start_digests(*adapters, *([base] if base else []))
    from ..combine import combine_adapters

    with bar("combine", None) as advance:
        doc = combine_adapters(list(adapters), output, method=method, weights=list(weights), rank=rank,
                               energy=energy, density=density, majority_sign=majority_sign, seed=seed,
                               device=device, force=force, report=report, on_module=lambda _: advance(),
                               base=base)
    if as_json:
        print_json(doc)
        return
    moe = any(m.get("experts") for m in doc["modules"])  # MoE expert tensors: per-expert errors too
    table(None, ["module", "kind", "input ranks", "rank", "retained energy", "rel. error"]
          + (["per expert"] if moe else []),
          [[m["name"], m["kind"], "+".join(str(r) for r in m["input_ranks"]), m["rank"], m["retained_energy"],
            m["rel_error"]] + ([expert_cell(m)] if moe else []) for m in doc["modules"]])
    kv_table(None, [("method", doc["method"]), ("weights", doc["weights"]), ("modules", len(doc["modules"])),
                    ("r", doc["r"]), ("other ranks", len(doc["rank_pattern"])),
                    ("max rel. error", doc["max_rel_error"]), ("carried whole", doc["saved_tensors"] or None)])
    info(f"wrote {doc['output']}: {len(doc['files'])} files, {doc['bytes']:,} bytes")
