"""04_decode.py as a user runs it: resume, sharding across processes, real models (slow)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, save_tiny_rm, write_jsonl
from test_search import save_tiny_policy


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("models")
    policy = save_tiny_policy(root / "policy", smol_tokenizer)
    rm = save_tiny_rm(root / "rm", "llama", smol_tokenizer, seed=1)
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"id": f"p{i}", "prompt": f"\n\nHuman: Question number {i}: what is {i} + {i}?\n\nAssistant:"}
        for i in range(6)])
    return policy, rm, prompts


def decode(folders, out, *extra):
    policy, rm, prompts = folders
    return run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--rm", rm, "--method", "cbs",
                      "--beam", 2, "--successors", 2, "--chunk", 3, "--max-new-tokens", 6, "--batch-size", 2,
                      "--output", out, *extra)


def test_output_rows_and_resume_after_a_kill(folders, tmp_path):
    full = tmp_path / "full.jsonl"
    first = decode(folders, full, "--resume")
    assert "already decoded" not in first.stderr  # a first run has nothing to resume, and does not say so
    rows = read(full)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(6)]
    for r in rows:
        assert set(r) >= {"id", "prompt", "response", "method", "params", "rm", "policy", "stats"}
        assert r["method"] == "cbs" and r["params"]["beam"] == 2
        s = r["stats"]
        assert s["policy_calls"] > 0 and s["policy_tokens"] > 0 and s["rm_tokens"] > 0 and s["seconds"] > 0
    # a killed run: three rows and a torn fourth line on disk
    cut = tmp_path / "cut.jsonl"
    with open(full) as f:
        lines = f.readlines()
    cut.write_text("".join(lines[:3]) + lines[3][:20])
    resumed = decode(folders, cut, "--resume")
    assert "rank 0: 3 prompts already decoded, 3 to go" in resumed.stderr
    again = read(cut)
    assert sorted(r["id"] for r in again) == [f"p{i}" for i in range(6)]
    assert {r["id"]: r["response"] for r in again} == {r["id"]: r["response"] for r in rows}


def test_two_processes_give_the_same_rows(folders, tmp_path):
    one = tmp_path / "one.jsonl"
    decode(folders, one)
    two = tmp_path / "two.jsonl"
    policy, rm, prompts = folders
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533",
                           os.path.join(ROOT, "04_decode.py"), "--prompts", prompts, "--policy", policy, "--rm", rm,
                           "--method", "cbs", "--beam", "2", "--successors", "2", "--chunk", "3",
                           "--max-new-tokens", "6", "--batch-size", "2", "--output", str(two)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read(one), read(two)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert not list(tmp_path.glob("two.jsonl.shard*"))


def test_missing_rm_is_a_clear_error(folders, tmp_path):
    policy, _, prompts = folders
    proc = run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--method", "argsg",
                      "--output", tmp_path / "x.jsonl", check=False)
    assert proc.returncode != 0 and "needs --rm" in proc.stderr


@pytest.mark.slow
def test_real_smollm2_guided_by_smollm2_and_minilm_rms(tmp_path):
    from common.models import MINILM, SMOLLM2, load_reward_model, load_tokenizer

    for name in (SMOLLM2, MINILM):
        tok = load_tokenizer(name)
        model = load_reward_model(name, tokenizer=tok, allow_new_head=True)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    responses = {}
    for rm in (SMOLLM2, MINILM):
        for method, extra in (("argsg", ["--k", "5"]), ("bon", ["--n", "3"]), ("greedy", [])):
            out = tmp_path / f"{rm}-{method}.jsonl"
            args = ["--prompts", "hh-rlhf:heldout", "--limit", 2, "--policy", SMOLLM2, "--method", method,
                    "--max-new-tokens", 12, "--output", out, *extra]
            if method != "greedy":
                args += ["--rm", tmp_path / rm]
            run_script("04_decode.py", *args)
            rows = read(out)
            assert len(rows) == 2 and all(r["response"].strip() for r in rows)
            responses[(rm, method)] = [r["response"] for r in rows]
            if method == "argsg":
                assert rows[0]["stats"]["rm_path"] == ("cached" if rm == SMOLLM2 else "text")
    assert responses[(SMOLLM2, "argsg")] != responses[(SMOLLM2, "greedy")]
    assert responses[(MINILM, "bon")] != responses[(MINILM, "greedy")]


def test_reward_norm_uses_the_rm_statistics(folders, tmp_path):
    policy, rm, prompts = folders
    common = ["--prompts", prompts, "--policy", policy, "--method", "argsg", "--k", 4, "--w", 1.5,
              "--max-new-tokens", 5, "--limit", 3, "--reward-norm", "std"]
    proc = run_script("04_decode.py", *common, "--rm", rm, "--output", tmp_path / "x.jsonl", check=False)
    assert proc.returncode == 2 and "reward_stats.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "x.jsonl")
    rm_with_stats = shutil.copytree(rm, tmp_path / "rm")
    with open(os.path.join(rm_with_stats, "reward_stats.json"), "w") as f:
        json.dump({"mean": 1.0, "std": 0.1}, f)
    run_script("04_decode.py", *common, "--rm", rm_with_stats, "--output", tmp_path / "n.jsonl")
    rows = read(tmp_path / "n.jsonl")
    assert all(r["params"]["reward_norm"] == "std" and r["params"]["reward_stats"] == {"mean": 1.0, "std": 0.1}
               for r in rows)
    for r in rows:
        assert abs(r["stats"]["search_reward"] - (r["stats"]["reward"] - 1.0) / 0.1) < 1e-3


def test_cards_defaults_and_closed_rm_format(folders, tmp_path):
    """CARDS' defaults are recorded (soft rule, r* from the statistics, top-k 40 at 0.7); the closed format
    scores finished turns through text and says so in the params."""
    policy, rm, prompts = folders
    rm_with_stats = shutil.copytree(rm, tmp_path / "rm")
    with open(os.path.join(rm_with_stats, "reward_stats.json"), "w") as f:
        json.dump({"mean": 0.5, "std": 0.25}, f)
    common = ["--prompts", prompts, "--policy", policy, "--max-new-tokens", 6, "--limit", 2, "--rm", rm_with_stats]
    run_script("04_decode.py", *common, "--method", "cards", "--output", tmp_path / "c.jsonl")
    params = read(tmp_path / "c.jsonl")[0]["params"]
    assert params["cards_rule"] == "soft" and params["reward_threshold"] == 0.75  # mean + std
    assert (params["top_k"], params["temperature"], params["max_retries"], params["min_segment"],
            params["max_segment"]) == (40, 0.7, 20, 4, 64)
    proc = run_script("04_decode.py", *common[:-2], "--rm", rm, "--method", "cards", "--output", tmp_path / "x.jsonl",
                      check=False)
    assert proc.returncode == 2 and "needs a target reward" in proc.stderr
    run_script("04_decode.py", *common, "--method", "bon", "--n", 2, "--rm-format", "closed",
               "--output", tmp_path / "b.jsonl")
    rows = read(tmp_path / "b.jsonl")
    assert all(r["params"]["rm_format"] == "closed" and r["stats"]["rm_path"] == "text" for r in rows)


def save_broken_rm(folder, tokenizer, value):
    """A tiny decoder RM whose score head is all `value` (inf or NaN): every score it gives is not finite."""
    import torch

    from conftest import tiny_rm

    model = tiny_rm("llama", tokenizer, seed=1)
    with torch.no_grad():
        model.score.weight.fill_(value)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_lengths_beyond_the_rm_and_the_policy_are_cut_by_rule_and_counted(folders, tmp_path):
    """An RM read with a budget of 40 tokens (below every prompt's length): 04's rewards (text path) are 05's scores of the same replies and
    both count the truncated inputs; a prompt beyond the policy's 512 positions keeps its tail and is counted;
    a budget that leaves no room for a prompt is one error line."""
    policy, rm, _ = folders
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": f"p{i}", "prompt": f"\n\nHuman: Question number {i}: what is {i} + {i}?\n\nAssistant:"}
        for i in range(3)] + [{"id": "long", "prompt": "\n\nHuman: " + "Tell me more. " * 170 + "\n\nAssistant:"}])
    out = tmp_path / "gen.jsonl"
    run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--rm", rm, "--method", "argsg", "--k", 3,
               "--max-new-tokens", 6, "--max-length", 40, "--rm-path", "text", "--output", out)
    rows = read(out)
    truncation = json.loads((tmp_path / "gen.jsonl.manifest.json").read_text())["truncation"]
    cut_rewards = sum(r["stats"]["reward_input_truncated"] for r in rows)
    assert cut_rewards == 4 and truncation["rewards_of_truncated_inputs"] == 4
    assert [r["stats"]["prompt_tokens_cut"] > 0 for r in rows] == [False] * 3 + [True]
    assert truncation["prompts_cut_for_policy"] == 1 and truncation["policy_prompt_room"] == 512 - 6
    run_script("05_evaluate.py", "metrics", "--generations", out, "--metrics", "reward", "--rm", rm,
               "--max-length", 40, "--decoding-rm", "none", "--output", tmp_path / "m.json")
    scored = {r["id"]: r["reward"] for r in read(tmp_path / "m.rows.jsonl")}
    for r in rows:
        assert r["stats"]["reward"] == pytest.approx(scored[r["id"]], abs=1e-4)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["reward_truncated_inputs"] == {rm: cut_rewards}
    assert json.loads((tmp_path / "m.json.manifest.json").read_text())["truncated_inputs"] == {rm: cut_rewards}
    proc = run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--method", "greedy",
                      "--max-new-tokens", 512, "--output", tmp_path / "x.jsonl", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {policy}: --max-new-tokens 512 leaves no room for a "
                                                    "prompt in the policy's 512 positions")


@pytest.mark.parametrize("value,rm_path", [("nan", "cached"), ("inf", "text")])
def test_non_finite_rm_scores_are_one_error_line(folders, tmp_path, smol_tokenizer, value, rm_path):
    policy, _, prompts = folders
    broken = save_broken_rm(tmp_path / "rm", smol_tokenizer, float(value))
    proc = run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--rm", broken, "--method", "bon",
                      "--n", 2, "--max-new-tokens", 3, "--limit", 2, "--rm-path", rm_path,
                      "--output", tmp_path / "x.jsonl", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith(f"error: {broken}: the RM's score of prompt id 'p0' is ")
    assert "not finite" in lines[-1] and not os.path.exists(tmp_path / "x.jsonl")


def test_reward_statistics_too_small_for_float32_are_refused(folders, tmp_path):
    """A std of 1e-300 is 0 in float32, where the search divides by it: refused in one line, as NaN is."""
    policy, rm, prompts = folders
    for stats, says in (({"mean": 1.0, "std": 1e-300}, "same score"), ({"mean": 1e39, "std": 1.0}, "finite")):
        path = write_jsonl(tmp_path / "stats.json", [stats])
        proc = run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--rm", rm, "--method", "argsg",
                          "--reward-norm", "std", "--reward-stats", path, "--output", tmp_path / "x.jsonl",
                          check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith(f"error: {path}: ") and says in proc.stderr


def test_ranking_drawn_samples_is_best_of_n_decoded(folders, tmp_path, minilm_tokenizer):
    """--samples-of: an RM ranking the N samples another RM's Best-of-N drew gives the rows that Best-of-N
    guided by it decodes: the same samples (each token's uniform is keyed by prompt and sample), the same
    choice, reward, policy work and RM tokens; only the wall seconds are the drawing run's."""
    policy, _, prompts = folders
    rms = [save_tiny_rm(tmp_path / f"rm{seed}", "bert", minilm_tokenizer, seed=seed) for seed in (3, 4)]

    def bon(rm, out, *extra):
        return run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--rm", rm, "--method", "bon",
                          "--n", 4, "--max-new-tokens", 6, "--batch-size", 3, "--output", out, *extra, check=False)

    drawn, direct, ranked = (tmp_path / f"{name}.jsonl" for name in ("drawn", "direct", "ranked"))
    assert bon(rms[0], drawn, "--save-candidates").returncode == 0
    assert bon(rms[1], direct).returncode == 0
    proc = bon(rms[1], ranked, "--samples-of", drawn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b, c = read(drawn), read(direct), read(ranked)
    assert [len(r["candidate_tokens"]) for r in a] == [4] * 6
    assert any(x["response"] != y["response"] for x, y in zip(a, b))  # the two RMs choose differently
    for want, got in zip(b, c):
        assert (got["id"], got["response"], got["rm"], got["params"]) == (want["id"], want["response"], want["rm"],
                                                                            want["params"])
        for key in ("policy_tokens", "policy_calls", "rm_tokens", "rm_calls", "new_tokens", "rm_path",
                    "reward_input_truncated"):
            assert got["stats"][key] == want["stats"][key], key
        assert got["stats"]["reward"] == pytest.approx(want["stats"]["reward"], abs=1e-5)
    # samples drawn at another N, or by another method, are refused before any model loads
    proc = run_script("04_decode.py", "--prompts", prompts, "--policy", policy, "--rm", rms[1], "--method", "bon",
                      "--n", 2, "--max-new-tokens", 6, "--samples-of", drawn, "--output", tmp_path / "x.jsonl",
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --samples-of {drawn}: drawn with n 4, this run's is 2")
