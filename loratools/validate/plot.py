"""`validate --plot FILE.png`: the per-block divergence of a streamed validate as a picture (matplotlib, the
optional extra `plot`): relative error of each block's hidden states against the reference, log scale, the
rounding allowance as a line and the first block beyond it marked."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputError, UsageError


def require_matplotlib() -> None:
    """Raise a one-line UsageError unless matplotlib can be imported (checked before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'loratools[plot]' "
                         "(or pip install matplotlib)") from None


def drawable(report: dict) -> str | None:
    """None when the report has per-block rows to draw, else why not (the forward passes were skipped, or
    no merged/tuned candidate was streamed)."""
    if any((c.get("divergence") or {}).get("blocks") for c in report.get("comparisons", [])):
        return None
    if report.get("forward_skipped"):
        return f"the forward passes were skipped ({report['forward_skipped']})"
    failed = [c for c in report.get("comparisons", []) if c.get("error")]
    if failed:
        return f"the {failed[0]['name']} comparison did not run ({failed[0]['error']})"
    return "no --merged or --tuned candidate was compared block by block"


def write_plot(report: dict, path: str | os.PathLike) -> Path:
    """Draw every comparison that carries a `divergence` into one PNG at `path` (written whole, then renamed
    into place). Raises UsageError when the report has no per-block rows (e.g. the forward passes were
    skipped), OutputError when the file cannot be written."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    why_not = drawable(report)
    if why_not is not None:
        raise UsageError(f"--plot: nothing to draw: {why_not}")
    series = [c for c in report["comparisons"] if (c.get("divergence") or {}).get("blocks")]
    out = Path(path)
    if not out.parent.is_dir():
        raise OutputError(f"parent directory {out.parent} does not exist", path=out)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * max(len(c["divergence"]["blocks"]) for c in series) + 3), 4))
    floor = 1e-12  # an exact block (rel err 0) still gets a point on a log axis
    for c in series:
        d = c["divergence"]
        xs = list(range(len(d["blocks"])))
        ys = [max(r["rel_err"] if r["rel_err"] is not None else float("inf"), floor) for r in d["blocks"]]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{c['name']}: {c['candidate']}")
        ax.axhline(d["allowance"], color=line.get_color(), ls="--", lw=0.8,
                   label=f"{c['name']}: rounding allowance {d['allowance']:.2g}")
        k = d.get("first_divergence_index")
        if k is not None:
            ax.plot([k], [ys[k]], marker="x", ms=10, color="red")
            ax.annotate(f"first divergence: {d['first_divergence']}", (k, ys[k]), textcoords="offset points",
                        xytext=(6, 6), fontsize=8, color="red")
    names = [r["block"] for r in series[0]["divergence"]["blocks"]]
    step = max(1, len(names) // 16)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([names[i] for i in range(0, len(names), step)], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("relative error of the block's output  ‖C − R‖ / ‖R‖")
    ax.set_title(f"validate: per-block divergence ({report.get('dtype')}, {report.get('device')})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write the plot: {e.strerror or e}", path=out) from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


__all__ = ["drawable", "require_matplotlib", "write_plot"]
