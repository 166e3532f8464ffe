"""make gpu-check: one command for a GPU box, and a report to paste into an issue.

    python bench/gpu_check.py --out runs/gpu-check          (make gpu-check; a few minutes on one H100)

1. the machine: GPU, driver, torch and its CUDA, native bf16;
2. make test-gpu's tests (tests/test_gpu.py, -m gpu): greedy tokens and RM scores on CUDA against the CPU's fp32,
   each measurement recorded;
3. reproduce.py at the gpu-smoke scale with --device cuda (a stage that cannot see the GPU stops the run, never
   falls back to the CPU), the Table 1 part;
4. from that run: the device and dtype every stage's manifest records, and per decoding method the policy's
   tokens per second and the peak GPU memory;
5. where .venv-vllm is (make setup-vllm TORCH=cuda): bench/backends.py --device cuda, Best-of-16 and speculative
   rejection at 128 new tokens on the PyTorch engine and on a vLLM server.
Writes OUT/report.json and OUT/report.md; exits 1 if any part failed (the report says which), 2 without CUDA.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def machine():
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}",
                    native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def run_step(name, cmd, env=None, timeout=None):
    """Run one part; its outcome, time and the tail of its output go into the report."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        ok, tail = proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-2000:])
    except subprocess.TimeoutExpired:
        ok, tail = False, f"stopped after {timeout} s"
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({time.time() - t0:.0f} s)", flush=True)
    return {"part": name, "ok": ok, "seconds": round(time.time() - t0, 1), "command": " ".join(cmd),
            "output_tail": tail if not ok else tail[-600:]}


def manifests(folder):
    """{output name: (device, dtype)} of every stage output of a reproduce folder."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.manifest.json")) +
                       glob.glob(os.path.join(folder, "*", "manifest.json"))):
        with open(path, encoding="utf-8") as f:
            made = json.load(f)
        name = os.path.relpath(path, folder).replace(".manifest.json", "").replace("/manifest.json", "")
        if made.get("device") or made.get("dtype"):
            found[name] = {"device": made.get("device"), "dtype": made.get("dtype")}
    return found


def decoding_speed(folder):
    """Per generations file: the policy's tokens per second of search time and the peak GPU memory."""
    speed = {}
    for path in sorted(glob.glob(os.path.join(folder, "gen_*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            stats = [json.loads(line)["stats"] for line in f if line.strip()]
        seconds = sum(s.get("seconds", 0) for s in stats)
        speed[os.path.basename(path)[4:-6]] = {
            "prompts": len(stats), "policy_tokens_per_s": round(sum(s.get("policy_tokens", 0) for s in stats)
                                                                 / max(seconds, 1e-9), 1),
            "peak_memory_mb": max((s.get("peak_memory_mb", 0) for s in stats), default=None)}
    return speed


def markdown(report):
    m = report["machine"]
    lines = ["# gpu-check report", "",
             f"{m.get('gpu', 'no GPU')} (x{m.get('gpus', 0)}, {m.get('memory_gib')} GiB, compute {m.get('capability')}, "
             f"native bf16: {m.get('native_bf16')}), driver {m.get('driver')}, torch {m['torch']}, CUDA {m['torch_cuda']}. "
             f"{report['date']}, {report['total_seconds']:.0f} s in all.", "",
             "| part | result | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {'ok' if p['ok'] else '**failed**'} | {p['seconds']} |" for p in report["parts"]]
    if report["measurements"]:
        lines += ["", "## CUDA against the CPU's fp32", ""]
        lines += [f"- {json.dumps(x)}" for x in report["measurements"]]
    if report["stage_devices"]:
        lines += ["", "## Device and dtype each stage recorded", "", "| output | device | dtype |", "|---|---|---|"]
        lines += [f"| {k} | {v['device']} | {v['dtype']} |" for k, v in report["stage_devices"].items()]
    if report["decoding"]:
        lines += ["", "## Decoding (gpu-smoke sizes: start-up dominates; a floor, not a throughput figure)", "",
                  "| run | prompts | policy tokens/s | peak GPU memory (MB) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['prompts']} | {v['policy_tokens_per_s']} | {v['peak_memory_mb']} |"
                  for k, v in report["decoding"].items()]
    if report.get("backends"):
        b = report["backends"]
        lines += ["", f"## PyTorch engine against vLLM {b['vllm_version']} ({b['prompts']} prompts, "
                      f"{b['max_new_tokens']} new tokens)", "",
                  "| method | torch s | vLLM s | torch policy tokens/s | vLLM policy tokens/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {t['seconds']} | {v['seconds']} | {t['policy_tokens_per_s']} | {v['policy_tokens_per_s']} |"
                  for m, t, v in ((m, b["torch"][m], b["vllm"][m]) for m in b["torch"])]
    for p in report["parts"]:
        if not p["ok"]:
            lines += ["", f"## {p['part']}: output (tail)", "", "```", p["output_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--timeout", type=int, default=1200, help="seconds allowed to each part")
    args = p.parse_args()
    info = machine()
    if not info["cuda_available"]:
        print(f"error: torch {info['torch']} (CUDA {info['torch_cuda']}) sees no GPU: gpu-check needs one "
              "(make setup TORCH=cuda on a GPU box)", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    measured = os.path.join(os.path.abspath(args.out), "test_gpu.jsonl")
    if os.path.exists(measured):
        os.remove(measured)
    smoke = os.path.join(os.path.abspath(args.out), "gpu-smoke")
    parts = [
        run_step("make test-gpu (tests/test_gpu.py)", [sys.executable, "-m", "pytest", "-q", "-s", "-m", "gpu",
                                                       "tests"], env={"SPPRM_GPU_REPORT": measured},
                 timeout=args.timeout),
        run_step("reproduce --scale gpu-smoke --device cuda", [sys.executable, "reproduce.py", "--scale", "gpu-smoke",
                                                              "--device", "cuda", "--out", smoke],
                 timeout=args.timeout),
    ]
    backends = os.path.join(os.path.abspath(args.out), "backends.json")
    if os.path.exists(backends):
        os.remove(backends)
    from common.vllm_server import venv_python

    if os.path.isfile(venv_python()):
        parts.append(run_step("bench/backends.py --device cuda (PyTorch engine against vLLM)",
                              [sys.executable, "bench/backends.py", "--device", "cuda", "--out", backends],
                              timeout=args.timeout))
    else:
        print("[skipped] bench/backends.py: no .venv-vllm (make setup-vllm TORCH=cuda)", flush=True)
    measurements = []
    if os.path.exists(measured):
        with open(measured, encoding="utf-8") as f:
            measurements = [json.loads(line) for line in f if line.strip()]
    stage_devices = manifests(smoke) if os.path.isdir(smoke) else {}
    on_cpu = [k for k, v in stage_devices.items() if v["device"] and not str(v["device"]).startswith("cuda")]
    if on_cpu:
        parts.append({"part": "every stage on CUDA", "ok": False, "seconds": 0, "command": "",
                      "output_tail": "stages that ran elsewhere: " + ", ".join(on_cpu)})
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": info, "parts": parts,
              "measurements": measurements, "stage_devices": stage_devices,
              "decoding": decoding_speed(smoke) if os.path.isdir(smoke) else {},
              "backends": json.load(open(backends, encoding="utf-8")) if os.path.exists(backends) else None,
              "total_seconds": round(time.time() - started, 1)}
    from common.io import write_json

    write_json(os.path.join(args.out, "report.json"), report)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    print(f"wrote {args.out}/report.md and report.json")
    sys.exit(0 if all(p["ok"] for p in parts) else 1)


if __name__ == "__main__":
    main()
