"""Which LoRA initialisations change the base: the one place loratools keeps that fact (PEFT 0.21.2's
`LoraConfig.init_lora_weights`, `peft/tuners/lora/layer.py`'s `update_layer`).

Note: the base such an adapter belongs to.
    PiSSA ("pissa", "pissa_niter_N"), OLoRA ("olora"), CorDA ("corda") and LoRA-GA ("lora_ga") take A₀, B₀
    from the base weight W and replace W by the residual W − s·B₀·A₀; LoftQ ("loftq") replaces it by the
    4-bit quantization of that residual. Training runs on that base, so the trained (B, A) gives the trained
    model only there: W_res + s·B·A. PEFT's documented workflow saves the residual base beside the adapter;
    PEFT's own loader, given an adapter whose config still names the method, runs the initialisation again
    on whatever base it is given. Folding the adapter into the ORIGINAL W, as merge does with any LoRA,
    gives W + s·B·A: a model nobody trained, and nothing fails. loratools cannot tell from the files which
    base it was handed, so every command that applies an adapter to a base says so in one line (`note`);
    `loratools convert ADAPTER --to lora --initial INIT` writes W + s·(B·A − B₀·A₀), the plain LoRA on W
    (for LoftQ, close to and not equal to the trained model: LoftQ's quantization error of the residual
    stays out of it). PEFT rewrites init_lora_weights to true when it converts at save time
    (`save_pretrained(path_initial_model_for_weight_conversion=)`), as `convert --initial` does, so a
    converted adapter is told apart and gets no line; so does a PEFT workflow that set it to true by hand
    before saving the trained adapter (nothing in the files is left to tell).

    Not base-changing: True / False / "gaussian" (random or zero B), "eva" (A from activations, B = 0),
    "orthogonal" (random orthogonal factors), "mica" (B from W's singular vectors, A = 0): W is untouched.
"""
from __future__ import annotations

import shlex

# init_lora_weights value (or prefix, as PEFT matches "pissa_niter_N") -> the method's name.
RESIDUAL_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA"}
LOFTQ_INIT = "loftq"
# What PEFT's save-time conversion (and `convert --to lora --initial`) takes: the residual-base methods.
MUTATING_INITS = tuple(RESIDUAL_INITS)


def base_changing_init(config: dict) -> str | None:
    """The adapter config's init_lora_weights when that initialisation changed the base (module note), else
    None (absent, a bool, or a method that leaves W alone)."""
    init = config.get("init_lora_weights", True)
    if not isinstance(init, str):
        return None
    init = init.lower()
    return init if init.startswith(MUTATING_INITS) or init == LOFTQ_INIT else None


def method_name(init: str) -> str:
    """"PiSSA", "OLoRA", "CorDA", "LoRA-GA" or "LoftQ" for a base_changing_init value."""
    return "LoftQ" if init == LOFTQ_INIT else next(v for k, v in RESIDUAL_INITS.items() if init.startswith(k))


def note(path, config: dict) -> str | None:
    """The one line every command that applies an adapter to a base says about it, or None."""
    init = base_changing_init(config)
    if init is None:
        return None
    if init == LOFTQ_INIT:
        base = ("the 4-bit residual base LoftQ made with it, deq(Q(W − s·B₀A₀)) (what PEFT's LoftQ recipe and "
                "`loratools quantize --nf4 --loftq` save)")
        caveat = " (close to the trained model, not equal: LoftQ's quantization error stays out)"
    else:
        base = "the residual base PEFT saved with it (W − s·B₀A₀)"
        caveat = ""
    return (f"{path}: init_lora_weights {init!r}: initialised with {method_name(init)}, the adapter applies to "
            f"{base}, not to the original model; for the original model convert it first: `loratools convert "
            f"{shlex.quote(str(path))} --to lora --initial INIT -o OUT` (INIT: the adapter as initialised){caveat}")


def notes(adapters) -> list[str]:
    """note() for each loaded adapter (adapter.Adapter: .path, .config) that has one, in order."""
    return [n for a in adapters if (n := note(a.path, a.config)) is not None]
