# Every target sets up .venv itself first (fresh machine: nothing to install by hand).
#   make demo    the main job: phantoms -> train -> predict -> PROMISE12 evaluation into demo_out/
#                (MODEL=name picks another network, e.g. on a GPU: make demo MODEL=tiramisu3d_p3a)
#   make test    ruff + the test suite (Triton kernels run through the interpreter on CPU-only machines)
#   make bench   the benchmarks this machine can run, results under bench/results/
#   make real    accuracy on real MRI: train on 40 cases of ../shared/data/real/mrus-prostate, score the
#                other 10 -> bench/results/<date>-real-<device>.md (skips when ../shared is absent)
#   make gpu-compile  every Triton kernel x autotune config x dot path compiled for sm_90a and sm_80 (no GPU
#                needed): registers, spills, shared memory -> bench/results/<date>-compile-report.md
#   make test-gpu-versions  the suite on the GPU machine's Python 3.12 and torch 2.11.0, on this CPU (its
#                own venv, .venv-gpu-versions)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check

# A CUDA build of torch already installed for $(PYTHON) is kept as it is: the venv then sees the system
# packages and none of the CPU pins (torch, triton, numpy) are installed over it.
CUDA_TORCH := $(shell $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo yes)
SOURCES    := $(shell find prostate_kernels models csrc -name '*.py' -o -name '*.cpp' -o -name '*.h') setup.py pyproject.toml

.PHONY: setup demo test test-gpu-versions lint compile-gate gpu-compile bench real clean

setup: $(VENV)/.installed

$(VENV)/.deps: requirements/cpu.txt requirements/dev.txt
ifeq ($(CUDA_TORCH),yes)
	@echo "CUDA torch found for $(PYTHON): keeping it (venv with system site packages)"
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -r requirements/dev.txt
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/cpu.txt -r requirements/dev.txt
endif
	touch $@

# The package (and its C++ extension) is rebuilt only when a source changed.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps .
	touch $@

# The demo writes only into a new or empty directory; demo_out/ of an earlier `make demo` (it holds the
# demo's marker file) is replaced, any other demo_out/ is refused by the command itself.
demo: setup
	@if [ -f demo_out/.prostate-kernels-demo ]; then echo "replacing demo_out/ (an earlier make demo's output)"; rm -rf demo_out; fi
	$(VENV)/bin/prostate-kernels demo --out demo_out $(if $(MODEL),--model $(MODEL))

# mypy reads the package's source (pyproject.toml's [tool.mypy]); the installed copy stands in for
# prostate_kernels.models, whose source lives in models/.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# bin/pytest, not `python -m pytest`: the current directory stays off sys.path, so the tests import the
# installed package (with its compiled _C), not the source tree.
# The compile gate: each kernel x dot path at its default config, compiled for sm_90a by Triton's own
# compiler (the interpreter never compiles); fails on a compile error, a register spill or a shared
# memory overrun. It must not run under TRITON_INTERPRET.
compile-gate: setup
	env -u TRITON_INTERPRET $(PY) tools/gpu_compile.py --quick --strict

# The suite on TEST_WORKERS processes (pytest-xdist): 2 on the 2-core CI machine, where the interpreted
# kernels keep each process busy (1.47x faster than one process, measured). `make test TEST_WORKERS=0` runs
# it in one process, `TEST_WORKERS=auto` on one per core (each holds its own torch: mind the memory).
TEST_WORKERS ?= 2
test: lint compile-gate
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS)

# The suite again on the lent GPU machine's Python and torch (Python 3.12, torch 2.11.0, triton 3.6.0), on
# this CPU, in a venv of its own: what breaks only on those versions is found before device time is spent.
# Not part of `make test` (a 5 GB CUDA build of torch, and the suite's 25 minutes again).
# GPU_PYTHON: pyenv's 3.12 where there is one (its python3.12 shim answers only inside that version)
GPU_PYTHON   ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_VERSIONS := .venv-gpu-versions
test-gpu-versions:
	@$(GPU_PYTHON) -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null || { echo "GPU_PYTHON=$(GPU_PYTHON) is not a Python 3.12: make test-gpu-versions GPU_PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(GPU_VERSIONS)/bin/python || $(GPU_PYTHON) -m venv $(GPU_VERSIONS)
	$(GPU_VERSIONS)/bin/python -m pip -q --disable-pip-version-check install -r requirements/gpu-versions.txt -r requirements/dev.txt
	$(GPU_VERSIONS)/bin/python -m pip -q --disable-pip-version-check install --no-build-isolation --no-deps .
	TRITON_INTERPRET=1 $(GPU_VERSIONS)/bin/pytest -q -n $(TEST_WORKERS)

real: setup
	$(PY) bench/real_data.py

gpu-compile: setup
	env -u TRITON_INTERPRET $(PY) tools/gpu_compile.py --out bench/results

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build *.egg-info $(VENV) $(GPU_VERSIONS) demo_out .pytest_cache .ruff_cache .mypy_cache
