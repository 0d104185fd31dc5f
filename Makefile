# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
DATA ?= ./data
TOY := --source toy --pretrained none --device cpu --data $(DATA) --overwrite
# Each demo step prints its wall time.
TIMED = start=$$(date +%s); $(1) || exit 1; echo "[$(2): $$(( $$(date +%s) - start )) s]"

.PHONY: install lint test demo ablate bench check-data data-toy clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

lint: install
	$(RUFF) format --check .
	$(RUFF) check .

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: lint
	@$(VENV)/bin/pytest -q; rc=$$?; \
	if [ $$rc = 5 ]; then echo "error: pytest collected no tests (expected tests/test_*.py)"; exit 1; fi; \
	exit $$rc

data-toy: install
	$(PY) tools.py make-toy --data $(DATA)

# Train and evaluate the three methods on the toy data on CPU, then put them side by side.
demo: data-toy
	@$(call TIMED,$(PY) famix.py $(TOY) --out out/famix-demo,famix)
	@$(call TIMED,$(PY) rein.py $(TOY) --out out/rein-demo,rein)
	@$(call TIMED,$(PY) clouds.py $(TOY) --phase warmup --out out/clouds-demo-warmup,clouds warm-up)
	@$(call TIMED,$(PY) clouds.py $(TOY) --phase joint --sam fake --init out/clouds-demo-warmup/last.pt \
	  --make-toy-generated 60 --out out/clouds-demo-joint,clouds joint)
	$(PY) tools.py compare out/famix-demo out/rein-demo out/clouds-demo-warmup out/clouds-demo-joint --out out

# What each method's mechanism adds on the toy targets: FAMix without its style mixing next to
# the default, CLOUDS' warm-up next to its joint phase (runs `make demo` first if needed).
ablate: data-toy
	@test -f out/famix-demo/results.json -a -f out/clouds-demo-joint/results.json || $(MAKE) demo
	@$(call TIMED,$(PY) famix.py $(TOY) --style none --out out/famix-demo-style-none,famix --style none)
	$(PY) tools.py compare out/famix-demo out/famix-demo-style-none out/clouds-demo-warmup \
	  out/clouds-demo-joint --out out/ablate

# JSON lines (reader throughput, each method's --bench), then one table.
bench: data-toy
	@mkdir -p out
	set -o pipefail; { $(PY) tools.py bench --data $(DATA) && \
	  for m in famix rein clouds; do $(PY) $$m.py --bench --data $(DATA) || exit 1; done; } | tee out/bench.jsonl
	$(PY) tools.py bench-table out/bench.jsonl

check-data: install
	$(PY) tools.py check-data --data $(DATA)

clean:
	rm -rf out .pytest_cache __pycache__ tests/__pycache__
