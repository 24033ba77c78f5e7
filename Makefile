# Two commands on a fresh machine:  make run   (the leaderboard)   and   make test   (tests + notebooks)
# Variables (README "Install"): PY builds the venv; VENV="$CONDA_PREFIX" (or any existing environment) uses that
# environment instead of creating .venv; TORCH_INDEX=<PyTorch's CPU wheel index URL> installs the CPU
# wheel of torch first (on Linux the default PyPI wheel is the multi-GB CUDA build); ARGS goes to `make pretrain`.
PY ?= python3
VENV ?= .venv
TORCH_INDEX ?=
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb)) $(sort $(wildcard notebooks/solutions/*.ipynb))
NB ?= $(NOTEBOOKS)
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: install run test unit nbval notebooks notebooks-robust lab lint benchmark pretrain clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --disable-pip-version-check -q torch==2.13.0 --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# one thread: the models are small, and a second thread only helps on an otherwise idle machine
run: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m chapters.leaderboard

# unit tests, then every notebook under nbval (outputs compared, volatile cells marked NBVAL_IGNORE_OUTPUT).
# Notebooks are executed and checked with one thread, so both sides compute the same floating-point sums.
test: unit nbval

# pytest exits 5 when it collects no test: that is not a failure of the code under test
unit: $(STAMP)
	$(BIN)/python -m pytest tests -q; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

nbval: $(STAMP)
	$(if $(NOTEBOOKS),OMP_NUM_THREADS=1 $(BIN)/python -m pytest --nbval $(NOTEBOOKS) --sanitize-with notebooks/sanitize.cfg -q; \
	  rc=$$?; test $$rc -eq 0 -o $$rc -eq 5,@echo "no notebooks")

# re-execute every notebook (or NB="notebooks/X.ipynb ...") in place after a code change, on the CPU, as CI
# will; the inline backend (not the exported Agg) so that the figures are saved in the notebooks
notebooks: $(STAMP)
	for nb in $(NB); do \
	  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 MPLBACKEND=module://matplotlib_inline.backend_inline $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 $$nb || exit 1; done

# before committing a notebook: execute it as another machine would (two threads, other CPU kernels) and
# validate it with nbval as CI does; prints "robust: K/N notebooks"
notebooks-robust: $(STAMP)
	bash .ci/notebooks-robust.sh $(NB)

lab: $(STAMP)
	$(BIN)/python -m pip install -q jupyterlab==4.6.6
	$(BIN)/jupyter lab notebooks/

lint: $(STAMP)
	$(BIN)/ruff check .

# one thread, as the README's figures: our GPT against transformers, our LoRA against peft, S-LoRA serving -> results/
benchmark: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m minimal.benchmark
	OMP_NUM_THREADS=1 $(BIN)/python -m chapters.ch4_low_rank.lora_speed
	OMP_NUM_THREADS=1 $(BIN)/python -m chapters.ch4_low_rank.slora_benchmark

# rebuild the base models into runs/pretrain/ (never data/ by default); ARGS="--model small --steps 100",
# ARGS="--tokenizer" (new tokenizer, then both models), ARGS="--tokenizer --out data --force" replaces the shipped files
pretrain: $(STAMP)
	$(BIN)/python -m minimal.pretrain $(ARGS)

clean:
	rm -rf .venv .pytest_cache .ruff_cache *.egg-info
