"""Half precision on the CPU, as a GPU runs it: scores come out of an fp32 head whatever the model's dtype, so
bf16/fp16 make no tie that fp32 does not have; every stage honours --dtype, agrees with fp32 within the
tolerances below and records the dtype that acted in its manifest.

Tolerances on scores: the tiny random models of conftest (a head scaled by 50, which scales the backbone's
rounding with it) stay within 5% (bf16) and 2% (fp16) of fp32's score, of its size or of 1 if larger (measured:
at most 2.3% and 1.1%); real MiniLM-L6 with a fresh head on real HH pairs within 5e-4 (measured: 2.5e-4 in bf16,
5e-5 in fp16)."""
import copy
import json

import pytest
import torch

from common.rewards import RMFormat, collate, head_layers, reward_at, score, score_encoded
from conftest import run_script, save_tiny_rm, separable_pairs, tiny_rm, write_jsonl

TINY_TOL = {torch.bfloat16: 0.05, torch.float16: 0.02, "bf16": 0.05, "fp16": 0.02}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def close(got, exact, dtype):
    """Within the tiny models' tolerance for dtype (relative to the score, at least 1)."""
    return abs(got - exact) <= TINY_TOL[dtype] * max(1.0, abs(exact))


PROMPTS = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: "
           "What should I cook tonight?\n\nAssistant:"]
WORDS = "flour water salt yeast rise bake oven heat knead dough crust warm slow quick soft".split()


def many_responses(n=48):
    """n different replies of similar length (scores close together: where rounding makes ties)."""
    import random

    rnd = random.Random(0)
    return [" ".join(rnd.choice(WORDS) for _ in range(8)) + f" for {i} minutes." for i in range(n)]


def half(model, dtype):
    return copy.deepcopy(model).to(dtype).eval()


def cpu_supports(dtype):
    """bf16 and fp16 matmuls and autocast on this CPU (torch emulates them where the hardware lacks them)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.Linear(4, 2)(torch.ones(1, 4))
        torch.nn.Linear(4, 2).to(dtype)(torch.ones(1, 4, dtype=dtype))
        return True
    except RuntimeError:
        return False


HALF = [pytest.param(d, marks=pytest.mark.skipif(not cpu_supports(d), reason=f"no {d} on this CPU"))
        for d in (torch.bfloat16, torch.float16)]


# ------------------------------------------------------------------------------------------ the head in fp32

@pytest.mark.parametrize("kind", ["llama", "gemma", "gpt2", "bert"])
def test_fp32_models_score_bit_for_bit_as_before(kind, smol_tokenizer, minilm_tokenizer):
    """On an fp32 model the fp32 head changes nothing: the same bits as the model's own head."""
    tok = minilm_tokenizer if kind == "bert" else smol_tokenizer
    model = tiny_rm(kind, tok)
    fmt = RMFormat(tok, model)
    batch, offsets = collate([fmt.encode(PROMPTS[i % 2], r) for i, r in enumerate(many_responses(6))],
                             tok.pad_token_id)
    last = batch["attention_mask"].sum(-1) - 1
    with torch.no_grad():
        got = reward_at(model, batch, last)
        if kind == "bert":
            before = model(**batch).logits[:, 0]
        else:
            position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      position_ids=position_ids).last_hidden_state
            before = model.score(hidden[torch.arange(len(last)), last])[:, 0]
    assert torch.equal(got, before)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_half_precision_models_make_no_ties_that_fp32_lacks(kind, dtype, smol_tokenizer, minilm_tokenizer):
    """A bf16/fp16 backbone: scores within the tolerance of fp32's and as many distinct values; the model's own
    head in that precision rounds them into ties (what the fp32 head removes)."""
    import contextlib

    import common.rewards as rewards

    tok = minilm_tokenizer if kind == "bert" else smol_tokenizer
    model = tiny_rm(kind, tok)
    fmt = RMFormat(tok, model)
    responses = many_responses()
    prompts = [PROMPTS[0]] * len(responses)
    exact = score(model, fmt, prompts, responses)
    low = half(model, dtype)
    got = score(low, fmt, prompts, responses)
    assert len(set(exact)) == len(responses)
    assert len(set(got)) == len(set(exact))
    assert all(close(a, b, dtype) for a, b in zip(got, exact))
    rounded = low.score if kind == "llama" else low.classifier
    assert rounded.weight.dtype == dtype and all(layer.weight.dtype == dtype for layer in head_layers(low))
    original = rewards.fp32_scores
    try:  # the model's own head, in its own precision
        rewards.fp32_scores = lambda layers: contextlib.nullcontext()
        own = score(low, fmt, prompts, responses)
    finally:
        rewards.fp32_scores = original
    assert len(set(own)) < len(responses)


def test_the_head_is_fp32_under_autocast_and_gradients_reach_it(smol_tokenizer):
    """Training under autocast (a GPU's, or the CPU's with --dtype bf16): the scores and the loss are fp32, the
    head is computed from the fp32 cast of the last hidden state, and its weights get gradients."""
    model = tiny_rm("llama", smol_tokenizer).train()
    fmt = RMFormat(smol_tokenizer, model)
    batch, _ = collate([fmt.encode(PROMPTS[0], r) for r in many_responses(4)], smol_tokenizer.pad_token_id)
    last = batch["attention_mask"].sum(-1) - 1
    seen = []
    model.score.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = reward_at(model, batch, last)
        with torch.no_grad():  # what autocast alone would give: a bf16 head
            own = model.score(torch.ones(1, model.config.hidden_size))
    assert scores.dtype == torch.float32 and own.dtype == torch.bfloat16
    assert seen[0][1] == torch.float32
    scores.sum().backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    assert "forward" not in model.score.__dict__  # the swap is undone


def test_the_engines_cached_rm_head_is_fp32(smol_tokenizer):
    """The RM cache of the search applies the same fp32 head: its rewards in bf16 equal the RM's score of the
    same reply within the tolerance and are not on bf16's grid."""
    from common.search import Policy, RewardModel, Search
    from test_search import tiny_policy

    policy = tiny_policy(smol_tokenizer)
    policy = Policy(half(policy.model, torch.bfloat16), smol_tokenizer, "tiny-bf16")
    rm32 = tiny_rm("llama", smol_tokenizer, seed=1)
    rm = RewardModel(half(rm32, torch.bfloat16), smol_tokenizer, "tiny-rm-bf16")
    search = Search(policy, "bon", rm, rm_path="cached", max_new_tokens=6, seed=0, n=3)
    assert search.cached_rm
    got = search.run([{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    fmt = RMFormat(smol_tokenizer, rm32)
    for p, g in zip(PROMPTS, got):
        exact = score_encoded(rm32, [fmt.encode(p, response_ids=g["tokens"])], smol_tokenizer.pad_token_id)[0]
        assert close(g["reward"], exact, torch.bfloat16)
        assert float(torch.tensor(g["reward"]).to(torch.bfloat16)) != g["reward"]


@pytest.mark.parametrize("method", ["greedy", "sample", "argsg", "cbs", "tbs", "bon", "cards", "specrej"])
def test_every_method_runs_in_bf16_with_fp32_rewards(method, smol_tokenizer, minilm_tokenizer):
    """Each method on a bf16 policy and bf16 RMs (the cached decoder path and the text path of an encoder):
    rewards within the tolerance of the fp32 RM's score of the same reply."""
    from common.search import Policy, RewardModel, Search
    from common.search.methods import make_method
    from test_search import tiny_policy

    policy = tiny_policy(smol_tokenizer)
    policy = Policy(half(policy.model, torch.bfloat16), smol_tokenizer, "tiny-bf16")
    uses_rm = make_method(method).uses_rm
    knobs = {"reward_threshold": 0.0} if method == "cards" else {}
    for rm32, tok in ((tiny_rm("llama", smol_tokenizer, seed=1), smol_tokenizer),
                      (tiny_rm("bert", minilm_tokenizer, seed=2), minilm_tokenizer)):
        rm = RewardModel(half(rm32, torch.bfloat16), tok, "tiny-rm-bf16")
        search = Search(policy, method, rm if uses_rm else None, max_new_tokens=6, seed=0, **knobs)
        got = search.run([{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
        assert all(g["tokens"] for g in got)
        if not uses_rm:
            break
        fmt = RMFormat(tok, rm32)
        for p, g in zip(PROMPTS, got):  # the fp32 RM's score of what the bf16 RM read: tokens, or their text
            exact = score_encoded(rm32, [fmt.encode(p, response_ids=g["tokens"])], tok.pad_token_id)[0] \
                if search.cached_rm else score(rm32, fmt, [p], [g["response"]])[0]
            assert close(g["reward"], exact, torch.bfloat16), (method, g["response"], g["reward"], exact)


def test_real_minilm_on_real_pairs_agrees_with_fp32(minilm_tokenizer):
    """MiniLM-L6 (a fresh head, seeded) on 12 real HH pairs: bf16 and fp16 within 5e-4 of fp32, no ties, and
    the same preferred reply in every pair."""
    from common.data import load_pairs
    from common.models import MINILM, load_reward_model

    pairs = load_pairs("hh-rlhf:heldout")[:12]
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    scores = {}
    for dtype in [torch.float32] + [d for d in (torch.bfloat16, torch.float16) if cpu_supports(d)]:
        torch.manual_seed(0)
        model = load_reward_model(MINILM, tokenizer=minilm_tokenizer, dtype=dtype, allow_new_head=True).eval()
        scores[dtype] = score(model, RMFormat(minilm_tokenizer, model, max_length=256), prompts, responses)
    exact = scores.pop(torch.float32)
    n = len(pairs)
    for dtype, got in scores.items():
        assert max(abs(a - b) for a, b in zip(got, exact)) < 5e-4, dtype
        assert len(set(got)) == len(set(exact)) == 2 * n
        assert [a > b for a, b in zip(got[:n], got[n:])] == [a > b for a, b in zip(exact[:n], exact[n:])]


# ------------------------------------------------------------------------------------------ the stages

def manifest(path):
    with open(str(path) + ".manifest.json") as f:
        return json.load(f)


def rows_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smol_tokenizer):
    from test_search import save_tiny_policy

    root = tmp_path_factory.mktemp("precision")
    return {"rm": save_tiny_rm(root / "rm", "llama", smol_tokenizer, seed=3),
            "policy": save_tiny_policy(root / "policy", smol_tokenizer)}


def dtypes_here():
    return ["fp32"] + [NAMES[d] for d in (torch.bfloat16, torch.float16) if cpu_supports(d)]


def test_02_weights_in_half_precision_agree_with_fp32(tmp_path, tiny_models):
    """02 with --dtype bf16/fp16 against fp32: reference scores within the tolerance, weights within 10% where
    fp32's margin is beyond the rounding (nearer, the sign itself is noise), no pair tied that fp32 does not
    tie (a cut before the replies differ is a tie in all), and the manifest records the dtype that acted."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(10))
    partial = tmp_path / "partial.jsonl"
    run_script("01_build_partial.py", "--input", pairs, "--output", partial, "--tokenizer", tiny_models["rm"])
    out = {}
    for name in dtypes_here():
        out[name] = tmp_path / f"w_{name}.jsonl"
        run_script("02_weight.py", "--input", partial, "--output", out[name], "--ref-rm", tiny_models["rm"],
                   "--device", "cpu", "--dtype", name)
        assert manifest(out[name])["dtype"] == name
    exact = rows_of(out.pop("fp32"))
    assert len(exact) > 10
    for name, path in out.items():
        got = rows_of(path)
        for a, b in zip(got, exact):
            assert a["id"] == b["id"]
            assert close(a["ref_chosen"], b["ref_chosen"], name) and close(a["ref_rejected"], b["ref_rejected"], name)
            tie = a["ref_chosen"] == a["ref_rejected"]
            assert tie <= (b["ref_chosen"] == b["ref_rejected"]), (name, a["id"])
            assert tie == (a["chosen"] == a["rejected"]) and (not tie or a["weight"] == b["weight"] == 0)
            margin = b["ref_chosen"] - b["ref_rejected"]
            if abs(margin) > 2 * TINY_TOL[name] * max(1.0, abs(b["ref_chosen"])):
                assert abs(a["weight"] - b["weight"]) <= 0.1 * b["weight"], (name, a["id"])
    assert any(r["chosen"] == r["rejected"] for r in exact)


def test_03_trains_in_the_chosen_precision(tmp_path, tiny_models):
    """03 with --dtype bf16/fp16 on the CPU trains under autocast over fp32 weights: the run differs from fp32
    (the precision acted), its losses and saved weights stay close, and the manifest says which dtype."""
    from safetensors.torch import load_file

    pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(16))
    logs, weights = {}, {}
    for name in dtypes_here():
        out = tmp_path / f"rm_{name}"
        run_script("03_train.py", "--input", pairs, "--init", tiny_models["rm"], "--output", out, "--lr", 1e-3,
                   "--batch-size", 4, "--device", "cpu", "--dtype", name)
        with open(out / "manifest.json") as f:
            assert json.load(f)["dtype"] == name
        logs[name] = [r["loss"] for r in rows_of(out / "train_log.jsonl") if "loss" in r]
        weights[name] = load_file(str(out / "model.safetensors"))
    start = load_file(str(tiny_models["rm"]) + "/model.safetensors")
    exact = weights.pop("fp32")
    moved = sum(float((exact[k] - start[k]).abs().sum()) for k in exact)
    for name, got in weights.items():
        assert all(t.dtype == torch.float32 for t in got.values())  # fp32 master weights
        assert logs[name] != logs["fp32"]  # autocast acted on the CPU
        assert max(abs(a - b) for a, b in zip(logs[name], logs["fp32"])) < 0.05
        off = sum(float((got[k] - exact[k]).abs().sum()) for k in exact)
        assert 0 < off < 0.2 * moved, (name, off, moved)


def test_04_decodes_in_half_precision_with_fp32_rewards(tmp_path, tiny_models):
    """04 with --dtype bf16/fp16: the manifest records it, and each reward is within the tolerance of the fp32
    RM's score of the same reply (as 05 scores it, in fp32)."""
    from common.rewards import load_rm

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    model, fmt = load_rm(tiny_models["rm"])
    for name in dtypes_here()[1:]:
        out = tmp_path / f"g_{name}.jsonl"
        run_script("04_decode.py", "--prompts", prompts, "--policy", tiny_models["policy"], "--rm", tiny_models["rm"],
                   "--method", "argsg", "--k", 3, "--max-new-tokens", 6, "--output", out, "--device", "cpu",
                   "--dtype", name)
        assert manifest(out)["dtype"] == name
        rows = rows_of(out)
        exact = score(model, fmt, [r["prompt"] for r in rows], [r["response"] for r in rows])
        assert all(close(row["stats"]["reward"], e, name) for row, e in zip(rows, exact))


def test_05_scores_in_half_precision_agree_with_fp32(tmp_path, tiny_models):
    """05's reward metric with --dtype bf16/fp16 against fp32: every row within the tolerance, as many distinct
    scores, the dtype in the manifest."""
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"id": f"g{i}", "prompt": PROMPTS[i % 2], "response": r}
                                               for i, r in enumerate(many_responses(12))])
    rewards = {}
    for name in dtypes_here():
        out = tmp_path / f"m_{name}.json"
        run_script("05_evaluate.py", "metrics", "--generations", gen, "--metrics", "reward", "--rm", tiny_models["rm"],
                   "--output", out, "--device", "cpu", "--dtype", name)
        assert manifest(out)["dtype"] == name
        rewards[name] = [r["reward"] for r in rows_of(str(out)[:-5] + ".rows.jsonl")]
    exact = rewards.pop("fp32")
    for name, got in rewards.items():
        assert all(close(a, b, name) for a, b in zip(got, exact))
        assert len(set(got)) == len(set(exact)) == len(exact)
