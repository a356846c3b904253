# Two commands set everything up on a fresh machine:
#   make run    create .venv, install, initialise DVC, run the pipeline (dvc repro)
#   make test   create .venv, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
# Offline by default: look for datasets and weights in ../shared/datasets when it exists.
PIPELINE_MIRROR ?= $(wildcard $(abspath ..)/shared/datasets)
export PIPELINE_MIRROR

.PHONY: install run test test-fast bench bench-quality bench-audit bench-scale dvc-init clean finetune finetune-ddp

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, torchvision, timm, h5py, dvc, sklearn, ray.data, onnxruntime, openvino, onnxscript, xdist, stages.backbones"
	touch $@

install: $(VENV)/.installed

dvc-init: install
	test -d .dvc || dvc init --quiet
	dvc config core.analytics false

run: dvc-init
	dvc repro
	@echo; sed -n '1,/^## /p' summary/summary.md | grep -v '^## '
	@echo "Full metrics: dvc metrics show; changes since the last commit: dvc metrics diff (after: source $(VENV)/bin/activate)"
	@echo "Report page (offline): $(abspath summary/report.html)"

# Fine-tune BACKBONE (one of params.yaml `backbones`; several: BACKBONE=a,b) as a DVC experiment: sets
# params.yaml `finetune.backbones: [$(BACKBONE)]` and runs what changed (needs a git commit, as `dvc exp` does).
BACKBONE ?= efficientnet_lite0
finetune: dvc-init
	dvc exp run -S 'finetune.backbones=[$(BACKBONE)]'
	dvc metrics show

# Fine-tune BACKBONE with DDP over NPROC processes: the finetune@ stage's own command under torchrun (one process per
# GPU with NCCL, gloo on CPU; several machines: torchrun --nnodes/--rdzv-endpoint). finetune.batch_size stays the
# effective batch: each process takes batch_size / NPROC images per step (it must divide). Needs the stage's inputs
# (`dvc repro head@$(BACKBONE)`); with BACKBONE in params.yaml `finetune.backbones`, `dvc commit finetune@$(BACKBONE)`
# then records the outputs as the stage's.
NPROC ?= 2
finetune-ddp: install
	torchrun --standalone --nproc_per_node $(NPROC) -m stages.finetune --backbone $(BACKBONE) --raw data/raw \
		--manifest data/prepared/manifest.csv --weights models/pretrained/$(BACKBONE).pth \
		--probe models/$(BACKBONE)/probe_pool.pt --out models/finetune/$(BACKBONE) --reports reports/finetune/$(BACKBONE)

# The whole suite in two runs: the tests not marked slow on two pytest-xdist workers (as `make test-fast`), then
# the slow ones in one process, so the real pipeline run they share (tests/conftest.py `real_pipeline`) is made once.
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS); fast=$$?; \
	$(BIN)/python -m pytest -q -m slow; slow=$$?; \
	test $$fast = 0 && test $$slow = 0

# The quick loop: the tests not marked slow on two pytest-xdist workers.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS)

bench: install
	$(BIN)/python -m stages.bench_extract

# Accuracy levers on held-out data (honest protocol), and the dataset audit's recall/precision on planted problems.
BENCH_DATASETS ?= $(PIPELINE_MIRROR)/hymenoptera_data $(PIPELINE_MIRROR)/pbc_blood_cells
bench-quality: install
	$(BIN)/python -m stages.bench_quality $(BENCH_DATASETS) --work /tmp/bench_quality --out /tmp/bench_quality/table.json

bench-audit: install
	$(BIN)/python -m stages.bench_audit $(BENCH_DATASETS) --work /tmp/bench_audit

# Scale ladder: wall s, peak RSS and growth exponent per stage on generated image sets (1k, 10k) and synthetic
# feature files (10k, 100k); targets print as PASS/FAIL. More: BENCH_SCALE_ARGS="--features 10000,100000,1000000".
BENCH_SCALE_ARGS ?=
bench-scale: install
	$(BIN)/python -m stages.bench_scale --work /tmp/bench_scale $(BENCH_SCALE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
