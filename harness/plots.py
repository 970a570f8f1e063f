"""PNG plots generated from raw results: loss curves of every backend over the oracle, and step-time bars."""

from __future__ import annotations

from pathlib import Path


def _grid(plt, n: int):
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(model: str, rows: list[dict], oracle: dict, out: Path) -> Path | None:
    """One panel per (dtype, batch size): each backend's per-step loss, the oracle dashed on top."""
    groups = sorted({(r["dtype"], r["batch_size"]) for r in rows if r.get("losses") and r["mode"] == "aligned"})
    if not groups:
        return None
    plt = _plt()
    fig, axes = _grid(plt, len(groups))
    for ax, (dtype, b) in zip(axes, groups):
        longest: dict[str, dict] = {}  # per backend, its longest run
        for r in rows:
            if (r["dtype"], r["batch_size"]) == (dtype, b) and r.get("losses") and r["mode"] == "aligned":
                name = r["backend"] + (" (fast)" if r.get("fast") else "")
                if len(r["losses"]) > len(longest.get(name, {}).get("losses", [])):
                    longest[name] = r
        steps = max(len(r["losses"]) for r in longest.values())
        for name, r in sorted(longest.items()):
            ax.plot(range(len(r["losses"])), r["losses"], label=f"{name} ({r['device']})", alpha=0.8, lw=1.5)
        ref = oracle.get((dtype, b, steps)) or oracle.get((dtype, b))
        if ref:
            ax.plot(range(len(ref)), ref, "k--", lw=1, label="oracle (numpy float64)")
        if steps > 200:
            ax.set_xscale("log")
        ax.set_title(f"{model}, {dtype}, batch {b}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def step_times(model: str, rows: list[dict], out: Path) -> Path | None:
    """Median ms/step per backend (IQR as error bar), log scale, one panel per (device, batch size)."""
    timed = [r for r in rows if (r.get("meta") or {}).get("timing")]
    groups = sorted({(r["device"], r["batch_size"]) for r in timed})
    if not groups:
        return None
    plt = _plt()
    fig, axes = _grid(plt, len(groups))
    for ax, (dev, b) in zip(axes, groups):
        sel = sorted((r for r in timed if (r["device"], r["batch_size"]) == (dev, b)),
                     key=lambda r: r["meta"]["timing"]["median_s"])
        labels = [f"{r['backend']}{' (fast)' if r.get('fast') else ''}\n{r['dtype']}" for r in sel]
        med = [r["meta"]["timing"]["median_s"] * 1e3 for r in sel]
        iqr = [r["meta"]["timing"]["iqr_s"] * 1e3 / 2 for r in sel]
        ax.bar(range(len(sel)), med, yerr=iqr, color="tab:blue", alpha=0.8, capsize=3)
        ax.set_xticks(range(len(sel)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (median, IQR)")
        ax.set_title(f"{model}: {dev}, batch {b}")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def sweep_per_sample(record: dict, out: Path) -> Path | None:
    """The batch sweep: per-sample time against batch size, log-log, one line per backend."""
    rows = [r for r in record["rows"] if r["status"] == "ok" and r.get("timing") and r["sweep"] == "batch"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in sorted({r["backend"] for r in rows}):
        sel = sorted((r for r in rows if r["backend"] == name), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in sel], [r["timing"]["median_s"] * 1e6 / r["batch"] for r in sel], "o-", ms=3,
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("µs per sample (median step time / batch)")
    ax.set_title(f"{record['model']} ({record['dtype']}, {record['device']}): cost per sample vs batch size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def sweep_flops(record: dict, out: Path) -> Path | None:
    """Step time against FLOPs per step, log-log, with the time the measured matrix-multiply rate would take."""
    rows = [r for r in record["rows"] if r["status"] == "ok" and r.get("timing")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, name in enumerate(sorted({r["backend"] for r in rows})):
        for kind, marker in (("batch", "o-"), ("width", "s--")):
            sel = sorted((r for r in rows if r["backend"] == name and r["sweep"] == kind), key=lambda r: r["flops"])
            if sel:
                ax.plot([r["flops"] for r in sel], [r["timing"]["median_s"] * 1e3 for r in sel], marker, ms=3,
                        color=f"C{i}", label=f"{name} ({kind} sweep)" if kind == "width" else name, alpha=0.85)
    peak = (record.get("peak") or {}).get("gflops")
    if peak:
        f = sorted(r["flops"] for r in rows)
        ax.plot([f[0], f[-1]], [f[0] / peak / 1e6, f[-1] / peak / 1e6], "k:", lw=2,
                label=f"the measured matmul limit ({peak:.0f} GFLOP/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("matmul FLOPs per training step")
    ax.set_ylabel("ms per step (median)")
    ax.set_title(f"{record['model']} ({record['dtype']}, {record['device']}): step time vs work")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
