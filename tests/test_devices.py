"""What a GPU box meets, checked on the CPU: the device and dtype each rank takes (the GPU count faked), and the
Makefile's GPU targets (every scale passed through, make test-gpu failing without CUDA)."""
import os
import subprocess

import pytest
import torch

from common.io import DataError
from common.models import resolve_device, resolve_dtype
from conftest import ROOT


@pytest.fixture
def gpus(monkeypatch):
    """Fake a node with n visible GPUs and a launcher's rank variables."""
    def fake(n, local_rank=None, local_world=None, visible=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        for name, value in (("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", local_world),
                            ("CUDA_VISIBLE_DEVICES", visible)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
    return fake


def test_each_rank_takes_its_own_gpu(gpus):
    gpus(4, local_rank=3, local_world=4)
    assert resolve_device("auto") == torch.device("cuda", 3)
    gpus(2)
    assert resolve_device("cuda") == torch.device("cuda", 0)


@pytest.mark.parametrize("local_rank,local_world,visible", [(1, 2, "0"), (0, 2, "0"), (2, None, None)])
def test_more_ranks_than_gpus_is_one_line(gpus, local_rank, local_world, visible):
    gpus(1, local_rank=local_rank, local_world=local_world, visible=visible)
    with pytest.raises(DataError) as e:
        resolve_device("auto")
    message = str(e.value)
    assert "\n" not in message and "1 GPU visible" in message and "--device cpu" in message
    if visible is not None:
        assert "CUDA_VISIBLE_DEVICES=0" in message


def test_deepspeed_on_the_cpu_keeps_the_model_there(gpus, monkeypatch):
    gpus(2, local_rank=0, local_world=2)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.delenv("DS_ACCELERATOR")
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_ranks_on_the_cpu_need_no_gpu(gpus):
    gpus(1, local_rank=1, local_world=2)
    assert resolve_device("cpu") == torch.device("cpu")
    gpus(0, local_rank=1, local_world=2)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DataError, match="no CUDA device is visible"):
        resolve_device("cuda")


def test_emulated_bf16_gets_fp16(monkeypatch):
    # V100/T4: torch reports bf16 as supported counting emulation; only native bf16 gets bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("cuda") == torch.bfloat16
    assert resolve_dtype("cpu") == torch.float32
    assert resolve_dtype("cuda", "fp32") == torch.float32


def make(*args, env=None):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_make_passes_every_scale_through():
    import reproduce

    for scale in reproduce.SCALES:
        for target in ("reproduce", "tables", "specrej"):
            out = make("-n", target, f"SCALE={scale}").stdout.strip().splitlines()[-1]
            assert f"reproduce.py --scale {scale} " in out, (target, scale, out)
            folder = "runs/reproduce" if scale == "cpu" else f"runs/reproduce-{scale}"
            assert out.endswith(f"--out {folder}"), out


def test_make_test_gpu_fails_without_cuda():
    proc = make("test-gpu", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sees no GPU" in errors[0], proc.stderr
    assert "passed" not in proc.stdout and "skipped" not in proc.stdout


def test_cpu_tests_hide_the_gpu():
    """make test compares with CPU fp32 values: on a GPU box its stages must not pick CUDA by --device auto."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available()


@pytest.mark.parametrize("scale,extra", [("gpu", []), ("gpu-smoke", ["--device", "cuda"])])
def test_a_gpu_scale_without_a_gpu_stops_instead_of_running_on_the_cpu(tmp_path, scale, extra):
    import sys

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--scale", scale, *extra, "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "error: --device cuda: no CUDA device is visible" in proc.stderr
    assert "--device cuda" in proc.stdout  # the first stage's command, as printed
    assert not (tmp_path / "out" / "orm_s0" / "config.json").exists()


def test_gpu_check_report_reads_a_run_folder(tmp_path):
    """bench/gpu_check.py's report: the device each stage recorded, tokens per second, failures named."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    (tmp_path / "orm_s0").mkdir()
    (tmp_path / "orm_s0" / "manifest.json").write_text(json.dumps({"device": "cuda:0", "dtype": "bf16"}))
    (tmp_path / "gen_argsg_orm.jsonl.manifest.json").write_text(json.dumps({"device": "cpu", "dtype": "fp32"}))
    (tmp_path / "gen_argsg_orm.jsonl").write_text("".join(json.dumps({"stats": s}) + "\n" for s in (
        {"seconds": 1.0, "policy_tokens": 30, "peak_memory_mb": 900.0},
        {"seconds": 3.0, "policy_tokens": 50, "peak_memory_mb": 1200.5})))
    devices = gpu_check.manifests(str(tmp_path))
    assert devices == {"orm_s0": {"device": "cuda:0", "dtype": "bf16"},
                       "gen_argsg_orm.jsonl": {"device": "cpu", "dtype": "fp32"}}
    speed = gpu_check.decoding_speed(str(tmp_path))
    assert speed == {"argsg_orm": {"prompts": 2, "policy_tokens_per_s": 20.0, "peak_memory_mb": 1200.5}}
    report = {"machine": {"torch": "x", "torch_cuda": "12.6"}, "date": "d", "total_seconds": 1.0,
              "parts": [{"part": "reproduce", "ok": False, "seconds": 3, "output_tail": "error: boom"}],
              "measurements": [], "stage_devices": devices, "decoding": speed}
    text = gpu_check.markdown(report)
    assert "| reproduce | **failed** | 3 |" in text and "error: boom" in text and "| argsg_orm | 2 | 20.0 |" in text
