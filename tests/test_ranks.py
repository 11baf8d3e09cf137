"""One rank rule for extract, resize and combine; combine's method registry and its command line agree."""
import click
import pytest
import torch

from conftest import FIXTURES, run_cli
from loratools.combine_methods import METHODS
from loratools.lora_math import peft_delta
from loratools.ranks import most_common_rank

LLAMA = FIXTURES / "tiny-llama"


def test_most_common_rank_takes_the_larger_on_a_tie():
    assert most_common_rank([4, 8, 4, 8], default=2) == 8
    assert most_common_rank([4, 8, 4], default=2) == 4
    assert most_common_rank([], default=2) == 2


@pytest.mark.parametrize("option,value,needle", [
    ("--rank", "0", "--rank must be an integer ≥ 1, got 0"),
    ("--energy", "1.5", "--energy must be in (0, 1], got 1.5"),
    ("--energy", "0", "--energy must be in (0, 1], got 0"),
])
def test_rank_options_one_rule_on_every_command(tmp_path, option, value, needle):
    argvs = {
        "extract": ["extract", LLAMA, FIXTURES / "tiny-llama-tuned"],
        "resize": ["resize", FIXTURES / "llama-lora"],
        "combine": ["combine", FIXTURES / "llama-lora", FIXTURES / "llama-rslora", "--method", "linear"],
    }
    for name, argv in argvs.items():
        out = tmp_path / name
        r = run_cli(*argv, "-o", out, option, value, expect=2)
        assert needle in r.stderr, (name, r.stderr)
        assert not out.exists()


def test_command_line_offers_exactly_the_registered_methods():
    from loratools.cli.combine_cmd import command

    method = next(p for p in command.params if p.name == "method")
    assert isinstance(method.type, click.Choice)
    assert list(method.type.choices) == list(METHODS)


@pytest.mark.parametrize("transposed", [False, True])
def test_peft_delta_is_the_scaled_product_in_the_base_layout(transposed):
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g)
    want = (B @ A) * 0.37
    assert torch.equal(peft_delta(B, A, 0.37, transposed), want.T if transposed else want)
