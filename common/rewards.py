"""What a reward model sees, and scoring: batched full responses and every prefix of a response.

The RM input rule (the same in training, weighting, evaluation and decoding):

  chat    decoder RM whose tokenizer has a chat template:
          apply_chat_template(messages, add_generation_prompt=True) ids ++ response ids[:t]
  plain   decoder RM without a template: tokenizer("Human: ...\\n\\nAssistant:") ids ++ ids of " " + response
  pair    encoder RM: [CLS] rendered prompt [SEP] response[:t] [SEP] (the tokenizer's own pair layout)

The response is tokenized alone, without special tokens, and nothing (no EOS, no end of turn) is appended
after a prefix: a prefix is unfinished. Prompts and responses are data: text that spells a control token
(<|im_end|>, <|im_start|>assistant, [SEP]) is tokenized as the characters it is (`text_ids`, `chat_ids`);
only the chat template's own markers and the tokenizer's own special tokens are control tokens. Over-long inputs: when prompt + response exceed the budget
(max_length less the encoder's special tokens), the prompt keeps its last min(prompt tokens, budget // 2)
tokens and the response is cut from the right to fill the rest. The kept prompt does not depend on how
long the response is, so the inputs of all over-long prefixes of a response are prefixes of one sequence
(prefix-consistent truncation): a response needs at most two forwards, one for its prefixes that fit and
one for those that do not.

For a decoder RM (causal attention) r(x, y[:t]) for every t is the head applied to the hidden state at each
response position of ONE forward pass; `score_prefixes` and the grouped training loss use that. Scores are always read at an explicit
position (the last real token), never by searching for the pad id: SmolLM2's pad is <|im_end|>, which
also closes every ChatML turn.
"""
import contextlib
import functools
import re

import torch
import torch.nn.functional as F

from common.dialogue import prompt_to_messages, render_plain
from common.io import DEFAULT_MAX_LENGTH
from common.models import is_decoder_rm


class RMFormat:
    """Turns (prompt, response[:t]) into RM input ids by the rule above, with per-prompt caching."""

    def __init__(self, tokenizer, model_or_config, max_length=DEFAULT_MAX_LENGTH, closed=False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.decoder = is_decoder_rm(model_or_config)
        if not self.decoder:
            self.kind = "pair"
            self._template = _pair_template(tokenizer)
            # absolute position embeddings: an encoder cannot read past its table
            config = getattr(model_or_config, "config", model_or_config)
            limit = getattr(config, "max_position_embeddings", None)
            if limit and config.model_type != "deberta-v2":
                self.max_length = min(max_length, limit)
        else:
            self.kind = "chat" if tokenizer.chat_template else "plain"
        # An RM that must see its turn closed (opt-in): response inside the template, no prefix fast path.
        if closed and self.kind != "chat":
            raise ValueError("the closed RM format needs a tokenizer with a chat template (a chat RM)")
        self.closed = closed
        self._prompt_cache = {}
        self.truncated = 0

    @property
    def fast_prefixes(self):
        return self.decoder and not self.closed

    def prompt_ids(self, prompt):
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            messages = prompt_to_messages(prompt)
            if self.kind == "chat":
                ids = chat_ids(self.tokenizer, messages, add_generation_prompt=True)
            else:  # plain: with the tokenizer's own special tokens (a BOS); pair: the layout adds them
                ids = text_ids(self.tokenizer, render_plain(messages), add_special_tokens=self.kind == "plain")
            if len(self._prompt_cache) > 50000:
                self._prompt_cache.clear()
            self._prompt_cache[prompt] = ids
        return ids

    def response_ids(self, response):
        return self.responses_ids([response])[0]

    def responses_ids(self, responses):
        """The response ids of many responses, in one batched tokenizer call (the same ids one by one)."""
        return text_ids(self.tokenizer, [" " + r if self.kind == "plain" else r for r in responses])

    def cut(self, response, t):
        """The text of the first t response tokens (the whole response when t >= its length)."""
        ids = self.response_ids(response)
        if t >= len(ids):
            return response
        text = self.tokenizer.decode(ids[:t], skip_special_tokens=False)
        return text[1:] if self.kind == "plain" and text.startswith(" ") else text

    @property
    def n_special(self):
        return len(self._template[0]) + len(self._template[1]) + len(self._template[2]) if self.kind == "pair" else 0

    def budgets(self, n_prompt, n_response):
        """(prompt tokens kept, response tokens kept) under the truncation rule."""
        budget = self.max_length - self.n_special
        if n_prompt + n_response <= budget:
            return n_prompt, n_response
        keep_prompt = min(n_prompt, budget // 2)
        return keep_prompt, min(n_response, budget - keep_prompt)

    def truncates(self, prompt, response):
        """Whether the RM input of (prompt, response) is cut by the truncation rule (counts nothing)."""
        if self.closed:
            before = self.truncated
            self.encode(prompt, response)
            cut, self.truncated = self.truncated > before, before
            return cut
        p, r = len(self.prompt_ids(prompt)), len(self.response_ids(response))
        return self.budgets(p, r) != (p, r)

    def encode(self, prompt, response=None, response_ids=None, t=None):
        """{"input_ids", "token_type_ids"?} for (prompt, response[:t])."""
        r = response_ids if response_ids is not None else self.response_ids(response)
        if t is not None:
            r = r[:t]
        if self.closed:
            messages = prompt_to_messages(prompt) + [
                {"role": "assistant", "content": self.tokenizer.decode(r, skip_special_tokens=False)}]
            ids = chat_ids(self.tokenizer, messages)
            if len(ids) > self.max_length:
                self.truncated += 1
                ids = ids[-self.max_length:]
            return {"input_ids": ids}
        p = self.prompt_ids(prompt)
        n_p, n_r = self.budgets(len(p), len(r))
        if (n_p, n_r) != (len(p), len(r)):
            self.truncated += 1
        p, r = p[len(p) - n_p:], r[:n_r]
        if self.kind != "pair":
            return {"input_ids": p + r}
        pre, mid, post, (type_a, type_b) = self._template
        return {"input_ids": pre + p + mid + r + post,
                "token_type_ids": [type_a] * (len(pre) + len(p) + len(mid)) + [type_b] * (len(r) + len(post))}


def text_ids(tokenizer, text, add_special_tokens=False):
    """The ids of data text: characters that spell a special token (<|im_end|>, [SEP]) are tokenized as text,
    never as that token (split_special_tokens). Text without such characters gets the ids it always had."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True).input_ids)


# Placeholders for message contents while the template renders (Unicode's private use area: no data is read
# through them, since the contents go in only after the rendering is split at them).
_CONTENT = "\ue000{}\ue001"
_CONTENT_RE = re.compile("\ue000(\\d+)\ue001")


def chat_ids(tokenizer, messages, add_generation_prompt=False):
    """apply_chat_template's ids, with the messages' contents as data: the markers the template writes are
    control tokens, a control token spelled inside a message is text (`text_ids`).

    Contents that spell no added token take the library's path unchanged (the same ids as always). Otherwise
    the template is rendered with placeholders for the contents and cut at its own added tokens; each run of
    text between two of them (template text and contents) is tokenized as text, as the tokenizer tokenizes
    the text between added tokens. A template that alters a content (so that the placeholders do not stand for
    it) falls back to transformers' sanitize_control_tokens, which encodes each control token quoted in a
    message as text on its own."""
    def render(chat, **kwargs):
        return tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, **kwargs)

    added = _added_tokens_re(tokenizer)
    if added is None or not any(added.search(m["content"]) for m in messages):
        return _as_ids(render(messages, tokenize=True))
    pieces = _CONTENT_RE.split(render([{**m, "content": _CONTENT.format(i)} for i, m in enumerate(messages)],
                                      tokenize=False))  # template text, content index, template text, ...
    contents = [messages[int(i)]["content"] for i in pieces[1::2]]
    pieces[1::2] = contents
    if "".join(pieces) != render(messages, tokenize=False):
        return _as_ids(render(messages, tokenize=True, sanitize_control_tokens=True))
    ids, run = [], ""
    for k, piece in enumerate(pieces):
        if k % 2:
            run += piece
            continue
        start = 0
        for marker in added.finditer(piece):  # the template's own control tokens
            run += piece[start:marker.start()]
            ids += _run_ids(tokenizer, run, first=not ids)
            ids.append(tokenizer.convert_tokens_to_ids(marker.group()))
            run, start = "", marker.end()
        run += piece[start:]
    return ids + _run_ids(tokenizer, run, first=not ids)


def _added_tokens_re(tokenizer):
    """A pattern matching any added token of the tokenizer (longest first), or None if it has none."""
    tokens = sorted((t for t in tokenizer.get_added_vocab() if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _run_ids(tokenizer, run, first):
    """A run of text that follows an added token, tokenized as the whole text would tokenize it there: after a
    newline that is then removed (so a SentencePiece tokenizer adds no word-start space to a run that is not
    the first), as transformers' sanitize_control_tokens does."""
    if not run:
        return []
    if first:
        return text_ids(tokenizer, run)
    newline = text_ids(tokenizer, "\n")
    ids = text_ids(tokenizer, "\n" + run)
    return ids[len(newline):] if ids[:len(newline)] == newline else text_ids(tokenizer, run)


def _as_ids(out):
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def _pair_template(tokenizer):
    """Learn the tokenizer's pair layout (specials before, between, after; segment ids) from a probe."""
    a = tokenizer("a", add_special_tokens=False).input_ids
    b = tokenizer("b", add_special_tokens=False).input_ids
    enc = tokenizer("a", "b", add_special_tokens=True, return_token_type_ids=True)
    ids = list(enc["input_ids"])
    i = _find(ids, a, 0)
    j = _find(ids, b, i + len(a))
    if i < 0 or j < 0:
        raise ValueError(f"cannot read the pair layout of {type(tokenizer).__name__}")
    types = enc.get("token_type_ids") or [0] * len(ids)
    return ids[:i], ids[i + len(a):j], ids[j + len(b):], (types[i], types[j])


def _find(seq, sub, start):
    for k in range(start, len(seq) - len(sub) + 1):
        if seq[k:k + len(sub)] == sub:
            return k
    return -1


# ------------------------------------------------------------------------------------------ loading an RM

_LOADED_RMS = {}


def load_rm(path, max_length=None, rm_format="open", device="cpu", dtype=None):
    """(model, RMFormat) of a trained RM, for scoring. max_length None: the length the RM was trained with
    (its manifest), else DEFAULT_MAX_LENGTH. A model is loaded once per process (a yardstick that is also
    the judge, or an RM scored under two formats, shares one copy)."""
    from common.io import DataError
    from common.models import load_reward_model, load_tokenizer, rm_max_length

    key = (path, str(device), dtype)
    if key not in _LOADED_RMS:
        tok = load_tokenizer(path)
        _LOADED_RMS[key] = (load_reward_model(path, tokenizer=tok, device=device, dtype=dtype).eval(), tok)
    model, tok = _LOADED_RMS[key]
    try:
        return model, RMFormat(tok, model, max_length=rm_max_length(path, max_length), closed=rm_format == "closed")
    except ValueError as e:
        raise DataError(f"{path}: --rm-format {rm_format}: {e}") from None


# ------------------------------------------------------------------------------------------ reward statistics
# reward_stats.json beside an RM: the mean and std of its scores of complete replies, which `--reward-norm std`
# divides by. 03_train.py writes it into every RM folder it makes; `python -m common.rewards stats` (also
# `05_evaluate.py reward-stats`) makes one for any RM, a hub ORM too.

REWARD_STATS_FILE = "reward_stats.json"


def read_reward_stats(rm, reward_norm="none", path=None):
    """{"mean", "std", "path"} of the RM's rewards: `path`, else reward_stats.json in the RM folder. Needed by
    --reward-norm std; read when present otherwise (a method may take defaults from them), and None when absent
    or without an RM."""
    import json
    import math
    import os

    from common.io import DataError
    from common.metrics import reward_stats_problem

    if not rm:
        if reward_norm == "std":
            raise DataError("--reward-norm std needs --rm")
        return None
    given, path = path is not None, path or os.path.join(rm, REWARD_STATS_FILE)
    if not os.path.isfile(path):
        if reward_norm == "std" or given:
            raise DataError(f"{path}: no reward statistics for --reward-norm std (03_train.py writes them; or "
                            "make them with python -m common.rewards stats and give --reward-stats FILE)")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for key in ("mean", "std"):
        value = stats.get(key) if isinstance(stats, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise DataError(f"{path}: field '{key}': expected a finite number")
    problem = reward_stats_problem(stats["mean"], stats["std"])
    if problem:
        raise DataError(f"{path}: {problem}")
    return {"mean": float(stats["mean"]), "std": float(stats["std"]), "path": path}


def checked_pair_scores(model, fmt, pairs, lengths, batch_size, rm):
    """prefix_pair_scores, each score finite (else one error naming the RM, the pair, its side and t)."""
    from common.metrics import prefix_pair_scores, require_finite_scores

    sw, sl = prefix_pair_scores(model, fmt, pairs, lengths, batch_size)
    for side, scores in (("chosen", sw), ("rejected", sl)):
        require_finite_scores(scores, rm, lambda n: f"pair {pairs[n // len(lengths)]['id']!r} {side}, "
                                                    f"t={lengths[n % len(lengths)]}")
    return sw, sl


def rm_scoring_args():
    """A parent parser of the flags of every command that scores with a trained RM (05's metrics, agreement,
    consistency and reward-stats; `python -m common.rewards stats`), declared once."""
    import argparse

    from common.io import add_device_args, add_max_length_arg, positive_int

    parser = argparse.ArgumentParser(add_help=False)
    add_max_length_arg(parser)
    parser.add_argument("--rm-format", choices=["open", "closed"], default="open",
                        help="closed: the RM sees each reply or prefix as a finished, closed chat turn (for hub chat "
                             "RMs trained that way; docs/scoring.md)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--allow-train-overlap", action="store_true",
                        help="score prompts or pairs the RM was trained on (refused by default: see its manifest)")
    parser.add_argument("--data-dir", default=None)
    add_device_args(parser)
    return parser


def add_reward_stats_args(parser):
    """The own flags of `python -m common.rewards stats` (and of its alias `05_evaluate.py reward-stats`); the
    scoring flags come from `rm_scoring_args`."""
    from common.io import positive_int, prefix_lengths

    parser.add_argument("--rm", required=True, help="RM folder, hub id or alias")
    parser.add_argument("--pairs", default="hh-rlhf:heldout", help="pairs whose chosen and rejected replies are scored")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N pairs")
    parser.add_argument("--prefix-lengths", type=prefix_lengths, default=[5, 10, 20, 50],
                        help="also the mean and std of prefix scores at these t")
    parser.add_argument("--output", required=True, help="JSON to write; give it to 04_decode.py --reward-stats")


def write_reward_stats(args, device, dtype):
    """Mean and std of an RM's scores of complete replies (and of prefixes), in the reward_stats.json layout
    that 03_train.py writes into the RM folders it makes."""
    import logging

    from common.data import check_prompt_overlap, load_pairs
    from common.io import DataError, check_output_differs, write_json, write_manifest
    from common.metrics import require_finite_scores, reward_statistics
    from common.models import device_fields

    check_output_differs(args.output, args.pairs)
    pairs = load_pairs(args.pairs, args.data_dir)[: args.limit]
    if not pairs:
        raise DataError(f"{args.pairs}: no pairs")
    check_prompt_overlap(pairs, args.pairs, [args.rm], args.data_dir, args.allow_train_overlap)
    model, fmt = load_rm(args.rm, args.max_length, args.rm_format, device, dtype)
    prompts = [p["prompt"] for p in pairs] * 2
    complete = score(model, fmt, prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                     args.batch_size)
    require_finite_scores(complete, args.rm, lambda n: f"pair {pairs[n % len(pairs)]['id']!r} "
                                                       f"{'chosen' if n < len(pairs) else 'rejected'}")
    truncated = {"complete": fmt.truncated}
    prefix = []
    if args.prefix_lengths:
        sw, sl = checked_pair_scores(model, fmt, pairs, args.prefix_lengths, args.batch_size, args.rm)
        prefix = [v for s in sw + sl for v in s]
        truncated["prefixes"] = fmt.truncated - truncated["complete"]
    stats = reward_statistics(complete, prefix, f"{args.pairs} ({len(pairs)} pairs, chosen and rejected)")
    stats.update(rm=args.rm, rm_format=args.rm_format, truncated_inputs=truncated)
    write_json(args.output, stats)
    write_manifest(args.output, args, inputs=[args.pairs], extra={"truncated_inputs": truncated},
                   resolved=device_fields(device, dtype))
    logging.getLogger("rewards").info("%s: mean %.4f, std %.4f over %d replies", args.rm, stats["mean"],
                                      stats["std"], stats["n"])
    return stats


# ------------------------------------------------------------------------------------------ batched forwards

def collate(examples, pad_id, padding_side="right"):
    """Pad a list of encoded examples; returns tensors and each row's offset (left padding shifts positions)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    types = torch.zeros((len(examples), width), dtype=torch.long) if "token_type_ids" in examples[0] else None
    offsets = []
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        start = width - n if padding_side == "left" else 0
        ids[row, start:start + n] = torch.tensor(e["input_ids"])
        mask[row, start:start + n] = 1
        if types is not None:
            types[row, start:start + n] = torch.tensor(e["token_type_ids"])
        offsets.append(start)
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    return batch, offsets


def head_layers(model):
    """The linear layers that turn an RM's last hidden state into its score: a decoder's `score`; for an
    encoder, every linear layer after its last list of blocks (BERT's pooler and classifier, RoBERTa's and
    ELECTRA's classifier.dense and out_proj, DistilBERT's pre_classifier and classifier)."""
    if isinstance(getattr(model, "score", None), torch.nn.Linear):
        return [model.score]
    modules = list(model.modules())
    lists = [i for i, m in enumerate(modules) if isinstance(m, torch.nn.ModuleList)]
    inside = {id(m) for i in lists for m in modules[i].modules()}
    start = lists[-1] + 1 if lists else 0
    layers = [m for m in modules[start:] if isinstance(m, torch.nn.Linear) and id(m) not in inside]
    return layers if lists else layers[-1:]


def _linear_in_fp32(layer, hidden):
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(hidden.float(), layer.weight.float(), bias)


@contextlib.contextmanager
def fp32_scores(layers):
    """While inside, the given linear layers (`head_layers`) compute in fp32, whatever the model's dtype: their
    input (the last hidden state) and weights are cast to fp32, autocast off. In bf16 a score in [2, 4) is
    rounded to steps of 0.016, and ties that fp32 does not have bias every metric built on score differences.
    On an fp32 model outside autocast nothing changes (the same bits as ever). Each layer is still called as a
    module (its forward is swapped), so frameworks that gather its weights around its forward (ZeRO-3) see them."""
    swapped = [layer for layer in layers
               if layer.weight.dtype != torch.float32 or torch.is_autocast_enabled(layer.weight.device.type)]
    own = [layer.__dict__.get("forward") for layer in swapped]  # a forward set on the instance by a library
    for layer in swapped:
        layer.forward = functools.partial(_linear_in_fp32, layer)
    try:
        yield
    finally:
        for layer, forward in zip(swapped, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def score_head(model):
    """A decoder RM's head as a function of hidden states [..., H] -> fp32 scores [..., 1] (`fp32_scores`)."""
    head = model.score

    def apply(hidden):
        with fp32_scores([head]):
            return head(hidden).float()
    return apply


def reward_at(model, batch, positions, decoder=None):
    """Scores (float32, differentiable) read at explicit positions; the head runs in fp32 whatever the
    model's dtype (`fp32_scores`).

    positions: a LongTensor [B] (one score a row: the last real token) or a list of index lists, one per
    row (several scores a row: one forward scores many prefixes). For an encoder RM only [B] is valid and
    the model's own pooling is used.
    """
    decoder = is_decoder_rm(model) if decoder is None else decoder
    mask = batch["attention_mask"]
    if not decoder:
        with fp32_scores(head_layers(model)):
            return model(**batch).logits[:, 0].float()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    base = model.base_model
    hidden = base(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    head = score_head(model)
    if torch.is_tensor(positions):
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]
        return head(picked)[:, 0]
    rows = torch.cat([torch.full((len(p),), r, dtype=torch.long) for r, p in enumerate(positions)])
    cols = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in positions])
    flat = head(hidden[rows.to(hidden.device), cols.to(hidden.device)])[:, 0]
    return list(flat.split([len(p) for p in positions]))


def _device(model):
    return next(model.parameters()).device


def _batches(items, batch_size, key):
    """Length-sorted batches (less padding); yields (original indices, items)."""
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, [items[i] for i in idx]


@torch.no_grad()
def score_encoded(model, examples, pad_id, batch_size=16, padding_side="right"):
    """One score for each encoded example (its last real token)."""
    model.eval()
    decoder = is_decoder_rm(model)
    if not decoder:
        padding_side = "right"  # absolute position embeddings of encoders would shift under left padding
    out = [0.0] * len(examples)
    device = _device(model)
    for idx, chunk in _batches(examples, batch_size, key=lambda e: len(e["input_ids"])):
        batch, offsets = collate(chunk, pad_id, padding_side)
        last = torch.tensor([o + len(e["input_ids"]) - 1 for o, e in zip(offsets, chunk)])
        scores = reward_at(model, {k: v.to(device) for k, v in batch.items()}, last, decoder)
        for i, s in zip(idx, scores.tolist()):
            out[i] = s
    return out


def score(model, fmt, prompts, responses, batch_size=16, padding_side="right"):
    """r(x, y) for each (prompt, complete response), batched."""
    examples = [fmt.encode(p, r) for p, r in zip(prompts, responses)]
    return score_encoded(model, examples, fmt.tokenizer.pad_token_id, batch_size, padding_side)


def _lengths_for(n_tokens, lengths):
    """lengths: None (every t), a list of t's, or (per response) that list already picked by the caller."""
    if lengths is None:
        return list(range(1, n_tokens + 1))
    # A prefix longer than its response is the whole response.
    return [min(t, n_tokens) for t in lengths]


def _per_response(lengths, i):
    """lengths may be shared by all responses (a list of ints) or given per response (a list of lists)."""
    if lengths is not None and len(lengths) and isinstance(lengths[0], (list, tuple)):
        return lengths[i]
    return lengths


def score_prefixes_reference(model, fmt, prompts, responses, lengths=None, batch_size=16, padding_side="right"):
    """The literal definition: one RM input, one score per prefix. The oracle for `score_prefixes`."""
    examples, owners = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        r_ids = fmt.response_ids(r)
        for t in _lengths_for(len(r_ids), _per_response(lengths, i)):
            examples.append(fmt.encode(p, response_ids=r_ids, t=t))
            owners.append(i)
    flat = score_encoded(model, examples, fmt.tokenizer.pad_token_id, batch_size, padding_side)
    out = [[] for _ in prompts]
    for i, s in zip(owners, flat):
        out[i].append(s)
    return out


@torch.no_grad()
def score_prefixes(model, fmt, prompts, responses, lengths=None, batch_size=16, padding_side="right"):
    """r(x, y[:t]) for t = 1..T (lengths=None) or for the given t's, for each (prompt, response).

    lengths: None, one list of t's for all responses, or a list of such lists, one per response.

    Decoder RM: every prefix is read off one forward over the longest of them (two when some prefixes are
    over-long: the truncation rule keeps one prompt for all of those). Encoder RMs (and the closed format)
    fall back to the per-prefix reference path.
    """
    if not fmt.fast_prefixes:
        return score_prefixes_reference(model, fmt, prompts, responses, lengths, batch_size, padding_side)
    model.eval()
    sequences, reads, slots = [], [], []  # one forward sequence each, the positions read, where they go
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        r_ids = fmt.response_ids(r)
        ts = _lengths_for(len(r_ids), _per_response(lengths, i))
        out.append([0.0] * len(ts))
        for seq, positions, members in prefix_sequences(fmt, fmt.prompt_ids(p), [r_ids[:t] for t in ts]):
            sequences.append({"input_ids": seq})
            reads.append(positions)
            slots.append([(i, k) for k in members])
    device = _device(model)
    for idx, chunk in _batches(sequences, batch_size, key=lambda e: len(e["input_ids"])):
        batch, offsets = collate(chunk, fmt.tokenizer.pad_token_id, padding_side)
        positions = [[o + q for q in reads[j]] for j, o in zip(idx, offsets)]
        scores = reward_at(model, {k: v.to(device) for k, v in batch.items()}, positions, decoder=True)
        for j, s in zip(idx, scores):
            for (i, k), value in zip(slots[j], s.tolist()):
                out[i][k] = value
    return out


def prefix_sequences(fmt, prompt_ids, prefixes):
    """Pack response prefixes (token lists) of one prompt into as few decoder inputs as the rule allows.

    Returns [(input ids, [read position per member], [member indices])]: member k's RM input
    fmt.encode(prompt, response_ids=prefixes[k]) is the sequence up to its read position, inclusive.
    Prefixes are grouped by the prompt tokens they keep; within a group a prefix joins the longest sequence
    that starts with it (a cut text whose re-tokenization differs gets a sequence of its own).
    """
    by_prompt = {}
    for k, ids in enumerate(prefixes):
        n_p, n_r = fmt.budgets(len(prompt_ids), len(ids))
        fmt.truncated += (n_p, n_r) != (len(prompt_ids), len(ids))
        by_prompt.setdefault(n_p, []).append((ids[:n_r], k))
    out = []
    for n_p, members in by_prompt.items():
        head = prompt_ids[len(prompt_ids) - n_p:]
        groups = []  # [response ids, positions, members]
        for ids, k in sorted(members, key=lambda m: -len(m[0])):
            group = next((g for g in groups if g[0][:len(ids)] == ids), None)
            if group is None:
                group = [ids, [], []]
                groups.append(group)
            group[1].append(n_p + len(ids) - 1)
            group[2].append(k)
        out += [(head + ids, positions, ks) for ids, positions, ks in groups]
    return out


# ------------------------------------------------------------------------------------------ training batches

def training_units(fmt, rows, grouped=False, weight_field="weight"):
    """Training units from pair, partial or weighted rows; rows of weight 0 are left out (they add nothing).

    grouped=False: one unit per row, its chosen and its rejected RM input, each read at its last token.
    grouped=True (a decoder RM, open format): one unit per pair (pair_id and prompt) holding all its rows.
    Each side is packed by `prefix_sequences` (one forward for every cut point of the side, two when
    some are over-long) and each row's score is read at its own last token: the same scores, fewer forwards.
    A unit: {"sequences": [encoded input], "chosen": [(sequence, position)], "rejected": [...],
    "weights": [w], "complete": [the row is a whole pair, not a cut], "n_rows", "n_tokens"}.
    """
    units = []
    if not grouped:
        for row in rows:
            w = float(row.get(weight_field, 1.0))
            if w <= 0:
                continue
            chosen = fmt.encode(row["prompt"], row["chosen"])
            rejected = fmt.encode(row["prompt"], row["rejected"])
            n_c, n_r = len(chosen["input_ids"]), len(rejected["input_ids"])
            units.append({"sequences": [chosen, rejected], "chosen": [(0, n_c - 1)], "rejected": [(1, n_r - 1)],
                          "weights": [w], "complete": [bool(row.get("complete", True))], "n_rows": 1,
                          "n_tokens": n_c + n_r})
        return units
    pairs = {}
    for row in rows:
        if float(row.get(weight_field, 1.0)) > 0:
            pairs.setdefault((row.get("pair_id", row.get("id")), row["prompt"]), []).append(row)
    for (_, prompt), members in pairs.items():
        prompt_ids = fmt.prompt_ids(prompt)
        unit = {"sequences": [], "chosen": [None] * len(members), "rejected": [None] * len(members),
                "weights": [float(r.get(weight_field, 1.0)) for r in members],
                "complete": [bool(r.get("complete", True)) for r in members], "n_rows": len(members)}
        for side in ("chosen", "rejected"):
            prefixes = [fmt.response_ids(r[side]) for r in members]
            for seq, positions, ks in prefix_sequences(fmt, prompt_ids, prefixes):
                for pos, k in zip(positions, ks):
                    unit[side][k] = (len(unit["sequences"]), pos)
                unit["sequences"].append({"input_ids": seq})
        unit["n_tokens"] = sum(len(s["input_ids"]) for s in unit["sequences"])
        units.append(unit)
    return units


BATCHING_WINDOWS = {"random": 1, "window": 4, "length": 50}


def training_batches(units, batch_size, seed, epoch, window=1):
    """Batches of about batch_size rows in an order fixed by (seed, epoch); a unit (a pair, or all the cuts
    of a pair when grouped) is never split.

    window=1 ("random", the default, as the standard reward trainer): each batch is a random draw of units.
    window=W > 1: units are drawn at random into windows of W batches and sorted by length within a window,
    so that a batch holds units of similar length (less padding, faster); the batches are then shuffled.
    W = 4 ("window") keeps every step's lengths close to a random draw's; W = 50 ("length") puts a length range
    in each step, which costs held-out accuracy (MiniLM ORM parity, seed 0: 0.586 with 50, 0.612 random).
    """
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    jitter = torch.rand(len(units), generator=g).tolist()
    order = torch.randperm(len(units), generator=g).tolist()
    mega = batch_size * window
    batches = []
    for s in range(0, len(order), mega):
        chunk = order[s:s + mega]
        if window > 1:
            chunk = sorted(chunk, key=lambda i: (units[i]["n_tokens"], jitter[i]))
        current, rows = [], 0
        for i in chunk:
            current.append(i)
            rows += units[i]["n_rows"]
            if rows >= batch_size:
                batches.append(current)
                current, rows = [], 0
        if current:
            batches.append(current)
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


FORWARD_OVERHEAD_TOKENS = 256  # what one more forward costs, in padded tokens (measured on 2 CPU cores)


def length_groups(lengths, overhead=FORWARD_OVERHEAD_TOKENS):
    """Indices of sequences split into groups of similar length that minimise the padded tokens of one forward
    per group (each group padded to its longest), plus `overhead` for each forward: an exact partition of the
    length-sorted sequences into runs, by dynamic programming."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sizes[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def batch_loss(model, units, pad_id, decoder, device, length_grouped=True, padding=False, forward=None):
    """The weighted Bradley-Terry loss of a batch: -mean over its rows of w * log sigmoid(r_w - r_l).

    length_grouped=True: the sequences of the batch go through the model in groups of similar length
    (`length_groups`), as many forwards as the data asks for. False: one padded forward, whatever the data
    (distributed ZeRO-3 gathers the parameters collectively at every forward, so every rank must run the same
    number). padding=True: a batch that only keeps the ranks in step (its rows weigh 0: loss and gradient 0, no
    rows or scores counted). forward(batch, positions): runs one forward and returns the scores there (default
    `reward_at` on `model`; a training runtime passes its own, e.g. DeepSpeed's engine). Returns (loss, stats) with
    stats
    {"rows", "forwards" (sequences), "tokens" (real tokens), "complete_scores" (the scores of the chosen and
    rejected replies of the batch's complete rows, as computed for the loss: reward statistics for free)}.
    """
    from common.losses import bradley_terry_loss

    sequences, reads, picks = [], [], {"chosen": [], "rejected": []}
    weights, complete = [], []
    for u in units:
        base = len(sequences)
        sequences += u["sequences"]
        reads += [[] for _ in u["sequences"]]
        for side in ("chosen", "rejected"):
            for s, pos in u[side]:
                picks[side].append((base + s, len(reads[base + s])))
                reads[base + s].append(pos)
        weights += u["weights"]
        complete += u.get("complete", [True] * len(u["weights"]))
    # The batch's sequences go through the model in groups of similar length (one forward each, the graph of
    # all kept for one backward): the same scores, loss and gradient as one padded forward, less padding.
    forward = forward or (lambda batch, positions: reward_at(model, batch, positions, decoder))
    per_sequence, tokens = [None] * len(sequences), 0
    lengths = [len(seq["input_ids"]) for seq in sequences]
    for group in length_groups(lengths) if length_grouped else [list(range(len(sequences)))]:
        batch, offsets = collate([sequences[i] for i in group], pad_id, "right")
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens += int(batch["attention_mask"].sum())
        if decoder:
            positions = [[o + q for q in reads[i]] for i, o in zip(group, offsets)]
            scores = forward(batch, positions)
        else:  # encoders read one score per sequence, at its end (their own pooling)
            last = torch.tensor([o + reads[i][-1] for i, o in zip(group, offsets)], device=device)
            scores = forward(batch, last)[:, None].unbind(0)
        for i, sc in zip(group, scores):
            per_sequence[i] = sc
    flat = torch.cat(per_sequence)
    start = [0]
    for r in reads:
        start.append(start[-1] + len(r))
    index = {side: torch.tensor([start[s] + j for s, j in picks[side]], device=flat.device) for side in picks}
    w = torch.tensor(weights, device=flat.device, dtype=flat.dtype) * (0.0 if padding else 1.0)
    r_chosen, r_rejected = flat[index["chosen"]], flat[index["rejected"]]
    loss = bradley_terry_loss(r_chosen, r_rejected, w)
    if padding:
        return loss, {"rows": 0, "forwards": 0, "tokens": 0, "complete_scores": []}
    keep = torch.tensor(complete, device=flat.device)
    scores = torch.cat([r_chosen[keep], r_rejected[keep]]).detach().float().cpu().tolist()
    return loss, {"rows": len(weights), "forwards": len(sequences), "tokens": tokens, "complete_scores": scores}


def main():
    """python -m common.rewards stats --rm RM --output FILE: reward_stats.json for any RM."""
    import argparse
    import logging

    from common.models import device_setup

    parser = argparse.ArgumentParser(prog="python -m common.rewards", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_reward_stats_args(sub.add_parser("stats", parents=[rm_scoring_args()],
                                         help="reward_stats.json for any RM (a hub ORM too), for 04_decode.py "
                                              "--reward-norm std"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    write_reward_stats(args, *device_setup(args))


if __name__ == "__main__":
    from common.io import run_main

    run_main(main)
