# The two commands a fresh clone needs: `make demo` and `make test`. Each one creates or updates
# .venv and installs what it needs; only Python >= 3.10 and make must already be there.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-pipeline test test-slow test-all lint docs bench chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dq-run configs/demo.yaml

# The second demo: a declarative pipeline (fan-out, join, on_dead) on a SQLite file.
demo-pipeline: $(STAMP)
	$(BIN)/dq-run configs/pipeline.yaml

# The default suite, in two pytest-xdist workers (about 4 minutes on 2 cores; 7 in one); the
# slow fault, stress and soak tests (@pytest.mark.slow) run in `make test-slow`, also in two
# workers (2.5 minutes; 4.7 one at a time: they mostly wait on timers and child processes),
# and .ci/run runs both. One file in one process:
# `.venv/bin/python -m pytest tests/unit/test_x.py`.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow' -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n 2

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runner

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Fault scenarios against real worker processes (not part of `make test`); under ten minutes.
chaos: $(STAMP)
	$(BIN)/python benchmarks/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
