import math

import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import device_option, force_option, json_option, max_shard_size_option, output_option

DTYPE_CHOICE = click.Choice(["auto", "float16", "bfloat16", "float32"])


def report(summary: dict, as_json: bool, verb: str) -> None:
    for note in summary.get("notes", ()):  # on stderr with --json too: the summary's "notes" hold the same lines
        click.echo(f"warning: {note}", err=True)  # one line, never wrapped
    if as_json:
        print_json(summary)
        return
    names = ", ".join(f"{a['path']} (x{a['weight']:g})" for a in summary["adapters"])
    info(f"{verb} {names}: {summary['changed_tensors']} of {summary['tensors']} tensors changed"
         + (f", {len(summary['replaced_tensors'])} replaced whole" if summary["replaced_tensors"] else "")
         + (", lm_head untied from the embedding" if summary.get("untied_head") else "")
         + (", 4-bit base dequantized" if summary.get("dequantized_base") else ""))
    if summary.get("experts"):  # MoE only: the spread of the per-expert relative change (all in --json)
        rows = summary["experts"]
        ratios = [(c, r["name"], e) for r in rows for e, c in enumerate(r["expert_rel_changes"]) if c is not None]
        change, name, e = max(ratios, default=(math.nan, "-", "-"))
        least = min((c for c, _, _ in ratios), default=math.nan)
        info(f"experts: {len(rows)} expert parameters ({', '.join(sorted({str(r['experts']) for r in rows}))} "
             f"experts each) changed; ‖ΔW_e‖/‖W_e‖ per expert {least:.3g} to {change:.3g} (largest: {name} "
             f"expert {e})")
    if (summary.get("qlora") or {}).get("line"):
        info(summary["qlora"]["line"])
    if summary.get("dora_record"):
        info(f"DoRA norms recorded in {summary['dora_record']} (lets `loratools unmerge` undo this merge)")
    info(f"wrote {summary['output']}: {len(summary['files'])} files, {summary['bytes']:,} bytes, "
         f"{'/'.join(summary['dtypes'])} on {summary['device']}")


@click.command("merge")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@output_option
@click.option("--weight", "weights", type=float, multiple=True, metavar="W",
              help="Scale an adapter's delta; give once per adapter, in order (default 1.0 each).")
@click.option("--dtype", type=DTYPE_CHOICE, default="auto", show_default=True,
              help="Output float dtype; auto keeps the base's (float16 for a 4-bit base).")
@click.option("--trained-on", type=click.Choice(["auto", "fp", "nf4", "fp4"]), default="auto", show_default=True,
              help="What the adapters were trained on: a QLoRA adapter saw the base's 4-bit dequantization. auto "
              "detects it where the files tell (docs/merge.md); with a 4-bit type, merge measures per weight what "
              "folding into the other base would change (it quantizes the touched weights: slower).")
@click.option("--into-dequantized", type=click.Choice(["nf4", "fp4"]), default=None,
              help="Merge into BASE quantized to 4 bits and dequantized (what a QLoRA adapter was trained on, "
              "what transformers' dequantize() + PEFT's merge_and_unload give) instead of the 16-bit weights.")
@device_option
@max_shard_size_option
@force_option
@json_option
def command(base, adapters, output, weights, dtype, trained_on, into_dequantized, device, max_shard_size, force,
            as_json):
    """Fold one or more LoRA adapters into BASE and write a plain dense checkpoint.

    An adapter may be in any format `loratools convert` reads (PEFT, MLX-LM, kohya, GGUF LoRA); BASE names
    the modules of kohya and GGUF files.

    Matches PEFT's merge_and_unload() (rsLoRA, rank/alpha patterns, fan_in_fan_out, embeddings,
    lora_bias, modules_to_save, DoRA). Several adapters are applied in the order given, in float32,
    rounded once. BASE may be a bitsandbytes 4-bit checkpoint: it is dequantized on the fly.
    PEFT's LoHa, LoKr, VeRA, AdaLoRA and IA3 adapters merge too, one per command, as PEFT merges
    them (docs/adapter_types.md).

    \b
    Examples:
      loratools merge fixtures/tiny-llama fixtures/llama-lora -o /tmp/merged
      loratools merge fixtures/tiny-llama fixtures/llama-lora fixtures/llama-rslora \\
          --weight 0.7 --weight 0.3 -o /tmp/mix --dtype bfloat16
      loratools merge fixtures/tiny-llama fixtures/llama-lora -o /tmp/qm --into-dequantized nf4
    """
    start_digests(base, *adapters)  # before torch is imported: see io/provenance.py
    from ..io import Checkpoint
    from ..merge import merge_checkpoint

    total = len(Checkpoint(base).tensors)
    with bar("merge", total) as advance:
        summary = merge_checkpoint(base, adapters, output, weights=list(weights), dtype=dtype, device=device,
                                   max_shard_size=max_shard_size, force=force, on_tensor=lambda _: advance(),
                                   trained_on=trained_on, into_dequantized=into_dequantized)
    report(summary, as_json, "merged")
