"""Shared fixtures: the real SmolLM2 and MiniLM tokenizers, and tiny random models of real classes."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.models import MINILM, SMOLLM2, load_tokenizer  # noqa: E402

torch.set_num_threads(2)

# The data settings the tests started with: tests that point SPPRM_DATA_DIR / SPPRM_CACHE elsewhere still find the
# real files where the stages find them.
DATA_ENV = {k: os.environ.get(k) for k in ("SPPRM_DATA_DIR", "SPPRM_CACHE", "SPPRM_HUB_MIRROR", "XDG_CACHE_HOME")}
_REAL_DATA = []


def real_data_dir():
    """A folder laid out as the data folder with every real data file, found the way the stages find them: the
    data folder itself when it holds them all (it has the MANIFEST.tsv), else a folder of links to the copies in
    the data cache that `make data` fills (fetched now where missing). A fresh clone with no data folder beside it
    runs the tests after `make data`."""
    if _REAL_DATA:
        return _REAL_DATA[0]
    import tempfile
    from unittest import mock

    from common.sources import SOURCES, data_file, resolve_data_dir

    with mock.patch.dict(os.environ, {k: v for k, v in DATA_ENV.items() if v is not None}, clear=False):
        for k, v in DATA_ENV.items():
            if v is None:
                os.environ.pop(k, None)
        folder = resolve_data_dir()
        if not all(os.path.isfile(os.path.join(folder, relpath)) for relpath in SOURCES):
            found = {relpath: data_file(relpath) for relpath in SOURCES}
            folder = tempfile.mkdtemp(prefix="sp-prm-data-")
            for relpath, path in found.items():
                os.makedirs(os.path.dirname(os.path.join(folder, relpath)), exist_ok=True)
                os.symlink(path, os.path.join(folder, relpath))
    _REAL_DATA.append(folder)
    return folder


def pytest_configure(config):
    """The CPU tests compare with CPU fp32 values: unless the GPU tests are selected (-m gpu, make test-gpu), a
    GPU is hidden from them and from the stages they start, so --device auto means the CPU on a GPU box too."""
    markexpr = config.getoption("markexpr") or ""
    if "gpu" not in markexpr.replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def smol_tokenizer():
    return load_tokenizer(SMOLLM2)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return load_tokenizer(MINILM)


def tiny_config(kind, vocab_size, pad_token_id, num_labels=1):
    from transformers import BertConfig, GemmaConfig, GPT2Config, LlamaConfig

    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, num_labels=num_labels)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if kind == "gemma":
        return GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=8, max_position_embeddings=512, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    if kind == "bert":
        return BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=512, **common)
    raise ValueError(kind)


def tiny_rm(kind, tokenizer, seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(kind, len(tokenizer), tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    # A random head is near zero; scale it so score differences are well above float noise.
    with torch.no_grad():
        head = model.score if hasattr(model, "score") else model.classifier
        head.weight.mul_(50)
    return model.eval()


def run_script(script, *args, env=None, check=True):
    """Run a numbered script as a user would; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def save_tiny_rm(folder, kind, tokenizer, seed=0):
    model = tiny_rm(kind, tokenizer, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(path, rows):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def separable_pairs(n, seed=0, prefix="p"):
    """A task a tiny RM can learn: chosen replies praise, rejected replies insult, in varied wording."""
    import random

    rnd = random.Random(seed)
    good = ["great", "kind", "helpful", "lovely", "wonderful", "clear", "thanks", "happy"]
    bad = ["awful", "stupid", "useless", "rude", "terrible", "nasty", "hate", "ugly"]
    topics = ["the weather", "my cat", "this recipe", "the movie", "your answer", "the plan"]
    rows = []
    for i in range(n):
        topic = rnd.choice(topics)
        c = " ".join(rnd.choice(good) for _ in range(rnd.randint(3, 8)))
        r = " ".join(rnd.choice(bad) for _ in range(rnd.randint(3, 8)))
        rows.append({"id": f"{prefix}{i}", "prompt": f"\n\nHuman: What do you think of {topic}?\n\nAssistant:",
                     "chosen": f"I find {topic} {c}.", "rejected": f"I find {topic} {r}."})
    return rows


@pytest.fixture(scope="session")
def gpu_smoke_run(tmp_path_factory):
    """reproduce.py's gpu-smoke scale, its table1 and specrej parts, run once a session: the real output of the
    demo's pipeline (every stage, manifests and all) at a size the CPU makes in minutes. Returns (folder,
    [CompletedProcess of each part])."""
    import subprocess

    out = tmp_path_factory.mktemp("runs") / "gpu-smoke"
    procs = [subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--scale", "gpu-smoke", "--part",
                             part, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
             for part in ("table1", "specrej")]
    return out, procs


def execute_notebook(name, run_dir):
    """Run notebooks/<name> top to bottom on `run_dir` as a user would (its kernel, SPPRM_RUN_DIR); returns the
    text of every output."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    previous = os.environ.get("SPPRM_RUN_DIR")
    os.environ["SPPRM_RUN_DIR"] = str(run_dir)  # the kernel inherits it
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    finally:
        if previous is None:
            os.environ.pop("SPPRM_RUN_DIR")
        else:
            os.environ["SPPRM_RUN_DIR"] = previous
    return "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
