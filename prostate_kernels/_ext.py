"""Loads the optional C++ extension prostate_kernels._C.

HAS_EXT tells whether it loaded. When it did not (not compiled, or built against another torch), the
package still imports and every op runs on its pure-PyTorch twin; one warning says so, once.
"""

from __future__ import annotations

import warnings
from types import ModuleType

_C: ModuleType | None
LOAD_ERROR: str | None

try:
    import torch  # noqa: F401  (libtorch must be loaded before _C)

    from prostate_kernels import _C  # type: ignore[attr-defined,no-redef]

    LOAD_ERROR = None
except ImportError as exc:  # also covers undefined-symbol errors from a torch version mismatch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "prostate_kernels: the C++ extension prostate_kernels._C is not available "
        f"({LOAD_ERROR}); using the pure-PyTorch path, which is slower for sliding-window inference. "
        "Rebuild with `pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXT: bool = _C is not None
