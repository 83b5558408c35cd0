# One entry point per stage; every stage reads the files of the one before (see README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.yaml
FOLD   ?= all
MODEL  ?=
SET    ?=
PRESET ?= small
DATA   ?= input/synthetic
BACKBONES ?=
IMAGES ?= $(DATA)/test/images
OUT    ?= submissions/predictions.csv
MAPS   ?=
RUNTIME ?= torch
FORMAT ?= onnx
EXECUTOR ?=

SETS  := $(foreach s,$(SET),--set $(s))
RUN   := $(PY) -m competition
ARGS  := --config $(CONFIG) $(SETS)

.PHONY: setup data folds train zoo pretrain pseudo infer leaderboard predict export report test all clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -c constraints.txt -e '.[dev]'
	touch $(STAMP)

data: $(STAMP)
	$(RUN) synth --preset $(PRESET) --out $(DATA) --if-missing --overwrite

folds: $(STAMP)
	$(RUN) folds $(ARGS)

train: $(STAMP)
	$(RUN) train --fold $(FOLD) $(ARGS)

zoo: $(STAMP)
	$(RUN) zoo $(if $(MODEL),--model $(MODEL),) --fold $(FOLD) $(ARGS)

# BACKBONES="efficientnet_b0 resnet18" pretrains each in turn; empty: the config's pretrain.backbone.
pretrain: $(STAMP)
	$(if $(strip $(BACKBONES)),$(foreach b,$(BACKBONES),$(RUN) pretrain $(ARGS) --set pretrain.backbone=$(b) &&) true,$(RUN) pretrain $(ARGS))

# A second round on pseudo-labels: SET="experiment=NAME pseudo.enabled=true pseudo.source=FIRST_ROUND".
pseudo: $(STAMP)
	$(RUN) pseudo $(ARGS)

infer: $(STAMP)
	$(RUN) infer $(ARGS) $(if $(ALLOW_PARTIAL),--allow-partial,)

leaderboard: $(STAMP)
	$(RUN) leaderboard $(ARGS)

# IMAGES: files, folders or globs (quote globs); MAPS=DIR also draws the maps of the images predicted defective.
predict: $(STAMP)
	$(RUN) predict $(ARGS) --images $(IMAGES) --out $(OUT) --runtime $(RUNTIME) $(if $(MAPS),--maps $(MAPS),)

export: $(STAMP)
	$(RUN) export $(ARGS) --format $(FORMAT)

report: $(STAMP)
	$(RUN) report $(ARGS)

# Lint first (ruff, configured in pyproject.toml), then the suite; pytest prints the 25 slowest tests.
# TEST_WORKERS pytest-xdist processes (one torch thread each, tests/conftest.py), a test module to a worker so its
# module fixtures are built once: pytest 502 s on 2 cores (896 s in one process, before test_prior's 155-s cut).
# TEST_WORKERS=0: one process.
# pytest exits 5 when it collects nothing; that is not a failure of the project.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check competition tests bench
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# The experiment's jobs (folds, pretrain where the config reads ssl weights, train and zoo per fold, infer,
# leaderboard) through `competition run`; EXECUTOR=ray runs them as Ray tasks (executor.* in the config).
all: data
	$(RUN) run $(ARGS) $(if $(EXECUTOR),--set executor.backend=$(EXECUTOR),)

clean-runs:
	rm -rf runs
