# Two targets a newcomer needs: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install system-deps clean mutation

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[deepspeed]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsevl demo --out runs/demo

# Debian packages the tests need (Chromium for the browser test): installed as root or with passwordless sudo,
# else one line says what to install.
system-deps:
	@bash scripts/system_deps.sh

test: system-deps $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs

# Mutation testing of the core modules (slow: about two hours on 2 cores; not run by CI). MODULES=metrics vlm ...
MUTATION_CHILDREN ?= 2
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	OMP_NUM_THREADS=1 $(PY) scripts/mutation.py --max_children $(MUTATION_CHILDREN) $(if $(MODULES),--modules $(MODULES))
