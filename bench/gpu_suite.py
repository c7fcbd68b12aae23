"""Everything a lent GPU should run, on a fresh machine with no network, in calls of a few minutes.

    python3 bench/gpu_suite.py --out DIR [--budget-s 300] [--only a,b] [--checks a,b] [--skip-build]
                               [--skip-checks] [--no-warm-cache] [--direct-kernels]
    python3 bench/gpu_suite.py --merge DIR1/results.json DIR2/results.json --out bench/results

1. builds the package and its C++ extension in place (pip install --no-build-isolation --no-deps -e .);
2. in the background, fills Triton's cache: tools/gpu_compile.py --warm-cache compiles every captured
   launch variant on all CPU cores, so the autotuners find most kernels compiled (waited for, at most
   WARM_CACHE_WAIT_S, before anything is timed);
3. checks every kernel on CUDA against its float64 reference (bench/gpu_checks.py); when a check that
   runs the halo kernels fails, and passes again under direct_kernels(), every
   later check and timing takes the direct kernels (the header's conv_kernels says which ran; a second
   call is then given --direct-kernels);
4. times the ops and the networks against eager PyTorch and torch.compile (the bench_* GPU sections),
   most important first; a section that would start after --budget-s seconds is skipped (named in the
   summary), and a second call with --only runs the rest on the warm machine;
5. writes results into DIR after every section (markdown, CSV, plots, and results.json that --merge
   turns into one set of result files for the calls of one session) and prints one summary table last.
A section that fails is reported in the table, never allowed to hide the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

WARM_CACHE_WAIT_S = 180


def build(out: Path) -> None:
    """pip install -e . (the C++ extension built against this machine's torch); pip's output goes to
    gpu_suite.log; SystemExit when it fails (nothing else can run)."""
    start = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    with (out / "gpu_suite.log").open("a") as log:
        log.write(proc.stdout[-4000:] + proc.stderr[-4000:] + "\n")
    if proc.returncode != 0:
        raise SystemExit(f"gpu_suite: the build failed (exit {proc.returncode}); see {out / 'gpu_suite.log'}")
    print(f"build: {time.time() - start:.0f} s", flush=True)


def start_cache_warming(out: Path) -> tuple[subprocess.Popen, float]:
    jobs = max(1, (os.cpu_count() or 2) - 2)
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_compile.py"), "--warm-cache", "--arch", "90",
           "--jobs", str(jobs)]  # fmt: skip
    log = (out / "gpu_suite.log").open("a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), time.time()


def finish_cache_warming(proc: subprocess.Popen, started: float) -> dict:
    try:
        rc = proc.wait(timeout=max(1.0, WARM_CACHE_WAIT_S - (time.time() - started)))
        result = "DONE" if rc == 0 else f"FAIL (exit {rc})"
    except subprocess.TimeoutExpired:
        proc.kill()
        result = "STOPPED"
    return {"section": "warm Triton cache", "result": result, "detail": f"{time.time() - started:.0f} s"}


def timing_sections(save_partial: Callable[[list], None]) -> list[tuple[str, Callable[[], list]]]:
    """(name, callable -> list[BenchResult]), most important first; save_partial(list[BenchResult]):
    a section's results so far, written beside the finished sections' (the patch ladder's rungs)."""
    import bench_bn_relu_conv3d
    import bench_dense_block
    import bench_depthwise
    import bench_graphs
    import bench_memory_format
    import bench_models
    import bench_optimize
    import bench_sliding_window
    import bench_tiles
    import gpu_profile
    import torch

    def dense_layer_fp32():
        torch.backends.cudnn.allow_tf32 = False  # IEEE float32: eager, compile and ours alike
        return [bench_bn_relu_conv3d.run("cuda", "full-res", dtype=torch.float32, full_res_only=True)]

    return [
        ("bn_relu_conv3d", lambda: [bench_bn_relu_conv3d.run("cuda", compile_mode="full-res")]),
        ("profile", lambda: [gpu_profile.run()]),
        ("cuda_graphs", lambda: [bench_graphs.run("cuda")]),
        ("tiles", lambda: [bench_tiles.run("cuda")]),
        ("dense_block", lambda: [bench_dense_block.run("cuda")]),
        ("depthwise", lambda: [bench_depthwise.run("cuda", quick=True)]),
        ("models", lambda: bench_models.run("cuda", ("tiramisu3d_p3a",), ("ours", "eager"), ladder=False)),
        # needs MONAI: carry its wheel
        ("optimize", lambda: [bench_optimize.run("cuda"), bench_optimize.run("cuda", model="highresnet")]),
        ("patch_ladder", lambda: bench_models.run(
            "cuda", (), ladder=True, on_ladder_row=lambda partial: save_partial([partial]))),
        ("memory_format", lambda: [bench_memory_format.run("cuda")]),
        ("sliding_window", lambda: [bench_sliding_window.run("cuda", rounds=10)]),
        ("dense_layer_fp32", dense_layer_fp32),
        ("models_compile", lambda: renamed(
            bench_models.run("cuda", ("tiramisu3d_p3a",), ("compile", "ours_compile"), ladder=False),
            "models_compile")),
        ("models_all", lambda: renamed(
            bench_models.run("cuda", tuple(bench_models.PAPER_PATCH)[:3], ladder=False), "models_others")),
    ]  # fmt: skip


def renamed(results: list, name: str) -> list:
    for result in results:
        result.name = name
    return results


def save(results: list, env: dict, out: Path, stem: str) -> None:
    """results.json (for --merge) and the combined result files named `stem` (one per call, chosen before
    the first section), rewritten after every section."""
    from run_all import write_all

    payload = {"env": env, "results": [vars(r) for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    write_all(results, out, memory_curve=False, env=env, stem=stem)


def merge(paths: list[Path], out: Path) -> None:
    """One set of result files from the results.json of several calls (the first call's env header,
    with the git sha of each call noted when they differ)."""
    from common import BenchResult

    payloads = [json.loads(p.read_text()) for p in paths]
    env = dict(payloads[0]["env"])
    shas = list(dict.fromkeys(p["env"]["git_sha"] for p in payloads))
    env["git_sha"] = ", ".join(shas)
    env["calls"] = ", ".join(p["env"]["date"] for p in payloads)
    results = [BenchResult(**r) for p in payloads for r in p["results"]]
    from run_all import write_all

    for path in write_all(results, out, memory_curve=False, env=env):
        print(path)


# The checks that run the halo kernels (the fused layer's at stride 1, the depthwise weight gradient's in
# channels-last half precision), and the ones rerun under direct_kernels() when any of those fails.
CONV_CHECKS = ("bn_relu_conv3d", "bn_relu_conv3d tiles", "dense block", "depthwise")
CONV_RECHECKS = ("bn_relu_conv3d", "dense block", "depthwise")


def run_check(name: str, check) -> list[dict]:
    """One check's rows, printed; a crash is a FAIL row with its traceback, never the end of the run."""
    try:
        rows = check("cuda")
    except Exception:  # noqa: BLE001 - a crash is a result to report
        rows = [{"check": name, "result": "FAIL", "detail": traceback.format_exc(limit=3)[-300:]}]
    for row in rows:
        print(row, flush=True)
    return rows


def run_checks(
    checks: Sequence[tuple[str, Callable[[str], list[dict]]]], chosen: list[str], t0: float
) -> dict[str, list[dict]]:
    """The checks naming a word of `chosen` (all when it is empty), in order, each check's rows under its
    name. Right after the last check of CONV_CHECKS, a failure there may turn the halo kernels off
    (fall_back_to_direct_kernels), so the checks after it run what the timings will run."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    selected = [(name, check) for name, check in checks if not chosen or any(w in name for w in chosen)]
    conv_checks = [name for name, _ in selected if name in CONV_CHECKS]
    rows_by_check = {}
    for name, check in selected:
        start = time.time()
        rows_by_check[name] = run_check(name, check)
        if conv_checks and name == conv_checks[-1] and launchers.HALO_KERNELS:
            rows_by_check.update(fall_back_to_direct_kernels(rows_by_check, dict(checks)))
        print(f"[{time.time() - t0:.0f} s] checks {name}: {time.time() - start:.0f} s", flush=True)
    return rows_by_check


def fall_back_to_direct_kernels(rows_by_check: dict[str, list[dict]], checks: dict) -> dict[str, list[dict]]:
    """When a check of CONV_CHECKS failed with the halo kernels on (stride 1's default), CONV_RECHECKS again
    under direct_kernels(). If they all pass there, the halo kernels are the failure: from here on this
    process times the direct kernels (set_halo_kernels(False)), so the timings are of kernels that passed,
    and the halo kernels' failure stays in the correctness table. Returns the rerun's rows, each check
    named "... (direct kernels)"; nothing when none of CONV_CHECKS failed, or none of them ran."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    failed = [r for name in CONV_CHECKS for r in rows_by_check.get(name, []) if r["result"] == "FAIL"]
    if not failed:
        return {}
    print(f"gpu_suite: {len(failed)} check(s) failed with the halo kernels; rechecking "
          "under direct_kernels()", flush=True)  # fmt: skip
    rerun = {}
    with launchers.direct_kernels():
        for name in CONV_RECHECKS:
            rows = run_check(name, checks[name])
            rerun[f"{name} (direct kernels)"] = [
                {**r, "check": f"{r['check']} (direct kernels)"} for r in rows
            ]
    if all(r["result"] != "FAIL" for rows in rerun.values() for r in rows):
        launchers.set_halo_kernels(False)
        print("gpu_suite: the direct kernels pass: every timing below takes them; time the rest of this "
              "session's calls with --direct-kernels", flush=True)  # fmt: skip
    return rerun


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--no-warm-cache", action="store_true")
    parser.add_argument("--budget-s", type=float, default=300.0, help="no timing section starts after this")
    parser.add_argument("--git-sha", default="", help="the sha of the tree (the device copy has no .git)")
    parser.add_argument(
        "--only", default="", help="comma-separated words: run only timing sections naming one"
    )
    parser.add_argument(
        "--checks", default="", help="comma-separated words: run only the correctness checks naming one"
    )
    parser.add_argument(
        "--direct-kernels", action="store_true",
        help="stride 1 takes the direct kernels throughout (a second call after the halo kernels failed)",
    )  # fmt: skip
    parser.add_argument("--merge", type=Path, nargs="+", help="results.json files to merge into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0, summary = time.time(), []
    if not args.skip_build:
        build(args.out)
        # a fresh interpreter: the editable install's path hook is read at start-up only
        os.execv(sys.executable, [sys.executable, *sys.argv, "--skip-build"])
    warming = None if args.no_warm_cache else start_cache_warming(args.out)

    import torch
    from common import environment, free_stem, markdown_table, write_results
    from gpu_checks import CHECKS

    import prostate_kernels
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    env = environment()
    env["extension"] = "loaded" if prostate_kernels.HAS_EXT else "NOT loaded"
    if args.git_sha:
        env["git_sha"] = args.git_sha
    print(env, flush=True)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device")

    if args.direct_kernels:
        launchers.set_halo_kernels(False)
    if not args.skip_checks:
        chosen = [w.strip() for w in args.checks.split(",") if w.strip()]
        rows_by_check = run_checks(CHECKS, chosen, t0)
        check_rows = [row for rows in rows_by_check.values() for row in rows]
        write_results("gpu-correctness", env, ["check", "result", "detail"], check_rows, [], args.out)
        failed = [r for r in check_rows if r["result"] == "FAIL"]  # INFO rows are diagnostics
        summary.append(
            {"section": "correctness", "result": "PASS" if not failed else "FAIL",
             "detail": f"{len(check_rows) - len(failed)}/{len(check_rows)} checks pass"}
        )  # fmt: skip
    env["conv_kernels"] = launchers.conv_kernels_in_use()  # after the checks' fallback, if any
    summary.append({"section": "conv kernels timed", "result": "INFO", "detail": env["conv_kernels"]})
    print(summary[-1], flush=True)
    if warming is not None:
        summary.append(finish_cache_warming(*warming))
        print(summary[-1], flush=True)

    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    results: list = []  # BenchResults
    stem = free_stem(env, args.out)  # this call's result files, rewritten after each section

    def save_partial(partial: list, done: list = results) -> None:  # done: extended in place below
        save(done + partial, env, args.out, stem)

    for name, section in timing_sections(save_partial):
        if wanted and not any(w == name for w in wanted):
            continue
        if time.time() - t0 > args.budget_s:
            summary.append({"section": name, "result": "SKIPPED", "detail": "time budget spent"})
            continue
        start = time.time()
        try:
            produced = section()
            results += produced
            for result in produced:
                summary.append({"section": result.name, "result": "DONE", "detail": result.summary})
            save(results, env, args.out, stem)
        except Exception:  # noqa: BLE001 - a crash is a result to report
            summary.append(
                {"section": name, "result": "FAIL", "detail": traceback.format_exc(limit=3)[-300:]}
            )
        torch.cuda.empty_cache()
        print(f"[{time.time() - t0:.0f} s] section {name}: {time.time() - start:.0f} s", flush=True)
    print(f"\ngpu_suite finished in {time.time() - t0:.0f} s on {env['device']}\n")
    print(markdown_table(["section", "result", "detail"], summary))


if __name__ == "__main__":
    main()
