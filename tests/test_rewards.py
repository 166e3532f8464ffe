import copy

import pytest
import torch

from common.rewards import RMFormat, score, score_prefixes, score_prefixes_reference
from conftest import tiny_rm

PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke about cats.\n\nAssistant:",
    "What is the capital of France?",
]
RESPONSES = [
    "Mix flour, water, salt and yeast, let it rise, then bake at a high heat.",
    "Why did the cat sit on the computer? To keep an eye on the mouse.",
    "Paris.",
]


def plain_tokenizer(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


@pytest.mark.parametrize("kind", ["llama", "gemma", "gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_one_forward_prefixes_equal_per_prefix(kind, padding_side, smol_tokenizer):
    tok = smol_tokenizer if kind != "gpt2" else plain_tokenizer(smol_tokenizer)
    model = tiny_rm(kind, tok)
    fmt = RMFormat(tok, model, max_length=512)
    assert fmt.kind == ("chat" if kind != "gpt2" else "plain")
    fast = score_prefixes(model, fmt, PROMPTS, RESPONSES, batch_size=2, padding_side=padding_side)
    slow = score_prefixes_reference(model, fmt, PROMPTS, RESPONSES, batch_size=1)
    for f, s, r in zip(fast, slow, RESPONSES):
        assert len(f) == len(s) == len(fmt.response_ids(r))
        assert torch.allclose(torch.tensor(f), torch.tensor(s), atol=1e-4)
    # the scores are not trivially equal across prefixes
    assert max(fast[0]) - min(fast[0]) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_lengths_beyond_response_are_the_whole_response(kind, smol_tokenizer):
    tok = smol_tokenizer if kind != "gpt2" else plain_tokenizer(smol_tokenizer)
    model = tiny_rm(kind, tok)
    fmt = RMFormat(tok, model, max_length=512)
    lengths = [1, 3, 500]
    fast = score_prefixes(model, fmt, PROMPTS, RESPONSES, lengths=lengths)
    full = score(model, fmt, PROMPTS, RESPONSES, batch_size=1)
    for f, whole in zip(fast, full):
        assert abs(f[-1] - whole) < 1e-4


def test_truncated_prefixes_match_reference(smol_tokenizer):
    model = tiny_rm("llama", smol_tokenizer)
    fmt = RMFormat(smol_tokenizer, model, max_length=40)  # forces prompt and response truncation
    fast = score_prefixes(model, fmt, PROMPTS, RESPONSES, batch_size=3)
    slow = score_prefixes_reference(model, fmt, PROMPTS, RESPONSES, batch_size=1)
    for f, s in zip(fast, slow):
        assert torch.allclose(torch.tensor(f), torch.tensor(s), atol=1e-4)
    for p, r in zip(PROMPTS, RESPONSES):
        assert len(fmt.encode(p, r)["input_ids"]) <= 40


@pytest.mark.parametrize("kind", ["llama", "gemma", "gpt2", "bert"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_scores_equal_one_at_a_time(kind, padding_side, smol_tokenizer, minilm_tokenizer):
    tok = {"bert": minilm_tokenizer, "gpt2": plain_tokenizer(smol_tokenizer)}.get(kind, smol_tokenizer)
    model = tiny_rm(kind, tok)
    fmt = RMFormat(tok, model, max_length=512)
    batched = score(model, fmt, PROMPTS, RESPONSES, batch_size=3, padding_side=padding_side)
    single = [score(model, fmt, [p], [r], batch_size=1)[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-4)
    assert len(set(round(s, 4) for s in single)) == 3


def test_score_is_read_at_last_real_token_even_when_it_is_the_pad_token(smol_tokenizer):
    """<|im_end|> is SmolLM2's pad token: a response ending with it must still be scored at that position."""
    model = tiny_rm("llama", smol_tokenizer)
    fmt = RMFormat(smol_tokenizer, model, max_length=512)
    response = "Paris.<|im_end|>"
    ids = fmt.encode(PROMPTS[2], response)["input_ids"]
    assert ids[-1] == smol_tokenizer.pad_token_id
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state
        expected = model.score(hidden[0, -1]).item()
    got = score(model, fmt, [PROMPTS[2], PROMPTS[0]], [response, RESPONSES[0]], batch_size=2)[0]
    assert abs(got - expected) < 1e-4


def test_chat_format_is_template_then_response_ids(smol_tokenizer):
    model = tiny_rm("llama", smol_tokenizer)
    fmt = RMFormat(smol_tokenizer, model)
    ids = fmt.encode(PROMPTS[0], RESPONSES[0], t=4)["input_ids"]
    text = smol_tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n" + smol_tokenizer.decode(fmt.response_ids(RESPONSES[0])[:4]))
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in text
    assert fmt.cut(RESPONSES[0], 4) == smol_tokenizer.decode(fmt.response_ids(RESPONSES[0])[:4])


def test_pair_format_for_encoders(minilm_tokenizer):
    model = tiny_rm("bert", minilm_tokenizer)
    fmt = RMFormat(minilm_tokenizer, model)
    enc = fmt.encode("What is the capital of France?", "Paris is the capital.")
    expected = minilm_tokenizer("Human: What is the capital of France?\n\nAssistant:", "Paris is the capital.")
    assert enc["input_ids"] == list(expected["input_ids"])
    assert enc["token_type_ids"] == list(expected["token_type_ids"])


def _cut_rows(fmt, pairs, cuts, weights):
    rows = []
    for i, (p, c, r) in enumerate(pairs):
        for k, t in enumerate(cuts[i]):
            rows.append({"id": f"{i}@{k}", "pair_id": f"pair{i}", "t": t, "prompt": p,
                         "chosen": fmt.cut(c, t), "rejected": fmt.cut(r, t), "weight": weights[i][k]})
    return rows


def _per_row_loss(model, fmt, rows):
    """The literal definition: one forward per row and side, score at its last token, mean over rows."""
    from common.losses import bradley_terry_loss

    def r(prompt, text):
        ids = fmt.encode(prompt, text)["input_ids"]
        hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state
        return model.score(hidden[0, -1])[0]

    kept = [row for row in rows if row["weight"] > 0]
    r_w = torch.stack([r(row["prompt"], row["chosen"]) for row in kept])
    r_l = torch.stack([r(row["prompt"], row["rejected"]) for row in kept])
    return bradley_terry_loss(r_w, r_l, torch.tensor([row["weight"] for row in kept]))


@pytest.mark.parametrize("max_length", [512, 48])  # 48: prompts and responses truncated
def test_grouped_training_loss_and_gradients_equal_per_row(max_length, smol_tokenizer):
    from common.rewards import batch_loss, training_units

    model = tiny_rm("llama", smol_tokenizer)
    model.train()
    fmt = RMFormat(smol_tokenizer, model, max_length=max_length)
    pairs = [(PROMPTS[0], RESPONSES[0], RESPONSES[1]), (PROMPTS[1], RESPONSES[1], "No."),
             (PROMPTS[2], RESPONSES[2], RESPONSES[0])]
    n0 = max(len(fmt.response_ids(RESPONSES[0])), len(fmt.response_ids(RESPONSES[1])))
    cuts = [list(range(1, n0 + 1)),          # TLT: every t
            [2, 5, 5, 9, 40],                 # SST-like: a repeated cut, one beyond both sides' lengths
            [1, 3, 100]]
    weights = [[(0.0 if t % 4 == 0 else 0.5 + 0.1 * t) for t in cuts[0]], [1.0, 2.0, 0.0, 1.5, 0.7], [0.3, 1.0, 2.5]]
    rows = _cut_rows(fmt, pairs, cuts, weights)

    expected = _per_row_loss(model, fmt, rows)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    units = training_units(fmt, rows, grouped=True)
    loss, counts = batch_loss(model, units, smol_tokenizer.pad_token_id, decoder=True, device="cpu")
    grads = torch.autograd.grad(loss, list(model.parameters()))

    n_rows = sum(w > 0 for ws in weights for w in ws)
    assert counts["rows"] == n_rows and counts["forwards"] < n_rows  # fewer forwards than rows
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-5), (g - e).abs().max()
    # the per-row units give the same loss too (the path encoders and --grouping off take)
    flat, flat_counts = batch_loss(model, training_units(fmt, rows, grouped=False), smol_tokenizer.pad_token_id,
                                   decoder=True, device="cpu")
    assert flat.item() == pytest.approx(expected.item(), abs=1e-5) and flat_counts["forwards"] == 2 * n_rows


def test_training_batches_cover_every_unit_once():
    from common.rewards import training_batches

    units = [{"n_rows": 1 + i % 3, "n_tokens": (7 * i) % 11} for i in range(40)]
    for window in (1, 4, 50):
        batches = training_batches(units, 4, seed=0, epoch=0, window=window)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(40))  # every unit once, none split
        assert batches == training_batches(units, 4, seed=0, epoch=0, window=window)
        assert batches != training_batches(units, 4, seed=0, epoch=1, window=window)
    # by length: within a mega-chunk the units of a batch are sorted by length; random: not ordered
    lengths = [[units[i]["n_tokens"] for i in b] for b in training_batches(units, 4, 0, 0, window=50)]
    spread = lambda bs: sum(max(b) - min(b) for b in bs)  # noqa: E731
    assert spread(lengths) < spread([[units[i]["n_tokens"] for i in b] for b in training_batches(units, 4, 0, 0)])


def test_length_groups_minimise_padding_plus_a_cost_per_forward():
    from common.rewards import length_groups

    # one forward: 4 * 210 + 256 = 1096; two by length: 2 * 11 + 2 * 210 + 2 * 256 = 954; three or four cost more
    assert sorted(map(sorted, length_groups([200, 10, 210, 11], overhead=256))) == [[0, 2], [1, 3]]
    assert length_groups([5, 6, 7], overhead=1000) == [[0, 1, 2]]  # forwards dearer than padding: one group
    assert sorted(map(sorted, length_groups([3, 1, 2], overhead=0))) == [[0], [1], [2]]  # padding only: alone
    groups = length_groups(list(range(40, 0, -1)))
    assert sorted(i for g in groups for i in g) == list(range(40))  # every sequence once
