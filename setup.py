"""Build of prostate_kernels and its optional C++ extension prostate_kernels._C.

_C is compiled from csrc/ against the installed torch (pybind11 bindings, C++17, -O3, OpenMP), so
install with `pip install --no-build-isolation .`. The extension is optional: if it fails to compile,
the package installs anyway and runs on its pure-PyTorch path (prostate_kernels._ext.HAS_EXT is False).
Set PROSTATE_KERNELS_NO_EXT=1 to skip it on purpose.

The GPU side of every op is written in Triton (prostate_kernels/ops/), compiled at run time, so no
CUDA compilation happens here even when the installed torch has CUDA.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
PACKAGES = [
    "prostate_kernels",
    "prostate_kernels.ops",
    "prostate_kernels.nn",
    "prostate_kernels.swap",
    "prostate_kernels.data",
    "prostate_kernels.models",
]
PACKAGE_DIR = {"prostate_kernels.models": "models"}


def _extension_build():
    """(ext_modules, cmdclass) for _C, or empty ones when the extension is skipped."""
    if os.environ.get("PROSTATE_KERNELS_NO_EXT") == "1":
        print("prostate_kernels: PROSTATE_KERNELS_NO_EXT=1, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "prostate_kernels: torch is not importable at build time (use --no-build-isolation); "
            "building without the C++ extension",
            file=sys.stderr,
        )
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    ext = CppExtension(
        name="prostate_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=["-O3", "-g0", "-std=c++17", "-fopenmp", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
        optional=True,  # a compile failure warns and installs the pure-PyTorch package
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extension_build()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"prostate_kernels": ["py.typed"]},  # PEP 561: type checkers read our hints
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
