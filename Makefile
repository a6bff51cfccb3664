# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed only when no torch >= 2.3 is importable.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# This workplace keeps datasets in ../shared/data; users download to ~/.cache/normlab.
SHARED_DATA := $(wildcard ../shared/data)
DATA_DIR ?= $(if $(SHARED_DATA),.data,$(HOME)/.cache/normlab)

.PHONY: setup demo test lint data clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python tools/torch_ok.py || \
		$(BIN)/pip install "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	$(BIN)/pip install -e ".[dev,ray,lab]"
	# the compiled kernels, built once here rather than inside the first run (about 40 s)
	$(BIN)/python -c "import normlab._ext.loader as native; native.module('fastnorm'); native.module('scan'); native.module('enorm', openmp=True); native.module('activations', openmp=True); native.module('equinorm', openmp=True)"
	touch $@

data: setup
ifneq ($(SHARED_DATA),)
	$(BIN)/python tools/prepare_data.py $(SHARED_DATA) .data
endif

demo: setup data
	$(BIN)/normlab reproduce fastnorm --quick --data-dir $(DATA_DIR) --out runs/fastnorm-quick

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests tools

clean:
	rm -rf $(VENV) .data .cache
