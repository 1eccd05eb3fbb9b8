# Two commands for a fresh machine (see README):
#   make repro   install everything into .venv and run the whole DVC pipeline on the default data
#   make test    install everything into .venv, run ruff, then the test suite (incl. a micro
#                `dvc repro`)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install repro test bench clean-runs params

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# no PATH tricks: every dvc.yaml stage runs through `sh pipelines/python` (the repository's .venv)
repro: install
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc repro

# the tests run on up to 4 processes (pytest-xdist), a module per process at a time (module-scoped
# fixtures are built once); tests/conftest.py starts the longest modules first
test: install
	$(BIN)/ruff check jetformer tests pipelines benchmarks
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder

# the self-contained benchmarks; peer_compare.py (needs --peer), paper_step.py (~20 GiB, minutes)
# and gpu_check.sh (CUDA) are run by hand, see README "Scaling up"
BENCHES := prepare train_step sampling loader
bench: install
	for b in $(BENCHES); do $(BIN)/python benchmarks/$$b.py || exit 1; done

# params.yaml <- params.yaml + overlays, e.g.  make params PRESET="jetformer_b imagenet256"
params: install
	$(BIN)/python -c 'import sys, yaml; from jetformer.config import load_config, load_config_dict; \
	d = load_config_dict("params.yaml", sys.argv[1:]); load_config(d); \
	open("params.yaml", "w").write(yaml.safe_dump(d, sort_keys=False))' $(PRESET)

clean-runs:
	rm -rf .ray_runs .ray_tune
