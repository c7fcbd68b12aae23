"""The installed package: cheap import, the C++ extension and its fallback, backend selection."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import prostate_kernels
from prostate_kernels import backend


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,  # not the source tree: `-c` puts the cwd first on sys.path
        env=full_env,
        timeout=120,
    )


def test_extension_is_built():
    """CI builds _C; a silently failed build would otherwise pass every test on the fallback path."""
    if os.environ.get("PROSTATE_KERNELS_NO_EXT") == "1":
        pytest.skip("built without the extension on purpose")
    from prostate_kernels._ext import LOAD_ERROR

    assert prostate_kernels.HAS_EXT, f"prostate_kernels._C did not load: {LOAD_ERROR}"


def test_import_is_cheap():
    result = run_python(
        """
        import sys
        import torch
        before = set(sys.modules)
        import prostate_kernels
        added = {m.split(".")[0] for m in set(sys.modules) - before}
        print(",".join(sorted(added & {"triton", "SimpleITK", "monai", "matplotlib", "tqdm", "numpy"})))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import prostate_kernels imported {result.stdout.strip()}"


def test_missing_extension_falls_back_with_one_warning():
    result = run_python(
        """
        import sys, warnings
        sys.modules["prostate_kernels._C"] = None  # as if _C were not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import prostate_kernels
            import prostate_kernels.inference
        import torch
        ours = [w for w in caught if "prostate_kernels._C" in str(w.message)]
        print(prostate_kernels.HAS_EXT, len(ours))
        x = torch.randn(1, 1, 6, 9, 9)
        out = prostate_kernels.sliding_window_inference(x, (4, 6, 6), 2, lambda w: w)
        print(float((out - x).abs().max()))
        """
    )
    assert result.returncode == 0, result.stderr
    has_ext, warnings_seen, error = result.stdout.split()
    assert has_ext == "False" and warnings_seen == "1"
    assert float(error) < 1e-6


def test_a_source_checkout_shadowing_the_installed_package_is_named_in_the_warning():
    """From the repository's root, `python -c` imports the source tree (no compiled _C there) and the
    warning quoted Python's "partially initialized module ... circular import", which misled."""
    root = Path(__file__).resolve().parents[1]
    if any((root / "prostate_kernels").glob("_C.*")):
        pytest.skip("this checkout has _C built in place (an editable install)")
    result = subprocess.run([sys.executable, "-W", "always", "-c", "import prostate_kernels._ext"],
                            capture_output=True, text=True, cwd=root, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"(no compiled _C in {root / 'prostate_kernels'})" in result.stderr, result.stderr
    assert "run from another directory to use the installed package" in result.stderr
    assert "circular import" not in result.stderr


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="'cuda'"):
        prostate_kernels.set_backend("cuda")


def test_use_backend_restores_after_an_exception():
    before = prostate_kernels.get_backend()
    with pytest.raises(RuntimeError, match="inside"):
        with prostate_kernels.use_backend("torch"):
            assert prostate_kernels.get_backend() == "torch"
            raise RuntimeError("inside")
    assert prostate_kernels.get_backend() == before


def test_auto_backend_resolution():
    with prostate_kernels.use_backend("auto"):
        assert backend.resolve(torch.device("cuda")) == "triton"
        assert backend.resolve(torch.device("cpu"), has_cpu_extension=True) == "cpp"
        assert backend.resolve(torch.device("cpu"), has_cpu_extension=False) == "torch"
    with prostate_kernels.use_backend("torch"):
        assert backend.resolve(torch.device("cuda")) == "torch"


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    result = run_python(
        """
        import torch, prostate_kernels
        with prostate_kernels.use_backend("triton"):
            try:
                prostate_kernels.sliding_window_inference(torch.zeros(1, 1, 4, 4, 4), 4, 1, lambda w: w)
            except RuntimeError as e:
                print("RuntimeError:", e)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout


def test_a_users_type_checker_reads_the_public_api_hints(tmp_path):
    """The package ships py.typed (PEP 561): mypy checks a user's calls against our signatures, where
    without it every import is an untyped module and any call passes."""
    pytest.importorskip("mypy")
    user = tmp_path / "user_code.py"
    user.write_text(
        textwrap.dedent("""
        import torch
        from prostate_kernels import sliding_window_inference
        from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d

        layer = BNReLUConv3d(16, 32, kernel_size=3)
        block = DenseBlock3d(48, 16, 4)
        x = torch.zeros(1, 16, 8, 8, 8)
        y: torch.Tensor = layer(x)
        probs: torch.Tensor = sliding_window_inference(x, (8, 8, 8), 4, layer, overlap=0.5)
        channels: int = block.out_channels
        wrong = sliding_window_inference(x, (8, 8, 8), 4, layer, overlap="half")
    """)
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull, str(user)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, result.stdout  # nothing about missing stubs or untyped imports
    assert 'user_code.py:12: error: Argument "overlap"' in errors[0] and "str" in errors[0], errors[0]
