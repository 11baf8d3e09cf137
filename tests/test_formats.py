"""The adapter-format registry (loratools/formats) and the PEFT format: detection, reading into PeftFiles,
and parse() resolving modules exactly as load_adapter does."""
import pytest
import torch

from conftest import FIXTURES, LLAMA, LLAMA_ADAPTERS

from loratools import formats
from loratools.adapter import load_adapter
from loratools.errors import InputError, UsageError


def test_registry_knows_peft_and_mlx():
    assert {"peft", "mlx"} <= set(formats.names())
    assert formats.get("peft").name == "peft"
    with pytest.raises(UsageError):
        formats.get("nope")


def test_detect_adapter_vs_checkpoint(tmp_path):
    assert formats.detect(FIXTURES / "llama-lora").name == "peft"
    assert formats.detect(LLAMA) is None
    assert formats.detect(tmp_path) is None
    with pytest.raises(InputError, match="not an adapter in a known format"):
        formats.read(LLAMA)


@pytest.mark.parametrize("name", LLAMA_ADAPTERS)
def test_peft_read_and_parse_match_load_adapter(name):
    files = formats.read(FIXTURES / name)
    assert files.source == "peft"
    ad, ref = formats.parse(files), load_adapter(FIXTURES / name)
    assert ad.config == ref.config and sorted(ad.saved) == sorted(ref.saved)
    assert list(ad.modules) == list(ref.modules)
    for n, m in ref.modules.items():
        got = ad.modules[n]
        assert (got.r, got.alpha, got.scale, got.kind) == (m.r, m.alpha, m.scale, m.kind)
        assert torch.equal(got.delta(), m.delta())


def test_register_refuses_incomplete_objects():
    class Half:
        name = "half"

    with pytest.raises(TypeError):
        formats.register(Half())
