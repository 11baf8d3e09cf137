import click

from ..io.provenance import start_digests
from .console import bar
from .merge_cmd import DTYPE_CHOICE, report
from .options import device_option, force_option, json_option, max_shard_size_option, output_option


@click.command("unmerge")
@click.argument("merged", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@output_option
@click.option("--weight", "weights", type=float, multiple=True, metavar="W",
              help="The weight each adapter was merged with; once per adapter, in order (default 1.0 each).")
@click.option("--dtype", type=DTYPE_CHOICE, default="auto", show_default=True,
              help="Output float dtype; auto keeps the merged checkpoint's.")
@device_option
@max_shard_size_option
@force_option
@json_option
def command(merged, adapters, output, weights, dtype, device, max_shard_size, force, as_json):
    """Take adapters back out of a merged checkpoint: subtract the deltas `merge` added.

    Give the adapters (and --weight values) the merge used, in any format `loratools convert` reads (the
    merged checkpoint names the modules of kohya and GGUF files). A DoRA merge is undone with the norms
    `loratools merge` recorded in MERGED/loratools-dora/; without that record it is refused.
    Tensors an adapter replaced whole (modules_to_save) cannot be restored and are refused.

    \b
    Example:
      loratools merge fixtures/tiny-llama fixtures/llama-dora -o /tmp/merged
      loratools unmerge /tmp/merged fixtures/llama-dora -o /tmp/base-again
    """
    start_digests(merged, *adapters)
    from ..io import Checkpoint
    from ..merge import unmerge_checkpoint

    total = len(Checkpoint(merged).tensors)
    with bar("unmerge", total) as advance:
        summary = unmerge_checkpoint(merged, adapters, output, weights=list(weights), dtype=dtype, device=device,
                                     max_shard_size=max_shard_size, force=force, on_tensor=lambda _: advance())
    report(summary, as_json, "unmerged")
