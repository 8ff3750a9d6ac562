# mfl_tff: `make demo` and `make test` are the two commands; both set up .venv when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# TFF 0.87.0 pins jax/jaxlib 0.4.14, which the package index does not serve: requirements.txt pins
# TFF's other requirements with 0.4.13, and TFF itself goes in without its dependencies. mfl_tff
# itself is then installed editable, also without dependencies (pyproject.toml lists no TFF), so
# `import mfl_tff` works from any directory; `python -m experiments.train` runs from this one.
TFF := tensorflow-federated==0.87.0
# The stamp is keyed on requirements.txt, the TFF pin and pyproject.toml: a ready .venv is never
# reinstalled, and one from before the package existed gets it installed.
STAMP := $(VENV)/.installed-$(shell (cat requirements.txt pyproject.toml; echo $(TFF)) | cksum | cut -d' ' -f1)
RUFF := $(VENV)/bin/ruff
PYTEST_FLAGS ?= -q
# TF and XLA print GPU-plugin errors at import on CPU-only machines; 3 keeps only fatal ones.
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test lint format venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(TFF)
	$(PY) -m pip install -q --no-deps -e .
	@# setuptools leaves its build metadata in the tree; the installed package does not need it.
	@rm -rf mfl_tff.egg-info
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: $(STAMP)
	$(RUFF) check --config .ci/ruff.toml mfl_tff experiments tests
	$(RUFF) format --config .ci/ruff.toml --check mfl_tff experiments tests

format: $(STAMP)
	$(RUFF) format --config .ci/ruff.toml mfl_tff experiments tests
	$(RUFF) check --config .ci/ruff.toml --fix mfl_tff experiments tests

test: lint
	$(PY) -m pytest -o python_files='*_test.py' -p no:cacheprovider $(PYTEST_FLAGS) tests

# The training binary on the default task (mfl on digits_fewshot; rerunning resumes), then a short
# comparison of MFL against FedAvg with fine-tuning on the same clients (output/compare/).
demo: $(STAMP)
	$(PY) -m experiments.train --root_output_dir=output --experiment_name=demo
	$(PY) -m experiments.compare --algorithms=mfl,fedavg --total_rounds=150 --rounds_per_eval=50 \
		--num_eval_clients=200 --output_dir=output/compare

clean:
	rm -rf $(VENV)
