"""Loads the optional C++ extension prostate_kernels._C.

HAS_EXT tells whether it loaded. When it did not (not compiled, or built against another torch), the
package still imports and every op runs on its pure-PyTorch twin; one warning says so, once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

_C: ModuleType | None
LOAD_ERROR: str | None

try:
    import torch  # noqa: F401  (libtorch must be loaded before _C)

    from prostate_kernels import _C  # type: ignore[attr-defined,no-redef]

    LOAD_ERROR = None
except ImportError as exc:  # also covers undefined-symbol errors from a torch version mismatch
    _C = None
    _here = Path(__file__).resolve().parent
    if any(_here.glob("_C.*")):  # built, but does not load (another torch's ABI, a missing library)
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        _fix = "Rebuild with `pip install --no-build-isolation .` against the installed torch."
    else:  # never built here: often a source checkout shadowing the installed package
        LOAD_ERROR = f"no compiled _C in {_here}"
        _fix = (
            "If that is a source checkout found first on sys.path (`python -m` and `python -c` put the "
            "current directory there), run from another directory to use the installed package; else "
            "install with `pip install --no-build-isolation .` against the installed torch."
        )
    warnings.warn(
        "prostate_kernels: the C++ extension prostate_kernels._C is not available "
        f"({LOAD_ERROR}); using the pure-PyTorch path, which is slower for sliding-window inference. {_fix}",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXT: bool = _C is not None
