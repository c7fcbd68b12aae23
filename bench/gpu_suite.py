"""Everything a lent GPU should run, in one call of under 8 minutes on a fresh machine with no network.

    python3 bench/gpu_suite.py --out DIR

1. builds the package and its C++ extension in place (pip install --no-build-isolation --no-deps -e .);
2. checks every kernel on CUDA against its reference (bench/gpu_checks.py);
3. times the ops against eager PyTorch and torch.compile (the bench_* scripts' GPU sections);
4. writes results (markdown + CSV) into DIR and prints one summary table last.
A section that fails is reported in the table, never allowed to hide the others.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

BUDGET_S = 7 * 60  # sections after this much wall time are skipped, so the call ends inside 8 minutes


def build(log: list[str]) -> dict:
    start = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log.append(proc.stdout[-4000:] + proc.stderr[-4000:])
    ok = proc.returncode == 0
    return {"section": "build", "result": "PASS" if ok else "FAIL", "detail": f"{time.time() - start:.0f} s"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument(
        "--only", default="", help="comma-separated words: run only timing sections naming one"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0, log, summary = time.time(), [], []
    if not args.skip_build:
        summary.append(build(log))

    import torch
    from common import environment, markdown_table, write_results
    from gpu_checks import CHECKS

    import prostate_kernels

    env = environment()
    env["extension"] = "loaded" if prostate_kernels.HAS_EXT else "NOT loaded"
    print(env, flush=True)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device")

    check_rows = []
    for name, check in CHECKS:
        try:
            rows = check("cuda")
        except Exception:  # noqa: BLE001 - a crash is a result to report
            rows = [{"check": name, "result": "FAIL", "detail": traceback.format_exc(limit=3)[-300:]}]
        check_rows += rows
        for row in rows:
            print(row, flush=True)
    write_results("gpu-correctness", env, ["check", "result", "detail"], check_rows, [], args.out)
    failed = [r for r in check_rows if r["result"] != "PASS"]
    summary.append(
        {"section": "correctness", "result": "PASS" if not failed else "FAIL",
         "detail": f"{len(check_rows) - len(failed)}/{len(check_rows)} checks pass"}
    )  # fmt: skip

    sections = [
        ("sliding window timing", _sliding_window_timing),
        ("bn_relu_conv3d timing", _bn_relu_conv3d_timing),
        ("dense block timing and memory", _dense_block_timing),
        ("depthwise timing", _depthwise_timing),
        ("models and patch ladder", _models_timing),
    ]
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    for name, section in sections:
        if wanted and not any(w in name for w in wanted):
            continue
        if time.time() - t0 > BUDGET_S:
            summary.append({"section": name, "result": "SKIPPED", "detail": "time budget spent"})
            continue
        try:
            summary.append({"section": name, "result": "DONE", "detail": section(args.out)})
        except Exception:  # noqa: BLE001
            summary.append(
                {"section": name, "result": "FAIL", "detail": traceback.format_exc(limit=3)[-300:]}
            )
    (args.out / "gpu_suite.log").write_text("\n".join(log))
    print(f"\ngpu_suite finished in {time.time() - t0:.0f} s on {env['device']}\n")
    print(markdown_table(["section", "result", "detail"], summary))


def _sliding_window_timing(out: Path) -> str:
    import bench_sliding_window

    sys.argv = ["bench_sliding_window.py", "--device", "cuda", "--rounds", "10", "--out-dir", str(out)]
    bench_sliding_window.main()
    return "see sliding_window-cuda results"


def _bn_relu_conv3d_timing(out: Path) -> str:
    import bench_bn_relu_conv3d

    rows = bench_bn_relu_conv3d.main(["--device", "cuda", "--compile-full-res-only"], out_dir=out)
    fused = [r for r in rows if r["provider"] == "fused triton" and "16x64x64" in r["shape"]]
    speedups = ", ".join(f"{r['speedup_vs_eager']}x/{r.get('speedup_vs_compile', '-')}x" for r in fused)
    return f"full-res fwd+bwd speed-up vs eager/compile: {speedups}"


def _dense_block_timing(out: Path) -> str:
    import bench_dense_block

    rows = bench_dense_block.main(["--device", "cuda"], out_dir=out)
    target = [r for r in rows if r["block"].startswith("12-layer") and r["variant"] == "ours"][0]
    return f"12-layer block: time {target['time_vs_naive']}x naive, peak {target['memory_vs_naive']}x naive"


def _models_timing(out: Path) -> str:
    import bench_models

    rows = bench_models.main(["--device", "cuda"], out_dir=out)
    return bench_models.ladder_summary(rows, "trains")


def _depthwise_timing(out: Path) -> str:
    import bench_depthwise

    rows = bench_depthwise.main(["--device", "cuda", "--quick"], out_dir=out)
    ours = [float(r["fwd_bwd_speedup_vs_best_pytorch"]) for r in rows if r["provider"].startswith("ours")]
    floor = [float(r["fwd_floor_fraction"]) for r in rows if r["provider"].startswith("ours")]
    return (
        f"fwd+bwd speed-up vs PyTorch {min(ours):.2f}-{max(ours):.2f}x; fwd floor fraction {min(floor):.2f}+"
    )


if __name__ == "__main__":
    main()
