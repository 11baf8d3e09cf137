import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import device_option, force_option, json_option, max_shard_size_option, output_option
from .rank_options import RankInt
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
@click.option("--loftq", is_flag=True,
              help="Also write a LoftQ LoRA initialisation (needs --nf4 and --rank) into OUT/loftq_init: "
                   "B·A corrects the written base's quantization error (docs/quantize.md).")
@click.option("--rank", type=RankInt("rank"), default=None, help="LoftQ: the adapter's rank r.")
@click.option("--iters", type=int, default=1, show_default=True,
              help="LoftQ: alternations of quantize / SVD (PEFT's loftq_iter).")
@click.option("--target-modules", multiple=True, metavar="PATTERN",
              help="LoftQ: modules that get the adapter (names, dotted suffixes or globs; comma or space "
                   "separated, repeatable); default every weight written in 4 bits.")
@device_option
@max_shard_size_option
@force_option
@json_option
@click.pass_context
def command(ctx, base, output, quant_type, blocksize, double_quant, compute_dtype, skip_modules, loftq, rank, iters,
            target_modules, device, max_shard_size, force, as_json):
    """Quantize a dense checkpoint to a bitsandbytes 4-bit one (NF4 or FP4), tensor by tensor.

    The output is what transformers writes for `from_pretrained(BASE, quantization_config=
    BitsAndBytesConfig(load_in_4bit=True, ...))` + `save_pretrained`, and loads the same way. Reports
    the relative RMS quantization error per tensor and in total, bytes and bits per parameter.

    \b
    Example:
      loratools quantize fixtures/tiny-llama -o /tmp/tiny-nf4
      loratools quantize fixtures/tiny-gpt2 -o /tmp/gpt2-fp4 --fp4 --no-double-quant --json
      loratools quantize fixtures/tiny-llama -o /tmp/tiny-loftq --nf4 --loftq --rank 8 --iters 2
    """
    lq = _loftq_options(ctx, quant_type, loftq, rank, iters, target_modules)
    start_digests(base)
    from ..io import Checkpoint
    from ..quantize import quantize_checkpoint

    total = len(Checkpoint(base).tensors)
    with bar("quantize", total) as advance:
        summary = quantize_checkpoint(base, output, quant_type=quant_type, blocksize=int(blocksize),
                                      double_quant=double_quant, compute_dtype=compute_dtype,
                                      skip_modules=list(skip_modules) or None, device=device,
                                      max_shard_size=max_shard_size, force=force,
                                      on_tensor=lambda _: advance(), loftq=lq)
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
    if lq is not None:
        _loftq_table(summary["loftq"])
    if summary["selection"] != "transformers":
        info("note: transformers could not build this model class; weights were chosen by name "
             "(2-D weights that are not embeddings, heads or norms)")


def _loftq_options(ctx, quant_type, loftq, rank, iters, target_modules):
    """The LoftQOptions of the command line, or None; LoftQ's options without --loftq are refused."""
    from ..errors import UsageError

    given = [f"--{n.replace('_', '-')}" for n in ("rank", "iters", "target_modules")
             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if not loftq:
        if given:
            raise UsageError(f"{given[0]} is a LoftQ option: add --loftq (and --nf4 --rank R)")
        return None
    # The LoftQ pair is made for NF4: the command line says so rather than relying on the default.
    if quant_type != "nf4" or ctx.get_parameter_source("quant_type") is click.core.ParameterSource.DEFAULT:
        raise UsageError(f"--loftq needs --nf4 (LoftQ's initialisation is defined for NF4)"
                         f"{', not --fp4' if quant_type != 'nf4' else ''}")
    if rank is None:
        raise UsageError("--loftq needs --rank R (the adapter's rank)")
    from ..loftq_quantize import LoftQOptions, check_options  # torch: only once the command line is known good

    patterns = tuple(p for arg in target_modules for p in arg.replace(",", " ").split())
    options = LoftQOptions(rank, iters, patterns or None)
    check_options(options, quant_type)
    return options


def _loftq_table(doc: dict) -> None:
    table("LoftQ: relative error ||W - base (- B·A)|| / ||W|| per module",
          ["module", "shape", "plain NF4", "LoftQ base", "base + B·A"],
          [[r["module"], r["shape"], r["rel_error_before"], r["rel_error_base"], r["rel_error_after"]]
           for r in doc["modules"]])
    t = doc["total"]
    kv_table("loftq", [
        ("adapter", f"{doc['adapter']}/ (rank {doc['rank']}, lora_alpha {doc['lora_alpha']}, {t['modules']} modules, "
                    f"{doc['iters']} iteration{'s' if doc['iters'] != 1 else ''})"),
        ("rel. error, all modules", f"plain NF4 {t['rel_error_before']:.4g} -> with adapter {t['rel_error_after']:.4g}"
                                    f" (LoftQ base alone {t['rel_error_base']:.4g})"),
    ])
