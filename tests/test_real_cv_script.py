"""bench/real_cv.py (GPU cross-validation): the folds, the packed cases, and `train(arrays=...)`, the
library entry it trains through (cases in memory, no files read)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_real_data_script import _decathlon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_cv  # noqa: E402

from prostate_kernels.checkpoint import load_checkpoint  # noqa: E402
from prostate_kernels.data import DataError  # noqa: E402
from prostate_kernels.data.phantoms import make_phantom  # noqa: E402
from prostate_kernels.train import TrainConfig, train  # noqa: E402


def test_folds_are_five_blocks_of_ten_consecutive_cases():
    folds = [real_cv.fold_of(i) for i in range(real_cv.N_CASES)]
    assert folds == [k for k in range(5) for _ in range(10)]


def test_pack_holds_every_case_by_name_resampled_to_the_training_spacing(tmp_path):
    data = _decathlon(tmp_path / "data", 50)  # 4x5x6 voxels at 1.5 mm, written out of order
    real_cv.pack(data, tmp_path / "pack.npz")
    names, images, masks = real_cv.load_pack(tmp_path / "pack.npz")
    assert names == [f"obs{i:03d}" for i in range(50)]
    assert images[7].dtype == np.float32 and masks[7].dtype == np.uint8
    assert (
        images[7].shape == masks[7].shape == (2, 2, 3)
    )  # 4x5x6 voxels of 1.5 mm at 3 mm (resample_to_spacing)
    assert 7.0 <= images[7].min() < images[7].max() <= 8.0  # case 7 holds the values 7 and 8
    assert set(np.unique(masks[7])) <= {0, 1}
    before = (tmp_path / "pack.npz").read_bytes()
    with pytest.raises(DataError, match="exists already"):  # never written over
        real_cv.pack(data, tmp_path / "pack.npz")
    assert (tmp_path / "pack.npz").read_bytes() == before


def test_train_on_arrays_reads_no_files(tmp_path):
    cases = []
    for seed in range(3):
        phantom = make_phantom(seed, (16, 32, 32))
        cases.append((f"case{seed}", phantom.image.array, phantom.mask.array))
    settings = dict(model="tiramisu3d_tiny", patch=(8, 32, 32), batch=2, iters=2, val_every=1, val_cases=1)
    config = TrainConfig(data=tmp_path / "no-such-folder", out=tmp_path / "run", progress=False, **settings)
    checkpoint = train(config, log=lambda *a: None, arrays=cases)
    state = load_checkpoint(checkpoint)
    assert state["iteration"] == 2 and not (tmp_path / "no-such-folder").exists()
    assert (tmp_path / "run" / "best.pt").exists()  # the last array was held out and validated
