"""The stages on CUDA against the CPU fp32 path (make test-gpu, which fails without a GPU; skipped where a plain
pytest run sees none).

Greedy decoding in fp32 on the GPU must give the CPU's tokens; in the default half precision the RM scores
that ARGS and Best-of-N report must agree with the CPU fp32 scores of the same tokens within SCORE_TOL (a
share of the spread of the scores: bf16 keeps about three significant digits through every layer), and the
replies must be as long as the CPU's (a search that stopped at once would pass a score check).
With SPPRM_GPU_REPORT=FILE each measurement is also appended to FILE as a JSON line (bench/gpu_check.py's
report reads them).
"""
import json
import os

import pytest
import torch

from common.data import load_prompts
from common.models import SMOLLM2, load_policy, load_reward_model, load_tokenizer, resolve_dtype
from common.rewards import score_encoded
from common.search import Policy, RewardModel, Search
from conftest import run_script, separable_pairs, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SCORE_TOL = 0.05          # |r_cuda - r_cpu| <= SCORE_TOL * (|r_cpu| + spread of the CPU scores)
N_PROMPTS, NEW_TOKENS = 8, 32


def record(**measurement):
    print(json.dumps(measurement))
    path = os.environ.get("SPPRM_GPU_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(measurement) + "\n")


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    """SmolLM2 with a seeded scalar head: a decoder RM that shares the policy's tokenizer (the cached path)."""
    folder = tmp_path_factory.mktemp("rm")
    tokenizer = load_tokenizer(SMOLLM2)
    torch.manual_seed(0)
    model = load_reward_model(SMOLLM2, tokenizer=tokenizer, allow_new_head=True)
    with torch.no_grad():
        model.score.weight.mul_(20)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("hh-rlhf:heldout", limit=N_PROMPTS)


def search(method, device, dtype, rm_folder=None, **knobs):
    tok = load_tokenizer(SMOLLM2, padding_side="left")
    policy = Policy(load_policy(SMOLLM2, dtype=dtype, device=device), tok, SMOLLM2)
    rm = None
    if rm_folder:
        rm_tok = load_tokenizer(rm_folder)
        rm = RewardModel(load_reward_model(rm_folder, tokenizer=rm_tok, dtype=dtype, device=device).eval(),
                         rm_tok, rm_folder, 2048)
    return Search(policy, method, rm, max_new_tokens=NEW_TOKENS, **knobs)


def test_greedy_on_cuda_gives_the_cpu_tokens(prompts):
    cpu = search("greedy", "cpu", torch.float32).run(prompts)
    cuda = search("greedy", "cuda", torch.float32).run(prompts)
    fp32_same = sum(a["tokens"] == b["tokens"] for a, b in zip(cuda, cpu))
    half = search("greedy", "cuda", resolve_dtype("cuda")).run(prompts)
    same = sum(a["tokens"][:8] == b["tokens"][:8] for a, b in zip(half, cpu))
    record(check="greedy tokens, CUDA against CPU fp32", fp32_equal=f"{fp32_same}/{len(prompts)}",
           half_first_8_equal=f"{same}/{len(prompts)}", half_dtype=str(resolve_dtype("cuda")))
    assert [r["tokens"] for r in cuda] == [r["tokens"] for r in cpu]
    # half precision may part from the CPU's argmax at a near tie, but not at the first tokens of most replies
    assert same >= len(prompts) // 2
    assert sum(len(r["tokens"]) for r in half) >= 0.5 * sum(len(r["tokens"]) for r in cpu)


@pytest.mark.parametrize("method,knobs", [("argsg", {"k": 10, "w": 1.5}), ("bon", {"n": 4})])
def test_reported_scores_on_cuda_agree_with_cpu_fp32(prompts, rm_folder, method, knobs):
    results = search(method, "cuda", resolve_dtype("cuda"), rm_folder, **knobs).run(prompts)
    cpu_results = search(method, "cpu", torch.float32, rm_folder, **knobs).run(prompts)
    tok = load_tokenizer(rm_folder)
    cpu_rm = RewardModel(load_reward_model(rm_folder, tokenizer=tok).eval(), tok, rm_folder, 2048)
    examples = [{"input_ids": cpu_rm.fmt.prompt_ids(p["prompt"]) + r["tokens"]} for p, r in zip(prompts, results)]
    cpu_scores = score_encoded(cpu_rm.model, examples, tok.pad_token_id)
    spread = float(torch.tensor(cpu_scores).std())
    worst = max(abs(r["reward"] - e) / (abs(e) + spread) for r, e in zip(results, cpu_scores))
    lengths = [len(r["tokens"]) for r in results], [len(r["tokens"]) for r in cpu_results]
    record(check=f"{method} RM scores, CUDA {resolve_dtype('cuda')} against CPU fp32", worst_relative_error=worst,
           tolerance=SCORE_TOL, mean_tokens_cuda=sum(lengths[0]) / len(prompts),
           mean_tokens_cpu=sum(lengths[1]) / len(prompts))
    assert worst <= SCORE_TOL
    # a search that stopped at once (or ran away) would pass the score check: replies as long as the CPU's
    assert all(lengths[0]) and 0.5 <= sum(lengths[0]) / sum(lengths[1]) <= 2.0


def test_stages_run_on_cuda_and_record_it(tmp_path, rm_folder):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(32))
    run_script("03_train.py", "--input", pairs, "--init", "minilm-l6", "--output", tmp_path / "orm",
               "--max-length", 64, "--device", "cuda")
    run_script("01_build_partial.py", "--input", pairs, "--output", tmp_path / "partial.jsonl",
               "--tokenizer", "minilm-l6", "--truncation", "sst", "--K", 1)
    run_script("02_weight.py", "--input", tmp_path / "partial.jsonl", "--output", tmp_path / "weighted.jsonl",
               "--ref-rm", tmp_path / "orm", "--device", "cuda")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"\n\nHuman: Tell me about "
                                                        f"topic {i}.\n\nAssistant:"} for i in range(4)])
    run_script("04_decode.py", "--prompts", prompts, "--rm", rm_folder, "--method", "argsg", "--k", 5,
               "--max-new-tokens", 8, "--output", tmp_path / "gen.jsonl", "--device", "cuda")
    run_script("05_evaluate.py", "metrics", "--generations", tmp_path / "gen.jsonl", "--rm", rm_folder,
               "--metrics", "reward,coherence", "--output", tmp_path / "metrics.json", "--device", "cuda")
    expected_dtype = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    for manifest in (tmp_path / "orm" / "manifest.json", tmp_path / "weighted.jsonl.manifest.json",
                     tmp_path / "gen.jsonl.manifest.json", tmp_path / "metrics.json.manifest.json"):
        made = json.loads(manifest.read_text())
        assert made["device"].startswith("cuda") and made["dtype"] == expected_dtype, manifest
