"""Reading every checkpoint layout, checked against the safetensors library itself."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loratools.io import Checkpoint
from conftest import CHECKPOINTS, FIXTURES, LLAMA


def reference_tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_directory_layouts_read_bit_exact(name):
    ck = Checkpoint(FIXTURES / name)
    ref = reference_tensors(FIXTURES / name)
    assert set(ck.keys()) == set(ref)
    for key, t in ck.iter_tensors():
        info = ck.info(key)
        assert info.shape == tuple(ref[key].shape) and info.dtype == ref[key].dtype
        assert torch.equal(t.view(torch.uint8), ref[key].contiguous().view(torch.uint8)), key


def test_sharded_fixture_is_sharded_and_index_agrees():
    ck = Checkpoint(LLAMA)
    assert ck.layout == "sharded" and len(ck.shards) == 3
    index = json.loads((LLAMA / "model.safetensors.index.json").read_text())
    assert {k: v for k, v in index["weight_map"].items()} == {k: ck.info(k).file.rsplit("/", 1)[1] for k in ck.keys()}


def test_single_file_layout(tmp_path):
    ref = reference_tensors(LLAMA)
    f = tmp_path / "weights.safetensors"
    save_file(ref, str(f))
    ck = Checkpoint(f)
    assert ck.layout == "file" and ck.config is None
    for key, t in ck.iter_tensors():
        assert torch.equal(t, ref[key])


def test_directory_with_single_model_file(tmp_path):
    ref = reference_tensors(LLAMA)
    d = tmp_path / "ck"
    d.mkdir()
    save_file(ref, str(d / "model.safetensors"))
    shutil.copy(LLAMA / "config.json", d)
    ck = Checkpoint(d)
    assert ck.layout == "directory" and ck.config["model_type"] == "llama"
    assert ck.non_weight_files() == [d / "config.json"]


def test_iteration_opens_each_shard_once(monkeypatch):
    ck = Checkpoint(LLAMA)
    opened = []
    import builtins

    real_open = builtins.open

    def spy(path, *a, **kw):
        if str(path).endswith(".safetensors"):
            opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    names = [n for n, _ in ck.iter_tensors(reversed(ck.keys()))]
    assert len(names) == len(ck.keys())
    assert len(opened) == len(set(opened)) == 3  # in-order reading despite a reversed request


def test_headers_only_for_listing(monkeypatch):
    """Listing keys, shapes and dtypes reads no tensor data."""
    import loratools.io.safetensors_format as sf

    def boom(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(sf, "read_tensor", boom)
    import loratools.io.checkpoint as cp

    monkeypatch.setattr(cp, "read_tensor", boom)
    ck = Checkpoint(LLAMA)
    assert ck.info("model.embed_tokens.weight").shape == (384, 64)
    assert ck.dtype_counts() == {"float16": 123200}
