import json
import os

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import run_script, save_tiny_rm, separable_pairs, write_jsonl


def read_log(folder):
    with open(os.path.join(folder, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_learns_a_separable_task(tmp_path, smol_tokenizer):
    init = save_tiny_rm(tmp_path / "init", "llama", smol_tokenizer)
    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(96, seed=1))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", separable_pairs(32, seed=2, prefix="h"))
    out = tmp_path / "rm"
    run_script("03_train.py", "--input", train, "--init", init, "--output", out, "--eval", heldout,
               "--epochs", 3, "--lr", 3e-3, "--batch-size", 8, "--log-steps", 4, "--eval-prefix-lengths", "2,5")
    log = read_log(out)
    losses = [e["loss"] for e in log if "loss" in e]
    evals = [e["eval"] for e in log if "eval" in e]
    assert losses[-1] < 0.5 * losses[0]
    assert len(evals) == 3 and evals[-1]["accuracy"] >= 0.9
    assert all(e["rows_per_s"] > 0 and e["tokens_per_s"] > 0 for e in log if "loss" in e)
    # a standard HF folder that AutoModelForSequenceClassification loads
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and AutoTokenizer.from_pretrained(out) is not None
    assert os.path.exists(out / "model.safetensors") and os.path.exists(out / "eval.json")
    assert not os.path.exists(out / "checkpoint")


def test_zero_weights_train_nothing_and_weights_scale_the_loss(tmp_path, smol_tokenizer):
    init = save_tiny_rm(tmp_path / "init", "llama", smol_tokenizer)
    rows = separable_pairs(16)
    for r in rows:
        r["weight"] = 0.0
    rows[0]["weight"] = 2.0
    data = write_jsonl(tmp_path / "w.jsonl", rows)
    run_script("03_train.py", "--input", data, "--init", init, "--output", tmp_path / "rm", "--lr", 1e-3)
    manifest = json.load(open(tmp_path / "rm" / "manifest.json"))
    assert manifest["rows"] == 1 and manifest["zero_weight_skipped"] == 15


def test_resume_gives_the_same_weights(tmp_path, smol_tokenizer):
    init = save_tiny_rm(tmp_path / "init", "llama", smol_tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", separable_pairs(64, seed=3))
    common = ["--input", data, "--init", init, "--epochs", 2, "--lr", 1e-3, "--batch-size", 8,
              "--save-steps", 3, "--seed", 7]
    run_script("03_train.py", *common, "--output", tmp_path / "full")
    run_script("03_train.py", *common, "--output", tmp_path / "cut", "--stop-after-steps", 5)
    assert os.path.exists(tmp_path / "cut" / "checkpoint" / "trainer_state.json")
    assert not os.path.exists(tmp_path / "cut" / "model.safetensors")
    run_script("03_train.py", *common, "--output", tmp_path / "cut", "--resume")
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    init_w = load_file(os.path.join(init, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert any(not torch.equal(a[k], init_w[k]) for k in a)  # it did train
    steps = [e["step"] for e in read_log(tmp_path / "cut") if "loss" in e]
    assert steps == sorted(steps) and steps[-1] == 16


def test_deepspeed_two_processes_on_cpu(tmp_path, smol_tokenizer):
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    init = save_tiny_rm(tmp_path / "init", "llama", smol_tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", separable_pairs(160, seed=4))
    out = tmp_path / "ds"
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", "29517", os.path.join(ROOT, "03_train.py"),
                           "--input", data, "--init", init, "--output", out, "--deepspeed",
                           os.path.join(ROOT, "configs", "zero3.json"), "--grad-accum", "2", "--lr", "3e-3"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    before = load_file(os.path.join(init, "model.safetensors"))
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert json.load(open(out / "manifest.json"))["world_size"] == 2


def test_training_on_weights_from_itself_is_refused(tmp_path, smol_tokenizer):
    """The reference RM must not be the model being trained (a copy of the same weights counts as the same)."""
    import shutil

    init = save_tiny_rm(tmp_path / "init", "llama", smol_tokenizer)
    other = save_tiny_rm(tmp_path / "other", "llama", smol_tokenizer, seed=5)
    shutil.copytree(init, tmp_path / "copy")
    partial = tmp_path / "partial.jsonl"
    run_script("01_build_partial.py", "--input", write_jsonl(tmp_path / "p.jsonl", separable_pairs(12)),
               "--output", partial, "--tokenizer", init, "--truncation", "sst", "--K", 2)
    for ref, name in ((init, "self"), (other, "other")):
        run_script("02_weight.py", "--input", partial, "--output", tmp_path / f"w_{name}.jsonl", "--ref-rm", ref)
    for init_as in (init, tmp_path / "copy"):
        proc = run_script("03_train.py", "--input", tmp_path / "w_self.jsonl", "--init", init_as,
                          "--output", tmp_path / "rm", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("error:") and "--allow-self-reference" in proc.stderr
        assert not os.path.exists(tmp_path / "rm" / "model.safetensors")
    run_script("03_train.py", "--input", tmp_path / "w_self.jsonl", "--init", init, "--output", tmp_path / "rm",
               "--allow-self-reference")
    heldout = write_jsonl(tmp_path / "heldout.jsonl", separable_pairs(6, seed=9, prefix="h"))
    run_script("03_train.py", "--input", tmp_path / "w_other.jsonl", "--init", init, "--output", tmp_path / "rm2",
               "--eval", heldout, "--eval-prefix-lengths", "2")
    manifest = json.load(open(tmp_path / "rm2" / "manifest.json"))
    assert manifest["reference"]["path"] == os.path.realpath(other)
    # reward_stats.json: mean and std of the trained RM's scores of the held-out complete responses
    from transformers import AutoModelForSequenceClassification

    from common.rewards import RMFormat

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm2").eval()
    fmt = RMFormat(smol_tokenizer, model, max_length=512)
    scores = []
    for pair in separable_pairs(6, seed=9, prefix="h"):
        for side in ("chosen", "rejected"):
            ids = fmt.encode(pair["prompt"], pair[side])["input_ids"]
            with torch.no_grad():
                scores.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    stats = json.load(open(tmp_path / "rm2" / "reward_stats.json"))
    assert stats["n"] == 12 and abs(stats["mean"] - float(np.mean(scores))) < 1e-4
    assert abs(stats["std"] - float(np.std(scores))) < 1e-4 and stats["std"] > 0
