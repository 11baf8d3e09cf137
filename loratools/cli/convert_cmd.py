import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import force_option, json_option, max_shard_size_option, output_option
from .rank_options import energy_option, max_rank_option, sv_ratio_option


@click.command("convert")
@click.argument("checkpoint", metavar="CHECKPOINT|ADAPTER", type=click.Path(path_type=str))
@output_option
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True, help="Cast floating-point tensors; auto keeps each tensor's dtype (checkpoints).")
@max_shard_size_option
@click.option("--to", "to", metavar="FORMAT", default=None,
              help="Adapters: the format to write (peft, mlx, ...); the input's format is detected.")
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="Adapters: the base checkpoint, for what the adapter alone does not say (kohya module names, "
                   "GGUF architecture, MLX MoE expert names; docs/formats.md).")
@click.option("--as-lora", "as_lora", is_flag=True, default=False,
              help="Adapters: write DoRA modules as plain LoRA of rank --rank (their merged delta on --base, "
                   "truncated by SVD; lossy, the error reported per module).")
@click.option("--rank", type=int, default=None, help="Adapters, with --as-lora: the rank of the re-factored modules; "
              "with --to lora: the rank of every module (docs/convert_lora.md).")
@click.option("--initial", type=click.Path(path_type=str), default=None,
              help="With --to lora: the initial adapter a PiSSA/OLoRA/CorDA adapter was trained from; writes "
                   "B·A − B₀·A₀ as a LoRA on the original base (rank 2r, as PEFT does, or truncated).")
@energy_option("With --to lora: per module, the smallest rank keeping this fraction of ‖ΔW‖².")
@sv_ratio_option
@max_rank_option
@force_option
@json_option
def command(checkpoint, output, dtype, max_shard_size, to, base, as_lora, rank, initial, energy, sv_ratio, max_rank,
            force, as_json):
    """Rewrite a checkpoint tensor by tensor (reshard it or change its float dtype), or an adapter in another
    file format (--to).

    \b
    Example:
      loratools convert fixtures/tiny-llama -o /tmp/tiny-bf16 --dtype bfloat16 --max-shard-size 200KB
      loratools convert fixtures/llama-lora -o /tmp/llama-lora-mlx --to mlx
      loratools convert fixtures/llama-dora -o /tmp/dora-gguf --to gguf --base fixtures/tiny-llama --as-lora --rank 8
      loratools convert pissa-trained --to lora --initial pissa-init -o /tmp/pissa-as-lora [--rank 8]
    """
    start_digests(checkpoint, *([initial] if initial else []))
    if to == "lora" or initial is not None or energy is not None or sv_ratio is not None or max_rank is not None:
        from .convert_to_lora import convert_to_lora

        return convert_to_lora(checkpoint, output, to=to, initial=initial, base=base, as_lora=as_lora, rank=rank,
                               energy=energy, sv_ratio=sv_ratio, max_rank=max_rank, force=force, as_json=as_json)
    from ..adapter_convert import convert_adapter, is_adapter
    from ..errors import UsageError

    if is_adapter(checkpoint):
        if to is None:
            raise UsageError("converting an adapter needs --to FORMAT (peft, mlx, ...)")
        if dtype != "auto" or click.get_current_context().get_parameter_source("max_shard_size").name != "DEFAULT":
            raise UsageError("--dtype and --max-shard-size apply to checkpoints, not to adapters")
        summary = convert_adapter(checkpoint, output, to=to, base=base, force=force, as_lora=as_lora, rank=rank)
        if as_json:
            print_json(summary)
        else:
            for note in summary["notes"]:
                info(f"note: {note}")
            for row in summary["lossy"] or ():
                info(f"as-lora: {row['module']}: rank {row['rank']}, relative error {row['rel_error']:.4g} "
                     f"(optimal {row['optimal_error']:.4g}, {row['svd']} SVD)")
            info(f"wrote {summary['output']}: {summary['from']} -> {summary['to']}, {summary['modules']} modules, "
                 f"{len(summary['files'])} files, {summary['bytes']:,} bytes")
        return
    if to is not None or base is not None or as_lora or rank is not None:
        raise UsageError(f"{checkpoint} is not an adapter in a known format; --to, --base, --as-lora and --rank "
                         f"apply to adapters")
    from ..convert import convert_checkpoint
    from ..io import Checkpoint

    total = len(Checkpoint(checkpoint).tensors)
    with bar("convert", total) as advance:
        summary = convert_checkpoint(checkpoint, output, dtype=dtype, max_shard_size=max_shard_size, force=force,
                                     on_tensor=lambda _: advance())
    if as_json:
        print_json(summary)
    else:
        info(f"wrote {summary['output']}: {summary['tensors']} tensors, {len(summary['files'])} files, "
             f"{summary['bytes']:,} bytes")
