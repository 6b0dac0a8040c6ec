# tsjax — two commands do everything on a fresh machine:
#   make demo   create .venv, install, build csrc/, run the main job on the built-in exemplars
#   make test   create .venv, install (with test extras), build csrc/, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
OUT    ?= out/demo
PYTEST_ARGS ?=

.PHONY: demo test install install-test build validator bench clean
.DEFAULT_GOAL := demo

$(VENV)/.runtime: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	$(PIP) install -q -r requirements.txt
	@touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(PIP) install -q -r requirements-test.txt
	@touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

# Native kernels: rebuilt whenever a file under csrc/ changes.
CSRC := $(shell find csrc -type f \( -name '*.cc' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.py' \) 2>/dev/null)
$(VENV)/.built: $(VENV)/.runtime setup.py $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@
build: $(VENV)/.built

# Khronos glTF validator (npm) for the export tests; optional, tests skip with a message without node.
validator:
	@if command -v npm >/dev/null 2>&1; then \
	  test -x .npm/node_modules/.bin/gltf_validator -o -f .npm/node_modules/gltf-validator/package.json || \
	  npm install --silent --no-audit --no-fund --prefix .npm gltf-validator@2.0.0-dev.3.10 ; \
	else echo "npm not found: glTF validator tests will be skipped"; fi

demo: build
	$(PY) -m tsjax.optimize --out $(OUT) --overwrite

# pytest exits 5 when the selection (e.g. PYTEST_ARGS="-m gpu" on a CPU machine) collected no test: not a failure.
test: install-test build validator
	@$(PY) -m pytest -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest selected no tests (exit 5): not a failure"; exit 0; fi; exit $$rc

bench: install-test build
	$(PY) bench/raster.py

clean:
	rm -rf build *.egg-info tsjax/_lib/*.so
