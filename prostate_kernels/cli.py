"""The `prostate-kernels` command: phantoms, train, predict, evaluate, export, demo, info.

User errors (missing or bad files, mismatched geometry, bad settings) print one line naming the file
and the problem and exit with status 2; in a directory, a bad case is reported at the end and does not
stop the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prostate_kernels.cli_args import (
    OneLineParser,
    WindowArgument,
    device_name,
    non_negative_float,
    non_negative_int,
    orientation_code,
    overlap_fraction,
    positive_float,
    positive_int,
    window_size,
)
from prostate_kernels.data.errors import DataError, first_line
from prostate_kernels.data.orientation import DEFAULT_ORIENTATION
from prostate_kernels.stop_requests import TrainingInterrupted

EXIT_USER_ERROR = 2
CHANNELS_LAST_HELP = ("run the network channels-last (NDHWC strides): the same math in other kernels, "
                      "faster or slower by model and device (docs/memory-layout.md)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    _escape_unprintable_output()
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a file system refusal (read-only, full, not a directory): one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}{_resume_hint(args)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingInterrupted as exc:  # train stopped on a signal, its checkpoint written
        print(str(exc), file=sys.stderr)
        return exc.status  # 128 + the signal: a shell's status for a process ended by it
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        print(f"error: out of memory ({first_line(exc)}); {_memory_hint(args)}", file=sys.stderr)
        return EXIT_USER_ERROR


_MEMORY_HINTS = {
    "phantoms": "choose a smaller --shape",
    "train": "choose a smaller --patch or --batch",
    "predict": "the volume or the model does not fit: try a smaller --window (or none), --device cpu, or a "
    "machine with more memory",
    "evaluate": "the volumes do not fit in this machine's memory",
    "demo": "the demo does not fit in this machine's memory",
}


def _escape_unprintable_output() -> None:
    """stdout and stderr escape what their encoding cannot hold instead of raising: a file name that is
    not UTF-8 (Python keeps its bytes as surrogates) ended a message in UnicodeEncodeError where the
    streams are strict (an en_US.UTF-8 locale: `predict` printed a traceback instead of its line)."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _memory_hint(args: argparse.Namespace) -> str:
    """What to change after running out of memory (and for train, _resume_hint)."""
    return _MEMORY_HINTS[args.command] + _resume_hint(args)


def _resume_hint(args: argparse.Namespace) -> str:
    """For a train that failed, whether --resume has a checkpoint to go on from (a run that failed before
    its first checkpoint has none; a failed checkpoint write leaves the one before it whole)."""
    if args.command == "train" and (Path(args.out) / "checkpoint.pt").is_file():
        return " (the last checkpoint is intact: --resume continues)"
    return ""


def _out_of_memory(exc: BaseException) -> bool:
    """A host allocation that failed (MemoryError; torch's CPU allocator raises a RuntimeError naming
    itself instead) or torch's GPU out-of-memory error (torch imported only if a command already did)."""
    torch = sys.modules.get("torch")
    cpu_allocator = isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc)
    return (
        isinstance(exc, MemoryError)
        or cpu_allocator
        or (torch is not None and isinstance(exc, torch.OutOfMemoryError))
    )


def _parser() -> argparse.ArgumentParser:
    from prostate_kernels import __version__

    parser = OneLineParser(prog="prostate-kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="write synthetic T2-like pelvis volumes with exact prostate masks")
    p.add_argument("--out", type=Path, required=True,
                   help="a new or empty directory for CaseNN.mhd/.raw and "
                   "CaseNN_segmentation.mhd/.raw")  # fmt: skip
    p.add_argument("--n", type=positive_int, default=8, help="how many cases (default 8)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the phantoms' random seed (default 0)")
    p.add_argument("--shape", type=positive_int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="volume size in voxels (default 24 128 128)")  # fmt: skip
    p.set_defaults(run=_phantoms)

    p = sub.add_parser("train", help="train a network on PROMISE12-style data")
    p.add_argument("--data", type=Path, required=True,
                   help="PROMISE12 layout (CaseNN.mhd with CaseNN_segmentation.mhd) or Decathlon layout "
                   "(imagesTr/ with labelsTr/)")  # fmt: skip
    p.add_argument("--model", default="tiramisu3d_p3a",
                   help="network (default tiramisu3d_p3a); an unknown name lists the others")  # fmt: skip
    p.add_argument("--patch", type=positive_int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="training patch in voxels (default: the paper's for the model)")  # fmt: skip
    p.add_argument("--batch", type=positive_int, default=None,
                   help="patches per step (default: the paper's for the model)")  # fmt: skip
    p.add_argument("--iters", type=positive_int, default=1000, help="training steps (default 1000)")
    p.add_argument("--loss", default="bce+dice", choices=("bce", "dice", "bce+dice"),
                   help="default bce+dice: +0.03 held-out Dice over bce on real MRI (README)")  # fmt: skip
    p.add_argument("--lr", type=positive_float, default=None, help="default: the paper's for the model")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                   help="Adam's weight decay (default 1e-4)")  # fmt: skip
    p.add_argument("--schedule", default="paper", choices=("paper", "poly"),
                   help="learning-rate decay: the paper's for the model, or poly: (1 - it/iters)^0.9",
                   )  # fmt: skip
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random rotation (+-15 deg about the slice axis), scaling (+-10%%) and "
                   "intensity scaling/shift, besides the flips (on by default: +0.04 held-out Dice on "
                   "real MRI)")  # fmt: skip
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (default auto: bf16 on CUDA, off on the CPU; bf16 on a CPU whose "
                   "bf16 conv3d backward is wrong is refused: README, bf16 on the CPU)")  # fmt: skip
    p.add_argument("--val-every", type=positive_int, default=100,
                   help="score the held-out cases every N steps, keeping the best as best.pt "
                   "(default 100)")  # fmt: skip
    p.add_argument(
        "--val-cases",
        type=non_negative_int,
        default=2,
        help="held-out cases (the last ones by name); 0: no validation and no best.pt",
    )
    p.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="write checkpoint.pt every N steps (default: --val-every)")  # fmt: skip
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run directory holding no earlier run (its other files are left alone), or an earlier run's "
        "with --resume",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--label", type=int, nargs="+", default=None,
                   help="the masks' label to learn (required when a mask holds several); several are joined "
                   "(the Decathlon's prostate zones: --label 1 2)")  # fmt: skip
    p.add_argument("--channel", type=non_negative_int, nargs="+", default=None,
                   help="the channel of multi-channel images to train on, or several as the network's input "
                   "channels (the Decathlon's prostate task: 0 is T2, 1 ADC, --channel 0 1 both); kept in "
                   "the checkpoint for predict")  # fmt: skip
    p.add_argument("--spacing", type=positive_float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="resample every case to this spacing (mm) first; predict does too")  # fmt: skip
    p.add_argument("--orientation", type=orientation_code, default=DEFAULT_ORIENTATION, metavar="CODE",
                   help="permute and flip every case's voxel axes to this orientation first (default LPS: "
                   "axial slices, x toward the left, y toward the back), or 'stored': as each file stores "
                   "them; predict does the same for each input")  # fmt: skip
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the weights, the patches and the augmentation (default 0)")  # fmt: skip
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms for the run (warn-only), untimed kernel tiles: "
                   "a rerun on the same GPU model repeats it bit for bit where every op allows")  # fmt: skip
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the network's forward and backward from CUDA graphs (one CUDA device, no "
                   "torchrun): far fewer host launches per step (docs/cuda-graphs.md)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="run the training step's forward and backward through torch.compile (Inductor; "
                   "the first iteration compiles it, minutes on a CPU); validation runs the model "
                   "eagerly (docs/torch-compile.md)")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help=CHANNELS_LAST_HELP)
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="under torchrun on GPUs: every BatchNorm normalises with all processes' batches "
                   "together (nn.SyncBatchNorm)")  # fmt: skip
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="data-loading processes (default 0: patches drawn in the training "
                   "process)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the steps")
    p.set_defaults(run=_train)

    p = sub.add_parser("predict", help="segment volumes with a trained checkpoint")
    p.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                   help="one checkpoint, or several (folds) whose probabilities are averaged")  # fmt: skip
    p.add_argument("--input", type=Path, required=True, help="an image file or a directory of them")
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="directory for <name>_segmentation files; existing files are never replaced",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files of an earlier prediction (never an input image or a reference mask)",
    )
    p.add_argument(
        "--continue",
        dest="continue_prediction",
        action="store_true",
        help="go on with an interrupted prediction into --output: skip the cases whose files all exist "
        "and were predicted with the same checkpoints and settings (recorded in --output), predict the "
        "others (replacing the files of a case that has only some); refused when a finished case was "
        "predicted with other checkpoints or settings",
    )
    p.add_argument("--overlap", type=overlap_fraction, default=0.5,
                   help="fraction of each window shared with its neighbour, in [0, 1) "
                   "(default 0.5)")  # fmt: skip
    p.add_argument("--window", type=window_size, nargs="+", action=WindowArgument, default=None,
                   metavar="D H W | whole",
                   help="stitch windows of this size instead of each checkpoint's training patch (multiples "
                   "of its network's downsampling: fewer windows, more context each), or whole: each "
                   "volume in one window, padded up to such a multiple")  # fmt: skip
    p.add_argument("--mode", default="gaussian", choices=("constant", "gaussian"),
                   help="window blending: gaussian weighs a window's centre more (default), constant "
                   "weighs its voxels alike")  # fmt: skip
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="average the predictions of the volume mirrored along each axis (8 passes; on by "
                   "default: +0.02 held-out Dice on real MRI, README)")  # fmt: skip
    p.add_argument("--channel", type=non_negative_int, nargs="+", default=None,
                   help="the channel(s) of multi-channel images to segment, as many as each checkpoint was "
                   "trained on (default: the ones each checkpoint was trained on)")  # fmt: skip
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <name>_probabilities (float32 foreground probability)")  # fmt: skip
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the largest connected component (one gland; on by default)")  # fmt: skip
    p.add_argument(
        "--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: cuda if any)"
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms (warn-only), untimed kernel tiles, windows summed in "
        "batch order: a rerun on the same GPU model repeats the probabilities bit for bit",
    )
    p.add_argument("--keep-voxel-size", action="store_true",
                   help="a checkpoint trained without --spacing sees every input on its own grid, even one "
                   "whose voxels are over 1.25x outside the sizes it was trained on (warned); by default "
                   "such an input is resampled into that range, the result back onto its grid")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help=CHANNELS_LAST_HELP)
    p.add_argument("--no-progress", action="store_true", help="no bar over each case's windows or slices")
    p.set_defaults(run=_predict)

    p = sub.add_parser(
        "evaluate",
        help="PROMISE12 measures of predictions against references",
        description="PROMISE12 measures of predictions against references: Dice, HD95 (the larger of the two "
        "directed 95th percentiles of surface distances, mm), ABD (mm), RVD (%), on the whole gland and its "
        "apex and base thirds. Every reference is scored: a missing, unreadable or empty prediction scores "
        "Dice 0 and the volume's diagonal as its distances.",
    )
    p.add_argument("--pred", type=Path, required=True, help="a mask file or a directory of them")
    p.add_argument("--ref", type=Path, required=True, help="a mask file or a directory of them")
    p.add_argument("--label", type=int, nargs="+", default=None,
                   help="reference label to score (e.g. 5; several are joined: 1 2); required when a "
                   "reference holds several")  # fmt: skip
    p.add_argument("--images", type=Path, default=None, help="where the images are, for overlays")
    p.add_argument("--out", type=Path, default=None, help="CSV and overlays (default: the --pred directory)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier evaluation (evaluation.csv, <case>_overlay.png)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 even when references have no prediction (they still score as failures)",
    )
    p.set_defaults(run=_evaluate)

    p = sub.add_parser(
        "export",
        help="write a checkpoint's network as a torch.export program (.pt2) that runs without this library",
        description="Write a checkpoint's network as a torch.export program: plain PyTorch operators (the "
        "same math as the fused kernels), run by torch.export.load(PATH).module() with no prostate_kernels "
        "installed. Input: windows of the checkpoint's patch (N, C, D, H, W), each image channel z-scored; "
        "output: logits. The file's extra file prostate_kernels.json says how to make the windows.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by train")
    p.add_argument("--out", type=Path, required=True,
                   help="the program file to write (such as p3a.pt2); never replaces a file")  # fmt: skip
    p.add_argument("--any-size", action="store_true",
                   help="windows of any size that is a multiple of the network's downsampling (up to "
                   "1024 voxels a side), not only the checkpoint's patch: a whole volume, padded, in one "
                   "call")  # fmt: skip
    p.set_defaults(run=_export)

    p = sub.add_parser("demo", help="phantoms -> train -> predict -> evaluate, into one directory")
    p.add_argument("--out", type=Path, default=Path("demo_out"),
                   help="a new or empty directory for all of it (default demo_out)")  # fmt: skip
    p.add_argument("--model", default="tiramisu3d_tiny", help="network (default tiramisu3d_tiny)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help="training steps (default 480 for tiramisu3d_tiny, else 1000)")  # fmt: skip
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="train and predict channels-last (default: on the CPU only; "
                   "docs/memory-layout.md)")  # fmt: skip
    p.set_defaults(run=_demo)

    p = sub.add_parser(
        "info",
        help="versions, the C++ extension, devices and what each op runs on them; --check runs them",
        description="What this install is made of (for a bug report): the package's and its dependencies' "
        "versions, whether the C++ extension loaded, the backend setting, and per device what each op runs "
        "on. --check runs every layer on small odd shapes on each device (the Triton kernels on a GPU) "
        "against a float64 PyTorch reference; exit status 1 if one disagrees or fails.",
    )
    p.add_argument("--check", action="store_true",
                   help="run each op on each device against the float64 reference (compiles the "
                   "Triton kernels on a GPU: under a minute)")  # fmt: skip
    p.add_argument("--device", type=device_name, nargs="+", default=None,
                   help="the devices to describe and check (default: cpu and every CUDA device)")  # fmt: skip
    p.set_defaults(run=_info)
    return parser


def _phantoms(args) -> int:
    from prostate_kernels.data.phantoms import DEFAULT_SHAPE, write_phantoms
    from prostate_kernels.safe_files import created_directory, require_empty_directory

    with created_directory(args.out, "--out"):  # removed again if nothing could be written into it
        require_empty_directory(args.out, "--out")
        paths = write_phantoms(args.out, args.n, args.seed, tuple(args.shape or DEFAULT_SHAPE))
    print(f"wrote {len(paths)} phantoms to {args.out}")
    return 0


def _train(args) -> int:
    from prostate_kernels.train import TrainConfig, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        patch=tuple(args.patch) if args.patch else None,
        batch=args.batch,
        iters=args.iters,
        loss=args.loss,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        augment=args.augment,
        amp=args.amp,
        val_every=args.val_every,
        val_cases=args.val_cases,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        label=tuple(args.label) if args.label else None,
        channel=tuple(args.channel) if args.channel else None,
        spacing=tuple(args.spacing) if args.spacing else None,
        orientation=args.orientation,
        seed=args.seed,
        deterministic=args.deterministic,
        cuda_graphs=args.cuda_graphs,
        compile=args.compile,
        channels_last=args.channels_last,
        sync_batchnorm=args.sync_batchnorm,
        workers=args.workers,
        progress=not args.no_progress,
    )
    checkpoint = train(config)
    print(f"checkpoint: {checkpoint}")
    return 0


def _predict(args) -> int:
    from prostate_kernels.pipeline import predict_files

    failures = predict_files(
        args.checkpoint,
        args.input,
        args.output,
        overlap=args.overlap,
        mode=args.mode,
        tta=args.tta,
        save_probabilities=args.save_probabilities,
        largest=args.largest_component,
        device=args.device,
        overwrite=args.overwrite,
        deterministic=args.deterministic,
        channels_last=args.channels_last,
        progress=not args.no_progress,
        channel=tuple(args.channel) if args.channel else None,
        window=args.window,
        continue_prediction=args.continue_prediction,
        keep_voxel_size=args.keep_voxel_size,
    )
    return _report(failures)


def _evaluate(args) -> int:
    from prostate_kernels.evaluation import evaluate_files

    failures, missing = evaluate_files(args.pred, args.ref, args.label, args.images, args.out, args.overwrite)
    if missing and not args.allow_missing:
        failures.append(
            f"{len(missing)} reference(s) without a prediction, scored as failures: "
            f"{', '.join(missing)} (--allow-missing to accept)"
        )
    return _report(failures)


def _export(args) -> int:
    from prostate_kernels.export import export_checkpoint

    exported = export_checkpoint(args.checkpoint, args.out, any_size=args.any_size)
    meta = exported.metadata
    shape = "x".join(map(str, meta["input_shape"]))
    sides = ""
    if meta["window_multiple"] is not None:
        names = ", ".join(str(n) for n in meta["input_shape"][2:])
        multiples = ", ".join(map(str, meta["window_multiple"]))
        least = ", ".join(map(str, meta["min_window"]))
        sides = f"; {names} multiples of {multiples} from {least} up to {meta['max_window']}"
    print(f"{exported.path}: {meta['model']}, input {shape} float32 windows (N from 1 to "
          f"{meta['max_batch']}{sides}), output logits; largest difference from the network's logits "
          f"{exported.max_difference:.3g}")  # fmt: skip
    return 0


def _demo(args) -> int:
    from prostate_kernels.demo import run_demo

    return _report(run_demo(args.out, args.model, args.iters, args.channels_last))


def _info(args) -> int:

    from prostate_kernels.environment import devices_here, report_lines

    devices = list(dict.fromkeys(map(_indexed, args.device))) if args.device else devices_here()
    for line in report_lines(devices):
        print(line)
    if not args.check:
        return 0
    from prostate_kernels.self_check import BF16_FLOOR, TOLERANCE, run_checks

    print(
        f"checks against the float64 PyTorch reference (pass: largest relative difference <= {TOLERANCE:g}; "
        f"bf16 autocast: <= 2x eager PyTorch's, or <= {BF16_FLOOR:g}):"
    )

    def show(result) -> None:
        outcome = "pass" if result.passed else "FAIL"
        found = result.failure or f"{result.error:.1e}"
        if result.eager_error is not None:
            found += f" (eager PyTorch: {result.eager_error:.1e})"
        check = result.check if result.precision == "float32" else f"{result.check}, {result.precision}"
        print(f"  {outcome}  {result.device:<7} {result.implementation:<6} {check}: {found} "
              f"({result.seconds:.1f} s)", flush=True)  # fmt: skip

    results = run_checks(devices, show)
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return 1 if failed else 0


def _indexed(name: str):
    """The device `name` names, a CUDA device with its index (cuda is cuda:0 when that is the current
    one), so that a device named twice is described and checked once."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _report(failures: list[str]) -> int:
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return EXIT_USER_ERROR if failures else 0


if __name__ == "__main__":
    sys.exit(main())
