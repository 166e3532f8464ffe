"""Search on a serving backend: the policy samples in a server (vLLM), the RM scores in this process.

For the methods whose proposals are sampled chains of many tokens (Best-of-N, speculative rejection,
chunk-level beam search: `Method.serves`), a serving engine's paged attention, continuous batching and
tensor parallelism do the sampling. A backend extends token-id prefixes: `extend(prefix, k, max_tokens, seed)`
returns k continuations of up to max_tokens tokens (token ids, their log-probabilities under the policy, why
each ended) and what the server computed. `ServedSearch` runs a method's rounds on it, as the PyTorch engine
(engine.py) does on its own caches, and asks the method the same questions (`shape`, `decision_points`,
`prune`, `choose`, `answer`, `record`), so the keep rules are the method's own:
  - each round, every row asks for K continuations of up to L tokens (one request with n = K);
  - at a decision point (speculative rejection: every `decision_every` tokens) the chains grown so far are
    scored with the RM and the method stops some (`prune`); each chain still in play is then resubmitted as
    its own prefix for the next stretch (the server's prefix cache holds the prefix: only new tokens cost);
  - the candidates are scored and the method chooses the next round's rows.
The RM reads each candidate as 05 scores a reply: its decoded text, tokenized and cut by the RM's rule (the
text path, docs/scoring.md).

Sampling. A request carries a seed derived from (seed, prompt id, round, lineage, segment, chain), and the server
draws continuation j of a request with n = K from seed + j: the same seed gives the same replies. The draws are
the server's, not the PyTorch engine's uniforms, so the two backends sample different (equally distributed)
replies, and speculative rejection at alpha 0 resubmits at each decision point where Best-of-N does not.

Compute is counted per prompt as the engine counts it: policy_tokens are the tokens the policy computed
(prompt tokens the server did not find in its prefix cache, plus generated ones), policy_cached_tokens those
it reused (from the server's usage figures: vLLM reports them with --enable-prompt-tokens-details),
rm_tokens the RM's input tokens.
"""
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from common.metrics import require_finite_scores
from common.rewards import score_encoded, text_ids
from common.search.engine import (Batch, Candidates, cut_replies, peak_memory_mb, prompt_key, prompt_room,
                                  search_params)
from common.search.methods import Row, Run


@dataclass
class Extension:
    """One continuation of a prefix: its new token ids (an ending EOS left out), each token's log-probability
    under the policy, and whether the reply ended ("stop": EOS or a stop string) or the budget did ("length")."""
    tokens: list
    logprobs: list
    finish: str


@dataclass
class Usage:
    """What the server computed for one request: prompt tokens (cached ones included), those it found in its
    prefix cache (None when it does not say), generated tokens."""
    prompt_tokens: int = 0
    cached_tokens: int = None
    completion_tokens: int = 0

    @property
    def computed(self):
        return self.prompt_tokens - (self.cached_tokens or 0) + self.completion_tokens


class VLLMBackend:
    """The policy on a vLLM server, over its OpenAI-compatible completions API: prompts go as token ids and
    token ids come back (`return_token_ids`), with each sampled token's log-probability (`logprobs: 0`: the
    model's own, before temperature and filtering). Requests of one step go out together, so the server
    batches them."""
    name = "vllm"

    def __init__(self, info, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(), stop_strings=(),
                 timeout=1800, concurrency=64):
        self.info = info
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k or 0}
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.stop_strings = list(stop_strings)
        self.timeout, self.concurrency = timeout, concurrency
        self.requests = 0

    def record(self):
        return self.info.record()

    def _request(self, prefix, k, max_tokens, seed):
        import json
        import urllib.error
        import urllib.request

        from common.io import DataError

        body = {"model": self.info.model, "prompt": list(prefix), "n": k, "seed": seed, "max_tokens": max_tokens,
                "logprobs": 0, "return_token_ids": True, "stop_token_ids": self.stop_token_ids,
                "skip_special_tokens": False, **self.sampling}
        if self.stop_strings:
            body.update(stop=self.stop_strings, include_stop_str_in_output=True)
        request = urllib.request.Request(self.info.url + "/completions", data=json.dumps(body).encode("utf-8"),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise DataError(f"vLLM server {self.info.url}: HTTP {e.code} on a completions request ({detail})") \
                from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(f"vLLM server {self.info.url}: no answer to a completions request "
                            f"({type(e).__name__}: {e})") from None

    def extend(self, prefix, k, max_tokens, seed):
        """k continuations of `prefix` (token ids) of up to max_tokens tokens, and the request's Usage."""
        payload = self._request(prefix, k, max_tokens, seed)
        self.requests += 1
        out = []
        for choice in sorted(payload["choices"], key=lambda c: c["index"]):
            tokens = list(choice.get("token_ids") or [])
            logprobs = list((choice.get("logprobs") or {}).get("token_logprobs") or [None] * len(tokens))
            finish = "stop" if choice.get("finish_reason") == "stop" else "length"
            while tokens and tokens[-1] in self.stop_token_ids:  # the EOS ends the reply; it is not part of it
                tokens.pop()
                logprobs.pop()
            out.append(Extension(tokens, logprobs, finish))
        usage = payload.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return out, Usage(int(usage.get("prompt_tokens") or 0), cached, int(usage.get("completion_tokens") or 0))

    def extend_all(self, requests):
        """[(prefix, k, max_tokens, seed)] -> [(extensions, usage)] in the same order, sent together."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self.extend(*r), requests))


def request_seed(seed, key, *coords):
    """A request's seed (0 <= s < 2**62, room for + j) from the run's seed, the prompt's key and coordinates."""
    return random.Random("/".join(map(str, (seed, key) + coords))).getrandbits(62)


@dataclass
class _Counts:
    policy_tokens: int = 0
    policy_cached_tokens: int = 0
    policy_calls: int = 0
    rm_tokens: int = 0
    rm_calls: set = field(default_factory=set)


class ServedSearch:
    """Runs a serving method over batches of prompts on a backend; `run` returns one result dict per prompt, with
    the fields the engine's `Search.run` gives (stats add policy_cached_tokens).

    policy: the Policy (its tokenizer and prompt rendering; its model may be only a config, see `policy_stub`)."""

    def __init__(self, policy, method, rm, backend, max_new_tokens=128, seed=0, stop_strings=(),
                 keep_candidates=False, max_model_len=None):
        if not getattr(method, "serves", False):
            raise ValueError(f"method {method.name} does not run on a serving backend (its proposals need the "
                             "policy's full next-token distribution at every token)")
        if method.uses_rm and rm is None:
            raise ValueError(f"method {method.name} needs a reward model (--rm)")
        self.method, self.policy, self.rm, self.backend = method, policy, rm, backend
        self.max_new_tokens, self.seed, self.keep_candidates = max_new_tokens, seed, keep_candidates
        method.bind(Run(max_new_tokens, rm is not None and rm.normalize, rm.stats if rm is not None else None,
                        lambda ids: policy.tokenizer.decode(ids, skip_special_tokens=True)))
        self.cached_rm = False  # the RM reads decoded text (what 04's manifest records as rm_path)
        self.stop_strings = tuple(stop_strings) or policy.default_stop_strings
        self.prompt_room = prompt_room(
            max_model_len or getattr(policy.model.config, "max_position_embeddings", None), max_new_tokens)

    def params(self):
        return search_params(self.method, self.max_new_tokens, self.seed, self.rm is not None,
                             self.rm is not None and self.rm.normalize, self.rm and self.rm.stats)

    # -- text ------------------------------------------------------------------------------------------
    def response_texts(self, token_lists):
        return cut_replies(self.policy.tokenizer, token_lists, self.stop_strings)

    def _stop_at(self, tokens, start):
        """The length of `tokens` up to the first token (at or after `start`) after which the decoded tail holds
        a stop string (the engine's rule: the last 12 tokens), or None."""
        if not self.stop_strings:
            return None
        for n in range(max(start, 1), len(tokens) + 1):
            tail = self.policy.tokenizer.decode(tokens[max(0, n - 12):n], skip_special_tokens=True)
            if any(s in tail for s in self.stop_strings):
                return n
        return None

    # -- scoring -----------------------------------------------------------------------------------------
    def _scores(self, items, prompts, counts):
        """Search rewards of [(prompt b, response tokens)] through their reply text, in one batched RM pass."""
        if not items:
            return []
        fmt = self.rm.fmt
        replies = fmt.responses_ids(self.response_texts([t for _, t in items]))
        examples = [fmt.encode(prompts[b]["prompt"], response_ids=ids) for (b, _), ids in zip(items, replies)]
        for (b, _), e in zip(items, examples):
            counts[b].rm_tokens += len(e["input_ids"])
            counts[b].rm_calls.add(self._rm_pass)
        self._rm_pass += 1
        scores = self.rm.to_search(score_encoded(self.rm.model, examples, self.rm.tokenizer.pad_token_id,
                                                 batch_size=64))
        require_finite_scores(scores, self.rm.name, lambda n: f"a reply to prompt id {prompts[items[n][0]]['id']!r}")
        return scores

    # -- the run -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, prompts):
        method, tok = self.method, self.policy.tokenizer
        t0 = time.perf_counter()
        W, K, L = method.shape(self.max_new_tokens)
        B = len(prompts)
        prefills = [text_ids(tok, p["prefill"]) if p.get("prefill") else [] for p in prompts]
        prompt_ids = [self.policy.fmt.prompt_ids(p["prompt"]) + pre for p, pre in zip(prompts, prefills)]
        cut = [0 if self.prompt_room is None else max(0, len(ids) - self.prompt_room) for ids in prompt_ids]
        self._prompt_ids = [ids[c:] for ids, c in zip(prompt_ids, cut)]
        counts = [_Counts() for _ in prompts]
        self._rm_pass = 0
        keys = [prompt_key(p["id"]) for p in prompts]

        rows = [Row(prompt=b, lineage=0, tokens=list(pre)) for b, pre in enumerate(prefills)]
        if self.rm is not None:
            for r, s in zip(rows, self._scores([(b, pre) for b, pre in enumerate(prefills)], prompts, counts)):
                r.score = s
        batch = Batch(self.seed, keys, method.start(rows))
        # W copies of each prompt, each with its own lineage (its own samples)
        rows = [Row(prompt=b, lineage=s, tokens=list(rows[b].tokens), score=rows[b].score)
                for b in range(B) for s in range(W)]
        self._prefill_len = [len(pre) for pre in prefills]
        last_round = []
        while not all(r.finished for r in rows):
            cand = self._grow(rows, batch, K, L, prompts, counts)
            choice = method.choose(rows, cand, batch)
            if self.keep_candidates:
                last_round = [(r.prompt, r.tokens + c) for r, cs in zip(rows, cand.chains) for c in cs]
            rows = [c.row for c in choice]
            batch.round_idx += 1

        seconds = time.perf_counter() - t0
        candidates = self.response_texts([t for _, t in last_round]) if self.keep_candidates else []
        results = []
        for b, p in enumerate(prompts):
            best = method.answer([r for r in rows if r.prompt == b], batch, b)
            response = self.response_texts([best.tokens])[0]
            c = counts[b]
            extra = {"candidates": [t for (q, _), t in zip(last_round, candidates) if q == b],
                     "candidate_tokens": [len(t) - self._prefill_len[b] for q, t in last_round if q == b]} \
                if self.keep_candidates else {}
            results.append({
                **extra,
                "response": response,
                "tokens": best.tokens,
                "reward": self.rm.raw(best.score) if self.rm else None,
                "search_reward": best.score,
                "stats": {
                    "policy_calls": c.policy_calls, "policy_tokens": c.policy_tokens,
                    "policy_cached_tokens": c.policy_cached_tokens,
                    "rm_calls": len(c.rm_calls), "rm_tokens": c.rm_tokens, "rm_path": "text" if self.rm else None,
                    "new_tokens": len(best.tokens) - len(prefills[b]),
                    "prompt_tokens_cut": cut[b],
                    "reward_input_truncated": self.rm.fmt.truncates(p["prompt"], response) if self.rm else None,
                    "rounds": batch.round_idx, **method.record(batch, b),
                    "seconds": seconds / B, "batch_seconds": seconds, "batch_size": B,
                    "peak_memory_mb": round(peak_memory_mb("cpu"), 1),
                },
            })
        return results

    def _grow(self, rows, batch, K, L, prompts, counts):
        """K chains of up to L tokens per unfinished row, grown by the backend in stretches between the method's
        decision points (where it may stop some), then scored: the round's Candidates."""
        method, R = self.method, len(rows)
        chains = [[[] for _ in range(K)] for _ in rows]
        logps = [[[] for _ in range(K)] for _ in rows]
        done = [[r.finished] * K for r in rows]        # the chain ended the response (EOS, stop string, budget)
        dropped = [[False] * K for _ in rows]          # stopped by the method inside the round
        budget = [self.max_new_tokens - (len(r.tokens) - self._prefill_len[r.prompt]) for r in rows]
        scored = {}                                    # (i, j) -> (chain length when scored, search reward)
        decisions = sorted(set(method.decision_points(L))) if self.rm is not None else []
        start = 0
        for segment, end in enumerate(decisions + [L]):
            if segment == 0:  # one request per row: K continuations of its prefix
                todo = [(i, None) for i, r in enumerate(rows) if not r.finished]
            else:             # each chain still in play continues from its own prefix
                todo = [(i, j) for i, r in enumerate(rows) for j in range(K)
                        if not r.finished and not done[i][j] and not dropped[i][j]]
            requests = []
            for i, j in todo:
                r = rows[i]
                grown = r.tokens + (chains[i][j] if j is not None else [])
                room = min(end - start, budget[i] - (len(chains[i][j]) if j is not None else 0))
                requests.append((self._prompt_ids[r.prompt] + grown, K if j is None else 1, room,
                                 request_seed(self.seed, batch.keys[r.prompt], batch.round_idx, r.lineage,
                                              segment, "all" if j is None else j)))
            for (i, j), (exts, usage) in zip(todo, self.backend.extend_all(requests)):
                c = counts[rows[i].prompt]
                c.policy_calls += 1
                c.policy_tokens += usage.computed
                c.policy_cached_tokens += usage.cached_tokens or 0
                for jj, ext in zip(range(K) if j is None else [j], exts):
                    self._append(rows[i], chains[i][jj], logps[i][jj], ext, budget[i], done[i], jj)
            start = end
            if end == L or not any(not done[i][j] and not dropped[i][j] for i in range(R) for j in range(K)):
                break
            # a decision point: score what has grown; the method stops some chains
            partial = Candidates(chains, done, None, dropped=dropped)
            partial.scores = self._chain_scores(rows, chains, dropped, scored, prompts, counts)
            for i, j in method.prune(rows, partial, batch):
                dropped[i][j] = True
        cand = Candidates(chains, done, None, dropped=dropped)
        cand.logprobs = logps
        cand.scores = self._chain_scores(rows, chains, dropped, scored, prompts, counts) if self.rm else None
        return cand

    def _append(self, row, chain, logp, ext, budget, done, j):
        """Add a continuation to chain j; mark the chain done where the response ended (EOS, a stop string,
        the token budget)."""
        start = len(chain)
        chain += ext.tokens
        logp += ext.logprobs
        stop = self._stop_at(row.tokens + chain, len(row.tokens) + start + 1)
        if stop is not None:
            del chain[stop - len(row.tokens):], logp[stop - len(row.tokens):]
        if ext.finish == "stop" or stop is not None or len(chain) >= budget:
            done[j] = True

    def _chain_scores(self, rows, chains, dropped, scored, prompts, counts):
        """[R, K] search rewards of the chains as grown so far: a chain is scored again only when it grew; a
        dropped one keeps its last score; a finished row's chains score as the row."""
        R, K = len(rows), len(chains[0])
        todo = [(i, j) for i, r in enumerate(rows) if not r.finished for j in range(K)
                if not dropped[i][j] and scored.get((i, j), (None,))[0] != len(chains[i][j])]
        values = self._scores([(rows[i].prompt, rows[i].tokens + chains[i][j]) for i, j in todo], prompts, counts)
        for (i, j), v in zip(todo, values):
            scored[i, j] = (len(chains[i][j]), float(v))
        out = torch.zeros(R, K)
        for i, r in enumerate(rows):
            for j in range(K):
                out[i, j] = r.score if r.finished else scored[i, j][1]
        return out


def policy_stub(name):
    """What a served search needs of the policy in this process: its config and generation config (positions,
    end-of-turn ids), not its weights."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from common.models import load_config, resolve_model_path

    try:
        generation = GenerationConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError):
        generation = None
    return SimpleNamespace(config=load_config(name), generation_config=generation)


def vllm_backend(info, method, policy, stop_strings=()):
    """The VLLMBackend that samples as `method` does (its temperature, top-p, top-k), ending a reply at the
    policy's end-of-turn ids and at the search's stop strings."""
    sampling = method.sampling
    return VLLMBackend(info, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                       stop_token_ids=policy.eos_ids, stop_strings=tuple(stop_strings) or policy.default_stop_strings)


def served_search(policy, method, rm, url=None, stop_strings=(), **search_args):
    """A ServedSearch whose policy samples on vLLM: the server at `url`, else one started here from .venv-vllm
    with the policy's folder (it stops when this process exits, killed or not: common/vllm_server.py)."""
    import logging
    import os

    from common.models import resolve_model_path
    from common.vllm_server import VLLMServer, connect

    if url:
        info = connect(url)
        if info.root and os.path.realpath(info.root) != os.path.realpath(resolve_model_path(policy.name)):
            logging.getLogger(__name__).warning("the server at %s serves %s, not the policy %s: its tokens are read "
                                                "with the policy's tokenizer", info.url, info.root, policy.name)
    else:
        info = VLLMServer(resolve_model_path(policy.name)).start()
    return ServedSearch(policy, method, rm, vllm_backend(info, method, policy, stop_strings),
                        stop_strings=stop_strings, max_model_len=info.max_model_len, **search_args)
