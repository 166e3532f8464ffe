import json
import re

import pytest
import torch

from common.search import Policy, RewardModel, Search, make_method
from conftest import tiny_config, tiny_rm
from reference_search import Reference

PROMPTS = [
    {"id": "a", "prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:"},
    {"id": "b", "prompt": "Tell me a joke about a very long and winding road that never seems to end."},
    {"id": "c", "prompt": "Hi", "prefill": "Sure here's"},
    {"id": "d", "prompt": "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"},
]


def tiny_policy(tokenizer, seed=0, eos_often=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("llama", len(tokenizer), tokenizer.pad_token_id)
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peakier than a random init: sampling has something to follow
    if eos_often:  # EOS just below the top token everywhere: sampled rows end at different lengths
        eos = tokenizer.eos_token_id

        def near_top(module, inputs, out):
            out = out.clone()
            out[..., eos] = out.max(-1).values - 0.7
            return out
        model.lm_head.register_forward_hook(near_top)
    return Policy(model, tokenizer, "tiny-llama")


def save_tiny_policy(folder, tokenizer, seed=0):
    pol = tiny_policy(tokenizer, seed=seed)
    pol.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def policy(smol_tokenizer):
    return tiny_policy(smol_tokenizer)


@pytest.fixture(scope="module")
def decoder_rm(smol_tokenizer):
    return RewardModel(tiny_rm("llama", smol_tokenizer, seed=1), smol_tokenizer, "tiny-llama-rm")


@pytest.fixture(scope="module")
def encoder_rm(minilm_tokenizer):
    return RewardModel(tiny_rm("bert", minilm_tokenizer, seed=2), minilm_tokenizer, "tiny-bert-rm")


def check(policy, method, rm, rm_path, batch_size, prompts=PROMPTS, **settings):
    """The engine at this batch size against the literal reference, token for token (and its reported
    reward against the reference's score of the same tokens)."""
    search = Search(policy, method, rm, rm_path=rm_path, **settings)
    got = []
    for s in range(0, len(prompts), batch_size):
        got += search.run(prompts[s:s + batch_size])
    ref = Reference.of(search)
    for p, g in zip(prompts, got):
        expected = ref.run(p)
        assert g["tokens"] == expected, (p["id"], method)
        if rm is not None and method != "argsg":
            assert abs(g["reward"] - ref.reward(p["prompt"], expected)) < 1e-4
    return got


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_args_greedy_matches_reference(policy, decoder_rm, rm_path, batch_size):
    got = check(policy, "argsg", decoder_rm, rm_path, batch_size, k=5, w=1.5, max_new_tokens=6)
    assert all(g["stats"]["rm_path"] == rm_path for g in got)


def test_args_with_an_encoder_rm_matches_reference(policy, encoder_rm):
    got = check(policy, "argsg", encoder_rm, "auto", 4, k=4, max_new_tokens=5)
    assert got[0]["stats"]["rm_path"] == "text"


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("method,extra", [("cbs", dict(beam=2, successors=3, chunk=3)),
                                          ("tbs", dict(beam=2, successors=3)),
                                          ("bon", dict(n=4))])
def test_beam_methods_match_reference(policy, decoder_rm, method, extra, batch_size):
    check(policy, method, decoder_rm, "cached", batch_size, max_new_tokens=7, seed=3, temperature=0.8, **extra)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_step_beam_matches_reference(policy, decoder_rm, batch_size):
    """A step-level method runs on the engine unchanged: a step ends after its delimiter (here a space, which
    most of the tiny model's tokens hold) or at max_step tokens, as the literal loop has it."""
    got = check(policy, "stepbeam", decoder_rm, "cached", batch_size, beam=2, k=2, max_step=4, delimiter=" ",
                max_new_tokens=8, seed=3, temperature=0.8)
    assert any(g["stats"]["rounds"] > 2 for g in got)  # some steps ended at the delimiter, before 4 tokens


def test_step_beam_without_its_delimiter_is_cbs(policy, decoder_rm):
    """With a delimiter that never occurs every step runs to max_step tokens: CBS with chunks of max_step."""
    settings = dict(beam=2, successors=2, max_new_tokens=6, seed=1)
    steps = Search(policy, "stepbeam", decoder_rm, delimiter="\x00never", max_step=3, **settings).run(PROMPTS)
    chunks = Search(policy, "cbs", decoder_rm, chunk=3, **settings).run(PROMPTS)
    assert [s["tokens"] for s in steps] == [c["tokens"] for c in chunks]


def test_knobs_keep_their_old_names():
    """K is one knob (--k) for ARGS and the beam searches; --successors, its older name for CBS and TBS, still
    sets it, and their rows still record it."""
    from common.search import Sampling, make_method, method_knobs

    cbs = make_method("cbs", successors=3, beam=2, chunk=4)
    assert cbs.shape(10) == (2, 3, 4) and cbs.sampling == Sampling(1.0, 1.0, 0)
    assert cbs.params() == {"beam": 2, "k": 3, "successors": 3, "chunk": 4, "temperature": 1.0, "top_p": 1.0,
                            "top_k": 0}
    assert make_method("tbs", k=5).params()["successors"] == 5
    assert make_method("argsg", k=4, successors=9).params() == {"k": 4, "w": 1.5}  # ARGS never had the old name
    assert make_method("greedy").sampling is None and make_method("cards").sampling == Sampling(0.7, 1.0, 40)
    flags = {k.name: k.flags for k in method_knobs()}
    assert flags["k"] == ("--k", "--successors") and flags["decision_every"] == ("--decision-every",)


def test_cbs_text_path_and_top_p(policy, decoder_rm):
    check(policy, "cbs", decoder_rm, "text", 4, beam=2, successors=2, chunk=4, max_new_tokens=8, top_p=0.9, top_k=50)


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_plain_decoding_matches_reference(policy, method):
    got = check(policy, method, None, "auto", 4, max_new_tokens=10, seed=5)
    assert all(g["stats"]["rm_calls"] == 0 for g in got)


def test_padding_and_batch_do_not_change_results(policy, decoder_rm):
    settings = dict(beam=2, successors=2, chunk=2, max_new_tokens=6, seed=1)
    alone = [Search(policy, "cbs", decoder_rm, **settings).run([p])[0]["tokens"] for p in PROMPTS]
    together = [r["tokens"] for r in Search(policy, "cbs", decoder_rm, **settings).run(list(reversed(PROMPTS)))][::-1]
    assert alone == together


def test_eos_stops_rows_independently(smol_tokenizer, decoder_rm):
    pol = tiny_policy(smol_tokenizer, seed=4, eos_often=True)
    got = check(pol, "sample", None, "auto", 4, max_new_tokens=12, seed=2)
    lengths = [g["stats"]["new_tokens"] for g in got]
    assert min(lengths) < 12 and len(set(lengths)) > 1  # rows met EOS at different steps
    check(pol, "cbs", decoder_rm, "cached", 4, beam=2, successors=2, chunk=3, max_new_tokens=9, seed=2)


def test_stop_strings_and_max_tokens(policy):
    plain = Policy(policy.model, policy.tokenizer, "plain")
    res = Search(plain, "greedy", max_new_tokens=5).run(PROMPTS[:2])
    assert all(r["stats"]["new_tokens"] == 5 for r in res)
    # make the first generated word a stop string: the response is cut before it and generation stops
    first = plain.tokenizer.decode(res[0]["tokens"][:2], skip_special_tokens=True)
    cut = Search(plain, "greedy", max_new_tokens=5, stop_strings=(first.strip()[:3],)).run(PROMPTS[:1])[0]
    assert len(cut["tokens"]) <= 2 and first.strip()[:3] not in cut["response"]


def test_cards_segments_retries_and_stats(policy, decoder_rm):
    # threshold above any reachable score: every segment is rejected until the retry bound, then the best
    # attempt is taken; segments end at the length cap (entropy threshold too high to cut)
    knobs = dict(max_segment=3, max_retries=2, reward_threshold=1e9, entropy_threshold=1e9, max_new_tokens=6,
                 seed=0, min_segment=1)
    res = Search(policy, "cards", decoder_rm, **knobs).run(PROMPTS[:2])
    for r in res:
        assert r["stats"]["new_tokens"] == 6
        assert r["stats"]["segments_tried"] == 2 * (knobs["max_retries"] + 1)  # 2 segments, 3 attempts each
    # a threshold below every score accepts each first attempt: one try per segment
    knobs["reward_threshold"] = -1e9
    res = Search(policy, "cards", decoder_rm, **knobs).run(PROMPTS[:2])
    assert all(r["stats"]["segments_tried"] == 2 for r in res)
    # an entropy threshold of 0 ends each segment after its first token
    knobs["entropy_threshold"] = 0.0
    res = Search(policy, "cards", decoder_rm, **knobs).run(PROMPTS[:1])
    assert res[0]["stats"]["segments_tried"] == 6


def test_cards_threshold_and_acceptance_by_hand():
    from common.search import cards_accepts, cards_threshold

    # r(x) = -1, r* = 2, alpha = 0.5: r_0 = 0.5; after 32 of 128 tokens tau = 0.5 + 32 * 1.5 / 128 = 0.875
    assert cards_threshold(-1.0, 2.0, 0.5, 32, 128) == pytest.approx(0.875)
    assert cards_threshold(-1.0, 2.0, 0.5, 0, 128) == pytest.approx(0.5)
    assert cards_threshold(-1.0, 2.0, 0.5, 200, 128) == pytest.approx(2.0)  # capped at r*
    assert cards_threshold(-1.0, 2.0, 0.0, 64, 128) == pytest.approx(0.5)   # alpha 0: r_0 = r(x)
    # soft: r = tau - 0.7 gives P = exp(-1) = 0.3679 with beta = 0.7
    assert cards_accepts("soft", 0.175, 0.36, threshold=0.875, beta=0.7)
    assert not cards_accepts("soft", 0.175, 0.37, threshold=0.875, beta=0.7)
    assert cards_accepts("soft", 0.9, 0.999, threshold=0.875, beta=0.7)      # above tau: always
    assert not cards_accepts("hard", 0.874, 0.0, threshold=0.875)
    assert cards_accepts("hard", 0.875, 1.0, threshold=0.875)
    # prefix rule: the reward must not drop below the accepted prefix's, or a fixed bar when given
    assert cards_accepts("prefix", 0.3, None, r_prefix=0.3) and not cards_accepts("prefix", 0.29, None, r_prefix=0.3)
    assert not cards_accepts("prefix", 0.3, None, r_prefix=0.0, threshold=0.5)


def test_cards_soft_rule_matches_literal_loop(policy, decoder_rm):
    """Each CARDS decision equals the literal rule: rebuild the accept/reject sequence from the scores."""
    from common.search import cards_accepts, cards_threshold, prompt_key, uniform  # noqa: F811

    search = Search(policy, "cards", decoder_rm, rm_path="cached", max_segment=2, min_segment=1, max_retries=3,
                    entropy_threshold=1e9, max_new_tokens=6, reward_threshold=0.0, cards_beta=0.05, seed=3)
    decisions = []
    original = search.method.accepts

    def spy(row, chain, s, batch):
        got = original(row, chain, s, batch)
        t = len(row.tokens) + len(chain)
        tau = cards_threshold(batch.state["r_prompt"][row.prompt], 0.0, 0.5, t, 6)
        u = uniform(3, prompt_key(PROMPTS[row.prompt]["id"]), batch.round_idx, row.lineage, "accept", 0)
        decisions.append(got == cards_accepts("soft", s, u, threshold=tau, beta=0.05))
        decisions.append(got == (u < min(1.0, __import__("math").exp((s - tau) / 0.05))))
        return got
    search.method.accepts = spy
    res = search.run(PROMPTS[:2])
    assert decisions and all(decisions)
    assert all(r["stats"]["new_tokens"] == 6 for r in res)
    # with a small beta some segments are rejected and some accepted
    tried = [r["stats"]["segments_tried"] for r in res]
    assert sum(tried) > 6 and all(t <= 3 * (search.method.max_retries + 1) for t in tried)


def test_cards_needs_a_target_for_its_rule(policy, decoder_rm):
    with pytest.raises(ValueError, match="target reward"):
        Search(policy, "cards", decoder_rm)
    Search(policy, "cards", decoder_rm, cards_rule="prefix")


def test_cached_rm_costs_k_new_tokens(policy, decoder_rm):
    cached = Search(policy, "argsg", decoder_rm, rm_path="cached", k=5, max_new_tokens=4).run(PROMPTS[:1])[0]["stats"]
    text = Search(policy, "argsg", decoder_rm, rm_path="text", k=5, max_new_tokens=4).run(PROMPTS[:1])[0]["stats"]
    prompt_len = len(decoder_rm.fmt.prompt_ids(PROMPTS[0]["prompt"]))
    # prefill + per step k candidates (the chosen one's keys stay: it is not read again); the text path re-reads
    # the whole sequence k times
    assert cached["new_tokens"] == 4 and cached["rm_tokens"] == prompt_len + 4 * 5
    assert text["rm_tokens"] > 5 * prompt_len


@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_args_with_normalised_reward_matches_reference(policy, smol_tokenizer, rm_path):
    """ARGS ranks log p(v) + w * (r - mean) / std; a small std lets the reward overrule the LM."""
    model = tiny_rm("llama", smol_tokenizer, seed=1)
    stats = {"mean": 3.0, "std": 0.05}
    plain = RewardModel(model, smol_tokenizer, "tiny-llama-rm", stats=stats)  # known, but not the switch
    normed = RewardModel(model, smol_tokenizer, "tiny-llama-rm", stats=stats, normalize=True)
    knobs = dict(k=5, w=1.5, max_new_tokens=6)
    got = check(policy, "argsg", normed, rm_path, 4, **knobs)
    unnormed = Search(policy, "argsg", plain, rm_path, **knobs)
    assert any(g["tokens"] != u["tokens"] for g, u in zip(got, unnormed.run(PROMPTS)))
    ref = Reference(policy, unnormed.method, normed, rm_path, max_new_tokens=6)
    for p, g in zip(PROMPTS, got):  # the reported reward is the RM's own score; the search's is normalised
        raw = ref.reward(p["prompt"], g["tokens"])
        assert g["reward"] == pytest.approx(raw, abs=1e-4)
        assert g["search_reward"] == pytest.approx((raw - 3.0) / 0.05, abs=2e-3)
    # what is recorded is what acted
    assert Search(policy, "argsg", normed, rm_path, **knobs).params()["reward_norm"] == "std"
    assert unnormed.params()["reward_norm"] == "none" and "reward_stats" not in unnormed.params()


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_speculative_rejection_matches_reference(policy, decoder_rm, rm_path, batch_size):
    got = check(policy, "specrej", decoder_rm, rm_path, batch_size, n=4, alpha=0.5, decision_every=3,
                max_new_tokens=9, seed=3, temperature=0.8)
    search = Search(policy, "specrej", decoder_rm, rm_path, n=4, alpha=0.5, decision_every=3, max_new_tokens=9,
                    seed=3, temperature=0.8)
    ref = Reference.of(search)
    for p, g in zip(PROMPTS, got):
        prefill = policy.tokenizer(p["prefill"], add_special_tokens=False).input_ids if p.get("prefill") else []
        assert g["stats"]["kept"] == ref.speculative_rejection(p, policy.fmt.prompt_ids(p["prompt"]), prefill)[1]


@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_speculative_rejection_with_an_alpha_schedule_matches_reference(policy, decoder_rm, rm_path):
    """A schedule rejects by depth: 25% at t = 3 (before the first listed depth: its alpha), 75% from t = 6 on,
    so 4 samples keep 3, then 1; the reference applies the schedule literally."""
    got = check(policy, "specrej", decoder_rm, rm_path, 4, n=4, alpha="5:0.25,6:0.75", decision_every=3,
                max_new_tokens=9, seed=3, temperature=0.8)
    kept = [g["stats"]["kept"] for g in got]
    assert all(k == [3, 1][:len(k)] for k in kept) and [3, 1] in kept, kept
    constant = Search(policy, "specrej", decoder_rm, rm_path, n=4, alpha="0:0.5", decision_every=3,
                      max_new_tokens=9, seed=3).run(PROMPTS)
    fixed = Search(policy, "specrej", decoder_rm, rm_path, n=4, alpha=0.5, decision_every=3,
                   max_new_tokens=9, seed=3).run(PROMPTS)
    assert [c["tokens"] for c in constant] == [f["tokens"] for f in fixed]


def test_alpha_auto_reads_the_schedule_calibrated_from_prefix_consistency(tmp_path):
    """alpha(t) = alpha_max * clip(tau(t), 0, 1) from a consistency file; auto:FILE[:RM] records the schedule
    itself; a bad schedule or file is one clear error."""
    from common.search.methods import consistency_schedule

    curve = [{"t": 16, "kendall_tau": 0.3}, {"t": 32, "kendall_tau": -0.2}, {"t": 64, "kendall_tau": 0.95}]
    assert consistency_schedule(curve, 0.8) == "16:0.24,32:0,64:0.76"
    calib = tmp_path / "consistency.json"
    calib.write_text(json.dumps({"rms": {"ORM": {"alpha_schedule": "16:0.24,32:0,64:0.76"},
                                         "SP-PRM": {"alpha_schedule": "16:0.5,64:0.9"}}}))
    method = make_method("specrej", alpha=f"auto:{calib}:SP-PRM")
    assert method.params()["alpha"] == "16:0.5,64:0.9"
    assert [method.alpha_at(t) for t in (0, 16, 63, 64, 500)] == [0.5, 0.5, 0.5, 0.9, 0.9]
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps({"rms": ["ORM"]}))
    for bad, says in [(f"auto:{calib}", "name one"), (f"auto:{calib}:PRM", "no schedule for 'PRM'"),
                      (f"auto:{malformed}", "not a readable consistency file"),
                      (f"auto:{tmp_path}/none.json", "not a readable consistency file"),
                      ("16:0.5,8:0.6", "depths must increase"), ("16:1.5", "is not t:alpha"), (1.5, "not in [0, 1]")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            make_method("specrej", alpha=bad)


@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_speculative_rejection_at_alpha_0_is_best_of_n(smol_tokenizer, decoder_rm, rm_path):
    """The same samples as Best-of-N (EOS often, so samples end at different lengths), the same answer, and
    on the cached path a policy token count that shrinks with alpha."""
    pol = tiny_policy(smol_tokenizer, seed=4, eos_often=True)
    settings = dict(n=4, max_new_tokens=12, seed=2, temperature=0.9)
    bon = Search(pol, "bon", decoder_rm, rm_path, **settings).run(PROMPTS)
    spec = Search(pol, "specrej", decoder_rm, rm_path, alpha=0.0, decision_every=3, **settings).run(PROMPTS)
    assert [s["tokens"] for s in spec] == [b["tokens"] for b in bon]
    assert [s["reward"] for s in spec] == pytest.approx([b["reward"] for b in bon], abs=1e-4)
    assert all(set(s["stats"]["kept"]) <= {4} for s in spec)
    half = Search(pol, "specrej", decoder_rm, rm_path, alpha=0.5, decision_every=3, **settings).run(PROMPTS)
    assert sum(h["stats"]["policy_tokens"] for h in half) < sum(s["stats"]["policy_tokens"] for s in spec)


def test_speculative_rejection_keeps_the_share_it_promises(policy, decoder_rm):
    """ceil((1 - alpha) m) of the m samples in play after each decision point, and at most 0.65x the policy
    tokens of Best-of-N at alpha 0.5 with a decision every quarter of the budget."""
    settings = dict(n=8, max_new_tokens=16, seed=1)
    bon = Search(policy, "bon", decoder_rm, **settings).run(PROMPTS)
    spec = Search(policy, "specrej", decoder_rm, alpha=0.5, decision_every=4, **settings).run(PROMPTS)
    for s in spec:
        kept, m = s["stats"]["kept"], 8
        for k in kept:
            assert k == max(1, -(-m // 2))
            m = k
    ratio = sum(s["stats"]["policy_tokens"] for s in spec) / sum(b["stats"]["policy_tokens"] for b in bon)
    assert ratio <= 0.65, ratio



# ------------------------------------------------------------------------------------------ over-long inputs

LONG_PROMPTS = PROMPTS + [
    {"id": "e", "prompt": "Tell me a joke about a very long road."},
    {"id": "f", "prompt": "Please summarise this story for me. " + " ".join(
        f"On day {i} the traveller walked on along the winding road." for i in range(8))}]
RM_BUDGET = 24


@pytest.fixture(scope="module")
def plain_models(policy):
    """The policy and a decoder RM with the SmolLM2 tokenizer without its chat template ("Human: ...
    Assistant:", short prompts), the RM read with a budget of 24 tokens. The prompts (8 tokens + a prefill of
    3, 13, 17, 24, 26, 127) and 14 to 16 new tokens cover every case of the truncation rule: a prompt within
    half the budget whose response is cut, prompts that fit whole beside a short response and keep their tail
    beside a long one, one of exactly the budget, prompts longer than it."""
    from common.models import SMOLLM2, load_tokenizer

    tok = load_tokenizer(SMOLLM2, padding_side="left")
    tok.chat_template = None
    rm = RewardModel(tiny_rm("llama", tok, seed=1), tok, "tiny-llama-rm", max_length=RM_BUDGET)
    return Policy(policy.model, tok, "tiny-llama"), rm


def scored_as_05(rm, prompt, tokens, text=None):
    """05's score of a reply: of its text (what the text path scores), else of its tokens (the cached path)."""
    from common.rewards import score, score_encoded

    if text is not None:
        return score(rm.model, rm.fmt, [prompt], [text], 1)[0]
    return score_encoded(rm.model, [rm.fmt.encode(prompt, response_ids=tokens)], rm.tokenizer.pad_token_id, 1)[0]


@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_rm_max_length_is_applied_on_both_paths(plain_models, rm_path):
    """Over-long RM inputs are cut by the documented rule on the cached path as on the text path: ARGS' tokens
    as the literal reference's, each reported reward 05's score of the same reply, the cut reported."""
    pol, rm = plain_models
    got = check(pol, "argsg", rm, rm_path, 6, prompts=LONG_PROMPTS, k=3, w=1.5, max_new_tokens=14)
    for p, g in zip(LONG_PROMPTS, got):
        text = g["response"] if rm_path == "text" else None
        assert g["reward"] == pytest.approx(scored_as_05(rm, p["prompt"], g["tokens"], text), abs=1e-4)
        n_p = len(rm.fmt.prompt_ids(p["prompt"]))
        n_r = len(g["tokens"]) if text is None else len(rm.fmt.response_ids(text))
        assert g["stats"]["reward_input_truncated"] == (n_p + n_r > RM_BUDGET)
        assert g["stats"]["prompt_tokens_cut"] == 0
    assert sum(g["stats"]["reward_input_truncated"] for g in got) >= 4
    # the cut acts: the whole input scores otherwise
    whole = RewardModel(rm.model, rm.tokenizer, "whole", max_length=10 ** 6)
    assert abs(scored_as_05(whole, LONG_PROMPTS[-1]["prompt"], got[-1]["tokens"]) - got[-1]["reward"]) > 1e-3


@pytest.mark.parametrize("rm_path", ["cached", "text"])
@pytest.mark.parametrize("method,extra", [("cbs", dict(beam=2, successors=2, chunk=5)), ("bon", dict(n=3)),
                                          ("specrej", dict(n=3, alpha=0.5, decision_every=5))])
def test_every_candidate_is_scored_by_the_rule(plain_models, method, extra, rm_path):
    """Every score a method ranks by (candidates at the end of a round, chains inside one) is 05's score of the
    candidate's reply under the RM's budget: short replies to long prompts read beside the whole prompt, long
    ones beside its tail, replies past the budget as their cut."""
    pol, rm = plain_models
    search = Search(pol, method, rm, rm_path=rm_path, max_new_tokens=16, seed=1, temperature=0.8, **extra)
    checked = []

    def check_scores(rows, cand):
        for i, r in enumerate(rows):
            for j, chain in enumerate(cand.chains[i]):
                if r.finished or (cand.dropped and cand.dropped[i][j]):
                    continue
                tokens, prompt = r.tokens + chain, LONG_PROMPTS[r.prompt]["prompt"]
                text = search.response_text(tokens) if rm_path == "text" else None
                assert float(cand.scores[i, j]) == pytest.approx(scored_as_05(rm, prompt, tokens, text), abs=1e-4)
                checked.append(len(rm.fmt.prompt_ids(prompt)) + len(tokens) > RM_BUDGET)
    choose, prune = search.method.choose, search.method.prune
    search.method.choose = lambda rows, cand, batch: check_scores(rows, cand) or choose(rows, cand, batch)
    search.method.prune = lambda rows, partial, batch: check_scores(rows, partial) or prune(rows, partial, batch)
    got = search.run(LONG_PROMPTS)
    assert any(checked) and (method == "bon" or not all(checked))  # Best-of-N scores complete replies only
    for p, g in zip(LONG_PROMPTS, got):
        text = g["response"] if rm_path == "text" else None
        assert g["reward"] == pytest.approx(scored_as_05(rm, p["prompt"], g["tokens"], text), abs=1e-4)


def test_a_prompt_longer_than_the_policy_keeps_its_tail(plain_models):
    """prompt + max_new_tokens beyond the policy's positions: the prompt keeps its last tokens, as the literal
    reference does, and each row says how many it lost; no room for any prompt is refused."""
    _, rm = plain_models
    pol = tiny_policy(rm.tokenizer)
    pol.model.config.max_position_embeddings = 40
    got = check(pol, "argsg", rm, "cached", 6, prompts=LONG_PROMPTS, k=2, max_new_tokens=6)
    lengths = [len(pol.fmt.prompt_ids(p["prompt"])) + len(pol.tokenizer(p.get("prefill", ""),
               add_special_tokens=False).input_ids) for p in LONG_PROMPTS]
    assert [g["stats"]["prompt_tokens_cut"] for g in got] == [max(0, n - 34) for n in lengths]
    assert got[-1]["stats"]["prompt_tokens_cut"] == 127 - 34
    with pytest.raises(ValueError, match="no room for a prompt"):
        Search(pol, "greedy", max_new_tokens=40)


@pytest.mark.parametrize("method,knobs", [("cbs", dict(beam=2, successors=3, chunk=3, top_p=0.9, top_k=50)),
                                          ("argsg", dict(k=4)), ("cards", dict(max_segment=3, min_segment=1,
                                                                               reward_threshold=0.0))])
def test_no_vocabulary_sized_tensor_leaves_the_device(policy, decoder_rm, monkeypatch, method, knobs):
    """Sampling runs where the logits are: every tensor the engine brings to the CPU or reads as numbers is
    smaller than the vocabulary (uniforms go to the device, token ids and scores come back; on the CPU these
    calls cost nothing, on a GPU each is a copy)."""
    moved = []
    for name in ("cpu", "tolist", "numpy"):
        def spy(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            moved.append(self.numel())
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    Search(policy, method, decoder_rm, max_new_tokens=6, seed=1, **knobs).run(PROMPTS)
    assert moved and max(moved) < len(policy.tokenizer)
