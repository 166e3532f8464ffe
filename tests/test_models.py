import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

from common.io import DataError
from common.models import dist_backend, resolve_device, resolve_dtype, trained_max_length, training_args


def test_training_args_read_from_the_manifest_of_an_rm_folder(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "manifest.json").write_text(json.dumps({"args": {"seed": 2, "max_length": 256}}))
    assert training_args(str(rm)) == {"seed": 2, "max_length": 256}
    assert trained_max_length(str(rm), 1024) == 256


def test_training_args_of_other_models_are_empty(tmp_path):
    assert training_args(str(tmp_path / "missing")) == {}
    assert training_args("org/hub-model") == {}
    assert trained_max_length("org/hub-model", 1024) == 1024
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    assert training_args(str(broken)) == {}
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "manifest.json").write_text(json.dumps({"args": {"max_length": "long"}}))
    assert trained_max_length(str(odd), 512) == 512


def test_device_rule_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype(resolve_device("auto")) == torch.float32
    assert resolve_dtype("cpu", "bf16") == torch.bfloat16  # asked for explicitly
    with pytest.raises(DataError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")


def test_device_rule_under_a_launcher_on_gpus(monkeypatch):
    """auto: the rank's own GPU from LOCAL_RANK; bf16 where supported, else fp16; nccl between GPU ranks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "-1")  # deepspeed's default for a single process
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(torch.device("cuda", 0)) == torch.float16
    assert resolve_dtype(torch.device("cuda", 0), "fp32") == torch.float32
    assert dist_backend(torch.device("cuda", 0)) == "nccl" and dist_backend(torch.device("cpu")) == "gloo"


def test_a_stage_refuses_cuda_without_a_gpu_before_loading_a_model(tmp_path):
    from conftest import run_script

    proc = run_script("04_decode.py", "--prompts", tmp_path / "none.jsonl", "--method", "greedy", "--output",
                      tmp_path / "out.jsonl", "--device", "cuda", check=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --device cuda")


# A training step's pattern: blocks of a few MiB allocated, written and freed, again and again (fresh process).
ALLOCATE_AND_FREE = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
from common.models import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(20):
    blocks = [torch.ones(size << 18) for size in (3, 5, 8, 13, 21, 30)]  # 3-30 MiB of float32, written
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(keep):
    proc = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE.format(root=ROOT, keep=keep)], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout.split()[-1])


def test_keep_freed_memory_serves_later_steps_without_new_pages():
    # 20 steps of 80 MiB (20,480 pages each): kept memory faults in about one step's pages, not one per step.
    # (glibc's default varies with its dynamic threshold, 49,000 to 335,000 here, so it is not the bound.)
    kept = page_faults(True)
    assert kept < 3 * 20_480


def test_a_fresh_rm_head_is_said_once_in_words_not_in_transformers_load_report(capfd, caplog):
    """Training starts MiniLM from a backbone: its new scalar head is one line of ours, not transformers' LOAD
    REPORT table of MISSING weights; a checkpoint with no trained head is still refused."""
    import logging

    from common.io import DataError
    from common.models import load_reward_model

    with caplog.at_level(logging.INFO, logger="common.models"):
        load_reward_model("minilm-l6", allow_new_head=True)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err and "not sharded" not in out + err
    said = [r.getMessage() for r in caplog.records if "fresh scalar head" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("minilm-l6: starting from a backbone: a fresh scalar head (")
    with pytest.raises(DataError, match="not a trained reward model"):
        load_reward_model("minilm-l6")
    assert not logging.getLogger("transformers.modeling_utils").filters  # put back as it was


def test_deepspeeds_no_gpu_warning_is_kept_out_on_a_cpu_machine():
    """transformers' save_pretrained imports DeepSpeed (through accelerate), which warns on every CPU machine that
    it found no GPU: common.models keeps that record out of DeepSpeed's logger where torch sees no GPU, and only
    that one."""
    import logging

    import deepspeed.accelerator.real_accelerator as real

    import common.models  # noqa: F401 (the filter is set when it loads)

    assert "we were unable to detect it." in open(real.__file__, encoding="utf-8").read()  # what DeepSpeed logs
    message = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."

    def record(text):
        return logging.LogRecord("DeepSpeed", logging.WARNING, real.__file__, 213, text, None, None)
    ds = logging.getLogger("DeepSpeed")
    assert not torch.cuda.is_available()  # the CPU tests hide any GPU
    assert not ds.filter(record(message)) and ds.filter(record("Setting ds_accelerator to cuda (auto detect)"))


def test_the_six_layer_smollm2_is_the_lower_part_of_the_full_model():
    """smollm2-135m-l6: the full model's embeddings and first 6 decoder layers (its layer-6 state, through the
    final norm, is the cut model's output state) and the policy's tokenizer, so its RMs score on the cached path."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.models import SMOLLM2, SMOLLM2_L6, load_tokenizer, resolve_model_path

    full = AutoModelForCausalLM.from_pretrained(resolve_model_path(SMOLLM2)).eval()
    cut = AutoModelForCausalLM.from_pretrained(resolve_model_path(SMOLLM2_L6)).eval()
    assert (cut.config.num_hidden_layers, full.config.num_hidden_layers) == (6, 30)
    ids = load_tokenizer(SMOLLM2)("Human: is the sky blue?", return_tensors="pt").input_ids
    assert load_tokenizer(SMOLLM2_L6)("Human: is the sky blue?").input_ids == ids[0].tolist()
    with torch.no_grad():
        lower = full.model.norm(full(ids, output_hidden_states=True).hidden_states[6])
        assert torch.allclose(cut(ids, output_hidden_states=True).hidden_states[-1], lower, atol=1e-5)
