"""Reward-guided search: one batched, cached core for greedy, sampling, ARGS, TBS, CBS, Best-of-N and CARDS.

Every method is rounds of "grow candidates, score them, keep some" over rows (a row = one beam of one prompt):

  method   beams W  candidates K per row        chunk L                  keep
  greedy   1        1 (argmax)                   1                        it
  sample   1        1 (sampled)                  1                        it
  argsg    1        top-k tokens by LM           1                        argmax log p(v) + w * r(x, y + v)
  tbs      W        K sampled                    1                        top-W by r over the prompt's W*K
  cbs      W        K sampled                    L                        top-W by r
  bon      1        N sampled                    max-new-tokens           best by r
  cards    1        1 sampled segment            until entropy > tau_u    accept if r >= threshold, else
                                                 or max segment           resample (at most max_retries)

Caches. The policy keeps one KV cache for all rows. The K candidate chains of a row go into that row as a
tree: each chain token attends the row's accepted prefix and its own chain only, and all chains share
positions (a 4-D attention mask, as in speculative decoding), so the prefix cache is never copied K times.
After the choice the chain keys are cropped off and the chosen chain is fed again as the row's next
accepted tokens (L tokens, once). A decoder RM that shares the policy's tokenizer keeps its own cache the
same way, so scoring K candidates of L tokens costs K*L new tokens. Any other RM gets decoded text
(the text path), batched. Sampling draws one uniform number per token from a generator seeded by
(seed, prompt id, round, beam, chain, step), so results do not depend on batch size or composition.
"""
import math
import random
import time
import zlib
from dataclasses import dataclass, field

import torch

from common.rewards import RMFormat, score_encoded

METHODS = ("greedy", "sample", "argsg", "tbs", "cbs", "bon", "cards")


@dataclass
class SearchConfig:
    method: str = "greedy"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    w: float = 1.5                # ARGS reward weight
    k: int = 30                   # ARGS candidates (top-k by LM likelihood)
    beam: int = 8                 # CBS/TBS beams W
    successors: int = 8           # CBS/TBS successors K per beam
    chunk: int = 30               # CBS chunk length L (TBS: 1)
    n: int = 16                   # Best-of-N
    # CARDS (Li et al., 2024, "Cascade Reward Sampling"): see cards_threshold / cards_accepts below
    entropy_threshold: float = 7.0   # tau_u: a segment ends before a token whose entropy is >= it (SP-PRM's 7.0)
    cards_rule: str = "soft"         # soft / hard: CARDS' adaptive threshold; prefix: r >= r(accepted prefix)
    reward_threshold: float = None   # r*: CARDS' target reward (soft/hard); prefix rule: a fixed bar if set
    cards_alpha: float = 0.5         # r_0 = (1 - alpha) r(x) + alpha r*
    cards_beta: float = 0.7          # soft acceptance: P = min(1, exp((r - tau(t)) / beta))
    min_segment: int = 4             # tokens before the entropy cut may end a segment
    max_segment: int = 64            # longest segment
    max_retries: int = 20            # rejections of a segment before the best attempt is taken
    reward_norm: str = "none"        # "std": every method uses (r - mean) / std of the RM's reward_stats.json
    seed: int = 0
    stop_strings: tuple = ()

    def shape(self):
        """(beams W, candidates K, chunk L) of the method."""
        m = self.method
        if m in ("greedy", "sample"):
            return 1, 1, 1
        if m == "argsg":
            return 1, self.k, 1
        if m == "tbs":
            return self.beam, self.successors, 1
        if m == "cbs":
            return self.beam, self.successors, self.chunk
        if m == "bon":
            return 1, self.n, self.max_new_tokens
        if m == "cards":
            return 1, 1, self.max_segment
        raise ValueError(f"unknown method {m!r}; choose from {METHODS}")

    def params(self):
        """The settings that matter for this method (recorded with every generation)."""
        sampling = ["temperature", "top_p", "top_k"]
        keep = {"greedy": [], "sample": sampling, "argsg": ["w", "k"], "tbs": ["beam", "successors"] + sampling,
                "cbs": ["beam", "successors", "chunk"] + sampling, "bon": ["n"] + sampling,
                "cards": ["cards_rule", "entropy_threshold", "reward_threshold", "cards_alpha", "cards_beta",
                          "min_segment", "max_segment", "max_retries"] + sampling}
        out = {k: getattr(self, k) for k in keep[self.method]}
        if self.uses_rm:
            out["reward_norm"] = self.reward_norm
        out.update(max_new_tokens=self.max_new_tokens, seed=self.seed)
        return out

    @property
    def samples(self):
        return self.method in ("sample", "tbs", "cbs", "bon", "cards")

    @property
    def uses_rm(self):
        return self.method not in ("greedy", "sample")


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


def pick_tokens(logits, us, cfg):
    """Greedy argmax (us is None) or inverse-CDF sampling with the given uniforms, one per row."""
    if us is None:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, cfg.temperature, cfg.top_p, cfg.top_k), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.as_tensor(us, dtype=cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)


CARDS_RULES = ("soft", "hard", "prefix")


def cards_threshold(r_prompt, target, alpha, t, n):
    """CARDS' adaptive reward threshold after t of n response tokens (Li et al., 2024, Sec. 3.2): it starts at
    r_0 = (1 - alpha) r(x) + alpha r* and rises linearly to the target r*, which it never exceeds:
    tau(t) = min(r_0 + t (r* - r_0) / n, r*)."""
    r0 = (1 - alpha) * r_prompt + alpha * target
    return min(r0 + t * (target - r0) / n, target)


def cards_accepts(rule, r, u, r_prefix=None, threshold=None, beta=0.7):
    """Whether a segment whose response scores r is accepted. soft (CARDS' default): with probability
    min(1, exp((r - tau) / beta)), decided by the uniform u; hard: r >= tau; prefix (this tool's earlier
    rule): r >= threshold if one is given, else r >= r(accepted prefix), i.e. the reward must not drop."""
    if rule == "soft":
        return u < math.exp(min(0.0, (r - threshold) / beta))
    if rule == "hard":
        return r >= threshold
    if rule == "prefix":
        return r >= (threshold if threshold is not None else r_prefix)
    raise ValueError(f"unknown CARDS rule {rule!r}; choose from {CARDS_RULES}")


def entropy(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


# ------------------------------------------------------------------------------------------ tree-cached model

class TreeCache:
    """A decoder (policy or RM) with one KV cache over R rows; tokens are fed as shared or as chain j.

    Keys carry a segment id: -1 for the row's accepted (shared) tokens, j for candidate chain j. A query of
    chain j sees valid shared keys and valid keys of chain j, in feeding order; a shared query sees shared
    keys only. Chain keys always come after all shared keys, so dropping them is a crop.
    """

    def __init__(self, model, head):
        from transformers import DynamicCache

        self.model, self.base = model, model.base_model
        device = next(model.parameters()).device
        # The search itself (sampling, ranking, bookkeeping) runs on the CPU in fp32 whatever the model's
        # device and precision: only forwards and heads run there, so sampled tokens depend on logits alone.
        self.head = lambda h: head(h.to(device)).float().cpu()
        self.cache = DynamicCache(config=model.config)
        self.key_valid = None   # [R, S] bool
        self.key_seg = None     # [R, S] long
        self.n_shared = None    # [R] positions used by valid shared tokens
        self.chain_len = None   # [R, K] valid tokens fed per chain in this round
        self.shared_len = 0     # cache length of the shared region
        self.calls = 0
        self.tokens = None      # [R] valid tokens processed per row

    @property
    def length(self):
        return 0 if self.key_valid is None else self.key_valid.shape[1]

    @torch.no_grad()
    def feed(self, tokens, valid, seg, n_chains=1):
        """Feed [R, Q] tokens; returns hidden states [R, Q, H]."""
        R, Q = tokens.shape
        if self.key_valid is None:
            self.key_valid = torch.zeros(R, 0, dtype=torch.bool)
            self.key_seg = torch.zeros(R, 0, dtype=torch.long)
            self.n_shared = torch.zeros(R, dtype=torch.long)
            self.tokens = torch.zeros(R, dtype=torch.long)
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
        device = next(self.model.parameters()).device
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
        self.tokens += valid.long().sum(1)
        return out.last_hidden_state.cpu()

    def drop_chains(self):
        extra = self.length - self.shared_len
        if extra > 0:
            self.cache.crop(-extra)
            self.key_valid = self.key_valid[:, :self.shared_len]
            self.key_seg = self.key_seg[:, :self.shared_len]
        if self.chain_len is not None:
            self.chain_len.zero_()

    def select_rows(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        self.cache.batch_select_indices(index.to(next(self.model.parameters()).device))
        self.key_valid, self.key_seg = self.key_valid[index], self.key_seg[index]
        self.n_shared = self.n_shared[index]
        self.tokens = self.tokens[index]
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


def last_valid(valid):
    """Index of the last True in each row (-1 if none)."""
    idx = torch.arange(valid.shape[1]).expand_as(valid)
    return torch.where(valid, idx, torch.full_like(idx, -1)).max(1).values


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
    max_length: int = 2048
    fmt: RMFormat = None
    stats: dict = None     # {"mean", "std"}: set to search with (r - mean) / std instead of r
    closed: bool = False   # every input a closed chat turn (an RM trained on finished, closed turns)

    def __post_init__(self):
        self.model.eval()
        self.fmt = RMFormat(self.tokenizer, self.model, max_length=self.max_length, closed=self.closed)

    def normalize(self, scores):
        """The reward the search sees: raw, or (r - mean) / std when stats are set (a tensor or a list)."""
        if self.stats is None:
            return scores
        if torch.is_tensor(scores):
            return (scores - self.stats["mean"]) / self.stats["std"]
        return [(s - self.stats["mean"]) / self.stats["std"] for s in scores]

    def raw(self, value):
        """The RM's own score of a (normalised) search reward."""
        return value if self.stats is None or value is None else value * self.stats["std"] + self.stats["mean"]

    def shares_tokens_with(self, policy):
        """The cached path needs a decoder RM whose tokenizer and prompt rendering equal the policy's."""
        if not self.fmt.fast_prefixes or self.fmt.kind != policy.fmt.kind:
            return False
        a, b = self.tokenizer, policy.tokenizer
        probe = "Hello, world! 123 ça va? <|im_end|>"
        return len(a) == len(b) and a(probe).input_ids == b(probe).input_ids and \
            a.chat_template == b.chat_template


# ------------------------------------------------------------------------------------------ the search core

@dataclass
class Row:
    prompt: int             # index into the batch
    slot: int               # beam index within the prompt
    tokens: list            # response token ids so far (prefill included)
    finished: bool = False
    score: float = None     # RM score of the accepted response
    logp: float = 0.0


class Search:
    """Runs one method over a batch of prompts. `run` returns one result dict per prompt."""

    def __init__(self, policy, cfg, rm=None, rm_path="auto"):
        self.policy, self.cfg, self.rm = policy, cfg, rm
        if cfg.uses_rm and rm is None:
            raise ValueError(f"method {cfg.method} needs a reward model (--rm)")
        if cfg.method == "cards" and cfg.cards_rule not in CARDS_RULES:
            raise ValueError(f"unknown CARDS rule {cfg.cards_rule!r}; choose from {CARDS_RULES}")
        if cfg.method == "cards" and cfg.cards_rule != "prefix" and cfg.reward_threshold is None:
            raise ValueError(f"CARDS' {cfg.cards_rule} rule needs its target reward r* (reward_threshold)")
        self.cached_rm = rm is not None and (
            rm_path == "cached" or (rm_path == "auto" and rm.shares_tokens_with(policy)))
        if rm_path == "cached" and rm is not None and not rm.shares_tokens_with(policy):
            raise ValueError("the cached RM path needs a decoder RM that shares the policy's tokenizer")
        self.stop_strings = tuple(cfg.stop_strings) or policy.default_stop_strings
        self.pad = policy.tokenizer.pad_token_id

    # -- helpers ------------------------------------------------------------------------------------
    def _stopped_by_string(self, tokens):
        if not self.stop_strings:
            return False
        tail = self.policy.tokenizer.decode(tokens[-12:], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)

    def response_text(self, tokens):
        text = self.policy.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in self.stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text.strip()

    # -- the run ------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, prompts):
        """prompts: list of {"id", "prompt", "prefill"?}. Returns [{"response", "tokens", "stats"}]."""
        cfg, pol = self.cfg, self.policy
        t0 = time.perf_counter()
        W, K, L = cfg.shape()
        keys = [prompt_key(p["id"]) for p in prompts]
        prefills = [pol.tokenizer(p["prefill"], add_special_tokens=False).input_ids if p.get("prefill") else []
                    for p in prompts]
        prompt_ids = [pol.fmt.prompt_ids(p["prompt"]) + pre for p, pre in zip(prompts, prefills)]
        rows = [Row(prompt=b, slot=0, tokens=list(pre)) for b, pre in enumerate(prefills)]
        self.prefill_len = [len(pre) for pre in prefills]

        policy_cache = TreeCache(pol.model, lm_head(pol.model))
        tokens, valid = pad_rows(prompt_ids, self.pad, left=True)
        hidden = policy_cache.feed(tokens, valid, torch.full_like(tokens, -1))
        last_logits = policy_cache.head(hidden[torch.arange(len(rows)), last_valid(valid)])

        rm_cache = None
        rm_calls, rm_tokens_text = 0, [0] * len(prompts)
        if self.rm is not None:
            if self.cached_rm:
                rm_cache = TreeCache(self.rm.model, self.rm.model.score)
                rm_ids = [self.rm.fmt.prompt_ids(p["prompt"]) + pre for p, pre in zip(prompts, prefills)]
                t, v = pad_rows(rm_ids, self.pad, left=True)
                h = rm_cache.feed(t, v, torch.full_like(t, -1))
                scores0 = self.rm.normalize(rm_cache.head(h[torch.arange(len(rows)), last_valid(v)])[:, 0].float())
            else:
                scores0 = torch.tensor(self._text_scores([(r.prompt, r.tokens) for r in rows], prompts,
                                                         rm_tokens_text))
                rm_calls += 1
            for r, s in zip(rows, scores0.tolist()):
                r.score = s
            self.prompt_scores = scores0.tolist()  # CARDS: r(x), where its threshold starts

        # Algorithm 3 starts H with W copies of the prompt: the first round ranks W*K candidates, and the
        # copies differ because each beam slot draws its own samples. The prompt is encoded once.
        if cfg.method in ("tbs", "cbs") and W > 1:
            parents = [b for b in range(len(prompts)) for _ in range(W)]
            policy_cache.select_rows(parents)
            last_logits = last_logits[torch.tensor(parents)]
            if rm_cache is not None:
                rm_cache.select_rows(parents)
            rows = [Row(prompt=b, slot=s, tokens=list(rows[b].tokens), score=rows[b].score)
                    for b in range(len(prompts)) for s in range(W)]

        pending = [[] for _ in rows]      # accepted tokens not yet fed to the policy / RM
        attempts = [0] * len(rows)         # CARDS retries of the current segment
        best_attempt = [None] * len(rows)  # CARDS: (score, chain, finished) of the best rejected attempt
        n_attempts = [0] * len(prompts)
        round_idx = 0
        while not all(r.finished for r in rows):
            R = len(rows)
            # 1. feed the accepted tokens; the policy's next-token logits of every row
            if any(pending):
                tokens, valid = pad_rows(pending, self.pad)
                hidden = policy_cache.feed(tokens, valid, torch.full_like(tokens, -1))
                has = valid.any(1)
                fresh = policy_cache.head(hidden[torch.arange(R), last_valid(valid).clamp(min=0)])
                last_logits = torch.where(has[:, None], fresh, last_logits)
            # 2. grow K candidate chains of up to L tokens per row
            chains, chain_done, chain_logp = self._grow(rows, last_logits, policy_cache, keys, round_idx, W, K, L)
            # 3. score them
            scores = None
            if self.rm is not None:
                if rm_cache is not None:
                    scores = self._cached_scores(rm_cache, rows, pending, chains)
                else:
                    flat = [(r.prompt, r.tokens + c) for r, cs in zip(rows, chains) for c in cs]
                    flat_scores = self._text_scores(flat, prompts, rm_tokens_text)
                    rm_calls += 1
                    scores = torch.tensor(flat_scores).view(R, K)
                for i, r in enumerate(rows):
                    if r.finished:
                        scores[i] = r.score
                    n_attempts[r.prompt] += 1 if not r.finished else 0
            # 4. choose
            choice = self._choose(rows, chains, chain_done, chain_logp, scores, W, K, attempts, best_attempt,
                                  keys, round_idx)
            # 5. move the caches to the chosen rows and queue the chosen chains
            policy_cache.drop_chains()
            if rm_cache is not None:
                rm_cache.drop_chains()
            parents = [c[0] for c in choice]
            if parents != list(range(R)):
                policy_cache.select_rows(parents)
                last_logits = last_logits[torch.tensor(parents)]
                if rm_cache is not None:
                    rm_cache.select_rows(parents)
            new_rows, pending = [], []
            for parent, new_row, accepted in choice:
                new_rows.append(new_row)
                pending.append(accepted)
            attempts = [attempts[p] if not acc and not rows[p].finished and cfg.method == "cards" else 0
                        for p, _, acc in choice]
            best_attempt = [best_attempt[p] if cfg.method == "cards" and not acc else None
                            for p, _, acc in choice]
            rows = new_rows
            round_idx += 1

        # the best row of each prompt
        results = []
        seconds = time.perf_counter() - t0
        for b, p in enumerate(prompts):
            mine = [r for r in rows if r.prompt == b]
            best = mine[0]
            for r in mine[1:]:
                if r.score is not None and (best.score is None or r.score > best.score):
                    best = r
            policy_tokens = int(sum(policy_cache.tokens[i] for i, r in enumerate(rows) if r.prompt == b))
            rm_tokens = rm_tokens_text[b] if rm_cache is None else int(
                sum(rm_cache.tokens[i] for i, r in enumerate(rows) if r.prompt == b))
            results.append({
                "response": self.response_text(best.tokens),
                "tokens": best.tokens,
                "reward": self.rm.raw(best.score) if self.rm else None,
                "search_reward": best.score,
                "stats": {
                    "policy_calls": policy_cache.calls, "policy_tokens": policy_tokens,
                    "rm_calls": (rm_cache.calls if rm_cache is not None else rm_calls) if self.rm else 0,
                    "rm_tokens": rm_tokens if self.rm else 0,
                    "rm_path": ("cached" if rm_cache is not None else "text") if self.rm else None,
                    "new_tokens": len(best.tokens) - self.prefill_len[b],
                    "rounds": round_idx, "segments_tried": n_attempts[b] if cfg.method == "cards" else None,
                    "seconds": seconds / len(prompts), "batch_seconds": seconds, "batch_size": len(prompts),
                },
            })
        return results

    # -- step 2 -------------------------------------------------------------------------------------
    def _grow(self, rows, last_logits, cache, keys, round_idx, W, K, L):
        cfg, R = self.cfg, len(rows)
        chains = [[[] for _ in range(K)] for _ in rows]
        done = [[r.finished] * K for r in rows]      # chain ended the response (EOS, stop, budget)
        stopped = [[r.finished] * K for r in rows]   # chain ended (also: CARDS segment boundary)
        logp = torch.zeros(R, K)
        logits = last_logits[:, None, :].expand(R, K, last_logits.shape[-1])
        budget = [cfg.max_new_tokens - (len(r.tokens) - self.prefill_len[r.prompt]) for r in rows]
        if cfg.method == "argsg":
            lp = torch.log_softmax(last_logits.float(), -1)
            top = torch.topk(lp, K, dim=-1)
            for i, r in enumerate(rows):
                if r.finished:
                    continue
                for j in range(K):
                    self._append(chains, done, stopped, i, j, int(top.indices[i, j]), budget[i], r)
                logp[i] = top.values[i]
            return chains, done, logp
        for step in range(L):
            active = [(i, j) for i in range(R) for j in range(K) if not stopped[i][j]]
            if not active:
                break
            flat = logits.reshape(R * K, -1)
            if cfg.method == "cards" and step >= max(1, cfg.min_segment):
                ent = entropy(flat[torch.tensor([i * K + j for i, j in active])]).tolist()
                for (i, j), e in zip(active, ent):
                    if e >= cfg.entropy_threshold:
                        stopped[i][j] = True  # segment boundary: this uncertain token opens the next one
                active = [(i, j) for i, j in active if not stopped[i][j]]
                if not active:
                    break
            sel = flat[torch.tensor([i * K + j for i, j in active])]
            us = [uniform(cfg.seed, keys[rows[i].prompt], round_idx, rows[i].slot, j, step) for i, j in active] \
                if cfg.samples else None
            picked = pick_tokens(sel, us, cfg).tolist()
            going = []
            for (i, j), tok in zip(active, picked):
                if self._append(chains, done, stopped, i, j, tok, budget[i], rows[i]) and step + 1 < L:
                    going.append((i, j, tok))
                else:
                    stopped[i][j] = True
            if not going:
                break
            # feed the chains that go on (one token each) to get their next-token logits
            feed_tokens = torch.full((R, K), self.pad, dtype=torch.long)
            feed_valid = torch.zeros((R, K), dtype=torch.bool)
            for i, j, tok in going:
                feed_tokens[i, j] = tok
                feed_valid[i, j] = True
            seg = torch.arange(K).expand(R, K).clone()
            logits = cache.head(cache.feed(feed_tokens, feed_valid, seg, n_chains=K))
        return chains, done, logp

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

    # -- step 3 -------------------------------------------------------------------------------------
    def _cached_scores(self, cache, rows, pending, chains):
        R, K = len(rows), len(chains[0])
        L = max(1, max(len(c) for cs in chains for c in cs))
        P = max(1, max(len(p) for p in pending))
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
                c = chains[i][j]
                if c:
                    tokens[i, start:start + len(c)] = torch.tensor(c)
                    valid[i, start:start + len(c)] = True
        hidden = cache.feed(tokens, valid, seg, n_chains=K)
        # prefix score of each row (the accepted response); a chain with no token scores as that prefix
        prefix = torch.tensor([r.score if r.score is not None else float("nan") for r in rows])
        has_pending = valid[:, :P].any(1)
        if has_pending.any():
            h = hidden[torch.arange(R), last_valid(valid[:, :P]).clamp(min=0)]
            fresh = self.rm.normalize(cache.head(h)[:, 0].float())
            prefix = torch.where(has_pending, fresh, prefix)
        out = prefix[:, None].repeat(1, K)
        ends = [(i, j, P + j * L + len(chains[i][j]) - 1) for i in range(R) for j in range(K) if chains[i][j]]
        if ends:
            h = hidden[torch.tensor([e[0] for e in ends]), torch.tensor([e[2] for e in ends])]
            vals = self.rm.normalize(cache.head(h)[:, 0].float())
            for (i, j, _), v in zip(ends, vals.tolist()):
                out[i, j] = v
        for i, r in enumerate(rows):
            r.score = float(prefix[i])  # the accepted prefix, now that its pending tokens are in
        return out

    def _text_scores(self, items, prompts, rm_tokens):
        examples = [self.rm.fmt.encode(prompts[b]["prompt"], self.response_text(t)) for b, t in items]
        for (b, _), e in zip(items, examples):
            rm_tokens[b] += len(e["input_ids"])
        return self.rm.normalize(score_encoded(self.rm.model, examples, self.rm.tokenizer.pad_token_id, batch_size=64))

    # -- step 4 -------------------------------------------------------------------------------------
    def _cards_accepts(self, row, chain, s, key, round_idx):
        cfg = self.cfg
        threshold = cfg.reward_threshold
        if cfg.cards_rule != "prefix":
            t = len(row.tokens) + len(chain) - self.prefill_len[row.prompt]
            threshold = cards_threshold(self.prompt_scores[row.prompt], cfg.reward_threshold, cfg.cards_alpha,
                                        t, cfg.max_new_tokens)
        u = uniform(cfg.seed, key, round_idx, row.slot, "accept", 0) if cfg.cards_rule == "soft" else None
        return cards_accepts(cfg.cards_rule, s, u, r_prefix=row.score, threshold=threshold, beta=cfg.cards_beta)

    def _choose(self, rows, chains, done, logp, scores, W, K, attempts, best_attempt, keys=None, round_idx=0):
        """[(parent row, new Row, accepted tokens)] in the new row order."""
        cfg = self.cfg
        out = []
        if cfg.method in ("greedy", "sample", "argsg", "cards"):
            for i, r in enumerate(rows):
                if r.finished:
                    out.append((i, r, []))
                    continue
                if cfg.method == "argsg":
                    obj = logp[i] + cfg.w * scores[i]
                    j = int(torch.argmax(obj))
                elif cfg.method == "cards":
                    s = float(scores[i, 0])
                    attempt = (s, chains[i][0], done[i][0])
                    if best_attempt[i] is None or s > best_attempt[i][0]:
                        best_attempt[i] = attempt
                    # as CARDS: after max_retries rejections the best attempt so far (this one included) is
                    # taken; before that, the attempt is accepted or the segment is resampled next round
                    if attempts[i] >= cfg.max_retries:
                        s, chain, fin = best_attempt[i]
                    elif self._cards_accepts(r, chains[i][0], s, keys[r.prompt], round_idx):
                        s, chain, fin = attempt
                    else:
                        attempts[i] += 1
                        out.append((i, r, []))
                        continue
                    out.append((i, Row(r.prompt, r.slot, r.tokens + chain, fin or not chain, s), chain))
                    continue
                else:
                    j = 0
                chain = chains[i][j]
                s = float(scores[i, j]) if scores is not None else None
                out.append((i, Row(r.prompt, r.slot, r.tokens + chain, done[i][j] or not chain, s), chain))
            return out
        # beam methods: per prompt, top-W of its rows' candidates (a finished row is its own candidate)
        by_prompt = {}
        for i, r in enumerate(rows):
            by_prompt.setdefault(r.prompt, []).append(i)
        for b in sorted(by_prompt):
            cands = []
            for i in by_prompt[b]:
                r = rows[i]
                if r.finished:
                    cands.append((r.score, r.slot * K, i, None))
                    continue
                for j in range(K):
                    cands.append((float(scores[i, j]), r.slot * K + j, i, j))
            cands.sort(key=lambda c: (-c[0], c[1]))
            for slot, (s, _, i, j) in enumerate(cands[:W]):
                r = rows[i]
                if j is None:
                    out.append((i, Row(b, slot, r.tokens, True, s), []))
                else:
                    chain = chains[i][j]
                    out.append((i, Row(b, slot, r.tokens + chain, done[i][j] or not chain, s), chain))
        return out
