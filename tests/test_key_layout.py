"""key_layout.py against transformers itself: for each stored tensor of a checkpoint saved by `save_pretrained`
(the original layout), the parameter and slice key_layout names must hold exactly that tensor in the model
`from_pretrained` builds; plus the refusals and explanations. Tiny models from configs, no downloads."""
import pytest
import torch

from conftest import LLAMA
from loratools.errors import FormatError
from loratools.io import Checkpoint
from loratools.key_layout import explain_missing, key_layout

TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    "llava": None,
}


def _build(family: str):
    import transformers

    if family == "llava":
        vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16)
        cfg = transformers.LlavaConfig(text_config=dict(model_type="llama", **TEXT), vision_config=vision,
                                       image_token_index=63)
        return transformers.LlavaForConditionalGeneration, cfg
    cfg = transformers.AutoConfig.for_model(family, **TEXT, **FAMILIES[family])
    return transformers.AutoModelForCausalLM, cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            cls, cfg = _build(family)
            torch.manual_seed(0)
            model = (cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)).float()
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            loaded = cls.from_pretrained(path, dtype=torch.float32)
            made[family] = (Checkpoint(path), loaded.state_dict())
        return made[family]
    return get


def _layout(ck: Checkpoint):
    return key_layout(ck.config, {k: tuple(i.shape) for k, i in ck.tensors.items()})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stored_tensor_is_where_transformers_loads_it(saved, family):
    ck, model_sd = saved(family)
    layout = _layout(ck)
    covered = {}
    for key, part in layout.parts.items():
        assert part.param in model_sd, (key, part)
        assert tuple(model_sd[part.param].shape) == layout.shapes[part.param]
        assert torch.equal(model_sd[part.param][part.index], ck.read(key)), (key, part.describe())
        covered[part.param] = covered.get(part.param, 0) + ck.info(key).numel
    # the stored tensors fill each parameter exactly (tied weights aside: they are one parameter twice)
    assert {p: n for p, n in covered.items()} == {p: model_sd[p].numel() for p in covered}
    fused = {p for p in layout.params if len(layout.params[p]) > 1}
    if family in ("mixtral", "qwen3_moe", "olmoe"):  # per-expert on disk, fused in the model
        assert {p.rsplit(".", 1)[1] for p in fused} == {"gate_up_proj", "down_proj"}
        gu = next(p for p in layout.params if p.endswith("layers.0.mlp.experts.gate_up_proj"))
        first = [p for p in layout.params[gu] if p.expert == 0]
        assert [p.rows for p in first] == [(0, layout.shapes[gu][1] // 2), (layout.shapes[gu][1] // 2,
                                                                           layout.shapes[gu][1])]
    else:
        assert not fused
    if family == "mixtral":
        assert layout.renames() == [("block_sparse_moe", "mlp")]
    if family == "gpt_oss":  # fused and [E, in, out] on disk already
        assert any(p.endswith("experts.gate_up_proj") for p in layout.transposed)
        assert not layout.renamed
    if family == "llava":
        assert ("language_model.model", "model.language_model") in layout.renames()


def test_identity_without_conversion_builds_no_model(monkeypatch):
    """A Llama checkpoint needs no conversion: its names are the model's, and no model class is built."""
    import loratools.hf_layout as hf

    monkeypatch.setattr(hf, "meta_model", lambda *a, **k: pytest.fail("model class built"))
    ck = Checkpoint(LLAMA)
    layout = key_layout(dict(ck.config, _probe=1), {k: tuple(i.shape) for k, i in ck.tensors.items()})
    assert layout.source == "transformers" and all(p.stored == p.param and p.whole for p in layout.parts.values())


def test_missing_expert_is_a_format_error(saved):
    ck, _ = saved("mixtral")
    gone = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    shapes = {k: tuple(i.shape) for k, i in ck.tensors.items() if k != gone}
    with pytest.raises(FormatError, match=r"gate_up_proj of 4 experts.*\[3, 4\]"):
        key_layout(ck.config, shapes)


def test_explanations(saved):
    ck, _ = saved("llava")
    layout = _layout(ck)
    # an adapter named after the stored (original) layout: a layout difference, with what transformers loads
    why = explain_missing("language_model.model.layers.0.self_attn.q_proj.weight", layout)
    assert why.startswith("a layout difference") and "loads as model.language_model.layers.0.self_attn.q_proj" in why
    # another prefix on the model's names
    why = explain_missing("base_model.layers.0.self_attn.q_proj.weight", layout)
    assert why.startswith("a prefix difference") and "'model.language_model' where the adapter has 'base_model'" \
        in why
    assert "another model" in explain_missing("model.language_model.layers.0.self_attn.qkv.weight", layout)
