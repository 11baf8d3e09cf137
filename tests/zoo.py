"""The model zoo: tiny random models of each transformers family, with PEFT adapters made the default way.

Each family is one row of FAMILIES: the transformers `model_type`, the config fields that make it tiny, the
class a user loads it with, the dtype it is saved in and which adapters PEFT makes on it. `Zoo.get(name)`
builds the row once (seeded, offline, `save_pretrained`) into a cache directory and returns a `Case` that
holds the saved paths and computes PEFT's references lazily (each at most once per session):

  - `adapter`: LoraConfig(target_modules="all-linear", init_lora_weights=False) — every factor random, so B is
    non-zero as after training; `adapter2`: a second one (other seed, rsLoRA, rank_pattern and
    alpha_pattern on one module kind each), for inspect and combine;
  - `dora`: the same with use_dora=True, where the family's row says PEFT allows it.

Other families (MoE, encoders, seq2seq, vision-language) are rows too: a new `model_class` or extra
config fields need nothing else here; a composite config's `text_config` takes the tiny shape; a family that
needs its own PEFT arguments sets `lora_kwargs`, a seq2seq one `seq2seq=True`, one with image/video token ids
`tokens_below`, and a command the zoo cannot run on it goes in `not_run` with the reason (no case is generated
for it and docs/architectures.md shows the reason; a family without DoRA must say why there).

`python tests/zoo.py` regenerates docs/architectures.md from a run of tests/test_zoo.py (see `main`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Common tiny shape; a row overrides what its family names differently or needs. Hidden 64, not 32:
# bitsandbytes' CPU 4-bit matmul fails on in_features below its blocksize (64).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


BUILD_VERSION = 2  # bump when Case._build changes what it writes (cached builds are keyed by it)


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    config: dict                  # fields on top of TINY (None removes a TINY field the family lacks)
    model_class: str = "AutoModelForCausalLM"
    task_type: str | None = "CAUSAL_LM"  # PEFT's task type a user gives for this class
    dtype: torch.dtype = torch.float16
    dora: bool = True             # PEFT builds DoRA on every module all-linear picks
    quantizes: bool = True        # transformers' 4-bit load replaces some weight (exact nn.Linear / Conv1D)
    needs: str = ""               # what the family needed of loratools (docs/architectures.md)
    lora_kwargs: dict = dataclasses.field(default_factory=dict)
    seq2seq: bool = False         # forward passes also get decoder_input_ids
    not_run: dict = dataclasses.field(default_factory=dict)  # command -> why the zoo does not run it here
    tokens_below: int | None = None  # input ids stay below this (ids above are image/video tokens)
    # command -> (words of its one-line error, why): the command must refuse this family's case so
    refuses: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        assert self.dora or "dora" in self.not_run, f"{self.model_type}: say in not_run why there is no DoRA"

    def not_run_reason(self, command: str) -> str | None:
        """Why the zoo has no `command` case for this family (None: it has one). Such cases are not generated
        at all (no skip), and docs/architectures.md shows the reason."""
        if command in self.not_run:
            return self.not_run[command]
        if command == "qlora" and not self.quantizes:
            return "no 4-bit base: transformers quantizes no weight of this family"
        return None

    def make_config(self):
        from transformers import AutoConfig

        def clean(d):
            return {k: v for k, v in d.items() if v is not None}

        if "text_config" in self.config:  # composite (vision-language): the tiny shape is the text model's
            fields = {**clean(self.config), "text_config": clean({**TINY, **self.config["text_config"]})}
        else:
            fields = clean({**TINY, **self.config})
        return AutoConfig.for_model(self.model_type, **fields)


_NO_GQA = dict(num_key_value_heads=None)
_NO_MOE_DORA = ("PEFT 0.21 refuses DoRA on target_parameters (the experts, the router): 'lora.ParamWrapper does "
                "not work with use_dora=True'")
_ENC = dict(num_key_value_heads=None, bos_token_id=None, eos_token_id=None)  # pad 0, vocab 96, 2 layers of 64
_SEQ = dict(hidden_size=None, intermediate_size=None, num_hidden_layers=None, num_attention_heads=None,
            num_key_value_heads=None, max_position_embeddings=None, bos_token_id=None)
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", {}, needs="nothing (the reference layout)"),
    "mistral": Family("mistral", dict(sliding_window=16), dtype=torch.bfloat16, needs="nothing"),
    "qwen2": Family("qwen2", {}, dtype=torch.bfloat16,
                    needs="nothing (q/k/v carry biases, untouched by LoRA)"),
    "qwen3": Family("qwen3", dict(head_dim=16), needs="nothing (q_norm/k_norm are not linear)"),
    "gemma2": Family("gemma2", dict(head_dim=16, sliding_window=16), dtype=torch.bfloat16,
                     needs="nothing (tied embeddings: lm_head is not stored)"),
    "gemma3_text": Family("gemma3_text", dict(head_dim=16, sliding_window=16), dtype=torch.bfloat16,
                          needs="nothing (tied embeddings: lm_head is not stored)"),
    "phi3": Family("phi3", dict(pad_token_id=0), needs="nothing (fused qkv_proj and gate_up_proj are plain "
                                                       "linears to LoRA)"),
    "gpt_neox": Family("gpt_neox", _NO_GQA, needs="nothing (fused query_key_value)"),
    "gpt2": Family("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, hidden_size=None,
                                intermediate_size=None, num_hidden_layers=None, num_attention_heads=None,
                                num_key_value_heads=None, max_position_embeddings=None),
                   dtype=torch.bfloat16, dora=True,
                   needs="nothing (Conv1D weights stored [in, out]: fan_in_fan_out)"),
    "opt": Family("opt", dict(ffn_dim=128, word_embed_proj_dim=64, intermediate_size=None,
                              num_key_value_heads=None), needs="nothing"),
    "falcon": Family("falcon", dict(num_kv_heads=None, new_decoder_architecture=False, multi_query=True,
                                    intermediate_size=None, num_key_value_heads=None),
                     dtype=torch.bfloat16, quantizes=False,
                     needs="nothing (multi-query fused query_key_value); transformers' 4-bit load leaves "
                           "FalconLinear (an nn.Linear subclass) dense, so `quantize` says there is nothing to "
                           "quantize"),
    "falcon_new": Family("falcon", dict(num_kv_heads=2, new_decoder_architecture=True, intermediate_size=None,
                                        num_key_value_heads=None), quantizes=False,
                         needs="nothing (Falcon-40B/180B layout: grouped fused query_key_value); 4-bit as falcon"),
    # MoE: with transformers 5 the experts are 3-D parameters; all-linear makes PEFT add target_parameters
    "mixtral": Family("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), dtype=torch.bfloat16,
                      dora=False, not_run=dict(dora=_NO_MOE_DORA),
                      needs="target_parameters LoRA on the fused experts and the router; the checkpoint stores "
                            "experts per expert (block_sparse_moe.experts.N.w1/w2/w3) and the router as "
                            "block_sparse_moe.gate (key_layout); quantize leaves experts and router dense"),
    "qwen3_moe": Family("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                          decoder_sparse_step=1, mlp_only_layers=[], head_dim=16),
                        dtype=torch.bfloat16, dora=False, not_run=dict(dora=_NO_MOE_DORA),
                        needs="target_parameters LoRA on the fused experts and the router (stored per expert)"),
    "olmoe": Family("olmoe", dict(num_experts=4, num_experts_per_tok=2), dtype=torch.bfloat16, dora=False,
                    not_run=dict(dora=_NO_MOE_DORA),
                    needs="target_parameters LoRA on the fused experts and the router (stored per expert)"),
    "gpt_oss": Family("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"]),
                      dtype=torch.bfloat16, dora=False, not_run=dict(dora=_NO_MOE_DORA),
                      lora_kwargs=dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                          "mlp.router.weight"]),
                      needs="experts stored fused and transposed [E, in, out] (validate's fit check marks them "
                            "so, as merge does); all-linear reaches only the attention here, so the row names the "
                            "experts and router as target_parameters, as a user adapting them does"),
    # encoders: bare (natural output: last hidden states) and a classifier whose head PEFT saves whole
    "bert": Family("bert", _ENC, model_class="AutoModel", task_type="FEATURE_EXTRACTION",
                   needs="the task type from config.json (FEATURE_EXTRACTION) in what extract/combine write; "
                         "validate builds BertModel, no random head"),
    "bert_cls": Family("bert", dict(_ENC, num_labels=3), model_class="AutoModelForSequenceClassification",
                       task_type="SEQ_CLS", refuses=dict(
                           unmerge=("unmerge cannot restore them",
                                    "the merged checkpoint holds the adapter's classifier, saved whole "
                                    "(modules_to_save): the base's is not in it"),
                           combine=("whole-module replacements cannot be combined",
                                    "the two adapters save different classifiers whole (modules_to_save): there is "
                                    "no sum of whole-module replacements (nor a PEFT reference: with both active "
                                    "PEFT says 'Only one adapter can be set at a time for ModulesToSaveWrapper')")),
                       needs="modules_to_save (the classifier, PEFT's SEQ_CLS default) merged whole; SEQ_CLS "
                             "task type"),
    "roberta": Family("roberta", dict(_ENC, pad_token_id=1), model_class="AutoModel",
                      task_type="FEATURE_EXTRACTION", needs="as bert"),
    # seq2seq: forward passes get decoder_input_ids too
    "t5": Family("t5", dict(_SEQ, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                            decoder_start_token_id=0), model_class="AutoModelForSeq2SeqLM",
                 task_type="SEQ_2_SEQ_LM", seq2seq=True, dtype=torch.bfloat16,
                 needs="SEQ_2_SEQ_LM task type; tied shared/encoder/decoder embeddings stored once"),
    "bart": Family("bart", dict(_SEQ, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                max_position_embeddings=64, decoder_start_token_id=2),
                   model_class="AutoModelForSeq2SeqLM", task_type="SEQ_2_SEQ_LM", seq2seq=True,
                   needs="SEQ_2_SEQ_LM task type"),
    # vision-language, image-free text input; saved in transformers' original key layout (save_pretrained's
    # default, as on the Hub)
    "llava": Family("llava", dict(text_config=dict(model_type="llama"), image_token_index=95,
                                  vision_config=dict(model_type="clip_vision_model", hidden_size=64,
                                                     intermediate_size=128, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=8,
                                                     projection_dim=64)),
                    model_class="AutoModelForImageTextToText", dtype=torch.bfloat16, tokens_below=90,
                    needs="stored keys language_model.model.* / vision_tower.* / multi_modal_projector.*, "
                          "PEFT's modules model.language_model.* (key_layout)"),
    "qwen2_vl": Family("qwen2_vl", dict(text_config=dict(rope_scaling=dict(type="mrope", mrope_section=[2, 2, 4])),
                                        image_token_id=90, video_token_id=91, vision_start_token_id=92,
                                        vision_end_token_id=93,
                                        vision_config=dict(depth=1, embed_dim=64, hidden_size=64, num_heads=2,
                                                           patch_size=14, spatial_merge_size=2,
                                                           temporal_patch_size=2)),
                       model_class="AutoModelForImageTextToText", dtype=torch.bfloat16, tokens_below=88,
                       needs="stored as on the Hub (model.layers.*, visual.*), PEFT's modules "
                             "model.language_model.* / model.visual.* (key_layout); all-linear LoRAs the vision "
                             "tower too (qkv, proj, fc1/fc2, the merger's Sequential)"),
}


def tokens(vocab: int, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (2, n), generator=g)


def auto_class(name: str):
    import transformers

    return getattr(transformers, name)


@contextlib.contextmanager
def quiet():
    """transformers and PEFT warn about tied weights and missing generation configs on tiny models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Case:
    """One family, built: base checkpoint and adapters on disk, PEFT's references on demand."""

    def __init__(self, name: str, root: Path):
        self.name, self.family, self.root = name, FAMILIES[name], Path(root)
        self.base = self.root / "base"
        self.adapter, self.adapter2 = self.root / "lora", self.root / "lora2"
        self.dora = self.root / "dora" if self.family.dora else None
        self._memo: dict = {}
        if not (self.root / "done").exists():
            self._build()

    # -- building ------------------------------------------------------------------------------------
    def _build(self):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import ParamWrapper

        fam = self.family
        self.root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = auto_class(fam.model_class).from_config(fam.make_config()).eval()
        with quiet():
            model.to(fam.dtype).save_pretrained(self.base)
        model = self.load_base(torch.float32)  # what the adapters are made on: the stored weights
        specs = [(self.adapter, 1, dict(r=4, lora_alpha=8)),
                 (self.adapter2, 2, dict(r=2, lora_alpha=3, use_rslora=True, patterns=True))]
        if self.dora:
            specs.append((self.dora, 3, dict(r=4, lora_alpha=8, use_dora=True)))
        suffixes: list[str] = []
        for path, seed, kw in specs:
            if kw.pop("patterns", False):  # per-module r and alpha, resolved by PEFT on the name's end
                kw.update(rank_pattern={suffixes[-1]: 3}, alpha_pattern={suffixes[0]: 5})
            torch.manual_seed(seed)
            cfg = LoraConfig(target_modules="all-linear", init_lora_weights=False, task_type=fam.task_type,
                             **kw, **fam.lora_kwargs)
            with quiet():
                pm = get_peft_model(copy.deepcopy(model), cfg)
            # module suffixes for the patterns: LoRA'd modules' own names (not a target_parameters wrapper's
            # module or its base_layer, nor a Sequential's index)
            suffixes = suffixes or sorted({n.rsplit(".", 1)[-1] for n, m in pm.named_modules()
                                           if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)
                                           and n.rsplit(".", 1)[-1].isidentifier()
                                           and not n.endswith("base_layer")})
            with torch.no_grad():  # init_lora_weights=False: kaiming A and B; keep ΔW near |W| (std 0.02)
                for n, p in pm.named_parameters():
                    if "lora_A" in n or "lora_B" in n:
                        p.normal_(0, 0.08)
                    elif ".modules_to_save." in n:  # a trained head, not PEFT's copy of the base's
                        p.add_(torch.randn_like(p) * 0.05)
            with quiet():
                pm.save_pretrained(path)
        (self.root / "done").write_text("ok")

    # -- models and references -----------------------------------------------------------------------
    def load_base(self, dtype=None, path=None):
        with quiet():
            m = auto_class(self.family.model_class).from_pretrained(path or self.base,
                                                                    dtype=dtype or self.family.dtype)
        return m.eval()

    def peft(self, adapters, weights=None, dtype=torch.float32):
        """PeftModel on the base (float32 by default) with `adapters` active, scaled by `weights`."""
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        model = self.load_base(dtype)
        names = [f"a{i}" for i in range(len(adapters))]
        with quiet():
            pm = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
            for a, n in zip(adapters[1:], names[1:]):
                pm.load_adapter(a, adapter_name=n)
        pm.base_model.set_adapter(names)
        for mod in pm.modules():
            if isinstance(mod, LoraLayer) and weights:
                for n, w in zip(names, weights):
                    mod.set_scale(n, w)
        return pm.eval(), names

    def peft_merged(self, adapter) -> dict[str, torch.Tensor]:
        """PEFT's merge_and_unload computed in float32, rounded once to the stored dtype, saved by transformers
        (so tied aliases are dropped as transformers drops them) and read back."""
        from loratools.io import Checkpoint

        key = ("merged", str(adapter))
        if key not in self._memo:
            pm, names = self.peft([adapter])
            with quiet(), tempfile.TemporaryDirectory() as d:
                pm.merge_and_unload(adapter_names=names).to(self.family.dtype).save_pretrained(d)
                self._memo[key] = {k: v.clone() for k, v in Checkpoint(d).iter_tensors()}
        return self._memo[key]

    def logits(self, model) -> torch.Tensor:
        """The model's natural output on the zoo's batch: logits, or a bare model's last hidden states."""
        ids = tokens(self.family.tokens_below or self.vocab)
        extra = dict(decoder_input_ids=ids) if self.family.seq2seq else {}
        with torch.no_grad():
            out = model(input_ids=ids, **extra)
        return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()

    def peft_logits(self, adapters, weights=None) -> torch.Tensor:
        key = ("logits", tuple(map(str, adapters)), tuple(weights or ()))
        if key not in self._memo:
            self._memo[key] = self.logits(self.peft(adapters, weights)[0])
        return self._memo[key]

    @property
    def vocab(self) -> int:
        cfg = json.loads((self.base / "config.json").read_text())
        return cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]

    def model_class_name(self) -> str:
        return json.loads((self.base / "config.json").read_text())["architectures"][0]


class Zoo:
    """Cases by family name, built at most once per cache directory."""

    def __init__(self, root: Path):
        self.root, self.cases = Path(root), {}

    def get(self, name: str) -> Case:
        if name not in self.cases:
            # the row's digest in the directory name: a changed row never reuses a stale cached build
            digest = hashlib.sha256(repr((TINY, FAMILIES[name], BUILD_VERSION)).encode()).hexdigest()[:10]
            self.cases[name] = Case(name, self.root / f"{name}-{digest}")
        return self.cases[name]


# -- docs/architectures.md ----------------------------------------------------------------------------------

COMMANDS = ["inspect", "merge", "unmerge", "validate", "quantize", "qlora", "extract", "combine", "dora", "refusal"]
DOC = ROOT / "docs" / "architectures.md"


def results_from_junit(path: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """{family: {command: (outcome, note)}} from a junit XML of tests/test_zoo.py (test ids
    `test_<command>[<family>]`, notes recorded with record_property('note', ...))."""
    import xml.etree.ElementTree as ET

    out: dict[str, dict[str, tuple[str, str]]] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "")
        if "[" not in name or not name.startswith("test_"):
            continue
        command, family = name[5:name.index("[")], name[name.index("[") + 1:-1]
        outcome, failed = "pass", ""
        for tag in ("failure", "error"):
            if tc.find(tag) is not None:
                outcome, failed = "FAIL", (tc.find(tag).get("message") or "").splitlines()[0][:200]
        skipped = tc.find("skipped")
        if skipped is not None:
            outcome = "xfail" if skipped.get("type") == "pytest.xfail" else "skip"
        props = {p.get("name"): p.get("value", "") for p in tc.iter("property")}
        note = failed or props.get("note", "")
        if outcome in ("skip", "xfail") and skipped is not None:
            note = (skipped.get("message") or "").removeprefix("Skipped: ")
        if outcome == "pass" and "cell" in props:  # a passing test of an expected refusal, say so
            outcome = props["cell"]
        out.setdefault(family, {})[command] = (outcome, note)
    return out


def render(results, classes: dict[str, str]) -> str:
    mark = {"pass": "✓", "FAIL": "✗ fails", "skip": "—", "xfail": "✗ known bug"}
    per_family: list[str] = []
    lines = [
        "# Supported architectures",
        "",
        "What each command gives on each model family, measured on tiny random models built from the",
        "families' transformers configs (tests/zoo.py, tests/test_zoo.py) with PEFT adapters made the default",
        "way: `LoraConfig(target_modules=\"all-linear\")`, every factor non-zero, and DoRA where PEFT allows it.",
        "This page is generated; regenerate it (about 2 minutes on 2 cores) with",
        "",
        "```bash",
        "python tests/zoo.py            # runs tests/test_zoo.py and rewrites docs/architectures.md",
        "```",
        "",
        "What a ✓ means, per column (the references are the libraries' own):",
        "",
        "- **inspect**: r, alpha and scale of every module equal those of PEFT's loaded LoRA layers.",
        "- **merge**: every tensor bit-identical to PEFT's `merge_and_unload()` computed in float32 and rounded",
        "  once to the stored dtype, same tensor names as transformers saves; the merged checkpoint loaded in",
        "  transformers gives the unmerged PEFT model's logits within the rounding of the weights.",
        "- **unmerge**: merge then unmerge gives the base back: untouched tensors bit for bit, changed ones within",
        "  ulp(merged) + ulp(W′) (docs/merge.md).",
        "- **validate**: passes the correct merge; fails (exit 1) a merge with one module's ΔW scaled 1.5x and",
        "  names that tensor.",
        "- **quantize**: `--nf4` output byte-identical to transformers' own 4-bit save and loads in transformers",
        "  with that 4-bit model's logits.",
        "- **qlora**: `merge` into the `--nf4` base with `--dtype` the family's: bit-identical to PEFT merging",
        "  into transformers' dequantization of that 4-bit model, in float32 rounded once.",
        "- **extract**: from PEFT's merged model, at the adapter's rank: PEFT loads the output with no missing or",
        "  unexpected keys and it gives the adapter's logits.",
        "- **combine**: `--method cat` of two adapters with weights: PEFT loads the output and it gives the",
        "  logits of PEFT with both adapters active at those weights.",
        "- **dora**: a DoRA adapter: inspect, merge bit-identical to PEFT's float32 merge, unmerge within the bound.",
        "- **refusal**: another family's adapter on this base: one line naming a module, exit 1, nothing written.",
        "",
        "*refused*: the command refuses that family's case in one line (exit 1, nothing written), for the reason",
        "given under the table; —: not run, for the reason given there.",
        "",
        "| family | model class | saved as | " + " | ".join(COMMANDS) + " | what the family needed |",
        "| --- | --- | --- | " + " | ".join("---" for _ in COMMANDS) + " | --- |",
    ]
    notes, measured = [], []
    for fam, row in results.items():
        cells = []
        f = FAMILIES.get(fam)
        for c in COMMANDS:
            outcome, note = row.get(c) or ("skip", (f.not_run_reason(c) if f else None) or "")
            cells.append(mark.get(outcome, outcome))
            if note:
                (measured if outcome == "pass" else notes).append(f"{c}: {note}")
        dtype = str(f.dtype).removeprefix("torch.") if f else ""
        lines.append(f"| {fam} | `{classes.get(fam, '')}` | {dtype} | " + " | ".join(cells)
                     + f" | {f.needs if f else ''} |")
        if measured or notes:
            per_family.append(f"- **{fam}**: " + "; ".join(notes + measured) + ".")
        notes, measured = [], []
    if per_family:
        lines += ["", "Per family, from the same run (what failed or was not run first, then the measurements):",
                  ""] + per_family
    lines += [
        "",
        "## Adding a family",
        "",
        "A family is one row of `FAMILIES` in tests/zoo.py: its transformers `model_type`, the config fields that",
        "make it tiny, the class it is loaded with (`model_class`), the dtype it is saved in, whether PEFT builds",
        "DoRA on it, and what it needed. Every test of tests/test_zoo.py then runs on it; a command the zoo",
        "cannot run on a family goes in the row's `not_run` with the reason, which shows here as —. Then",
        "regenerate this page. A MoE family's adapters carry PEFT `target_parameters` (the fused experts, the",
        "router): inspect compares them with PEFT's ParamWrapper layers (r, alpha, scale, experts); encoders and",
        "seq2seq models are compared on their natural outputs (logits, or a bare encoder's last hidden states),",
        "vision-language models on image-free text input. More MoE cases (rank/alpha patterns, per-expert",
        "reports) are in tests/test_moe_adapter.py and tests/test_moe_merge.py.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run tests/test_zoo.py with a junit report and write docs/architectures.md from it (failures too, as
    ✗ with their message); returns pytest's exit code."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        junit = Path(d) / "zoo.xml"
        # leaves out test_docs_table_lists_every_family: it checks the page this writes
        cmd = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_zoo.py"), f"--junitxml={junit}",
               "-o", "junit_family=xunit1", "-k", "not docs_table", *(argv or [])]
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        results = results_from_junit(junit)
    DOC.write_text(render(results, {fam: _class_name(FAMILIES[fam]) for fam in results if fam in FAMILIES}))
    print(f"wrote {DOC.relative_to(ROOT)}" + (f" (pytest exit code {rc}: see the table)" if rc else ""))
    return rc


def _class_name(f: Family) -> str:
    """The concrete class `model_class` builds for this family (what config.json's architectures names)."""
    with torch.device("meta"):
        return type(auto_class(f.model_class).from_config(f.make_config())).__name__


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main(sys.argv[1:]))
