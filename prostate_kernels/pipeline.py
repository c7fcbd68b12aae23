"""`prostate-kernels predict`: the images of a file or directory segmented by trained checkpoints, each
case written whole beside a record of the settings (evaluation.py scores them, demo.py runs it all).

It works case by case: a bad case is recorded (returned as a message) and the others go on.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prostate_kernels.data import (
    ConfigError,
    DataError,
    check_image,
    read_channels,
    write_volume,
)
from prostate_kernels.data.cases import (
    IMAGE_SUFFIXES,
    discover_cases,
    is_image_file,
    passed_over,
    stem,
    suffix,
)
from prostate_kernels.data.dicom import series_directories
from prostate_kernels.data.io import as_channels, channel_count, check_channels
from prostate_kernels.data.orientation import back_onto, reoriented
from prostate_kernels.data.resample import PREDICT_HINT, resample_image, resample_onto
from prostate_kernels.data.sampling import zscore_channels
from prostate_kernels.determinism import deterministic_mode
from prostate_kernels.devices import available_device, memory_bytes
from prostate_kernels.memory_bound import step_memory
from prostate_kernels.models import downsampling
from prostate_kernels.predict import PATCH_WINDOWS_PER_CALL, largest_component, predict_probabilities
from prostate_kernels.prediction_record import (
    RECORD_NAME,
    PredictionRecord,
    PredictionSettings,
    prediction_settings,
)
from prostate_kernels.safe_files import (
    companions,
    created_directory,
    refuse_existing,
    remove_dead_temporaries,
)
from prostate_kernels.trained_model import build_network, load_trained_model, window_shape
from prostate_kernels.trained_spacing import network_spacing, resamples_into_range, spacing_message
from prostate_kernels.windows import WHOLE


def list_images(path: Path) -> list[Path]:
    """An image file itself, or a directory's images (a dataset's cases, else every non-mask image, else
    the DICOM series it is or holds one directory each of)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if not path.is_dir():
        raise DataError(path, "not a regular file or a directory (a pipe, socket or device)")
    try:
        cases = discover_cases(path)
    except DataError:
        files = [p for p in sorted(path.iterdir()) if is_image_file(p)]
        images = [p for p in files if "_segmentation" not in p.name] or series_directories(path)
        if not images:
            masks = f"; its {len(files)} *_segmentation file(s) are masks, not images" if files else ""
            raise DataError(
                path, f"no images ({', '.join(IMAGE_SUFFIXES)}, DICOM series) found{masks}"
            ) from None
        return images
    unused = passed_over(path, cases)
    if unused:
        print(f"not predicted (not named CaseNN like the {len(cases)} case(s) beside them): "
              f"{', '.join(p.name for p in unused)}; give a file's own path to predict it")  # fmt: skip
    return [case.image for case in cases]


def predict_files(
    checkpoint: Path | list[Path],
    inputs: Path,
    output: Path,
    overlap: float = 0.5,
    mode: str = "gaussian",
    tta: bool = False,
    save_probabilities: bool = False,
    largest: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    deterministic: bool = False,
    channels_last: bool = False,
    progress: bool = False,
    channel: int | Sequence[int] | None = None,
    window: tuple[int, int, int] | str | None = None,
    continue_prediction: bool = False,
    keep_voxel_size: bool = False,
) -> list[str]:
    """Writes <name>_segmentation (and <name>_probabilities) with each input's geometry; returns failures.

    Never writes over an input image or a reference mask; over other existing files only with
    `overwrite` (files of an earlier prediction). Checked for every case before anything is written.
    Several checkpoints (folds): their probabilities are averaged, each model on its own patch.
    deterministic: under determinism.deterministic_mode (the same probabilities on every run).
    channels_last: the networks run channels-last (layout.py; the same probabilities up to rounding).
    progress: a bar per case and model over its windows (3-D networks) or slices (2-D).
    channel: the channel(s) of multi-channel images each network sees, as many as it was trained on;
    None: the ones it was trained on (train --channel; none for single-channel images).
    window: the sliding window, (D, H, W) for every network (each a multiple of its downsampling; a 2-D
    network's D its slices), or WHOLE: each volume in one window (inference_window); None: each
    network's training patch.
    continue_prediction: go on with an interrupted prediction into `output`: a case whose targets all
    exist (each is written whole or not at all) and whose record (prediction_record) names this run's
    checkpoints and settings is skipped; one with only some of its files, or without a record, is
    predicted again and its files replaced; ConfigError, before anything is written, when a finished
    case was predicted with other checkpoints or settings.
    keep_voxel_size: a network trained without --spacing sees every input on its own grid (warned when
    its voxels are far from the training ones); by default such an input is resampled into the recorded
    training range and back (trained_spacing.network_spacing).
    Every case written is recorded in `output`'s prediction_record.RECORD_NAME.
    """
    if continue_prediction and overwrite:
        raise ConfigError("--continue keeps the files of an earlier prediction and --overwrite replaces "
                          "them: pass one of the two")  # fmt: skip
    try:
        dev = available_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "device")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    images = list_images(inputs)
    targets = {path: _targets(path, Path(output), save_probabilities) for path in images}
    _check_targets(targets, Path(inputs), overwrite or continue_prediction)  # inputs, references refused
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    ensemble = [load_trained_model(path, dev, channels_last) for path in checkpoints]
    for path, (model, state) in zip(checkpoints, ensemble, strict=True):
        check_window(window, state, model, path)
    channels = [
        _channels_to_read(channel, state, path)
        for path, (_, state) in zip(checkpoints, ensemble, strict=True)
    ]
    amp = torch.bfloat16 if dev.type == "cuda" else None
    record = PredictionRecord(Path(output))
    into_range = not keep_voxel_size and any(resamples_into_range(state) for _, state in ensemble)
    settings = prediction_settings(checkpoints, window, overlap, mode, tta, largest, channels, into_range)
    done = _already_predicted(images, targets, record, settings, output) if continue_prediction else []
    failures = []
    with created_directory(output, "--output"), deterministic_mode(deterministic):  # removed if none written
        remove_dead_temporaries(Path(output))
        replace = overwrite or continue_prediction  # else a file that appeared meanwhile fails its case
        for path in (image for image in images if image not in done):
            failed = _predict_case(path, ensemble, channels, targets[path], dev, overlap, mode, tta, largest,
                                   amp, progress, window, replace, keep_voxel_size)  # fmt: skip
            if not failed:
                record.add(targets[path][0].name, settings)
            failures += failed
    return failures


def _already_predicted(
    images: list[Path],
    targets: dict[Path, tuple[Path, Path | None]],
    record: PredictionRecord,
    settings: PredictionSettings,
    output: Path,
) -> list[Path]:
    """--continue's finished cases: all their files exist and the record names this run's settings.
    ConfigError when a finished case was predicted with other settings (nothing is written then)."""
    finished = [path for path in images if _predicted(targets[path])]
    names = {path: targets[path][0].name for path in finished}
    recorded = [path for path in finished if record.digest_of(names[path]) is not None]
    other = [path for path in recorded if record.digest_of(names[path]) != settings.digest]
    if other:
        first = names[other[0]]
        more = f" and {len(other) - 1} more" if len(other) > 1 else ""
        raise ConfigError(f"--continue: {first}{more} in {output} were predicted with other settings "
                          f"({'; '.join(record.differences(first, settings))}): continue with the same "
                          "checkpoints and settings, or predict into a new --output")  # fmt: skip
    unrecorded = len(finished) - len(recorded)
    if unrecorded:
        print(f"--continue: {unrecorded} finished case(s) in {output} have no record of the settings that "
              f"predicted them ({RECORD_NAME}): predicted again")  # fmt: skip
    if recorded:
        print(f"--continue: {len(recorded)} of {len(images)} case(s) already predicted in {output}, skipped")
    return recorded


def check_window(window: tuple[int, int, int] | str | None, state: dict, model, checkpoint: Path) -> None:
    """ConfigError unless `window` (predict's --window) is None, WHOLE, or sizes the checkpoint's network
    takes: multiples of its downsampling, and for a 2-D network a depth of its slices."""
    if window is None or window == WHOLE:
        return
    asked = f"--window {window if isinstance(window, str) else ' '.join(map(str, window))}"
    if isinstance(window, str) or len(window) != 3 or not all(isinstance(w, int) and w >= 1 for w in window):
        raise ConfigError(f"{asked}: give 3 sizes D H W >= 1, or {WHOLE}")
    slices = state.get("slices", 0)
    if slices and window[0] != slices:
        raise ConfigError(f"{asked}: {checkpoint}'s {state['model']} reads stacks of {slices} slices: "
                          f"its window's depth must be {slices}")  # fmt: skip
    factors = downsampling(model)
    if any(w % f for w, f in zip(window, factors, strict=True)):
        raise ConfigError(f"{asked} must be a multiple of {factors} for {checkpoint}'s {state['model']} "
                          "(its total downsampling)")  # fmt: skip


def inference_window(
    state: dict, model, window: tuple[int, int, int] | str | None, shape: tuple[int, ...]
) -> tuple[int, int, int]:
    """The (D, H, W) window a network is stitched with on a volume of `shape` (D, H, W), on the grid the
    network sees: its training patch (window None), the window given (checked by check_window), or for
    WHOLE the volume's own size rounded up to multiples of its downsampling (a 2-D network: its slices
    deep), so that one window holds the whole volume (padded: sliding_window_inference pads a volume
    smaller than its window, half before and half after, and crops the result back)."""
    if window is None:
        return tuple(state["patch"])
    if not isinstance(window, str):
        d, h, w = window  # a list from the command line
        return d, h, w
    if window != WHOLE:
        raise ValueError(f"window {window!r}: the one named window is {WHOLE!r}")
    d, h, w = (-(-size // f) * f for size, f in zip(shape, downsampling(model), strict=True))
    slices = state.get("slices", 0)
    return (slices, h, w) if slices else (d, h, w)


def windows_per_call(state: dict, roi: tuple[int, int, int]) -> int:
    """Windows per network call (sw_batch_size) for windows of `roi`: PATCH_WINDOWS_PER_CALL of the
    checkpoint's training patch, fewer of a larger window (at least one), more of a smaller one, so that
    a call holds the voxels of the default windows' calls, and their memory (a whole-volume window and its
    mirror images, which share calls, would otherwise run four at a time)."""
    return max(1, PATCH_WINDOWS_PER_CALL * math.prod(state["patch"]) // math.prod(roi))


_CALL_PEAKS: dict[tuple, int] = {}  # (model, its kwargs, one call's input shape): bytes held at once


def _check_call_fits(state: dict, roi: tuple[int, int, int], per_call: int, image: Path) -> None:
    """On the CPU, DataError naming the image when one network call (per_call windows of roi) holds more
    than the machine's memory at once: memory_bound.step_memory of the network's forward on the meta
    device (no values; cached per shape), a lower bound on what the CPU holds. The host's out-of-memory
    killer ended predict with no message (--window whole of Tiramisu 3D p3a on a 48x512x512 volume holds
    98 GiB at once); on a GPU the out-of-memory error is caught and reported in one line."""
    shape = (per_call, *window_shape(state, roi)[1:])
    key = (state["model"], repr(state.get("model_kwargs", {})), shape)
    if key not in _CALL_PEAKS:
        with torch.device("meta"), torch.no_grad():
            network = build_network(state, image).eval()
            _CALL_PEAKS[key] = step_memory(network, torch.empty(shape)).peak
    need, total = _CALL_PEAKS[key], memory_bytes(torch.device("cpu"))
    if total is not None and need > total:
        raise DataError(image, f"one network call of {state['model']} on a {'x'.join(map(str, roi))} window "
                               f"holds {need / 2**30:.3g} GiB at once, more than the {total / 2**30:.3g} GiB "
                               "of memory of cpu: choose a smaller --window")  # fmt: skip


def _channels_to_read(channel: int | Sequence[int] | None, state: dict, checkpoint: Path) -> tuple | None:
    """The channels of each image that the checkpoint's network sees: predict's --channel, else the ones
    it was trained on (None: a single-channel image). ConfigError when --channel names another count, or
    a channel twice."""
    if channel is None:
        return as_channels(state.get("channel"))
    asked, trained = as_channels(channel), as_channels(state.get("channel"))
    check_channels(asked)
    count = channel_count(trained)
    if len(asked) != count:
        how = f"--channel {' '.join(map(str, trained))}" if trained else "a single-channel image"
        raise ConfigError(f"--channel {' '.join(map(str, asked))} names {len(asked)} channel(s), but "
                          f"{checkpoint} was trained on {count} ({how}): name {count}")  # fmt: skip
    return asked


def _predict_case(
    path, ensemble, channels, targets, dev, overlap, mode, tta, largest, amp, progress, window, replace: bool,
    keep_voxel_size: bool,
) -> list[str]:  # fmt: skip
    """Segments one image into its targets (segmentation path, probabilities path or None), each network
    of the ensemble on its channels of it (`channels`: a tuple or None per network); returns [] or [the
    case's failure]. replace=False: a target that another run wrote since _check_targets looked is the
    case's failure, left as it is. What the networks say of its voxel size goes to stderr, each line once."""
    try:
        start = time.time()
        seen = {}  # channels: those channels of the image (3-D Volumes), read and checked once
        for read in channels:
            if read not in seen:
                seen[read] = read_channels(path, read)
                for volume in seen[read]:
                    check_image(volume)
        image = seen[channels[0]][0]  # the channels share the image's 3-D grid
        probs, said = [], []  # said: each network's message on the voxel size, or None
        for (model, state), read in zip(ensemble, channels, strict=True):
            prob, message = _model_probabilities(model, state, seen[read], dev, overlap, mode, tta, amp,
                                                 progress, window, keep_voxel_size)  # fmt: skip
            probs.append(prob)
            said.append(message)
        for note in dict.fromkeys(s for s in said if s):  # an ensemble's networks trained alike say it once
            print(f"{path.name}: {note}", file=sys.stderr)
        prob = np.stack(probs).mean(axis=0, dtype=np.float32)
        mask = (prob > 0.5).astype(np.uint8)
        if largest:
            mask = largest_component(mask)
        segmentation, probabilities = targets
        write_volume(image.like(mask), segmentation, replace)
        if probabilities is not None:
            write_volume(image.like(prob.astype(np.float32)), probabilities, replace)
        print(f"{path.name}: {int(mask.sum())} voxels segmented in {time.time() - start:.1f} s")
    except DataError as exc:
        return [str(exc)]
    return []


def _model_probabilities(
    model, state: dict, images, device, overlap, mode, tta, amp, progress, window=None,
    keep_voxel_size: bool = False,
) -> tuple[np.ndarray, str | None]:  # fmt: skip
    """Probabilities on the images' own grid (`images`: the network's channels, 3-D Volumes on one grid);
    a model trained in an orientation sees them reoriented to it (axes permuted and flipped), then
    resampled to the voxel size trained_spacing.network_spacing gives (its --spacing, or for voxels far
    outside its training range the range's nearest end); its probabilities go back the same way
    (resampled linearly, then reoriented exactly) onto the images' own grid. window: as predict_files'.
    Returns (probabilities, trained_spacing.spacing_message: what to say of the voxel size, or None)."""
    oriented = [reoriented(image, state.get("orientation")) for image in images]
    own = oriented[0].spacing_zyx
    spacing = network_spacing(own, state, keep_voxel_size)
    grids = [resample_image(image, spacing, PREDICT_HINT) for image in oriented] if spacing else oriented
    slices = int(state.get("slices", 0))
    channels = zscore_channels(np.stack([grid.array for grid in grids]))  # (C, D, H, W)
    roi = inference_window(state, model, window, channels.shape[1:])
    per_call = windows_per_call(state, roi)
    if device.type == "cpu":
        _check_call_fits(state, roi, per_call, images[0].path)
    prob = predict_probabilities(model, channels, roi, slices, device, overlap, mode, tta, per_call, amp,
                                 progress)  # fmt: skip
    if spacing is not None:
        prob = resample_onto(grids[0].like(prob), oriented[0])
    if oriented[0] is not images[0]:
        prob = back_onto(oriented[0].like(prob), images[0])
    return prob, spacing_message(own, state, keep_voxel_size)


def _targets(image: Path, output: Path, save_probabilities: bool) -> tuple[Path, Path | None]:
    """(<name>_segmentation, <name>_probabilities or None) in `output`, in the image's format; a DICOM
    series' directory gives <its name>_segmentation.nii.gz."""
    name, ext = stem(image), (suffix(image) if not image.is_dir() else ".nii.gz")
    probabilities = output / f"{name}_probabilities{ext}" if save_probabilities else None
    return output / f"{name}_segmentation{ext}", probabilities


def _predicted(targets: tuple[Path, Path | None]) -> bool:
    """Whether a case's targets all exist (a MetaImage header is written after its voxel file)."""
    return all(target.exists() for target in targets if target is not None)


def _check_targets(targets: dict[Path, tuple[Path, Path | None]], inputs: Path, overwrite: bool) -> None:
    """DataError before anything is written: two inputs writing one file, a target that is an input or
    a reference, an existing target (unless `overwrite`)."""
    protected = {p.resolve() for p in targets}
    if inputs.is_dir():
        with contextlib.suppress(DataError):
            protected |= {c.label.resolve() for c in discover_cases(inputs) if c.label is not None}
    files = [f for pair in targets.values() for t in pair if t is not None for f in companions(t)]
    seen = set()
    for file in files:
        key = file.resolve()
        if key in protected and file.exists():
            raise DataError(file, "is an input image or a reference mask: predict never writes over it; "
                                  "choose another --output directory")  # fmt: skip
        if key in seen:
            raise DataError(
                file, "two inputs would write this same file; predict them into separate --output"
            )
        seen.add(key)
    if not overwrite:
        refuse_existing(files, "predict never replaces existing files: choose a new --output directory, "
                               "or pass --overwrite to replace an earlier prediction")  # fmt: skip
