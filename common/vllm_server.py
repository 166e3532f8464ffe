"""A vLLM server as the policy's backend: started from the server's own environment, or a running one.

`make setup-vllm` builds that environment in .venv-vllm (vLLM pins its own torch and transformers, so it
never shares the main environment). `VLLMServer(model_folder)` starts its OpenAI-compatible server on a free
port of 127.0.0.1 and waits until it answers; leaving the `with` block stops it and everything it started
(its process group), also when the block ends in an error. Where this process dies without leaving the block
(killed), the kernel sends the server SIGTERM (PR_SET_PDEATHSIG) and vLLM stops its workers. `connect(url)`
reads a running server instead (one started by hand, e.g. with tensor parallelism on a GPU box).

Both give a `ServerInfo`: the base URL (.../v1), the served model's name, vLLM's version, the longest input
the server takes.
"""
import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from common.io import DataError

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the server's environment: .venv-vllm beside the code, or where SPPRM_VLLM_VENV says
VENV_ENV = "SPPRM_VLLM_VENV"
SERVED_NAME = "policy"
# KV cache of a CPU server, GiB (VLLM_CPU_KVCACHE_SPACE): small, since the machine is shared; the environment's
# own value wins
CPU_KV_CACHE_GB = 1
# The prefix cache holds whole blocks: with a CPU server's default (128 tokens) a resubmitted prefix of a short
# prompt would mostly miss; 32 is the smallest size vLLM's CPU attention runs at full speed with
CPU_BLOCK_SIZE = 32


@dataclass
class ServerInfo:
    url: str              # base URL, ending in /v1
    model: str            # the served model's name (what requests name)
    version: str          # vLLM's version
    max_model_len: int = None
    root: str = None      # the folder or hub id the server loaded

    def record(self):
        """What rows and manifests say about the backend that produced them."""
        return {"backend": "vllm", "backend_version": self.version, "served_model": self.root or self.model}


def venv_python():
    venv = os.environ.get(VENV_ENV) or os.path.join(ROOT, ".venv-vllm")
    return os.path.join(os.path.abspath(venv), "bin", "python")  # the server starts in another folder


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def base_url(url):
    """http://host:port, http://host:port/ or http://host:port/v1 -> http://host:port/v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def connect(url, timeout=10):
    """The ServerInfo of a running vLLM server at `url` (one line, DataError, where none answers)."""
    url = base_url(url)
    root = url[:-len("/v1")]
    try:
        models = _get_json(url + "/models", timeout)["data"]
        version = _get_json(root + "/version", timeout).get("version", "unknown")
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--vllm-url {url}: no vLLM server answers there ({type(e).__name__}: {e})") from None
    if not models:
        raise DataError(f"--vllm-url {url}: the server serves no model")
    model = models[0]
    return ServerInfo(url, model["id"], version, model.get("max_model_len"), model.get("root"))


def _die_with_parent():
    """In the server's process: SIGTERM when the process that started it dies, killed or not (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def serve_command(model, port, python=None, dtype="auto", max_model_len=None, extra_args=()):
    """The `vllm serve` command line: the OpenAI-compatible server of `model` on 127.0.0.1:port, automatic
    prefix caching (a resubmitted prefix costs only its new tokens) with cached-token counts in the usage,
    sampling defaults from the request only (not the model's generation_config). On a CPU: eager mode (no graph
    compilation: a quick start) and blocks of CPU_BLOCK_SIZE tokens. A server started by hand takes the same
    flags (and --tensor-parallel-size on GPUs)."""
    command = [python or venv_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--enable-prefix-caching", "--enable-prompt-tokens-details",
               "--generation-config", "vllm", "--seed", "0"]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if not on_gpu():
        command += ["--enforce-eager", "--block-size", str(CPU_BLOCK_SIZE)]
    elif "--gpu-memory-utilization" not in extra_args:
        # vLLM takes a share of the whole GPU and refuses to start where less is free: 80% of what this process
        # (its RM, loaded first) leaves free
        import torch

        free, total = torch.cuda.mem_get_info()
        command += ["--gpu-memory-utilization", f"{max(0.05, 0.8 * free / total):.2f}"]
    return command + list(extra_args)


def on_gpu():
    import torch

    return torch.cuda.is_available()


def server_env():
    """The server's environment: offline (the model is a local folder), no usage reports, and on a CPU a small
    KV cache and no thread pinning (the cores are shared)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GB))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.pop("PYTHONPATH", None)  # the server imports its own packages only
    return env


class VLLMServer:
    """`with VLLMServer(folder) as info:` a vLLM server of the model folder, stopped when the block ends.

    Start-up failures are one line (DataError): no server environment, the server exiting (its last error line
    and the log's path), or no answer within `timeout` seconds."""

    def __init__(self, model, python=None, dtype="auto", max_model_len=None, timeout=900, extra_args=(),
                 log_path=None):
        self.model, self.python, self.dtype = model, python or venv_python(), dtype
        self.max_model_len, self.timeout, self.extra_args = max_model_len, timeout, tuple(extra_args)
        self.log_path, self._temporary_log = log_path, log_path is None
        self.process = None
        self.info = None

    def __enter__(self):
        return self.start()

    def __exit__(self, kind, value, traceback):
        self.stop()
        if kind is None and self._temporary_log and os.path.exists(self.log_path):
            os.remove(self.log_path)  # a clean run: its temporary log said nothing needed (a failed one keeps it)
        return False

    def start(self):
        if not os.path.isfile(self.python):
            raise DataError(f"--backend vllm: no vLLM environment at {os.path.dirname(os.path.dirname(self.python))}"
                            f" (make setup-vllm builds it; or give --vllm-url of a running server)")
        port = free_port()
        if self.log_path is None:
            self.log_path = os.path.join(tempfile.gettempdir(), f"vllm-serve-{os.getpid()}-{port}.log")
        command = serve_command(self.model, port, self.python, self.dtype, self.max_model_len, self.extra_args)
        log.info("starting vLLM on 127.0.0.1:%d (log: %s)", port, self.log_path)
        with open(self.log_path, "w", encoding="utf-8") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_env(), cwd=tempfile.gettempdir(),
                                            start_new_session=True, preexec_fn=_die_with_parent)
        atexit.register(self.stop)  # an exit that skips the block (sys.exit in a signal handler, say)
        try:
            self.info = self._wait_ready(f"http://127.0.0.1:{port}")
        except BaseException:
            self.stop()
            raise
        log.info("vLLM %s serves %s at %s", self.info.version, self.model, self.info.url)
        return self.info

    def _wait_ready(self, root):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DataError(f"the vLLM server exited (status {self.process.returncode}) before it answered: "
                                f"{last_error_line(self.log_path)} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(root + "/health", timeout=5) as response:
                    if response.status == 200:
                        return connect(root)
            except (urllib.error.URLError, OSError, DataError):
                pass
            time.sleep(1.0)
        raise DataError(f"the vLLM server did not answer within {self.timeout:.0f} s (log: {self.log_path})")

    def stop(self, grace=30):
        """SIGTERM to the server's process group; SIGKILL to whatever of it is left after `grace` seconds."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _signal_group(process.pid, 0):
            process.poll()  # reaps the API server once it exits; its workers leave the group on their own
            time.sleep(0.2)
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()


def _signal_group(pgid, sig):
    """Send `sig` to a process group; False when none of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def last_error_line(path):
    """The last line of a server log that says what went wrong (an exception's message), else its last line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("error")]
    return (errors or lines or ["(empty log)"])[-1][:300]


def _main():
    """python -m common.vllm_server MODEL: serve a model folder until interrupted (for benchmarks by hand)."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from common.models import resolve_model_path

    with VLLMServer(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct")) as info:
        print(json.dumps(info.__dict__), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _main()
