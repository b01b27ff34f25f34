# Two commands for a newcomer: `make demo` (prune the shipped sample) and `make test` (the test suite).
# Both create .venv and install what they need; torch is pinned so no CUDA wheels are pulled.
VENV ?= .venv
PY := $(VENV)/bin/python
SUBLORA := $(VENV)/bin/sublora
SAMPLE ?= sample_checkpoints/elliptic
DEMO_OUT ?= demo_out
# fresh benchmark figures; bench/results/ holds the committed ones and their discussion
BENCH_OUT ?= bench_out

.PHONY: install demo test test-slow lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plots]'
	touch $@

demo: install
	$(SUBLORA) inspect $(SAMPLE)/adapter_k2
	$(SUBLORA) prune $(SAMPLE)/adapter_k2 --calib $(SAMPLE)/calib_k2.py --budget 50 --out $(DEMO_OUT) --overwrite
	@echo "report: $(DEMO_OUT)/sublora_report.md"
	@echo "sublora is installed in $(VENV): run $(SUBLORA) ..., or 'source $(VENV)/bin/activate' and then sublora ..."

test: install
	$(VENV)/bin/ruff check sublora_cli tests bench sample_checkpoints
	$(VENV)/bin/pytest -q

test-slow: install
	$(VENV)/bin/pytest -q -m slow

bench: install
	$(PY) bench/svd_convert.py
	mkdir -p $(BENCH_OUT)
	$(PY) bench/curvature.py --json $(BENCH_OUT)/curvature.json
	$(PY) bench/paper_table.py --out $(BENCH_OUT)
	$(PY) bench/sd_resize.py --json $(BENCH_OUT)/sd_resize.json

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(BENCH_OUT)
