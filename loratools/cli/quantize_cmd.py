import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import device_option, force_option, json_option, max_shard_size_option, output_option
from .tables import human_bytes, kv_table, table


@click.command("quantize")
@click.argument("base", type=click.Path(path_type=str))
@output_option
@click.option("--nf4", "quant_type", flag_value="nf4", default=True, help="NormalFloat4 (the QLoRA default).")
@click.option("--fp4", "quant_type", flag_value="fp4", help="4-bit float (1 sign, 2 exponent, 1 mantissa bit).")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="Values per absmax scale.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the absmax scales to 8 bits as well (saves ~0.37 bits per parameter).")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="bnb_4bit_compute_dtype written to the config (the matmul dtype at load).")
@click.option("--skip-modules", multiple=True, metavar="NAME",
              help="Keep these modules dense, in addition to transformers' defaults (lm_head, tied "
                   "weights); transformers' matching: prefix, regex or suffix. Repeatable.")
@device_option
@max_shard_size_option
@force_option
@json_option
def command(base, output, quant_type, blocksize, double_quant, compute_dtype, skip_modules, device,
            max_shard_size, force, as_json):
    """Quantize a dense checkpoint to a bitsandbytes 4-bit one (NF4 or FP4), tensor by tensor.

    The output is what transformers writes for `from_pretrained(BASE, quantization_config=
    BitsAndBytesConfig(load_in_4bit=True, ...))` + `save_pretrained`, and loads the same way. Reports
    the relative RMS quantization error per tensor and in total, bytes and bits per parameter.

    \b
    Example:
      loratools quantize fixtures/tiny-llama -o /tmp/tiny-nf4
      loratools quantize fixtures/tiny-gpt2 -o /tmp/gpt2-fp4 --fp4 --no-double-quant --json
    """
    start_digests(base)
    from ..io import Checkpoint
    from ..quantize import quantize_checkpoint

    total = len(Checkpoint(base).tensors)
    with bar("quantize", total) as advance:
        summary = quantize_checkpoint(base, output, quant_type=quant_type, blocksize=int(blocksize),
                                      double_quant=double_quant, compute_dtype=compute_dtype,
                                      skip_modules=list(skip_modules) or None, device=device,
                                      max_shard_size=max_shard_size, force=force,
                                      on_tensor=lambda _: advance())
    if as_json:
        print_json(summary)
        return
    t = summary["total"]
    table(None, ["tensor", "shape", "parameters", "bytes before", "bytes after", "bits/param", "rel. RMS error"],
          [[r["name"], r["shape"], r["parameters"], r["bytes_before"], r["bytes_after"], r["bits_per_parameter"],
            r["rel_rms_error"]] for r in summary["tensors"]])
    kv_table("quantize", [
        ("output", summary["output"]),
        ("format", f"{summary['quant_type']}, blocksize {summary['blocksize']}, double quant "
                   f"{'on' if summary['double_quant'] else 'off'}, compute {summary['compute_dtype']}"),
        ("quantized", f"{t['quantized_tensors']} tensors, {t['quantized_parameters']:,} of {t['parameters']:,} "
                      f"parameters"),
        ("rel. RMS error (all quantized)", f"{t['rel_rms_error']:.4g}"),
        ("bits per parameter", f"{t['bits_per_quantized_parameter']:.3f} quantized weights, "
                               f"{t['bits_per_parameter']:.3f} whole model"),
        ("bytes on disk", f"{t['bytes_before']:,} ({human_bytes(t['bytes_before'])}) -> {t['bytes_after']:,} "
                          f"({human_bytes(t['bytes_after'])})"),
    ])
    if summary["selection"] != "transformers":
        info("note: transformers could not build this model class; weights were chosen by name "
             "(2-D weights that are not embeddings, heads or norms)")
