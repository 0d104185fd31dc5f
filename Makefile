# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ./data
METHODS := famix rein clouds

.PHONY: install demo test bench data-toy clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

data-toy: install
	$(PY) common.py make-toy --data $(DATA)

# Train and evaluate every method file that exists on the toy data, on CPU.
demo: data-toy
	@ran=0; \
	if [ -f famix.py ]; then ran=1; $(PY) famix.py --source toy --pretrained none --device cpu --data $(DATA) --out out/famix-demo || exit 1; fi; \
	if [ -f rein.py ]; then ran=1; $(PY) rein.py --source toy --pretrained none --device cpu --data $(DATA) --out out/rein-demo || exit 1; fi; \
	if [ -f clouds.py ]; then ran=1; \
	  $(PY) clouds.py --source toy --pretrained none --device cpu --data $(DATA) --phase warmup --out out/clouds-demo-warmup || exit 1; \
	  $(PY) clouds.py --source toy --pretrained none --device cpu --data $(DATA) --phase joint --sam fake \
	    --init out/clouds-demo-warmup/last.pt --make-toy-generated 60 --out out/clouds-demo-joint || exit 1; fi; \
	if [ $$ran = 0 ]; then $(PY) common.py demo --data $(DATA); fi

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: install
	@$(VENV)/bin/pytest -q; rc=$$?; \
	if [ $$rc = 5 ]; then echo "error: pytest collected no tests (expected tests/test_*.py)"; exit 1; fi; \
	exit $$rc

bench: data-toy
	$(PY) common.py bench --data $(DATA)
	@for m in $(METHODS); do if [ -f $$m.py ]; then $(PY) $$m.py --bench --data $(DATA) || exit 1; fi; done

clean:
	rm -rf out .pytest_cache __pycache__ tests/__pycache__
