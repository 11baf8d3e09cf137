import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import force_option, json_option, max_shard_size_option, output_option


@click.command("convert")
@click.argument("checkpoint", type=click.Path(path_type=str))
@output_option
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True, help="Cast floating-point tensors; auto keeps each tensor's dtype.")
@max_shard_size_option
@force_option
@json_option
def command(checkpoint, output, dtype, max_shard_size, force, as_json):
    """Rewrite a checkpoint tensor by tensor: reshard it or change its float dtype.

    \b
    Example:
      loratools convert fixtures/tiny-llama -o /tmp/tiny-bf16 --dtype bfloat16 --max-shard-size 200KB
    """
    start_digests(checkpoint)
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
