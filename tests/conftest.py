"""Test set-up: Triton kernels run through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before Triton is first imported, hence here, at collection time.
Every test that changes the kernel backend does it through `use_backend` (restored afterwards).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from prostate_kernels import get_backend  # noqa: E402


@pytest.fixture(autouse=True)
def _backend_is_restored():
    """Fails a test that leaves the process-wide backend changed."""
    before = get_backend()
    yield
    assert get_backend() == before, f"test left the backend at {get_backend()!r} (was {before!r})"


@pytest.fixture(autouse=True)
def _locale_is_restored():
    """Fails a test that leaves the process's locale changed (GDCM's DICOM writer set it to "C": every
    later test then read subprocess output and torch.compile's templates as ASCII, and 13 failed)."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    yield
    assert locale.setlocale(locale.LC_ALL) == before, (
        f"test left the locale at {locale.setlocale(locale.LC_ALL)!r}"
    )


@pytest.fixture(autouse=True)
def _deterministic_mode_is_restored():
    """Fails a test that leaves torch's deterministic-algorithms mode or cuDNN's benchmark changed."""
    import torch

    def settings():
        flags = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        return (*flags, torch.backends.cudnn.benchmark)

    before = settings()
    yield
    assert settings() == before, f"test left (deterministic, warn_only, cudnn.benchmark) at {settings()}"
