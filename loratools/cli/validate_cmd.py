import sys

import click

from .console import info, print_json
from .options import device_option, json_option
from .tables import fmt, kv_table, table


@click.command("validate")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, type=click.Path(path_type=str))
@click.option("--merged", type=click.Path(path_type=str), help="A merged checkpoint: compared tensor by tensor with "
              "base + adapter deltas, and by logits with base + ADAPTERs through PEFT (unmerged).")
@click.option("--tuned", type=click.Path(path_type=str), help="A fine-tuned checkpoint: how much of base -> tuned "
              "base + ADAPTERs reproduce (e.g. an adapter made by `loratools extract`).")
@click.option("--quantized", type=click.Path(path_type=str), help="A bitsandbytes 4-bit checkpoint: compared with "
              "BASE, per tensor (dequantized) and by logits.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Scale each adapter's delta (one per ADAPTER, in order; default 1.0), as `merge --weight` does.")
@device_option
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype of the forward passes; auto = the model's dtype on CUDA, "
              "float32 on the CPU.")
@click.option("--batch", type=int, default=4, show_default=True, help="Sequences in the test batch.")
@click.option("--seq-len", type=int, default=128, show_default=True,
              help="Tokens per sequence (capped at the model's maximum positions).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the test batch.")
@click.option("--atol", type=float, default=None, help="Allowed max |Δlogit| for the merged and quantized "
              "comparisons (default: from the dtypes involved; see docs).")
@click.option("--rtol", type=float, default=None, help="Allowed relative logits error ‖Δ‖/‖ref‖ for the "
              "merged and quantized comparisons (default: from the dtypes involved).")
@click.option("--min-carried", type=float, default=0.0, show_default=True,
              help="--tuned passes when base + ADAPTERs carry at least this fraction of the fine-tune's logit change.")
@click.option("--static-only", is_flag=True, help="Header and tensor checks only: build no model.")
@click.option("--stream/--no-stream", "stream", default=None, help="Run the forward passes block by block from "
              "disk (one block in memory; per-block divergence of the hidden states) or as whole models. "
              "Default: whole when the model fits in free memory, else streamed (docs/validate.md).")
@click.option("--plot", "plot", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE.png",
              help="Draw the per-block relative error (log scale) into FILE.png; implies --stream. Needs the "
              "optional extra: pip install 'loratools[plot]'.")
@click.option("--trained-on", type=click.Choice(["auto", "fp", "nf4", "fp4"]), default="auto", show_default=True,
              help="What the adapters were trained on. With nf4/fp4 (or detected: a QLoRA adapter whose "
              "base_model_name_or_path is a 4-bit checkpoint) the reference is also built on BASE dequantized "
              "through that format, and --merged is compared with both bases (docs/validate.md).")
@json_option
def command(base, adapters, merged, tuned, quantized, weights, device, dtype, batch, seq_len, seed, atol, rtol,
            min_carried, static_only, trained_on, stream, plot, as_json):
    """Check adapters against a base, and a merged, fine-tuned or 4-bit checkpoint against base + adapters.

    Adapters may be in any format `loratools convert` reads (PEFT, MLX-LM, kohya, GGUF LoRA).
    Static checks read headers (and the adapters' small tensors): every problem is listed at once.
    Tensor checks stream the checkpoints and name the module that is wrong. Forward passes build the
    models with transformers (local files only) and compare logits on one deterministic batch; they
    run on CUDA when available. Exit code 0 only if every check passes.

    \b
    Examples:
      loratools validate fixtures/tiny-llama fixtures/llama-lora --merged merged/
      loratools validate fixtures/tiny-llama fixtures/llama-lora --tuned fixtures/tiny-llama-tuned --json
      loratools validate fixtures/tiny-llama --quantized tiny-llama-nf4/ --device cuda
      loratools validate fixtures/tiny-llama fixtures/llama-lora --merged merged/ --trained-on nf4
    """
    from ..validate import failure, validate

    if plot is not None:
        from ..errors import UsageError
        from ..validate.plot import require_matplotlib

        if static_only:
            raise UsageError("--plot draws the forward passes' per-block divergence: drop --static-only")
        require_matplotlib()  # before the work, not after it
    log = info if sys.stderr.isatty() else None
    report = validate(base, adapters, merged=merged, tuned=tuned, quantized=quantized, weights=list(weights),
                      device=device, dtype=dtype, batch=batch, seq_len=seq_len, seed=seed, atol=atol, rtol=rtol,
                      min_carried=min_carried, static_only=static_only, trained_on=trained_on,
                      stream=stream, plot=plot is not None, log=log)
    if plot is not None:
        from ..validate.plot import drawable, write_plot

        why_not = drawable(report)
        report["plot"] = str(write_plot(report, plot)) if why_not is None else None
        if why_not is not None:
            report["plot_skipped"] = why_not
            info(f"--plot: nothing drawn, {why_not}")
    err = failure(report)
    if as_json:
        if err is not None:
            report["error"] = err.to_json()["error"]
        print_json(report)
        if err is not None:
            click.echo(f"error: {err.one_line()}", err=True)
            click.get_current_context().exit(err.exit_code)
        return
    show(report)
    if err is not None:
        raise err
    info(f"ok: {report['summary']}")


def show(report: dict) -> None:
    """The report as tables on stderr."""
    items = [("base", report["base"])]
    for a in report["adapters"]:
        items.append(("adapter", a["path"] + ("" if a["weight"] == 1.0 else f" (weight {fmt(a['weight'])})")))
    for role in ("merged", "tuned", "quantized"):
        if report[role]:
            items.append((role, report[role]))
    fwd = ("skipped: " + report["forward_skipped"]) if report["forward_skipped"] else (
        f"{report['device']}, {report['dtype']}, batch {report['batch']} x {report['seq_len']} tokens "
        f"({report['batch_source']}), seed {report['seed']}"
        + (", streamed block by block" if (report.get("stream") or {}).get("streamed") else ""))
    items.append(("forward passes", fwd))
    kv_table("validate", items)
    if report["comparisons"]:
        rows = []
        for c in report["comparisons"]:
            if c.get("error"):
                rows.append([c["name"], c["reference"], c["candidate"], None, None, None, None, c["error"], "FAIL"])
                continue
            if c["name"] == "tuned":
                allowed = f"carried >= {fmt(c['min_carried'])}"
                verdict = f"carried {c['carried']:.3f}"
            elif "atol" in c:
                allowed = f"|Δ| <= {fmt(c['atol'])}, rel <= {fmt(c['rtol'])}"
                verdict = ""
            else:
                allowed, verdict = "(informational)", ""
            verdict = (verdict + " " if verdict else "") + ("ok" if c["passed"] else "FAIL")
            rows.append([c["name"], c["reference"], c["candidate"], c["max_abs"], c["rel_err"], c["cosine"], c["top1"],
                         allowed, verdict])
        table(report.get("output") or "logits", ["comparison", "reference", "candidate", "max |Δlogit|", "rel err", "cosine", "top-1 agree",
                         "allowed", "verdict"], rows)
    if (report.get("trained_on") or {}).get("line"):
        info(report["trained_on"]["line"])
    show_divergence(report)
    t = report["tensors"]
    if "merged" in t:
        m = t["merged"]
        worst = max((r["max_err_over_allowance"] for r in m["rows"] if r["passed"]), default=0.0)
        info(f"merged tensors: {m['checked']} checked against base + adapter deltas, {m['failed']} failed"
             + (" (listed under problems)" if m["failed"] else "")
             + (f"; passing ones use at most {worst:.2g} of the rounding allowance" if m["checked"] else ""))
    if "tuned" in t:
        tt = t["tuned"]
        info(f"tuned weights: the adapters carry {tt['weights_carried']:.3f} of the weight change; "
             f"{tt['covered_share']:.3f} of it lies in adapted tensors")
        worst = sorted(tt["tensors"], key=lambda r: r["carried"])[:5]
        if worst:
            table(None, ["tensor (least carried first)", "‖T − W‖", "carried"],
                  [[r["tensor"], r["change_norm"], r["carried"]] for r in worst])
    if "quantized" in t:
        q = t["quantized"]
        rels = [r["rel_err"] for r in q["rows"]]
        info(f"quantized tensors: {q['checked']} 4-bit weights checked, {q['failed']} failed"
             + (f"; dequantization error {min(rels):.3g} .. {max(rels):.3g} (relative)" if rels else ""))
    if report["problems"]:
        table(f"problems ({len(report['problems'])})", ["check", "module / tensor", "expected", "found", "problem"],
              [[p["check"], p["tensor"] or p["module"] or p["path"], p["expected"], p["found"], p["message"]]
               for p in report["problems"]])
    if report["notes"]:
        table(f"notes ({len(report['notes'])}, not failures)", ["check", "note"],
              [[n["check"], n["message"]] for n in report["notes"]])


def show_divergence(report: dict) -> None:
    """The streamed comparisons' per-block rows and logits agreement, as tables on stderr."""
    for c in report["comparisons"]:
        d = c.get("divergence")
        if not d:
            continue
        first = d.get("first_divergence_index")
        rows = [[r["block"], r["rel_err"], r["cosine"], r["max_abs"],
                 "FIRST BEYOND" if i == first else ("beyond" if first is not None and i > first and
                                                    not (r["finite"] and r["rel_err"] <= d["allowance"]) else "")]
                for i, r in enumerate(d["blocks"])]
        table(f"{c['name']}: each block's output hidden states against the reference's (allowed rel err "
              f"{fmt(d['allowance'])})",
              ["block", "rel err", "cosine", "max |Δ|", ""], rows)
        lg = d.get("logits")
        if lg:
            info(f"{c['name']} logits agreement: KL {lg['kl']:.3g} nats (max {lg['max_kl']:.3g}), top-1 {lg['top1']:.3f}, "
                 f"top-{lg['k']} overlap {lg['topk']:.3f}, max |Δlogit| {c['max_abs']:.3g}")
