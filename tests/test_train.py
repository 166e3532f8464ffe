import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, save_tiny_rm, separable_pairs, tiny_rm, write_jsonl


def read_log(folder):
    with open(os.path.join(folder, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(ranks, *args, timeout=480, check=True):
    """03_train.py under the deepspeed launcher on `ranks` CPU processes. A rank that waits over two minutes for
    the others fails (DEEPSPEED_TIMEOUT, minutes) and the launcher with it; should anything still hang, the whole
    process group is killed at `timeout` seconds and the test fails: a deadlock is a failure, never a hang."""
    import shutil

    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               os.path.join(ROOT, "03_train.py"), *map(str, args), "--device", "cpu"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"deepspeed on {ranks} ranks did not finish in {timeout} s (a deadlock):\n"
                             + out[-2000:] + err[-3000:])
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


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
    # as a kill inside the checkpoint swap leaves it: the newest complete, not yet moved in, and an older one
    os.rename(tmp_path / "cut" / "checkpoint", tmp_path / "cut" / "checkpoint.tmp")
    os.makedirs(tmp_path / "cut" / "checkpoint.old")
    proc = run_script("03_train.py", *common, "--output", tmp_path / "cut", "--resume")
    assert "checkpoint.tmp at epoch 0, step 5" in proc.stderr
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
    init = save_tiny_rm(tmp_path / "init", "llama", smol_tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", separable_pairs(160, seed=4))
    out = tmp_path / "ds"
    run_deepspeed(2, "--input", data, "--init", init, "--output", out, "--deepspeed",
                  os.path.join(ROOT, "configs", "zero3.json"), "--grad-accum", "2", "--lr", "3e-3")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    before = load_file(os.path.join(init, "model.safetensors"))
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert json.load(open(out / "manifest.json"))["world_size"] == 2


def heldout_scores(folders, n_pairs=16, seed=3):
    """Scores of the first held-out HH pairs' chosen and rejected replies by each model folder (and, first, by
    MiniLM with the score head a run of --seed `seed` starts from)."""
    from common.data import load_pairs
    from common.models import MINILM, load_reward_model, load_tokenizer
    from common.rewards import RMFormat, score

    pairs = load_pairs("hh-rlhf:heldout")[:n_pairs]
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    tokenizer = load_tokenizer(MINILM)
    torch.manual_seed(seed)  # as 03 does before it loads --init
    models = [load_reward_model(MINILM, tokenizer=tokenizer, allow_new_head=True)]
    models += [load_reward_model(str(f), tokenizer=tokenizer) for f in folders]
    return [torch.tensor(score(m.eval(), RMFormat(tokenizer, m, max_length=256), prompts, responses, 8))
            for m in models]


def test_deepspeed_zero3_two_ranks_on_real_pairs_of_mixed_lengths(tmp_path):
    """ZeRO-3 on two CPU ranks over 36 real HH pairs of mixed lengths (17 of 36 cut at 256 tokens): 9 batches of
    4, which two ranks cannot share evenly (5 and 4 + one of weight 0), and windows of 2 micro-batches (the
    epoch ends inside the third). It finishes, and its model is the one-process model that accumulates the same
    4 batches a step (the same steps, gradients and schedule).

    Tolerance: every held-out score within 1% of how far training moved the scores from the starting model.
    Measured: 0.1% (the order of float sums; a one-process run with one padded forward instead of length groups
    differs by 0.06%). What the bound tells apart: a last window that never steps (12%), the padding batch
    trained with weight 1 (2.6%), forwards that bypass the engine so that ZeRO-3 keeps only the last
    micro-batch's gradient of a window (71%)."""
    common = ["--input", "hh-rlhf:train", "--limit", 36, "--init", "minilm-l6", "--max-length", 256,
              "--batch-size", 4, "--seed", 3, "--log-steps", 1]
    run_deepspeed(2, *common, "--output", tmp_path / "ds", "--grad-accum", 2,
                  "--deepspeed", os.path.join(ROOT, "configs", "zero3.json"))
    run_script("03_train.py", *common, "--output", tmp_path / "one", "--grad-accum", 4, "--device", "cpu")
    manifest = json.load(open(tmp_path / "ds" / "manifest.json"))
    assert manifest["world_size"] == 2 and manifest["total_steps"] == 3 and manifest["truncated"] > 0
    for run in ("ds", "one"):
        assert [e["step"] for e in read_log(tmp_path / run) if "loss" in e] == [1, 2, 3]
    start, ds, one = heldout_scores([tmp_path / "ds", tmp_path / "one"])
    moved = (one - start).abs().max().item()
    assert moved > 1e-3
    assert (ds - one).abs().max().item() <= 0.01 * moved, ((ds - one).abs().max().item(), moved)
    # reward statistics: both score the training pairs after training (every rank the same forwards)
    stats = [json.load(open(tmp_path / run / "reward_stats.json")) for run in ("ds", "one")]
    assert stats[0]["n"] == stats[1]["n"] == 72
    assert abs(stats[0]["mean"] - stats[1]["mean"]) <= 0.01 * moved


def test_every_rank_gets_as_many_micro_batches():
    from common.runtime import rank_share

    batches = [[i] for i in range(9)]
    for world in (1, 2, 4, 12):
        shares = [rank_share(batches, rank, world) for rank in range(world)]
        assert len({len(share) for share, _ in shares}) == 1  # the same count on every rank
        assert len(shares[0][0]) == -(-9 // world)
        real = sorted(b[0] for share, n_real in shares for b in share[:n_real])
        assert real == list(range(9))  # every batch trained once, by one rank
        for share, n_real in shares:  # padding only at the end, a batch of the data (the same forward)
            assert all(b in batches for b in share[n_real:])
    assert [n for _, n in (rank_share(batches, r, 2) for r in range(2))] == [5, 4]


def test_batch_loss_one_forward_per_micro_batch_and_padding(smol_tokenizer):
    """Several ranks: one padded forward whatever the lengths (the same loss and gradient as the length groups);
    a padding batch: loss 0, gradient 0, nothing counted."""
    from common.rewards import RMFormat, batch_loss, reward_at, training_units

    model = tiny_rm("llama", smol_tokenizer)
    model.train()
    fmt = RMFormat(smol_tokenizer, model, max_length=512)
    rows = separable_pairs(6, seed=2)
    for row in rows[:2]:
        row["chosen"] += " It is" + " very" * 300 + " good."  # two long pairs among short ones
    units = training_units(fmt, rows)

    def run(**kwargs):
        calls = []

        def forward(batch, positions):
            calls.append(batch["input_ids"].shape)
            return reward_at(model, batch, positions, decoder=True)

        model.zero_grad()
        loss, counts = batch_loss(model, units, smol_tokenizer.pad_token_id, True, "cpu", forward=forward, **kwargs)
        loss.backward()
        return loss, counts, calls, [p.grad.clone() for p in model.parameters()]

    grouped, grouped_counts, grouped_calls, grouped_grads = run()
    padded, padded_counts, padded_calls, padded_grads = run(length_grouped=False)
    assert len(grouped_calls) >= 2 and len(padded_calls) == 1 and padded_calls[0][0] == 12
    assert padded.item() == pytest.approx(grouped.item(), abs=1e-6)
    for a, b in zip(padded_grads, grouped_grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert padded_counts["rows"] == 6 and len(padded_counts["complete_scores"]) == 12
    pad, pad_counts, pad_calls, pad_grads = run(length_grouped=False, padding=True)
    assert len(pad_calls) == 1 and pad.item() == 0.0 and all(not g.any() for g in pad_grads)
    assert pad_counts == {"rows": 0, "forwards": 0, "tokens": 0, "complete_scores": []}


def test_deepspeed_config_needs_no_compiler(tmp_path):
    """configs/zero3.json resolves, in DeepSpeed's own code, to PyTorch's AdamW (no op to build); without
    torch_adam the same code picks FusedAdam, which compiles with nvcc at first use on CUDA."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from common.runtime import deepspeed_config

    args = SimpleNamespace(batch_size=8, max_grad_norm=1.0, lr=5e-6, weight_decay=0.0)
    config = deepspeed_config(os.path.join(ROOT, "configs", "zero3.json"), args, 16, 8, True, torch.bfloat16)
    assert config["optimizer"]["type"] == "AdamW" and "scheduler" not in config and config["bf16"]["enabled"]
    assert config["train_batch_size"] == 8 * 16 * 8 and "offload_optimizer" not in config["zero_optimization"]
    engine = SimpleNamespace(zero_use_cpu_optimizer=lambda: False, zenflow=False, bf16_optimizer_states=lambda: False)
    params = dict(config["optimizer"]["params"])
    optimizer, _ = DeepSpeedEngine.get_optimizer_configuration(engine, dict(params), True)
    assert optimizer is torch.optim.AdamW
    params.pop("torch_adam")
    optimizer, _ = DeepSpeedEngine.get_optimizer_configuration(engine, params, True)
    assert optimizer.__name__ == "FusedAdam"
    # a config that names no optimizer gets the same
    with open(os.path.join(ROOT, "configs", "zero3.json")) as f:
        write_jsonl(tmp_path / "bare.json", [{k: v for k, v in json.load(f).items() if k != "optimizer"}])
    config = deepspeed_config(tmp_path / "bare.json", args, 1, 1, True, torch.bfloat16)
    assert config["optimizer"]["params"]["torch_adam"] is True


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


def test_checkpoints_hold_each_ranks_random_state_cuda_too(tmp_path, smol_tokenizer, monkeypatch):
    """A resumed run draws the same random numbers as an uninterrupted one: the CPU generator's state and, on a
    GPU, the CUDA generator's (faked here: the runtime reads and restores it through torch.cuda)."""
    from common.runtime import Runtime, check_checkpoint

    args = SimpleNamespace(deepspeed=None, lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0)
    rt = Runtime(args, tiny_rm("llama", smol_tokenizer), 10, 1, torch.device("cpu"), torch.float32)
    rt.cuda = True
    cuda_state = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device="cuda": cuda_state.update(now=t.clone()))
    folder = str(tmp_path / "checkpoint")
    torch.manual_seed(11)
    rt.save_checkpoint(folder, {"epoch": 0, "micro": 3, "step": 3, "fingerprint": {}})
    expected = torch.rand(4)
    cuda_state["now"] = torch.zeros(16, dtype=torch.uint8)  # both generators move on
    state = check_checkpoint(folder, {}, 1)
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"torch", "cuda"}
    rt.load_checkpoint(folder, state, folder)
    assert torch.equal(torch.rand(4), expected)
    assert torch.equal(cuda_state["now"], torch.arange(16, dtype=torch.uint8))
