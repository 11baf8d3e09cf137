import click

from .console import print_json
from .options import json_option
from .tables import fmt, human_bytes, kv_table, table


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@json_option
@click.option("--all-modules", is_flag=True, help="List every adapter module instead of grouping uniform ones.")
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="The base checkpoint, for adapters whose format needs it to be read (kohya, GGUF LoRA: their "
                   "module names; MLX-LM MoE experts).")
def command(path, as_json, all_modules, base):
    """Show what a checkpoint, 4-bit checkpoint or adapter (PEFT, MLX-LM, kohya, GGUF LoRA) holds (headers only);
    kohya and GGUF adapters need --base.

    \b
    Example:
      loratools inspect fixtures/tiny-llama
      loratools inspect fixtures/llama-lora --json
      loratools inspect lora.safetensors --base fixtures/tiny-llama
    """
    from ..inspect import group_modules, inspect_path

    doc = inspect_path(path, base)
    if as_json:
        print_json(doc)
        return
    if doc["kind"] == "checkpoint":
        q = doc["quantization"]
        items = [("path", doc["path"]), ("layout", doc["layout"]), ("architecture", doc["architecture"]),
                 ("model type", doc["model_type"]), ("tensors", doc["tensors"]), ("parameters", doc["parameters"]),
                 ("dtypes", doc["dtypes"]), ("shards", len(doc["shards"])),
                 ("bytes on disk", f"{doc['bytes_on_disk']:,} ({human_bytes(doc['bytes_on_disk'])})"),
                 ("quantization", "none" if q is None else
                  f"{q['method']} {q['quant_type']}, blocksize {q['blocksize']}, double quant "
                  f"{fmt(q['double_quant'])}, compute {q['compute_dtype']}, {q['quantized_tensors']} tensors")]
        if doc["provenance"]:
            items.append(("written by", fmt(doc["provenance"])))
        kv_table("checkpoint", items)
        if len(doc["shards"]) > 1:
            table(None, ["shard", "tensors", "bytes"], [[s["file"], s["tensors"], s["bytes"]] for s in doc["shards"]])
        return
    items = [("path", doc["path"]), ("format", doc["format"]), ("type", doc["peft_type"]), ("task", doc["task_type"]),
             ("base model", doc["base_model"]), ("target modules", doc["target_modules"]),
             ("target parameters", doc["target_parameters"]),
             ("rsLoRA", doc["use_rslora"]), ("DoRA", doc["use_dora"]), ("lora_bias", doc["lora_bias"]),
             ("fan_in_fan_out", doc["fan_in_fan_out"]), ("modules_to_save", doc["modules_to_save"]),
             ("adapted modules", len(doc["modules"])), ("trainable parameters", doc["trainable_parameters"]),
             ("dtypes", doc["dtypes"]), ("bytes on disk", f"{doc['bytes_on_disk']:,}")]
    if doc["provenance"]:
        items.append(("written by", fmt(doc["provenance"])))
    items += [("read as PEFT", note) for note in doc["format_notes"]]
    kv_table("adapter", items)
    # MoE expert tensors (target_parameters): an experts column, and with --all-modules each one's per-expert
    # ‖ΔW_e‖ range; tables of adapters without experts are unchanged.
    moe = any(m["experts"] > 1 for m in doc["modules"])
    if all_modules:
        table(None, ["module", "kind", "r", "alpha", "scale", "base shape", "DoRA", "bias"]
              + (["experts", "‖ΔW_e‖ min..max"] if moe else []),
              [[m["name"], m["kind"], m["r"], m["alpha"], m["scale"], m["base_shape"], m["dora"], m["bias"]]
               + ([m["experts"], _norm_range(m["expert_delta_norms"])] if moe else []) for m in doc["modules"]])
    else:
        table(None, ["module", "count", "kind", "r", "alpha", "scale", "DoRA", "bias"] + (["experts"] if moe else []),
              [[g["module"], g["count"], g["kind"], g["r"], g["alpha"], g["scale"], g["dora"], g["bias"]]
               + ([g["experts"]] if moe else []) for g in group_modules(doc["modules"])])
    if doc["saved_tensors"]:
        table("saved whole (modules_to_save / embedding base layers)", ["tensor", "shape"],
              [[s["name"], s["shape"]] for s in doc["saved_tensors"]])


def _norm_range(norms: list | None) -> str:
    if not norms:
        return "-"
    finite = [v for v in norms if v is not None]
    return f"{fmt(min(finite))}..{fmt(max(finite))}" if finite else "NaN/Inf"
