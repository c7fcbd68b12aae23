"""Benchmark pictures (matplotlib PNG): speed-up per shape per op, and the patch-size ladder."""

from __future__ import annotations

from pathlib import Path

from common import BenchResult

SPEEDUP_COLUMNS = {  # benchmark -> (speed-up column, label column(s), rows kept)
    "sliding_window": ("speedup_vs_monai", ("mode", "sw_batch_size"), lambda r: True),
    "bn_relu_conv3d": ("speedup_vs_eager", ("shape",), lambda r: r.get("provider") == "fused triton"),
    "depthwise": (
        "fwd_bwd_speedup_vs_best_pytorch",
        ("C", "size", "dilation"),
        lambda r: r["provider"].startswith("ours"),
    ),
    "dense_block": ("time_vs_naive", ("block",), lambda r: r.get("variant") == "ours"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_plot(results: list[BenchResult], path: Path) -> Path | None:
    """One bar chart per benchmark that has a measured speed-up of ours (dense block: time vs naive)."""
    panels = []
    for result in results:
        spec = SPEEDUP_COLUMNS.get(result.name)
        if spec is None:
            continue
        column, labels, keep = spec
        rows = [r for r in result.rows if keep(r) and r.get(column) not in (None, "")]
        if rows:
            panels.append((result.name, column, [" ".join(str(r[k]) for k in labels) for r in rows],
                           [float(r[column]) for r in rows]))  # fmt: skip
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (name, column, bar_labels, values) in zip(axes[:, 0], panels, strict=True):
        ax.barh(bar_labels, values, color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{name}: {column}", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def ladder_plot(result: BenchResult, path: Path) -> Path:
    """Patch-size ladder of Tiramisu 3D p3a: memory kept (CPU) or whether a step trains (GPU), per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    variants = list(dict.fromkeys(r["variant"] for r in result.rows))
    for variant in variants:
        rows = [r for r in result.rows if r["variant"] == variant]
        voxels = [int(r["voxels"]) for r in rows]
        if "kept_for_backward_GiB" in rows[0]:
            ax.plot(voxels, [float(r["kept_for_backward_GiB"]) for r in rows], marker="o", label=variant)
            ax.set_ylabel("GiB kept for backward")
        else:
            peaks = [float(r["peak_MiB"]) / 1024 if r["trains"] == "yes" else float("nan") for r in rows]
            ax.plot(voxels, peaks, marker="o", label=f"{variant} (missing point: out of memory)")
            ax.set_ylabel("peak GiB of a training step")
    first = result.rows[0]
    if "kept_for_backward_GiB" in first:  # the budget: what the naive model keeps at the paper's patch
        naive = next(r for r in result.rows if r["variant"] != "ours")
        ax.axhline(float(naive["kept_for_backward_GiB"]), color="grey", linestyle="--", linewidth=0.8,
                   label=f"naive at {naive['patch']}")  # fmt: skip
    ax.set_xticks([int(r["voxels"]) for r in result.rows if r["variant"] == variants[0]])
    ax.set_xticklabels([r["patch"] for r in result.rows if r["variant"] == variants[0]], fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("patch (D x H x W), batch 2")
    ax.set_title("Tiramisu 3D p3a: patch size vs memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
