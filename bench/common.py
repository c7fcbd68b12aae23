"""Shared benchmark plumbing: environment record, interleaved median timing, result files.

Rules (DESIGN.md section 7): providers are timed side by side in one process on the same inputs, in
interleaved rounds (so that a slow spell of a shared machine hits every provider alike), after a
warm-up, and reported as medians; outputs are checked before anything is timed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    """Device, versions, git sha and date: the header of every result file."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(),
        "device_kind": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    for module in ("triton", "monai"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = "not installed"
    if torch.cuda.is_available():  # which fused-layer kernels a GPU run times
        from prostate_kernels.ops.bn_relu_conv3d_triton import conv_kernels_in_use

        env["conv_kernels"] = conv_kernels_in_use()
    return env


def synchronize() -> None:
    """Waits for the GPU's queued work where there is a GPU (a no-op on a CPU machine)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object]) -> float:
    """Seconds for one call (synchronising CUDA around it)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def interleaved_medians(
    cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 2
) -> dict[str, dict]:
    """Median, min and max seconds per case, running every case once per round, in turn."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(time_once(fn))
    return {
        name: {"median": statistics.median(s), "min": min(s), "max": max(s), "runs": len(s)}
        for name, s in samples.items()
    }


def capture(fn: Callable[[], object], device: str, warmups: int = 3) -> Callable[[], object]:
    """fn captured in a CUDA graph, as torch.cuda.graph's documentation prescribes: `warmups` runs on a
    side stream first (autotuning, Triton's compilation and lazy allocations happen there), then one
    captured run. Returns the replay; tensors fn allocated in the capture hold each replay's values.
    Off CUDA (the dry runs on the CPU) fn runs `warmups` times and is returned itself: the caller's
    comparisons run, no capture does."""
    if device != "cuda":
        for _ in range(warmups):
            fn()
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(
    name: str,
    env: dict[str, str],
    columns: list[str],
    rows: list[dict],
    notes: list[str],
    out_dir: Path | None = None,
) -> tuple[Path, Path]:
    """Writes <date>-<device>-<name>.md and .csv; returns their paths."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date'][:10]}-{slug(env['device'])[:40]}-{name}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    lines = [f"# {name}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", markdown_table(columns, rows), ""]
    lines += [f"- {note}" for note in notes]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(out)


@dataclass
class BenchResult:
    """What a benchmark's run() returns: its rows and the notes that qualify them."""

    name: str  # e.g. "sliding_window"
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    summary: str = ""  # one line for the summary table: the key figures and targets

    def write(self, env: dict[str, str], device: str, out_dir: Path | None = None) -> tuple[Path, Path]:
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        return write_results(f"{self.name}-{device}", env, columns, self.rows, self.notes, out_dir)


def free_stem(env: dict[str, str], out_dir: Path) -> str:
    """<date>-<device> for a run's files, or <date>-<device>-runN (N = 2, 3, ...) when an earlier run of
    that day and device already has its files in out_dir (they are never written over)."""
    base = f"{env['date'][:10]}-{slug(env['device'])[:40]}"
    stem, n = base, 1
    while (Path(out_dir) / f"{stem}.csv").exists() or (Path(out_dir) / f"{stem}.md").exists():
        n += 1
        stem = f"{base}-run{n}"
    return stem


def write_combined(
    results: list[BenchResult], env: dict[str, str], out_dir: Path | None = None, stem: str | None = None
) -> tuple[Path, Path]:
    """One run of every benchmark: <stem>.md (a section per benchmark) and .csv (all rows, with a
    `benchmark` column); returns their paths. stem: default free_stem(env, out_dir)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or free_stem(env, out_dir)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    columns = ["benchmark", *dict.fromkeys(k for r in results for row in r.rows for k in row)]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for result in results:
            for row in result.rows:
                writer.writerow({"benchmark": result.name, **row})
    lines = (
        ["# Benchmarks", ""] + [f"- {key}: {value}" for key, value in env.items()] + ["", "## Summary", ""]
    )
    lines += [
        markdown_table(
            ["benchmark", "summary"], [{"benchmark": r.name, "summary": r.summary} for r in results]
        )
    ]
    for result in results:
        columns = list(dict.fromkeys(k for row in result.rows for k in row))
        lines += ["", f"## {result.name}", "", markdown_table(columns, result.rows), ""]
        lines += [f"- {note}" for note in result.notes]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd keeps for backward of module(x), plus the output's
    (model state, i.e. parameters and buffers, and the input itself are not counted)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    storages[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()
    state = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers(), x]}
    return sum(n for ptr, n in storages.items() if ptr not in state)
