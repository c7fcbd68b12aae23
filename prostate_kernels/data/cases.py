"""Finding cases in a dataset directory: PROMISE12 naming or the Medical Decathlon layout."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prostate_kernels.data.errors import DataError

IMAGE_SUFFIXES = (".mhd", ".nii.gz", ".nii", ".nrrd", ".mha")
_PROMISE_IMAGE = re.compile(r"^(Case\d+)(\.mhd|\.nii\.gz|\.nii|\.nrrd|\.mha)$", re.IGNORECASE)


@dataclass(frozen=True)
class Case:
    name: str  # e.g. "Case07"
    image: Path
    label: Path | None  # None when the dataset has no reference for this case


def stem(path: Path) -> str:
    """File name without its image suffix (.nii.gz counts as one)."""
    for suffix in IMAGE_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def is_image_file(path: Path) -> bool:
    """A file whose name ends in one of IMAGE_SUFFIXES (case-insensitive)."""
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def suffix(path: Path) -> str:
    for s in IMAGE_SUFFIXES:
        if path.name.lower().endswith(s):
            return path.name[-len(s) :]
    return path.suffix


def discover_cases(directory: str | Path, require_labels: bool = False) -> list[Case]:
    """Cases of `directory`, sorted by name.

    PROMISE12: CaseNN.mhd with CaseNN_segmentation.mhd (other image suffixes too). Decathlon:
    imagesTr/<name>.nii.gz with labelsTr/<name>.nii.gz (and imagesTs/ without labels).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, "not a directory")
    cases = _decathlon(directory) if (directory / "imagesTr").is_dir() else _promise12(directory)
    if not cases:
        raise DataError(
            directory,
            "no cases found (expected CaseNN.mhd with CaseNN_segmentation.mhd, or imagesTr/ with labelsTr/)",
        )
    if require_labels:
        missing = [c.name for c in cases if c.label is None]
        if missing:
            raise DataError(directory, f"no reference segmentation for {', '.join(missing)}")
    return cases


def passed_over(directory: str | Path, cases: list[Case]) -> list[Path]:
    """Image files directly in a PROMISE12-style `directory` that are neither one of `cases`' images nor
    its reference: files not named CaseNN (Patient7.mhd, Case50b.nii.gz), which discover_cases leaves
    out. train and predict name them; they went unused without a word, with status 0. Empty for the
    Decathlon layout (its cases are every image of imagesTr/ and imagesTs/)."""
    directory = Path(directory)
    if (directory / "imagesTr").is_dir():
        return []
    known = {c.image.resolve() for c in cases} | {c.label.resolve() for c in cases if c.label is not None}
    return [p for p in sorted(directory.iterdir()) if is_image_file(p) and p.resolve() not in known]


def _promise12(directory: Path) -> list[Case]:
    cases = []
    for path in sorted(directory.iterdir()):
        match = _PROMISE_IMAGE.match(path.name)
        if not match:
            continue
        name, ext = match.group(1), match.group(2)
        label = directory / f"{name}_segmentation{ext}"
        cases.append(Case(name, path, label if label.exists() else None))
    return cases


def _decathlon(directory: Path) -> list[Case]:
    cases = []
    for split, labels in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = directory / split
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES):
                continue
            label = directory / labels / path.name if labels else None
            cases.append(Case(stem(path), path, label if label is not None and label.exists() else None))
    return cases
