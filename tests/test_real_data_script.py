"""bench/real_data.py (`make real`): the fixed split, data read in place, the skip without data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_data  # noqa: E402

from prostate_kernels.data import Volume, write_volume  # noqa: E402

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _decathlon(folder: Path, n: int) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for i in reversed(range(n)):  # written out of order: the split must sort by name
        image = np.full((4, 5, 6), i, dtype=np.uint8)
        image[..., 3:] += 1  # not constant: an image of one value has nothing to learn (and is refused)
        mask = np.zeros((4, 5, 6), dtype=np.uint8)
        mask[1:3, 1:4, 2:5] = 1
        write_volume(
            Volume(image, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), IDENTITY),
            folder / "imagesTr" / f"obs{i:03d}.nii.gz",
        )
        write_volume(
            Volume(mask, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), IDENTITY),
            folder / "labelsTr" / f"obs{i:03d}.nii.gz",
        )
    return folder


def test_split_is_the_first_40_by_name_and_the_sets_link_to_the_data(tmp_path):
    data = _decathlon(tmp_path / "data", 50)
    train, held_out = real_data.split(data)
    assert [c.name for c in train] == [f"obs{i:03d}" for i in range(40)]
    assert [c.name for c in held_out] == [f"obs{i:03d}" for i in range(40, 50)]
    linked = real_data.link_dataset(held_out, tmp_path / "held_out")
    images = sorted((linked / "imagesTr").iterdir())
    assert len(images) == 10 and all(p.is_symlink() for p in images)  # read in place, never copied
    assert images[0].resolve() == (data / "imagesTr" / "obs040.nii.gz").resolve()


def test_a_dataset_of_another_size_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="expected 50 cases"):
        real_data.split(_decathlon(tmp_path / "data", 12))


def test_without_the_data_it_skips_with_a_message(tmp_path, capsys):
    assert real_data.main(["--data", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "out")]) == 0
    assert "skipped: no real data" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
