# meshid: `make demo` and `make test` work on a fresh machine with only Python, make and Debian's packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench soak proto lint clean

# Quiet: one line, then pip's errors only (-qq), so `make demo` starts with the demo.
$(STAMP): pyproject.toml
	@echo "make: installing meshid and its dependencies into $(VENV) (once)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --progress-bar off --upgrade pip
	@$(PY) -m pip install -qq --progress-bar off -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	@$(PY) examples/demo.py

# pytest exits 5 when it collects nothing: that is a failure here, never a pass.
test: $(STAMP)
	$(PY) scripts/genproto.py --check
	$(PY) -m pytest -q --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) bench/run.py

# Not part of `make test`: a server and several clients with SVIDs rotating every ~2 s, for
# MINUTES (default 10), loopback only; prints requests, failures, rotations and memory growth.
MINUTES ?= 10
soak: $(STAMP)
	$(PY) bench/soak.py --minutes $(MINUTES)

proto: $(STAMP)
	$(PY) scripts/genproto.py

lint: $(STAMP)
	$(VENV)/bin/ruff check meshid tests examples bench scripts
	$(VENV)/bin/mypy meshid bench/*.py
	# known-vulnerable dependency versions (asks PyPI's advisory data; needs the network)
	$(VENV)/bin/pip-audit --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
