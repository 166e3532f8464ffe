"""make setup on a CPU machine: torch from PyTorch's CPU index where it can be reached (PyPI's Linux torch is
the CUDA build), pip's own indexes at once where it cannot."""
import os
import subprocess
import time

from conftest import ROOT


def make(*args, **env):
    return subprocess.run(["make", "--no-print-directory", "-C", ROOT, *args], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_cpu_setup_installs_torch_from_the_cpu_index_before_the_requirements(tmp_path):
    plan = make("-n", "setup", f"VENV={tmp_path}/venv").stdout.replace("\\\n\t", "")  # what it would run
    torch_step = plan.index("pip install --quiet \"$(grep '^torch==' requirements.txt)\" "
                            "--index-url https://download.pytorch.org/whl/cpu")
    assert torch_step < plan.index("pip install --quiet -r requirements.txt")
    assert "urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=5)" in plan  # probed first
    cuda = make("-n", "setup", "TORCH=cuda", f"VENV={tmp_path}/venv").stdout
    assert "--index-url https://download.pytorch.org/whl/cu126" in cuda and "whl/cpu" not in cuda


def test_an_unreachable_cpu_index_is_passed_over_at_once(tmp_path):
    """A machine that cannot reach the index (one that serves its own CPU torch) gets no retries: the probe
    fails in well under a second on a refused connection, and setup goes on with pip's own indexes."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    started = time.time()
    probe = make("--eval", "probe:; @if $(CPU_INDEX_REACHABLE); then echo reachable; else echo passed over; fi",
                 "probe", f"VENV={venv}", "TORCH_CPU_INDEX=http://127.0.0.1:9/whl/cpu")  # port 9: nothing listens
    assert probe.stdout.strip().endswith("passed over") and time.time() - started < 5, probe.stdout + probe.stderr
