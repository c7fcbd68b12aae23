"""bench/gpu_checks.py's pinned-tile check, run through the interpreter on a tiny layer: the code a GPU
run will execute works (a GPU session has minutes, not the time to debug it), and every tile passes."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if not BENCH.is_dir():
    pytest.skip(f"bench/ is not beside the tests ({BENCH})", allow_module_level=True)
sys.path.insert(0, str(BENCH))


def tiny_layer(gpu_checks):
    """A 20-channel slice at 2x3x4, batch 1: the checks' p3a layer, shrunk for the interpreter."""
    return gpu_checks.DenseCase(1, 20, 16, (2, 3, 4), 1, 1, 1, False, True)


@pytest.fixture
def halo_turned_off(monkeypatch):
    """set_halo_kernels(False) for the test, as bench/gpu_suite.py sets it after the halo kernels fail
    their checks, and the halo autotuners that were launched (each launch indexes one with its grid)."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers
    from prostate_kernels.ops.launch import BucketedAutotuner

    monkeypatch.setattr(launchers, "HALO_KERNELS", True)  # restored after the test
    launchers.set_halo_kernels(False)
    launched, index = set(), BucketedAutotuner.__getitem__

    def spy(self, grid):
        launched.add(id(self))
        return index(self, grid)

    monkeypatch.setattr(BucketedAutotuner, "__getitem__", spy)
    halo = {id(launchers._fwd_halo): "forward", id(launchers._dgrad_halo): "input grad",
            id(launchers._wgrad_halo): "weight grad"}  # fmt: skip
    yield lambda: sorted(halo[i] for i in launched if i in halo)
    assert not launchers.HALO_KERNELS  # nothing in the test turned them back on for good


def test_every_pinned_tile_passes_the_gpu_check_on_a_tiny_layer(halo_turned_off):
    """With the halo kernels turned off for the process (the suite's fallback), the halo rows still run the
    halo kernels (halo_kernels()), so each row checks the kernel it names."""
    import gpu_checks

    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    rows = gpu_checks.check_bn_relu_conv3d_tiles("cpu", layer=tiny_layer(gpu_checks))
    assert halo_turned_off() == ["forward", "input grad", "weight grad"]
    tiles = len(launchers.FWD_TILES) + len(launchers.DGRAD_TILES) + len(launchers.WGRAD_TILES)
    halo = (len(launchers.HALO_TILES) + 2) * len(launchers.HALO_WARPS_STAGES)  # + both gradients' tiles
    assert len(rows) == tiles * len(launchers.WARPS_STAGES) + halo
    halo_forward = len(launchers.HALO_TILES) * len(launchers.HALO_WARPS_STAGES)
    assert sum(" forward (halo) tile " in r["check"] for r in rows) == halo_forward
    assert all(r["result"] == "PASS" for r in rows), [r for r in rows if r["result"] != "PASS"]
    wgrad = [r for r in rows if " weight grad (direct) tile " in r["check"]]
    assert len(wgrad) == len(launchers.WGRAD_TILES) * len(launchers.WARPS_STAGES)
    wgrad_halo = [r for r in rows if " weight grad (halo) tile " in r["check"]]
    assert len(wgrad_halo) == len(launchers.HALO_WARPS_STAGES)
    assert all("grad_weight:" in r["detail"] for r in wgrad + wgrad_halo)
    dgrad_halo = [r for r in rows if " input grad (halo) tile " in r["check"]]
    assert len(dgrad_halo) == len(launchers.HALO_WARPS_STAGES)
    assert all("grad_x:" in r["detail"] for r in dgrad_halo)


def test_the_tile_timings_run_every_tile_and_find_the_autotuned_one(halo_turned_off):
    """bench/bench_tiles.py (a GPU section of bench/gpu_suite.py) through the interpreter on a tiny layer:
    a row per tile x warps of each kernel, cuDNN's (here: PyTorch's CPU) time beside each, and the
    autotuner's own pick marked once per kernel; the halo rows time the halo kernels even when the suite
    turned them off."""
    import bench_tiles
    import torch

    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    result = bench_tiles.run("cpu", torch.float32, shapes=((8, (2, 3, 3)),))
    assert halo_turned_off() == ["forward", "input grad", "weight grad"]
    plain = launchers.WARPS_STAGES
    halo = launchers.HALO_WARPS_STAGES
    lists = {"forward (halo)": (launchers.HALO_TILES, halo), "forward (direct)": (launchers.FWD_TILES, plain),
             "input grad (halo)": ([launchers.HALO_DGRAD_TILE], halo),
             "input grad (direct)": (launchers.DGRAD_TILES, plain),
             "weight grad (halo)": ([launchers.HALO_WGRAD_TILE], halo),
             "weight grad (direct)": (launchers.WGRAD_TILES, plain)}  # fmt: skip
    for kernel, (tiles, warps_stages) in lists.items():
        rows = [r for r in result.rows if r["kernel"] == kernel]
        explored = [ws for ws in bench_tiles.EXPLORE_WARPS_STAGES if ws not in warps_stages]
        assert len(rows) == len(tiles) * (len(warps_stages) + len(explored))
        assert sum(r["autotuned"] == "yes" for r in rows) == 1
        assert sum(r["candidate"] == "yes" for r in rows) == len(tiles) * len(warps_stages)
        assert all(float(r["ms"]) > 0 and float(r["cudnn_ms"]) > 0 for r in rows)
    assert result.summary.count("best") == 6


def test_the_fused_dropout_check_runs_and_passes(monkeypatch):
    """bench/gpu_checks.py's bitwise check of the dense block's one-launch dropout, through the interpreter
    on a small buffer (float16 here, bf16 on the GPU); it fails when the one launch draws another mask."""
    import gpu_checks

    from prostate_kernels.ops import seeded_dropout_triton

    small = (2, 50, 3, 5, 7)
    row = gpu_checks._check_fused_dropout("cpu", small)
    assert row["result"] == "PASS" and row["detail"] == "fused True, 0 elements differ", row
    scale = seeded_dropout_triton.philox_dropout_
    monkeypatch.setattr(  # another layer's mask: the check must see it
        seeded_dropout_triton, "philox_dropout_", lambda t, seeds, layer, p: scale(t, seeds, layer + 1, p)
    )
    assert gpu_checks._check_fused_dropout("cpu", small)["result"] == "FAIL"


def test_the_determinism_check_runs_and_passes_on_a_tiny_case():
    """bench/gpu_checks.py's run-to-run check through the interpreter: three runs of the fused layer, a dense
    block and the depthwise conv compared bit for bit, and the stitching under deterministic mode."""
    import gpu_checks

    tiny = {
        "layer": tiny_layer(gpu_checks),
        "block": (8, 4, 2),
        "block_size": (2, 3, 4),
        "volume_size": (4, 6, 7),
        "roi": (3, 4, 5),
        "models": (
            ("tiramisu3d_tiny", {}, (8, 16, 16), "torch"),
            ("deeplabv3plus_3d", {"width": 1 / 32, "middle_blocks": 1}, (4, 16, 16), "torch"),
        ),
    }
    rows = gpu_checks.check_determinism("cpu", **tiny)
    assert len(rows) == 8
    assert [r["result"] for r in rows] == ["PASS"] * 5 + ["INFO", "PASS", "PASS"], rows
    assert all("differing: none" in r["detail"] for r in rows[:4]), rows
    assert "0 voxels differ" in rows[4]["detail"]
    for row, name in zip(rows[6:], ("tiramisu3d_tiny", "deeplabv3plus_3d"), strict=True):
        assert row["check"].startswith(name), row
        assert row["detail"].startswith("0 of ") and "deterministic version: none" in row["detail"], row


def _tiny_cuda_graph_check(gpu_checks) -> list[dict]:
    return gpu_checks.check_cuda_graphs(
        "cpu",
        layer=tiny_layer(gpu_checks),
        block=(8, 4, 2),
        block_size=(2, 3, 4),
        model=("tiramisu3d_tiny", (8, 16, 16), "torch"),
        train_case=("tiramisu3d_tiny", (8, 16, 16), 3),
    )


ACCUMULATE_GRAD_WARNING = (
    "The AccumulateGrad node's stream does not match the stream of the node that produced the incoming "
    "gradient. This may incur unnecessary synchronization and break CUDA graph capture if ..."
)  # torch's words, which failed the autotuner row on the first H200 run (2026-12-04)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the planted warnings: only the check's rows matter here
@pytest.mark.parametrize("said, autotuner_row", [
    (ACCUMULATE_GRAD_WARNING, "PASS"),
    ("prostate_kernels: kernel was first launched at this size inside a CUDA graph capture, ...", "FAIL"),
])  # fmt: skip
def test_the_cuda_graph_check_fails_on_the_librarys_capture_warning_alone(monkeypatch, said, autotuner_row):
    """Only the library's own untimed-bucket warning fails the row; any other warning said during the
    captures is listed in the INFO row after it."""
    import bench_graphs  # noqa: F401 - imported first: its own `capture` stays the real one after the test
    import common
    import gpu_checks

    def warning_capture(fn, device, warmups=3):
        warnings.warn(said, UserWarning, stacklevel=1)
        return capture(fn, device, warmups)

    capture = common.capture
    monkeypatch.setattr(common, "capture", warning_capture)
    rows = _tiny_cuda_graph_check(gpu_checks)
    assert rows[5]["check"].startswith("no autotuner bucket first met inside a capture"), rows[5]
    assert rows[5]["result"] == autotuner_row, rows[5]
    assert rows[6]["result"] == "INFO" and (said[:60] in rows[6]["detail"]) == (autotuner_row == "PASS"), rows


def test_the_cuda_graph_check_runs_and_passes_on_a_tiny_case():
    """bench/gpu_checks.py's CUDA graph check through the interpreter on a tiny case: on the CPU nothing is
    captured (common.capture returns the step itself), so this runs the check's own plumbing, the eager
    reference with the replay's dropout seeds, the whole-step rewind and the comparisons, not a capture."""
    import gpu_checks

    rows = _tiny_cuda_graph_check(gpu_checks)
    assert [r["result"] for r in rows] == ["PASS"] * 6 + ["INFO"], rows
    assert rows[4]["check"].startswith("train --cuda-graphs tiramisu3d_tiny 8x16x16: 3 iterations"), rows[4]
    assert rows[4]["detail"].startswith("largest relative loss difference 0.0e+00"), rows[4]
    assert all(r["check"].endswith("(dry run: not captured)") for r in rows), rows
    assert "differing: none" in rows[0]["detail"] and "differing: none" in rows[1]["detail"]
    assert rows[3]["detail"].startswith("largest weight difference 0.0e+00"), rows[3]


def test_the_cuda_graph_timings_run_on_a_tiny_case():
    """bench/bench_graphs.py (a GPU section of bench/gpu_suite.py) on the CPU: nothing is captured, but every
    step (the fused and PyTorch dense layers, the training steps of ours and the plain network) runs in
    both columns and the rows and summary come out."""
    import bench_graphs

    result = bench_graphs.run(
        "cpu", layers=((6, (2, 3, 4)),), model=("tiramisu3d_tiny", (8, 16, 16)), rounds=1
    )
    assert [(r["case"].split(" ")[0], r["variant"]) for r in result.rows] == [
        ("dense", "ours"), ("dense", "PyTorch"),
        ("tiramisu3d_tiny", "ours"), ("tiramisu3d_tiny", "plain PyTorch"),
        ("tiramisu3d_tiny", "ours, train --cuda-graphs"),
    ]  # fmt: skip
    assert all(float(r["eager_ms"]) > 0 and float(r["graph_ms"]) > 0 for r in result.rows[:-1])
    assert float(result.rows[-1]["eager_ms"]) > 0 and result.rows[-1]["graph_ms"] == ""
    assert result.summary.startswith("tiramisu3d_tiny step: ours ")
    assert " ms as train --cuda-graphs runs it; plain " in result.summary
    assert any("dry run" in note for note in result.notes)


def _fake_check(name: str, passes_with_halo: bool, passes_direct: bool):
    """A check whose one row passes or fails by which kernels stride 1 takes when it runs."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    def check(device):
        ok = passes_with_halo if launchers.HALO_KERNELS else passes_direct
        return [{"check": f"{name} case", "result": "PASS" if ok else "FAIL", "detail": device}]

    return check


@pytest.mark.parametrize(
    "halo_ok, direct_ok, rechecked, halo_after",
    [(True, True, False, True), (False, True, True, False), (False, False, True, True)],
    ids=["halo-passes", "halo-fails-direct-passes", "both-fail"],
)
def test_the_suite_falls_back_to_the_direct_kernels_only_when_they_pass(
    halo_ok, direct_ok, rechecked, halo_after, monkeypatch
):
    """bench/gpu_suite.py after its halo-kernel checks: no failure, no recheck; a failure with the halo
    kernels rechecks under direct_kernels(), and the process times the direct kernels only if they pass
    there (both failing leaves the default: there is nothing better to time, and the table says so)."""
    import gpu_suite

    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    monkeypatch.setattr(launchers, "HALO_KERNELS", True)
    checks = {name: _fake_check(name, halo_ok, direct_ok) for name in gpu_suite.CONV_CHECKS}
    rows_by_check = {name: check("cuda") for name, check in checks.items()}
    rerun = gpu_suite.fall_back_to_direct_kernels(rows_by_check, checks)
    assert launchers.HALO_KERNELS is halo_after
    assert launchers.conv_kernels_in_use().startswith("halo" if halo_after else "direct")
    if not rechecked:
        assert rerun == {}
        return
    assert sorted(rerun) == sorted(f"{name} (direct kernels)" for name in gpu_suite.CONV_RECHECKS)
    rows = [r for rows in rerun.values() for r in rows]
    assert all(r["check"].endswith(" case (direct kernels)") for r in rows), rows
    assert all(r["result"] == ("PASS" if direct_ok else "FAIL") for r in rows), rows


def test_the_suite_runs_the_chosen_checks_and_rechecks_before_the_later_ones(monkeypatch):
    """bench/gpu_suite.run_checks: the chosen checks in order, the direct-kernel recheck right after the last
    halo-kernel check (so a later check, here "determinism", already runs the direct kernels), a crashing
    check reported as a FAIL row, and a choice without any halo-kernel check."""
    import gpu_suite

    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    monkeypatch.setattr(launchers, "HALO_KERNELS", True)
    seen = []

    def determinism(device):
        seen.append(launchers.HALO_KERNELS)
        raise RuntimeError("boom")

    checks = [("sliding window", _fake_check("sliding window", True, True))]
    checks += [(name, _fake_check(name, False, True)) for name in gpu_suite.CONV_CHECKS]
    checks += [("determinism", determinism)]
    rows = gpu_suite.run_checks(checks, ["sliding"], 0.0)
    assert list(rows) == ["sliding window"] and launchers.HALO_KERNELS
    rows = gpu_suite.run_checks(checks, [], 0.0)
    names = [*[name for name, _ in checks[:-1]], *[f"{n} (direct kernels)" for n in gpu_suite.CONV_RECHECKS]]
    assert list(rows) == [*names, "determinism"]
    assert seen == [False] and not launchers.HALO_KERNELS
    assert rows["determinism"][0]["result"] == "FAIL" and "boom" in rows["determinism"][0]["detail"]


def test_the_memory_format_timings_run_on_a_tiny_case(monkeypatch):
    """bench/bench_memory_format.py: the CPU rows time a real training step in both layouts; the GPU rows
    (the GPU suite's memory_format section), with the step faked, ask for each model and kind in both
    layouts, and an out-of-memory in one layout leaves the other's figures and no speed-up."""
    import bench_memory_format as bench
    import torch

    (row,) = bench.cpu_rows({"tiramisu3d_tiny": ((1, 8, 16, 16), 2)}, rounds=1)
    ncdhw, channels_last = float(row["ncdhw_ms"]), float(row["channels_last_ms"])
    assert ncdhw > 0 and channels_last > 0
    assert row["channels_last_speedup"] == f"{ncdhw / channels_last:.2f}"

    asked = []

    def fake_variant(name, kind, device, channels_last):
        asked.append((name, kind, device, channels_last))
        return torch.nn.Identity(), "torch"

    def fake_step(model, backend, shape, channels_last):
        if channels_last and asked[-1][0] == "unet3d":
            raise torch.OutOfMemoryError("fake")
        return (8.0 if channels_last else 10.0), 100.0

    monkeypatch.setattr(bench, "variant", fake_variant)
    monkeypatch.setattr(bench, "cuda_step", fake_step)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = bench.gpu_rows()
    assert asked == [(name, kind, "cuda", cl) for name in bench.GPU_MODELS for kind in ("ours", "eager")
                     for cl in (False, True)]  # fmt: skip
    speedups = {(r["model"], r["variant"]): r["channels_last_speedup"] for r in rows}
    assert speedups[("tiramisu3d_p3a", "ours")] == "1.25" and speedups[("unet3d", "eager")] == ""
    unet = next(r for r in rows if r["model"] == "unet3d")
    assert unet["ncdhw_ms"] == "10.0" and unet["channels_last_ms"] == "OOM"


def test_the_profiles_phase_timings_and_python_profile_run_on_a_tiny_layer():
    """gpu_profile's phase rows (forward, retained backward, fresh forward + backward, each enqueue and
    wall ms) and its cProfile rows: the code the next GPU run executes, here on the CPU."""
    import gpu_profile

    rows = gpu_profile.phase_rows(8, (2, 4, 4), device="cpu")
    assert [r["kernel"] for r in rows] == ["fwd", "bwd", "fwd+bwd"]
    for row in rows:
        enqueue, wall = float(row["cuda_ms_per_step"]), float(row["step_wall_ms"])
        assert 0 < enqueue <= wall, row  # on the CPU the work is done when the call returns
    step = gpu_profile._dense_layer_step(8, (2, 4, 4), device="cpu")
    top = gpu_profile.python_profile("tiny layer", step, repeats=3)
    assert top and all(r["case"] == "tiny layer (python)" and float(r["step_kernel_ms"]) > 0 for r in top)


def test_the_profiles_whole_step_timings_run_ours_and_eager():
    """gpu_profile's whole training step rows (enqueue and wall ms of ours and the plain network), on a
    tiny Tiramisu 3D on the CPU, and the summary's clause for each."""
    import gpu_profile

    rows = gpu_profile.model_step_rows("tiramisu3d_tiny", (8, 16, 16), device="cpu")
    assert [r["kernel"] for r in rows] == ["ours", "eager"]
    for row in rows:
        enqueue, wall = float(row["cuda_ms_per_step"]), float(row["step_wall_ms"])
        assert 0 < enqueue <= wall, row
    clauses = gpu_profile.summarize(rows).split("; ")
    assert [c.split(": ")[0] for c in clauses] == [
        "tiramisu3d_tiny step 8x16x16 bf16 ours",
        "tiramisu3d_tiny step 8x16x16 bf16 eager",
    ]


def test_the_profile_summary_reads_each_kind_of_row_by_its_own_columns():
    import gpu_profile

    profiled = {"case": "layer", "kernel": "k", "step_wall_ms": "4.175", "step_kernel_ms": "0.741"}
    host = {"case": "layer (host)", "kernel": "aten::add", "step_wall_ms": "4.175", "step_kernel_ms": "2.5"}
    python = {"case": "layer (python)", "kernel": "f", "step_wall_ms": "", "step_kernel_ms": "1.9"}
    phases = gpu_profile.phase_rows(8, (2, 4, 4), device="cpu")
    summary = gpu_profile.summarize([profiled, host, python, *phases])
    clauses = summary.split("; ")
    assert clauses[:3] == [
        "layer: wall 4.175 ms, kernels 0.741 ms",
        "layer (host): host self CPU 2.5 ms",
        "layer (python): 1.9 ms of Python under cProfile",
    ]
    fwd = phases[0]
    host_ms, wall_ms = fwd["cuda_ms_per_step"], fwd["step_wall_ms"]
    assert clauses[3] == f"dense layer C_in=8 2x4x4 bf16 fwd: host {host_ms} ms of wall {wall_ms} ms"
    assert [c.split(": ")[0].rsplit(" ", 1)[1] for c in clauses[3:]] == ["fwd", "bwd", "fwd+bwd"]


def test_the_export_check_runs_and_passes_on_the_cpu():
    """The GPU run's check of the exported programs (traced on the CPU, run on the device) runs here."""
    import gpu_checks

    rows = gpu_checks.check_export("cpu")
    assert [r["check"] for r in rows] == [
        "exported tiramisu3d_tiny program on cpu vs the network there",
        "exported deeplabv3plus_3d program on cpu vs the network there",
        "exported tiramisu3d_tiny program (--any-size) on cpu vs the network there",
    ]
    assert all(r["result"] == "PASS" for r in rows), rows


def test_the_info_check_runs_and_passes_on_the_cpu():
    """The GPU run's `info --check` rows (on the CPU here: "auto", and the Triton kernels interpreted)."""
    import gpu_checks

    rows = gpu_checks.check_info("cpu")
    from prostate_kernels.cpu_bf16 import is_faulty, probe_error
    from prostate_kernels.self_check import CASES

    # the last row: eager's bf16 conv3d at 2 slices, for the record (its verdict as cpu_bf16's probe's)
    *rows, diagnostic = rows
    assert diagnostic["result"] == "INFO" and "2 slices deep" in diagnostic["check"], diagnostic
    assert diagnostic["detail"].startswith("WRONG" if is_faulty(probe_error()) else "right"), diagnostic
    bf16 = sum(case.bf16 for case in CASES)
    assert len(rows) == 2 * len(CASES) + bf16 and all(row["result"] == "PASS" for row in rows), rows
    assert rows[len(CASES)]["check"] == "info --check: BNReLUConv3d train fwd+bwd, float32 (triton)"
    assert rows[-bf16]["check"] == "info --check: BNReLUConv3d train fwd+bwd, bf16 autocast (triton)"
    assert "eager PyTorch's" in rows[-bf16]["detail"]


def test_the_predict_stitching_check_runs_on_the_cpu():
    """The GPU run's predict check (GPU against CPU; here CPU against itself, so only that it runs)."""
    import gpu_checks

    rows = gpu_checks.check_predict_stitching("cpu")
    cases = [r["check"].rpartition("(")[2] for r in rows]
    assert cases == ["mirroring, 8 windows)", "mirroring, one whole-volume window)"]
    assert all(r["result"] == "PASS" for r in rows), rows
