"""Everything a lent GPU should run, in one call of under 8 minutes on a fresh machine with no network.

    python3 bench/gpu_suite.py --out DIR

1. builds the package and its C++ extension in place (pip install --no-build-isolation --no-deps -e .);
2. checks every kernel on CUDA against its reference (bench/gpu_checks.py);
3. times the ops against eager PyTorch and torch.compile (the bench_* scripts' GPU sections);
4. writes results (markdown + CSV) into DIR and prints one summary table last.
A section that fails is reported in the table, never allowed to hide the others. Timing sections run
most important first and are skipped once BUDGET_S has passed (a first call also pays for Triton's
compiles and autotuning); `--only bn_relu_conv3d,dense_block` in a second call runs the rest.
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

    import bench_bn_relu_conv3d
    import bench_dense_block
    import bench_depthwise
    import bench_models
    import bench_sliding_window
    from run_all import write_all

    sections = [  # most important first: later ones are skipped when the time budget is spent
        ("bn_relu_conv3d", lambda: [bench_bn_relu_conv3d.run("cuda", compile_mode="full-res")]),
        ("dense_block", lambda: [bench_dense_block.run("cuda")]),
        ("depthwise", lambda: [bench_depthwise.run("cuda", quick=True)]),
        ("sliding_window", lambda: [bench_sliding_window.run("cuda", rounds=10)]),
        ("models", lambda: bench_models.run("cuda")),
    ]
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    results = []
    for name, section in sections:
        if wanted and not any(w in name for w in wanted):
            continue
        if time.time() - t0 > BUDGET_S:
            summary.append({"section": name, "result": "SKIPPED", "detail": "time budget spent"})
            continue
        try:
            produced = section()
            results += produced
            for result in produced:
                summary.append({"section": result.name, "result": "DONE", "detail": result.summary})
        except Exception:  # noqa: BLE001 - a crash is a result to report
            summary.append(
                {"section": name, "result": "FAIL", "detail": traceback.format_exc(limit=3)[-300:]}
            )
    if results:
        try:
            write_all(results, args.out, memory_curve=False)
        except Exception:  # noqa: BLE001
            summary.append(
                {"section": "results", "result": "FAIL", "detail": traceback.format_exc(limit=3)[-300:]}
            )
    (args.out / "gpu_suite.log").write_text("\n".join(log))
    print(f"\ngpu_suite finished in {time.time() - t0:.0f} s on {env['device']}\n")
    print(markdown_table(["section", "result", "detail"], summary))


if __name__ == "__main__":
    main()
