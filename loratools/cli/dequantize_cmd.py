import click

from ..io.provenance import start_digests
from .console import bar, info, print_json
from .options import device_option, force_option, json_option, max_shard_size_option, output_option


@click.command("dequantize")
@click.argument("quantized", metavar="Q", type=click.Path(path_type=str))
@output_option
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Dtype of the dequantized weights [default: the dtype recorded in each quant_state].")
@device_option
@max_shard_size_option
@force_option
@json_option
def command(quantized, output, dtype, device, max_shard_size, force, as_json):
    """Write a bitsandbytes 4-bit checkpoint back as a dense one, tensor by tensor.

    Each packed weight becomes exactly what bitsandbytes' dequantize_4bit returns (GPT-2 Conv1D
    weights back in their [in, out] layout); other tensors are copied; config.json loses its
    quantization_config.

    \b
    Example:
      loratools quantize fixtures/tiny-llama -o /tmp/tiny-nf4
      loratools dequantize /tmp/tiny-nf4 -o /tmp/tiny-dense --dtype float16
    """
    start_digests(quantized)
    from ..io import Checkpoint
    from ..quantize import dequantize_checkpoint

    ck = Checkpoint(quantized)
    with bar("dequantize", len(ck.tensors)) as advance:
        summary = dequantize_checkpoint(quantized, output, dtype=dtype, device=device, max_shard_size=max_shard_size,
                                        force=force, on_tensor=lambda _: advance())
    if as_json:
        print_json(summary)
    else:
        info(f"wrote {summary['output']}: {summary['tensors']} tensors ({summary['dequantized_tensors']} "
             f"dequantized, {summary['dtype']}), {summary['bytes']:,} bytes")
