import pytest
import torch

from common.search import Policy, RewardModel, Search, SearchConfig
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


def check(policy, cfg, rm, rm_path, batch_size, prompts=PROMPTS):
    search = Search(policy, cfg, rm, rm_path=rm_path)
    got = []
    for s in range(0, len(prompts), batch_size):
        got += search.run(prompts[s:s + batch_size])
    ref = Reference(policy, cfg, rm, "cached" if search.cached_rm else "text")
    for p, g in zip(prompts, got):
        expected = ref.run(p)
        assert g["tokens"] == expected, (p["id"], cfg.method)
        if rm is not None and cfg.method != "argsg":
            assert abs(g["reward"] - ref.reward(p["prompt"], expected)) < 1e-4
    return got


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_args_greedy_matches_reference(policy, decoder_rm, rm_path, batch_size):
    cfg = SearchConfig(method="argsg", k=5, w=1.5, max_new_tokens=6)
    got = check(policy, cfg, decoder_rm, rm_path, batch_size)
    assert all(g["stats"]["rm_path"] == rm_path for g in got)


def test_args_with_an_encoder_rm_matches_reference(policy, encoder_rm):
    got = check(policy, SearchConfig(method="argsg", k=4, max_new_tokens=5), encoder_rm, "auto", 4)
    assert got[0]["stats"]["rm_path"] == "text"


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("method,extra", [("cbs", dict(beam=2, successors=3, chunk=3)),
                                          ("tbs", dict(beam=2, successors=3)),
                                          ("bon", dict(n=4))])
def test_beam_methods_match_reference(policy, decoder_rm, method, extra, batch_size):
    cfg = SearchConfig(method=method, max_new_tokens=7, seed=3, temperature=0.8, **extra)
    check(policy, cfg, decoder_rm, "cached", batch_size)


def test_cbs_text_path_and_top_p(policy, decoder_rm):
    cfg = SearchConfig(method="cbs", beam=2, successors=2, chunk=4, max_new_tokens=8, top_p=0.9, top_k=50)
    check(policy, cfg, decoder_rm, "text", 4)


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_plain_decoding_matches_reference(policy, method):
    cfg = SearchConfig(method=method, max_new_tokens=10, seed=5)
    got = check(policy, cfg, None, "auto", 4)
    assert all(g["stats"]["rm_calls"] == 0 for g in got)


def test_padding_and_batch_do_not_change_results(policy, decoder_rm):
    cfg = SearchConfig(method="cbs", beam=2, successors=2, chunk=2, max_new_tokens=6, seed=1)
    alone = [Search(policy, cfg, decoder_rm).run([p])[0]["tokens"] for p in PROMPTS]
    together = [r["tokens"] for r in Search(policy, cfg, decoder_rm).run(list(reversed(PROMPTS)))][::-1]
    assert alone == together


def test_eos_stops_rows_independently(smol_tokenizer, decoder_rm):
    pol = tiny_policy(smol_tokenizer, seed=4, eos_often=True)
    cfg = SearchConfig(method="sample", max_new_tokens=12, seed=2)
    got = check(pol, cfg, None, "auto", 4)
    lengths = [g["stats"]["new_tokens"] for g in got]
    assert min(lengths) < 12 and len(set(lengths)) > 1  # rows met EOS at different steps
    cfg = SearchConfig(method="cbs", beam=2, successors=2, chunk=3, max_new_tokens=9, seed=2)
    check(pol, cfg, decoder_rm, "cached", 4)


def test_stop_strings_and_max_tokens(policy):
    plain = Policy(policy.model, policy.tokenizer, "plain")
    cfg = SearchConfig(method="greedy", max_new_tokens=5)
    res = Search(plain, cfg).run(PROMPTS[:2])
    assert all(r["stats"]["new_tokens"] == 5 for r in res)
    # make the first generated word a stop string: the response is cut before it and generation stops
    first = plain.tokenizer.decode(res[0]["tokens"][:2], skip_special_tokens=True)
    cfg = SearchConfig(method="greedy", max_new_tokens=5, stop_strings=(first.strip()[:3],))
    cut = Search(plain, cfg).run(PROMPTS[:1])[0]
    assert len(cut["tokens"]) <= 2 and first.strip()[:3] not in cut["response"]


def test_cards_segments_retries_and_stats(policy, decoder_rm):
    # threshold above any reachable score: every segment is rejected until the retry bound, then the best
    # attempt is taken; segments end at the length cap (entropy threshold too high to cut)
    cfg = SearchConfig(method="cards", max_segment=3, max_retries=2, reward_threshold=1e9,
                       entropy_threshold=1e9, max_new_tokens=6, seed=0, min_segment=1)
    res = Search(policy, cfg, decoder_rm).run(PROMPTS[:2])
    for r in res:
        assert r["stats"]["new_tokens"] == 6
        assert r["stats"]["segments_tried"] == 2 * (cfg.max_retries + 1)  # 2 segments, 3 attempts each
    # a threshold below every score accepts each first attempt: one try per segment
    cfg.reward_threshold = -1e9
    res = Search(policy, cfg, decoder_rm).run(PROMPTS[:2])
    assert all(r["stats"]["segments_tried"] == 2 for r in res)
    # an entropy threshold of 0 ends each segment after its first token
    cfg.entropy_threshold = 0.0
    res = Search(policy, cfg, decoder_rm).run(PROMPTS[:1])
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
    from common.search import cards_accepts, cards_threshold, prompt_key, uniform

    cfg = SearchConfig(method="cards", max_segment=2, min_segment=1, max_retries=3, entropy_threshold=1e9,
                       max_new_tokens=6, reward_threshold=0.0, cards_beta=0.05, seed=3)
    search = Search(policy, cfg, decoder_rm, rm_path="cached")
    decisions = []
    original = search._cards_accepts

    def spy(row, chain, s, key, round_idx):
        got = original(row, chain, s, key, round_idx)
        t = len(row.tokens) + len(chain)
        tau = cards_threshold(search.prompt_scores[row.prompt], 0.0, 0.5, t, 6)
        u = uniform(3, key, round_idx, row.slot, "accept", 0)
        decisions.append(got == cards_accepts("soft", s, u, threshold=tau, beta=0.05))
        decisions.append(got == (u < min(1.0, __import__("math").exp((s - tau) / 0.05))))
        return got
    search._cards_accepts = spy
    res = search.run(PROMPTS[:2])
    assert decisions and all(decisions)
    assert all(r["stats"]["new_tokens"] == 6 for r in res)
    # with a small beta some segments are rejected and some accepted
    tried = [r["stats"]["segments_tried"] for r in res]
    assert sum(tried) > 6 and all(t <= 3 * (cfg.max_retries + 1) for t in tried)


def test_cards_needs_a_target_for_its_rule(policy, decoder_rm):
    with pytest.raises(ValueError, match="target reward"):
        Search(policy, SearchConfig(method="cards"), decoder_rm)
    Search(policy, SearchConfig(method="cards", cards_rule="prefix"), decoder_rm)


def test_cached_rm_costs_k_new_tokens(policy, decoder_rm):
    cfg = SearchConfig(method="argsg", k=5, max_new_tokens=4)
    cached = Search(policy, cfg, decoder_rm, rm_path="cached").run(PROMPTS[:1])[0]["stats"]
    text = Search(policy, cfg, decoder_rm, rm_path="text").run(PROMPTS[:1])[0]["stats"]
    prompt_len = len(decoder_rm.fmt.prompt_ids(PROMPTS[0]["prompt"]))
    # prefill + per step (1 accepted + k candidates); the text path re-reads the whole sequence k times
    assert cached["rm_tokens"] <= prompt_len + 4 * (1 + 5)
    assert text["rm_tokens"] > 5 * prompt_len


@pytest.mark.parametrize("rm_path", ["cached", "text"])
def test_args_with_normalised_reward_matches_reference(policy, smol_tokenizer, rm_path):
    """ARGS ranks log p(v) + w * (r - mean) / std; a small std lets the reward overrule the LM."""
    model = tiny_rm("llama", smol_tokenizer, seed=1)
    plain = RewardModel(model, smol_tokenizer, "tiny-llama-rm")
    normed = RewardModel(model, smol_tokenizer, "tiny-llama-rm", stats={"mean": 3.0, "std": 0.05})
    cfg = SearchConfig(method="argsg", k=5, w=1.5, max_new_tokens=6, reward_norm="std")
    got = check(policy, cfg, normed, rm_path, 4)
    unnormed = Search(policy, SearchConfig(method="argsg", k=5, w=1.5, max_new_tokens=6), plain, rm_path).run(PROMPTS)
    assert any(g["tokens"] != u["tokens"] for g, u in zip(got, unnormed))
    ref = Reference(policy, cfg, normed, rm_path)
    for p, g in zip(PROMPTS, got):  # the reported reward is the RM's own score; the search's is normalised
        raw = ref.reward(p["prompt"], g["tokens"])
        assert g["reward"] == pytest.approx(raw, abs=1e-4)
        assert g["search_reward"] == pytest.approx((raw - 3.0) / 0.05, abs=2e-3)
    assert cfg.params()["reward_norm"] == "std"
