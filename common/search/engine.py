"""The search engine: one batched, cached loop that runs any method of methods.py. It names no method.

Every method is rounds of "grow candidates, score them, keep some" over rows (a row = one beam of one
prompt):
  1. feed each row's accepted tokens to the policy (and the RM's cache): the next-token logits of every row;
  2. grow K candidate chains of up to L tokens per row (drawn, argmax, or the top-k next tokens);
  3. score every candidate with the RM (cached path, or decoded text);
  4. the method chooses the rows of the next round; the caches follow them.

Caches. The policy keeps one KV cache for all rows. The K candidate chains of a row go into that row as a
tree: each chain token attends the row's accepted prefix and its own chain only, and all chains share
positions (a 4-D attention mask, as in speculative decoding), so the prefix cache is never copied K times.
After the choice the chain keys are cropped off and the chosen chain is fed again as the row's next
accepted tokens (L tokens, once). A method may also decide inside a round (`decision_points`): the chains
grown so far are scored and the method stops some of them (`prune`); a stopped chain is fed no further, so
the policy's work shrinks with it. A decoder RM that shares the policy's tokenizer keeps its own cache the
same way, each chain token fed once however often it is scored, so scoring K candidates of L tokens costs
K*L new tokens; the chosen chain's keys stay in its cache as the row's next accepted tokens (the policy
feeds its chain again, whose last token it never read); it holds each prompt's kept tail when inputs grow longer than the RM's max length, so both
paths cut by the one rule of common/rewards.py (`RMWindow`). Any other RM gets decoded text (the text path),
batched.

Sampling draws one uniform number per token from a generator seeded by (seed, prompt id, and the
coordinates the method gives: round, lineage, chain, step), so results do not depend on batch size or
composition. Compute is counted per prompt: a token counts once for each time a
model computes it (a prompt encoded once and copied to W beams or N samples counts once).

Where things run. Forwards, heads and sampling run on the models' device: the policy's next-token logits stay
there (fp32 whatever the model's precision), each token's uniform (drawn on the CPU from its coordinates) goes
there, filtering, softmax, cumulative sum and search run there in fp32, and only token ids come back; no
[rows x vocab] tensor leaves the device. RM scores (one number per candidate, fp32) come to the CPU, where the
methods rank and the bookkeeping (chains, masks, lineages) runs. On the CPU the tokens are the literal
reference's; on a GPU a token depends on its logits and its uniform, up to the device's rounding in the sums.
"""
import math
import os
import random
import resource
import time
import zlib
from dataclasses import dataclass, field

import torch

from common.io import DEFAULT_MAX_LENGTH
from common.metrics import require_finite_scores
from common.rewards import RMFormat, score_encoded, score_head, text_ids
from common.search.methods import Method, Row, Run, make_method


# ------------------------------------------------------------------------------------------ sampling

def prompt_key(prompt_id):
    return zlib.crc32(str(prompt_id).encode("utf-8"))


def uniform(seed, key, round_idx, beam, chain, step):
    """The uniform number behind one sampled token; the same in the engine and the reference."""
    return random.Random(f"{seed}/{key}/{round_idx}/{beam}/{chain}/{step}").random()


def filter_logits(logits, temperature=1.0, top_p=1.0, top_k=0):
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest head with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return logits


def pick_tokens(logits, us, sampling):
    """Argmax (us is None) or inverse-CDF sampling by the Sampling settings with the given uniforms, one per row,
    on the logits' device in fp32: only the uniforms go there and the token ids come back."""
    if us is None:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, sampling.temperature, sampling.top_p, sampling.top_k), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.as_tensor(us, dtype=cdf.dtype, device=cdf.device).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def entropy(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


# ------------------------------------------------------------------------------------------ tree-cached model

class TreeCache:
    """A decoder (policy or RM) with one KV cache over R rows; tokens are fed as shared or as chain j.

    Keys carry a segment id: -1 for the row's accepted (shared) tokens, j for candidate chain j. A query of
    chain j sees valid shared keys and valid keys of chain j, in feeding order; a shared query sees shared
    keys only. Chain keys always come after all shared keys, so dropping them is a crop. `owner[r]` is the
    prompt of row r: tokens are counted per prompt (`tokens[b]`), once each time they are computed.
    """

    def __init__(self, model, head, owner):
        from transformers import DynamicCache

        self.model, self.base = model, model.base_model
        self.device = next(model.parameters()).device
        self.head = lambda h: head(h.to(self.device)).float()  # fp32, on the model's device
        self.cache = DynamicCache(config=model.config)
        self.owner = torch.as_tensor(owner, dtype=torch.long)
        self.tokens = torch.zeros(int(self.owner.max()) + 1 if len(owner) else 0, dtype=torch.long)
        self.key_valid = None   # [R, S] bool
        self.key_seg = None     # [R, S] long
        self.n_shared = None    # [R] positions used by valid shared tokens
        self.chain_len = None   # [R, K] valid tokens fed per chain in this round
        self.shared_len = 0     # cache length of the shared region
        self.calls = 0

    @property
    def length(self):
        return 0 if self.key_valid is None else self.key_valid.shape[1]

    @torch.no_grad()
    def feed(self, tokens, valid, seg, n_chains=1):
        """Feed [R, Q] tokens; returns hidden states [R, Q, H] (on the model's device)."""
        R, Q = tokens.shape
        if self.key_valid is None:
            self.key_valid = torch.zeros(R, 0, dtype=torch.bool)
            self.key_seg = torch.zeros(R, 0, dtype=torch.long)
            self.n_shared = torch.zeros(R, dtype=torch.long)
        if self.chain_len is None or self.chain_len.shape[1] < n_chains:
            self.chain_len = torch.zeros(R, n_chains, dtype=torch.long)
        shared = seg < 0
        sv = (shared & valid).long()
        pos = torch.where(shared, self.n_shared[:, None] + sv.cumsum(1) - 1, torch.zeros_like(seg))
        n_shared_after = self.n_shared + sv.sum(1)
        for j in range(n_chains):
            in_j = (seg == j)
            cv = (in_j & valid).long()
            pj = n_shared_after[:, None] + self.chain_len[:, j:j + 1] + cv.cumsum(1) - 1
            pos = torch.where(in_j, pj, pos)
            self.chain_len[:, j] += cv.sum(1)
        pos = pos.clamp(min=0)
        self.n_shared = n_shared_after

        key_valid = torch.cat([self.key_valid, valid], 1)
        key_seg = torch.cat([self.key_seg, seg], 1)
        S = self.length
        same = (key_seg[:, None, :] < 0) | (key_seg[:, None, :] == seg[:, :, None])
        order = torch.arange(S + Q)[None, :] <= (S + torch.arange(Q))[:, None]
        allowed = key_valid[:, None, :] & same & order[None]
        allowed[:, torch.arange(Q), S + torch.arange(Q)] = True  # every query sees itself: no empty row
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(R, 1, Q, S + Q, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
        device = self.device
        out = self.base(input_ids=tokens.to(device), attention_mask=mask.to(device),
                        position_ids=pos.to(device), past_key_values=self.cache, use_cache=True)
        # Shared columns come first in a call; they extend the shared region (chains are cropped later).
        lead = int((~shared).any(0).long().argmax()) if bool((~shared).any()) else Q
        if lead and self.shared_len != S:
            raise RuntimeError("shared tokens fed after chain tokens; drop the chains first")
        if lead:
            self.shared_len = S + lead
        self.key_valid, self.key_seg = key_valid, key_seg
        self.calls += 1
        self.tokens.index_add_(0, self.owner, valid.long().sum(1))
        return out.last_hidden_state

    def drop_chains(self):
        extra = self.length - self.shared_len
        if extra > 0:
            self.cache.crop(-extra)
            self.key_valid = self.key_valid[:, :self.shared_len]
            self.key_seg = self.key_seg[:, :self.shared_len]
        if self.chain_len is not None:
            self.chain_len.zero_()

    def keep_chains(self, chosen):
        """Make the keys of chain chosen[r] of each row r the row's next shared tokens (in feeding order) and drop
        every other chain: a chosen candidate's tokens are not fed again (None: keep none). Returns the tokens
        kept per row. Rows keeping fewer than the most are padded with invalid keys, as a left-padded prompt is."""
        from transformers.cache_utils import DynamicLayer

        S0 = self.shared_len
        want = torch.tensor([-2 if j is None else j for j in chosen], dtype=torch.long)
        keep = self.key_valid[:, S0:] & (self.key_seg[:, S0:] == want[:, None])
        counts = keep.sum(1)
        M = int(counts.max()) if len(chosen) else 0
        if M == 0 or any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            self.drop_chains()
            return [0] * len(chosen)
        src = torch.argsort((~keep).long(), dim=1, stable=True)[:, :M] + S0  # the kept columns first, in order
        for layer in self.cache.layers:
            R, H, _, D = layer.keys.shape
            index = src.to(layer.keys.device)[:, None, :, None].expand(R, H, M, D)
            layer.keys = torch.cat([layer.keys[:, :, :S0], layer.keys.gather(2, index)], 2)
            layer.values = torch.cat([layer.values[:, :, :S0], layer.values.gather(2, index)], 2)
        self.key_valid = torch.cat([self.key_valid[:, :S0], torch.arange(M)[None, :] < counts[:, None]], 1)
        self.key_seg = torch.cat([self.key_seg[:, :S0], torch.full((len(chosen), M), -1, dtype=torch.long)], 1)
        self.shared_len = S0 + M
        self.n_shared = self.n_shared + counts
        self.chain_len = None
        return counts.tolist()

    def select_rows(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        self.cache.batch_select_indices(index.to(self.device))
        self.key_valid, self.key_seg = self.key_valid[index], self.key_seg[index]
        self.n_shared = self.n_shared[index]
        self.owner = self.owner[index]
        self.chain_len = None


def lm_head(model):
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return lambda h: torch.tanh(head(h) / cap) * cap
    return head


def pad_rows(seqs, pad_id, left=False):
    """[R, Q] tokens and validity from ragged lists (Q >= 1)."""
    width = max(1, max((len(s) for s in seqs), default=0))
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        if s:
            start = width - len(s) if left else 0
            tokens[r, start:start + len(s)] = torch.tensor(s)
            valid[r, start:start + len(s)] = True
    return tokens, valid


def at(values, rows, cols):
    """values[rows[n], cols[n]], the indices made on the CPU (tensors or lists), values on any device."""
    device = values.device
    return values[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)]


def last_valid(valid):
    """Index of the last True in each row (-1 if none)."""
    idx = torch.arange(valid.shape[1]).expand_as(valid)
    return torch.where(valid, idx, torch.full_like(idx, -1)).max(1).values


def peak_memory_mb(device):
    """Peak memory so far: max allocated on a CUDA device, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if os.uname().sysname != "Darwin" else peak / 2 ** 20


# ------------------------------------------------------------------------------------------ models bundled

@dataclass
class Policy:
    model: object
    tokenizer: object
    name: str = "policy"
    fmt: RMFormat = None
    eos_ids: set = field(default_factory=set)

    def __post_init__(self):
        self.fmt = RMFormat(self.tokenizer, self.model, max_length=10 ** 9)  # same prompt rendering rule
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self.eos_ids = {i for i in ids if i is not None}

    @property
    def default_stop_strings(self):
        # A base model rendered as "Human: ... Assistant:" would go on to write the next human turn.
        return () if self.fmt.kind == "chat" else ("\nHuman:", "\n\nHuman:")


@dataclass
class RewardModel:
    model: object
    tokenizer: object
    name: str = "rm"
    max_length: int = DEFAULT_MAX_LENGTH
    fmt: RMFormat = None
    stats: dict = None        # {"mean", "std"} of the RM's rewards (reward_stats.json), when known
    normalize: bool = False   # the one switch: search with (r - mean) / std instead of r
    closed: bool = False      # every input a closed chat turn (an RM trained on finished, closed turns)

    def __post_init__(self):
        self.model.eval()
        self.fmt = RMFormat(self.tokenizer, self.model, max_length=self.max_length, closed=self.closed)
        if self.normalize and self.stats is None:
            raise ValueError("normalised rewards need the RM's reward statistics (mean and std)")

    def to_search(self, scores):
        """The reward the search sees: raw, or (r - mean) / std when normalised (a tensor or a list)."""
        if not self.normalize:
            return scores
        if torch.is_tensor(scores):
            return (scores - self.stats["mean"]) / self.stats["std"]
        return [(s - self.stats["mean"]) / self.stats["std"] for s in scores]

    def raw(self, value):
        """The RM's own score of a search reward."""
        return value if not self.normalize or value is None else value * self.stats["std"] + self.stats["mean"]

    @torch.no_grad()
    def score_texts(self, prompt_texts, replies):
        """(search rewards, RM input tokens) of each (prompt, reply text), as 05 scores a reply: tokenized for
        the RM in one batched call, cut by the truncation rule, scored in batches of 64."""
        ids = self.fmt.responses_ids(replies)
        examples = [self.fmt.encode(p, response_ids=i) for p, i in zip(prompt_texts, ids)]
        scores = score_encoded(self.model, examples, self.tokenizer.pad_token_id, batch_size=64)
        return self.to_search(scores), [len(e["input_ids"]) for e in examples]

    def shares_tokens_with(self, policy):
        """The cached path needs a decoder RM whose tokenizer and prompt rendering equal the policy's."""
        if not self.fmt.fast_prefixes or self.fmt.kind != policy.fmt.kind:
            return False
        a, b = self.tokenizer, policy.tokenizer
        probe = "Hello, world! 123 ça va? <|im_end|>"
        return len(a) == len(b) and a(probe).input_ids == b(probe).input_ids and \
            a.chat_template == b.chat_template


@dataclass
class RMWindow:
    """The truncation rule (common/rewards.py, docs/scoring.md) on the RM's cache, per prompt b of a batch.

    Prompt b's RM input keeps its last keep[b] = min(n, budget // 2) tokens when prompt + response exceed the
    budget: the cache holds those, and after them the RM reads at most cap[b] = budget - keep[b] response tokens,
    so a response of t tokens scores as its first min(t, cap[b]) (later tokens are never fed). Where the whole
    prompt is longer than its kept tail, a response short enough to fit beside the whole prompt is read beside
    it (`whole_prompt`): the cache does not hold that input, and it is scored afresh.
    """
    fmt: RMFormat
    prompts: list    # prompt texts
    n_prompt: list   # RM prompt tokens
    keep: list       # prompt tokens in the cache (the last ones)
    cap: list        # response tokens read after them

    @classmethod
    def of(cls, fmt, prompts):
        n = [len(fmt.prompt_ids(p)) for p in prompts]
        keep, cap = zip(*[fmt.budgets(k, 10 ** 9) for k in n]) if prompts else ((), ())
        return cls(fmt, list(prompts), n, list(keep), list(cap))

    def cached_prompt(self, b):
        ids = self.fmt.prompt_ids(self.prompts[b])
        return ids[len(ids) - self.keep[b]:]

    def truncated(self, b, t):
        """Whether the RM input of prompt b and a response of t tokens is cut by the rule."""
        return self.fmt.budgets(self.n_prompt[b], t) != (self.n_prompt[b], t)

    def whole_prompt(self, b, t):
        """Whether that input holds the whole prompt while the cache holds only its tail."""
        return self.keep[b] < self.n_prompt[b] and not self.truncated(b, t)


# ------------------------------------------------------------------------------------------ the loop

def prompt_room(positions, max_new_tokens):
    """Prompt tokens a policy of `positions` positions keeps beside max_new_tokens (None: no limit); a prompt
    longer than that keeps its last prompt_room tokens, as the RM's rule keeps a prompt's tail."""
    room = None if positions is None else positions - max_new_tokens
    if room is not None and room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the policy's "
                         f"{positions} positions")
    return room


def cut_replies(tokenizer, token_lists, stop_strings):
    """The reply of each token list: decoded (one batched call), cut before the first stop string, stripped."""
    texts = []
    for text in tokenizer.batch_decode(token_lists, skip_special_tokens=True) if token_lists else []:
        for s in stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        texts.append(text.strip())
    return texts



def search_params(method, max_new_tokens, seed, has_rm, normalize, stats):
    """What a run's rows record: the method's knobs (with the defaults the RM's reward settings give), the
    budget and seed, and for RM-guided methods whether rewards were normalised (the switch that acted) and
    with which statistics."""
    out = method.params(bool(normalize), stats) if has_rm else method.params()
    if method.uses_rm and has_rm:
        out["reward_norm"] = "std" if normalize else "none"
        if normalize:
            out["reward_stats"] = {"mean": stats["mean"], "std": stats["std"]}
    out.update(max_new_tokens=max_new_tokens, seed=seed)
    return out


def chosen_chain(cand, choice):
    """Which candidate chain of its parent row a choice accepted: one with exactly its tokens (None: it accepted
    none, or tokens grown in an earlier round)."""
    if not choice.accepted:
        return None
    return next((j for j, chain in enumerate(cand.chains[choice.parent]) if chain == choice.accepted), None)


@dataclass
class Candidates:
    """What step 2 grew and step 3 scored: per row i, K chains (token lists), whether each ended the
    response, whether the method stopped it inside the round (`dropped`), their LM log-probabilities
    (top-k proposals) and search rewards ([R, K] or None)."""
    chains: list
    done: list
    logp: torch.Tensor
    scores: torch.Tensor = None
    dropped: list = None


@dataclass
class Batch:
    """What a method may read while it chooses: the round, its own state (Method.start), and the uniform number
    at any coordinates of a prompt (seeded by the run's seed and the prompt's id)."""
    seed: int
    keys: list
    state: dict
    round_idx: int = 0

    def uniform(self, b, *coords):
        return uniform(self.seed, self.keys[b], *coords)


@dataclass
class Decoding:
    """One batch's prompts as encoded (prefills, prompt tokens cut for the policy), its caches, and the text
    path's RM counts."""
    prompts: list
    prefills: list
    cut: list
    policy_cache: TreeCache
    rm_cache: TreeCache = None
    window: RMWindow = None
    rm_calls: int = 0
    rm_tokens_text: list = None


class NextTokens:
    """What `Method.stop_chain` may read of the next token of each growing chain (`[n]`: the n-th), computed
    for all of them at once on first use: `.entropy`."""

    def __init__(self, flat_logits, index):
        self.flat_logits, self.index, self._entropy = flat_logits, index, None

    def __getitem__(self, n):
        return _NextToken(self, n)

    def entropies(self):
        if self._entropy is None:
            index = torch.tensor(self.index, device=self.flat_logits.device)
            self._entropy = entropy(self.flat_logits[index]).tolist()
        return self._entropy


class _NextToken:
    __slots__ = ("all", "n")

    def __init__(self, all_, n):
        self.all, self.n = all_, n

    @property
    def entropy(self):
        return self.all.entropies()[self.n]


class Search:
    """Runs one method over batches of prompts. `run` returns one result dict per prompt.

    method: a Method instance (methods.py) or its name (then knobs are its keyword arguments)."""

    def __init__(self, policy, method, rm=None, rm_path="auto", max_new_tokens=128, seed=0, stop_strings=(),
                 keep_candidates=False, **knobs):
        self.method = make_method(method, **knobs) if isinstance(method, str) else method
        self.policy, self.rm = policy, rm
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.keep_candidates = keep_candidates  # also return the last round's candidates (Best-of-N: the N samples)
        if self.method.uses_rm and rm is None:
            raise ValueError(f"method {self.method.name} needs a reward model (--rm)")
        self.method.bind(Run(max_new_tokens, rm is not None and rm.normalize, rm.stats if rm is not None else None,
                             lambda ids: policy.tokenizer.decode(ids, skip_special_tokens=True)))
        self.cached_rm = rm is not None and (
            rm_path == "cached" or (rm_path == "auto" and rm.shares_tokens_with(policy)))
        if rm_path == "cached" and rm is not None and not rm.shares_tokens_with(policy):
            raise ValueError("the cached RM path needs a decoder RM that shares the policy's tokenizer")
        self.stop_strings = tuple(stop_strings) or policy.default_stop_strings
        self.pad = policy.tokenizer.pad_token_id
        # each row says how many prompt tokens it lost to the policy's positions
        self.prompt_room = prompt_room(getattr(policy.model.config, "max_position_embeddings", None),
                                       max_new_tokens)

    def params(self):
        return search_params(self.method, self.max_new_tokens, self.seed, self.rm is not None,
                             self.rm is not None and self.rm.normalize, self.rm and self.rm.stats)

    # -- helpers ------------------------------------------------------------------------------------
    def _stopped_by_string(self, tokens):
        if not self.stop_strings:
            return False
        tail = self.policy.tokenizer.decode(tokens[-12:], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)

    def response_text(self, tokens):
        return self.response_texts([tokens])[0]

    def response_texts(self, token_lists):
        return cut_replies(self.policy.tokenizer, token_lists, self.stop_strings)

    # -- the run ------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, prompts):
        """prompts: list of {"id", "prompt", "prefill"?}. Returns [{"response", "tokens", "reward", "stats"}]."""
        method = self.method
        t0 = time.perf_counter()
        W, K, L = method.shape(self.max_new_tokens)
        d, rows, last_logits, batch = self._encode(prompts, W)
        policy_cache, rm_cache = d.policy_cache, d.rm_cache
        pending = rm_pending = [[] for _ in rows]  # accepted tokens not yet fed to the policy / RM
        last_round = []
        self._text_calls = 0
        while not all(r.finished for r in rows):
            R = len(rows)
            # 1. feed the accepted tokens; the policy's next-token logits of every row
            if any(pending):
                tokens, valid = pad_rows(pending, self.pad)
                hidden = policy_cache.feed(tokens, valid, torch.full_like(tokens, -1))
                has = valid.any(1)
                fresh = policy_cache.head(at(hidden, torch.arange(R), last_valid(valid).clamp(min=0)))
                last_logits = torch.where(has[:, None].to(fresh.device), fresh, last_logits)
            # 2. grow K candidate chains of up to L tokens per row (the method may stop some on the way);
            # 3. score them (a finished row's candidates score as the row)
            scorer = self._scorer(rm_cache, d.window, rows, rm_pending, prompts, d.rm_tokens_text)
            budget = [self.max_new_tokens - (len(r.tokens) - len(d.prefills[r.prompt])) for r in rows]
            cand = self._grow(rows, last_logits, policy_cache, batch, K, L, budget, scorer)
            if scorer is not None:
                cand.scores = scorer(cand)
                for i, r in enumerate(rows):
                    if r.finished:
                        cand.scores[i] = r.score
            # 4. choose; the caches follow the chosen rows
            choice = method.choose(rows, cand, batch)
            if self.keep_candidates:
                last_round = [(r.prompt, r.tokens + c) for r, cs in zip(rows, cand.chains) for c in cs]
            policy_cache.drop_chains()
            parents = [c.parent for c in choice]
            if parents != list(range(R)):
                policy_cache.select_rows(parents)
                last_logits = last_logits[torch.tensor(parents, device=last_logits.device)]
                if rm_cache is not None:
                    rm_cache.select_rows(parents)
            pending = rm_pending = [c.accepted for c in choice]
            if rm_cache is not None:  # the RM read the chosen candidates' tokens as candidates: their keys stay
                kept = rm_cache.keep_chains([chosen_chain(cand, c) for c in choice])
                rm_pending = [c.accepted[k:] for c, k in zip(choice, kept)]
            rows = [c.row for c in choice]
            batch.round_idx += 1
        d.rm_calls += self._text_calls
        return self._results(d, rows, batch, last_round, time.perf_counter() - t0)

    def _encode(self, prompts, W):
        """Each prompt (and its prefill) fed to the policy's cache, and scored by the RM (its cache or its
        text path): the batch's Decoding, its first rows (W per prompt, r(x) as their score), the policy's
        next-token logits of each, and the Batch (the method's state started from one row per prompt)."""
        pol, B = self.policy, len(prompts)
        prefills = [text_ids(pol.tokenizer, p["prefill"]) if p.get("prefill") else [] for p in prompts]
        prompt_ids = [pol.fmt.prompt_ids(p["prompt"]) + pre for p, pre in zip(prompts, prefills)]
        cut = [0 if self.prompt_room is None else max(0, len(ids) - self.prompt_room) for ids in prompt_ids]
        prompt_ids = [ids[c:] for ids, c in zip(prompt_ids, cut)]
        rows = [Row(prompt=b, lineage=0, tokens=list(pre)) for b, pre in enumerate(prefills)]

        d = Decoding(prompts, prefills, cut, TreeCache(pol.model, lm_head(pol.model), range(B)),
                     rm_tokens_text=[0] * B)
        tokens, valid = pad_rows(prompt_ids, self.pad, left=True)
        hidden = d.policy_cache.feed(tokens, valid, torch.full_like(tokens, -1))
        last_logits = d.policy_cache.head(at(hidden, torch.arange(B), last_valid(valid)))  # on the policy's device
        if self.rm is not None:
            self._score_prompts(d, rows)
        batch = Batch(self.seed, [prompt_key(p["id"]) for p in prompts], self.method.start(rows))
        # Rows start as W copies of the prompt (Algorithm 3's H, or N samples); each copy has its own
        # lineage, so it draws its own samples. The prompt is encoded once and its cache rows copied.
        if W > 1:
            parents = [b for b in range(B) for _ in range(W)]
            d.policy_cache.select_rows(parents)
            last_logits = last_logits[torch.tensor(parents, device=last_logits.device)]
            if d.rm_cache is not None:
                d.rm_cache.select_rows(parents)
            rows = [Row(prompt=b, lineage=s, tokens=list(rows[b].tokens), score=rows[b].score)
                    for b in range(B) for s in range(W)]
        return d, rows, last_logits, batch

    def _score_prompts(self, d, rows):
        """r(x) of each prompt (with its prefill) as its row's score; the RM's cache starts with its prompt."""
        prompts, prefills, B = d.prompts, d.prefills, len(d.prompts)
        if self.cached_rm:
            # the RM's cache holds each prompt's kept tail and the response tokens the RM reads (RMWindow)
            window = d.window = RMWindow.of(self.rm.fmt, [p["prompt"] for p in prompts])
            rm_cache = d.rm_cache = TreeCache(self.rm.model, score_head(self.rm.model), range(B))  # fp32 scores
            rm_ids = [window.cached_prompt(b) + pre[:window.cap[b]] for b, pre in enumerate(prefills)]
            t, v = pad_rows(rm_ids, self.pad, left=True)
            h = rm_cache.feed(t, v, torch.full_like(t, -1))
            scores0 = self.rm.to_search(rm_cache.head(at(h, torch.arange(B), last_valid(v)))[:, 0].cpu())
            fresh = [(b, pre) for b, pre in enumerate(prefills) if window.whole_prompt(b, len(pre))]
            for (b, _), s in zip(fresh, self._whole_prompt_scores(rm_cache, window, fresh)):
                scores0[b] = s
        else:
            scores0 = torch.tensor(self._text_scores([(r.prompt, r.tokens) for r in rows], prompts,
                                                     d.rm_tokens_text))
            d.rm_calls += 1
        require_finite_scores(scores0, self.rm.name, [f"prompt id {p['id']!r}" for p in prompts])
        for r, s in zip(rows, scores0.tolist()):
            r.score = s

    def _results(self, d, rows, batch, last_round, seconds):
        """The answer of each prompt, and what it cost."""
        method, B = self.method, len(d.prompts)
        results = []
        device = next(self.policy.model.parameters()).device
        candidates = self.response_texts([t for _, t in last_round]) if self.keep_candidates else []
        for b, p in enumerate(d.prompts):
            best = method.answer([r for r in rows if r.prompt == b], batch, b)
            rm_tokens = d.rm_tokens_text[b] if d.rm_cache is None else int(d.rm_cache.tokens[b])
            extra = {"candidates": [c for (q, _), c in zip(last_round, candidates) if q == b],
                     "candidate_tokens": [len(t) - len(d.prefills[b]) for q, t in last_round if q == b]} \
                if self.keep_candidates else {}
            response = self.response_text(best.tokens)
            if self.rm is None:
                reward_cut = None
            elif d.window is not None:
                reward_cut = d.window.truncated(b, len(best.tokens))
            else:
                reward_cut = self.rm.fmt.truncates(p["prompt"], response)
            results.append({
                **extra,
                "response": response,
                "tokens": best.tokens,
                "reward": self.rm.raw(best.score) if self.rm else None,
                "search_reward": best.score,
                "stats": {
                    "policy_calls": d.policy_cache.calls, "policy_tokens": int(d.policy_cache.tokens[b]),
                    "rm_calls": (d.rm_cache.calls if d.rm_cache is not None else d.rm_calls) if self.rm else 0,
                    "rm_tokens": rm_tokens if self.rm else 0,
                    "rm_path": ("cached" if d.rm_cache is not None else "text") if self.rm else None,
                    "new_tokens": len(best.tokens) - len(d.prefills[b]),
                    # truncation: prompt tokens the policy did not see; whether the reward's RM input was cut
                    "prompt_tokens_cut": d.cut[b], "reward_input_truncated": reward_cut,
                    "rounds": batch.round_idx, **method.record(batch, b),
                    "seconds": seconds / B, "batch_seconds": seconds, "batch_size": B,
                    "peak_memory_mb": round(peak_memory_mb(device), 1),
                },
            })
        return results

    # -- step 3: scoring, on the RM's cache or through text ---------------------------------------------
    def _scorer(self, rm_cache, window, rows, pending, prompts, rm_tokens_text):
        """A function Candidates -> [R, K] search rewards of the chains as grown so far; each call scores
        what was added since the last (None without an RM)."""
        if self.rm is None:
            return None
        R = len(rows)
        state = {"fed": None, "scores": None, "pending": pending}

        def score(cand):
            K = len(cand.chains[0])
            if state["scores"] is None:
                state["fed"] = [[0] * K for _ in range(R)]
            live = [[not (cand.dropped and cand.dropped[i][j]) for j in range(K)] for i in range(R)]
            if rm_cache is not None:
                out = self._cached_scores(rm_cache, window, rows, state["pending"], cand.chains, state["fed"],
                                          state["scores"], live)
                state["pending"] = [[] for _ in rows]
            else:
                out = state["scores"].clone() if state["scores"] is not None else torch.zeros(R, K)
                todo = [(i, j) for i in range(R) for j in range(K)
                        if live[i][j] and (state["scores"] is None or len(cand.chains[i][j]) > state["fed"][i][j])]
                if todo:
                    flat = [(rows[i].prompt, rows[i].tokens + cand.chains[i][j]) for i, j in todo]
                    for (i, j), v in zip(todo, self._text_scores(flat, prompts, rm_tokens_text)):
                        out[i, j] = v
                    self._text_calls += 1
                for i, j in todo:
                    state["fed"][i][j] = len(cand.chains[i][j])
            require_finite_scores(out, self.rm.name,
                                  lambda n: f"a reply to prompt id {prompts[rows[n // K].prompt]['id']!r}")
            state["scores"] = out
            return out.clone()
        return score

    # -- step 2: candidates, by the method's proposal ------------------------------------------------------
    def _grow(self, rows, last_logits, cache, batch, K, L, budget, scorer=None):
        """budget[i]: the new tokens row i may still add."""
        if self.method.proposal == "top_k":
            return self._top_tokens(rows, last_logits, K, budget)
        return self._chains(rows, last_logits, cache, batch, K, L, budget, scorer)

    def _top_tokens(self, rows, last_logits, K, budget):
        """The K most likely next tokens of each row, as chains of one token, with their log-probabilities."""
        chains = [[[] for _ in range(K)] for _ in rows]
        done, stopped = [[r.finished] * K for r in rows], [[r.finished] * K for r in rows]
        top = torch.topk(torch.log_softmax(last_logits.float(), -1), K, dim=-1)
        logp, indices = top.values.cpu(), top.indices.cpu().tolist()  # [R, K]: small
        for i, r in enumerate(rows):
            if r.finished:
                logp[i] = 0.0
                continue
            for j in range(K):
                self._append(chains, done, stopped, i, j, indices[i][j], budget[i], r)
        return Candidates(chains, done, logp)

    def _chains(self, rows, last_logits, cache, batch, K, L, budget, scorer):
        """K chains of up to L tokens per row, each token drawn by the method's sampling (argmax without), fed
        to the policy's cache as the tree of its row. A chain ends with the response (EOS, a stop string, the
        budget), where the method's `stop_chain` says (a segment boundary), or at a decision point, where the
        chains are scored and the method's `prune` stops some (they are fed no further)."""
        method, R = self.method, len(rows)
        sampling = method.sampling
        chains = [[[] for _ in range(K)] for _ in rows]
        done = [[r.finished] * K for r in rows]      # chain ended the response (EOS, stop, budget)
        stopped = [[r.finished] * K for r in rows]   # chain ended (also: a segment boundary, a rejection)
        dropped = [[False] * K for _ in rows]        # stopped by the method's prune inside the round
        logp = torch.zeros(R, K)
        logits = last_logits[:, None, :].expand(R, K, last_logits.shape[-1])
        decisions = set(method.decision_points(L)) if scorer is not None else set()
        ends_chains = type(method).stop_chain is not Method.stop_chain
        for step in range(L):
            active = [(i, j) for i in range(R) for j in range(K) if not stopped[i][j]]
            if active and step in decisions:  # score what has grown; the method stops some chains
                partial = Candidates(chains, done, logp, dropped=dropped)
                partial.scores = scorer(partial)
                for i, j in method.prune(rows, partial, batch):
                    dropped[i][j] = stopped[i][j] = True
                active = [(i, j) for i, j in active if not stopped[i][j]]
            flat = logits.reshape(R * K, -1)
            if active and ends_chains:
                next_tokens = NextTokens(flat, [i * K + j for i, j in active])
                for n, (i, j) in enumerate(active):
                    if method.stop_chain(rows[i], chains[i][j], step, next_tokens[n]):
                        stopped[i][j] = True
                active = [(i, j) for i, j in active if not stopped[i][j]]
            if not active:
                break
            sel = flat[torch.tensor([i * K + j for i, j in active], device=flat.device)]
            us = [batch.uniform(rows[i].prompt, batch.round_idx, rows[i].lineage, j, step)
                  for i, j in active] if sampling is not None else None
            picked = pick_tokens(sel, us, sampling).tolist()
            going = []
            for (i, j), tok in zip(active, picked):
                if self._append(chains, done, stopped, i, j, tok, budget[i], rows[i]) and step + 1 < L:
                    going.append((i, j, tok))
                else:
                    stopped[i][j] = True
            if not going:
                break
            logits = self._feed_chains(cache, going, R, K)
        return Candidates(chains, done, logp, dropped=dropped)

    def _feed_chains(self, cache, going, R, K):
        """Feed the next token of each chain that goes on (row i, chain j, token) to the policy's cache, one
        column per such chain (a chain that ended takes no more room or work); their next-token logits
        [R, K, V] (rows of chains that ended: zeros, never read)."""
        width = [0] * R
        where = []
        for i, j, _ in going:
            where.append(width[i])
            width[i] += 1
        Q = max(width)
        feed_tokens = torch.full((R, Q), self.pad, dtype=torch.long)
        feed_valid = torch.zeros((R, Q), dtype=torch.bool)
        seg = torch.zeros((R, Q), dtype=torch.long)
        rows_, chains_, toks_ = zip(*going)
        rows_t, cols_t = torch.tensor(rows_), torch.tensor(where)
        feed_tokens[rows_t, cols_t] = torch.tensor(toks_)
        feed_valid[rows_t, cols_t] = True
        seg[rows_t, cols_t] = torch.tensor(chains_)
        fed = cache.head(cache.feed(feed_tokens, feed_valid, seg, n_chains=K))
        if Q == K and len(going) == R * K:  # every chain went on, in order
            return fed
        logits = torch.zeros(R, K, fed.shape[-1], device=fed.device)
        logits[rows_t.to(fed.device), torch.tensor(chains_, device=fed.device)] = at(fed, rows_t, cols_t)
        return logits

    def _append(self, chains, done, stopped, i, j, tok, budget, row):
        """Add a token to chain j of row i; False when the response ends there (EOS, stop string, budget)."""
        if tok in self.policy.eos_ids:
            done[i][j] = stopped[i][j] = True
            return False
        chains[i][j].append(tok)
        if len(chains[i][j]) >= budget or self._stopped_by_string(row.tokens + chains[i][j]):
            done[i][j] = stopped[i][j] = True
            return False
        return True

    def _cached_scores(self, cache, window, rows, pending, chains, fed, previous, live):
        """Feed the accepted tokens and each live chain's tokens not yet in the RM's cache (fed[i][j] of them
        are); the score at each chain's end ([R, K]; a chain with no token scores as its row's prefix, one
        with nothing new keeps its `previous` score). The RM reads at most window.cap response tokens of a
        row (the truncation rule): later tokens are not fed, and a chain that ends past the cap scores as its
        cut (RMWindow)."""
        R, K = len(rows), len(chains[0])
        # row i's accepted tokens are rows[i].tokens; the last len(pending[i]) of them are not in the cache yet
        pending = [p[:max(0, window.cap[r.prompt] - len(r.tokens) + len(p))] for r, p in zip(rows, pending)]
        room = [max(0, window.cap[r.prompt] - len(r.tokens)) for r in rows]  # chain tokens the RM reads
        new = [[chains[i][j][fed[i][j]:room[i]] if live[i][j] else [] for j in range(K)] for i in range(R)]
        L = max(1, max(len(c) for cs in new for c in cs))
        # the first call of a round opens with the accepted tokens (a column even when there are none);
        # later calls of the same round add chain tokens only
        P = max([1 if previous is None else 0] + [len(p) for p in pending])
        tokens = torch.full((R, P + K * L), self.pad, dtype=torch.long)
        valid = torch.zeros((R, P + K * L), dtype=torch.bool)
        seg = torch.full((R, P + K * L), -1, dtype=torch.long)
        for i in range(R):
            if pending[i]:
                tokens[i, :len(pending[i])] = torch.tensor(pending[i])
                valid[i, :len(pending[i])] = True
            for j in range(K):
                start = P + j * L
                seg[i, start:start + L] = j
                c = new[i][j]
                if c:
                    tokens[i, start:start + len(c)] = torch.tensor(c)
                    valid[i, start:start + len(c)] = True
                fed[i][j] += len(c)
        hidden = cache.feed(tokens, valid, seg, n_chains=K)
        # prefix score of each row (the accepted response); a chain with no token scores as that prefix
        prefix = torch.tensor([r.score if r.score is not None else float("nan") for r in rows])
        has_pending = valid[:, :P].any(1)
        if has_pending.any():
            h = at(hidden, torch.arange(R), last_valid(valid[:, :P]).clamp(min=0))
            fresh = self.rm.to_search(cache.head(h)[:, 0].cpu())
            prefix = torch.where(has_pending, fresh, prefix)
        ends = [(i, j, P + j * L + len(new[i][j]) - 1) for i in range(R) for j in range(K) if new[i][j]]
        at_ends = {}
        if ends:
            h = at(hidden, [e[0] for e in ends], [e[2] for e in ends])
            vals = self.rm.to_search(cache.head(h)[:, 0].cpu())
            at_ends = {(i, j): v for (i, j, _), v in zip(ends, vals.tolist())}
        # inputs that the rule reads beside the whole prompt (short responses to a long prompt): scored afresh
        fresh = [(i, None, rows[i].tokens) for i in range(R) if has_pending[i]] + \
            [(i, j, rows[i].tokens + chains[i][j]) for i, j in at_ends]
        fresh = [(i, j, t) for i, j, t in fresh if window.whole_prompt(rows[i].prompt, len(t))]
        for (i, j, _), v in zip(fresh, self._whole_prompt_scores(cache, window,
                                                                  [(rows[i].prompt, t) for i, _, t in fresh])):
            if j is None:
                prefix[i] = v
            else:
                at_ends[i, j] = v
        out = prefix[:, None].repeat(1, K) if previous is None else previous.clone()
        for (i, j), v in at_ends.items():
            out[i, j] = v
        for i, r in enumerate(rows):
            r.score = float(prefix[i])  # the accepted prefix, now that its pending tokens are in
        return out

    def _whole_prompt_scores(self, cache, window, items):
        """Search rewards of (prompt b, response tokens) whose RM input holds the whole prompt while the cache
        holds only its kept tail: each input encoded by the rule and scored afresh, as 05 scores those tokens
        (counted as the cache's RM calls and tokens)."""
        if not items:
            return []
        examples = [self.rm.fmt.encode(window.prompts[b], response_ids=tokens) for b, tokens in items]
        for (b, _), e in zip(items, examples):
            cache.tokens[b] += len(e["input_ids"])
        cache.calls += 1
        return self.rm.to_search(score_encoded(self.rm.model, examples, self.rm.tokenizer.pad_token_id,
                                               batch_size=64))

    def _text_scores(self, items, prompts, rm_tokens):
        """Search rewards of (prompt b, response tokens) through their reply text, as 05 scores a reply: the
        texts decoded in one batched call and tokenized for the RM in another."""
        scores, lengths = self.rm.score_texts([prompts[b]["prompt"] for b, _ in items],
                                              self.response_texts([t for _, t in items]))
        for (b, _), n in zip(items, lengths):
            rm_tokens[b] += n
        return scores


