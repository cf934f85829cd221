# Two commands do everything on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch goes in first, pinned: where pip can find the CPU build (this project's machines have it in
# a local wheel folder) it takes that; a bare `torch` requirement would pull the newest CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup setup-dev demo test bench dist gpu-check clean

# The runtime only (what `reluscope analyze` needs): enough for the demo.
$(BIN)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The runtime plus what the tests need (the dev extra: test tools and every optional extra).
$(BIN)/.dev: $(BIN)/.runtime
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.runtime
setup-dev: $(BIN)/.dev

demo: setup
	$(BIN)/reluscope analyze sample_models/digits_mlp_dead.pt --arch sample_models/architectures.py:digits_mlp --data sample_models/digits_calib.npz

test: setup-dev
	$(BIN)/python -m pytest -q

bench: setup-dev
	$(BIN)/python benchmarks/overhead.py

# sdist and wheel into dist/, checked by twine (build and twine live in their own venv)
dist:
	$(PYTHON) -m venv .venv-dist
	.venv-dist/bin/python -m pip install --quiet build twine
	rm -rf dist
	.venv-dist/bin/python -m build --outdir dist .
	.venv-dist/bin/twine check --strict dist/*

# On a machine with a CUDA GPU and its own PyTorch/Triton/torchvision (no venv, nothing fetched):
# the CUDA tests and the CUDA benchmarks. See benchmarks/README.md.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_triton_stats.py \
		tests/test_deferred_nonfinite.py
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_ground_truth.py \
		tests/test_api.py tests/test_hostile.py -k "cuda or triton"
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/stats_kernel.py
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/overhead.py --device cuda --model resnet50 --images 1024 \
		--batch-size 128 --size 224 --repeats 5 --no-onnx
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/memory.py --device cuda --model resnet50 --batch-size 128 --size 224

clean:
	rm -rf $(VENV) .venv-dist dist build .pytest_cache .hypothesis
