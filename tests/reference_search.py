"""Literal, slow reference implementations of the search methods (the paper's Algorithms 2 and 3).

No caches, no batching: every LM and RM value is a fresh forward over the whole sequence. The fast engine
in common/search/ must reproduce these token for token. Shared with it only: the sampling rule
(pick_tokens with the per-token uniform), the RM input rule, and the method objects, read for their knobs.
"""
import torch

from common.rewards import score, score_encoded
from common.search import pick_tokens, prompt_key, uniform


class Reference:
    def __init__(self, policy, method, rm=None, rm_path="cached", max_new_tokens=128, seed=0, stop_strings=()):
        self.policy, self.method, self.rm, self.rm_path = policy, method, rm, rm_path
        self.max_new_tokens, self.seed, self.stop_strings = max_new_tokens, seed, tuple(stop_strings)
        self.tok = policy.tokenizer

    @classmethod
    def of(cls, search, rm_path=None):
        """The literal counterpart of an engine Search: the same method, models and settings."""
        return cls(search.policy, search.method, search.rm, rm_path or ("cached" if search.cached_rm else "text"),
                   search.max_new_tokens, search.seed, search.stop_strings)

    def logits(self, prompt_ids, response):
        with torch.no_grad():
            return self.policy.model(torch.tensor([prompt_ids + response])).logits[0, -1]

    def reward(self, prompt, response):
        if self.rm_path == "cached":  # these tokens, by the RM input rule (over-long inputs truncated)
            example = self.rm.fmt.encode(prompt, response_ids=response)
            return score_encoded(self.rm.model, [example], self.tok.pad_token_id, 1)[0]
        text = self.text(response)
        return score(self.rm.model, self.rm.fmt, [prompt], [text], 1)[0]

    def search_reward(self, prompt, response):
        """The reward the methods rank by: r, or (r - mean) / std with reward normalisation."""
        r = self.reward(prompt, response)
        stats = self.rm.stats
        return (r - stats["mean"]) / stats["std"] if self.rm.normalize else r

    def text(self, response):
        text = self.tok.decode(response, skip_special_tokens=True)
        for s in self.stops():
            if s in text:
                text = text[:text.find(s)]
        return text.strip()

    def stops(self):
        return self.stop_strings or self.policy.default_stop_strings

    def ends(self, response, n_new):
        tail = self.tok.decode(response[-12:], skip_special_tokens=True)
        return n_new >= self.max_new_tokens or any(s in tail for s in self.stops())

    def run(self, p):
        prefill = self.tok(p["prefill"], add_special_tokens=False).input_ids if p.get("prefill") else []
        prompt_ids = self.policy.fmt.prompt_ids(p["prompt"])  # the response starts with the prefill
        # prompt + max_new_tokens must fit the policy's positions: the prompt keeps its last tokens
        positions = getattr(self.policy.model.config, "max_position_embeddings", None)
        if positions is not None:
            prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(prefill) - (positions - self.max_new_tokens)):]
        m = self.method.name
        if m == "argsg":
            return self.args(p, prompt_ids, prefill)
        if m in ("greedy", "sample"):
            return self.plain(p, prompt_ids, prefill)
        if m in ("cbs", "tbs", "bon"):
            return self.chunk_beam(p, prompt_ids, prefill, *self.method.shape(self.max_new_tokens))
        if m == "stepbeam":  # CBS whose chunks end after the step delimiter (or at max_step tokens)
            delimiter = self.method.delimiter
            ends = lambda chain: delimiter in self.tok.decode(chain, skip_special_tokens=True)  # noqa: E731
            return self.chunk_beam(p, prompt_ids, prefill, self.method.beam, self.method.k, self.method.max_step,
                                   step_ends=ends)
        if m == "specrej":
            return self.speculative_rejection(p, prompt_ids, prefill)[0]
        raise ValueError(f"no literal reference for {m}")

    def plain(self, p, prompt_ids, response):
        response, key = list(response), prompt_key(p["id"])
        n0 = len(response)
        for round_idx in range(self.max_new_tokens):
            us = [uniform(self.seed, key, round_idx, 0, 0, 0)] if self.method.name == "sample" else None
            tok = int(pick_tokens(self.logits(prompt_ids, response)[None], us, self.method.sampling)[0])
            if tok in self.policy.eos_ids:
                break
            response.append(tok)
            if self.ends(response, len(response) - n0):
                break
        return response

    def args(self, p, prompt_ids, response):
        """ARGS-greedy: argmax over the top-k tokens v of log p(v) + w * r(x, y + v) (r normalised if set)."""
        response, n0 = list(response), len(response)
        while True:
            logp = torch.log_softmax(self.logits(prompt_ids, response).float(), -1)
            top = torch.topk(logp, self.method.k)
            objective = []
            for lp, v in zip(top.values.tolist(), top.indices.tolist()):
                candidate = response if v in self.policy.eos_ids else response + [v]
                objective.append(lp + self.method.w * self.search_reward(p["prompt"], candidate))
            v = top.indices[int(torch.argmax(torch.tensor(objective)))].item()
            if v in self.policy.eos_ids:
                return response
            response.append(v)
            if self.ends(response, len(response) - n0):
                return response

    def chunk_beam(self, p, prompt_ids, prefill, W, K, L, step_ends=None):
        """CBS (TBS: L = 1; Best-of-N: W = 1, K = N, L = max tokens): keep the top-W of W*K chunks by r. With
        step_ends, a chunk also ends as soon as step_ends(chunk) holds (step beam search: a delimiter)."""
        key, n0 = prompt_key(p["id"]), len(prefill)
        start = {"tokens": list(prefill), "done": False, "score": self.reward(p["prompt"], list(prefill))}
        # Algorithm 3: H starts with W copies of the prompt (Best-of-N: W = 1)
        beams = [dict(start) for _ in range(W)]
        round_idx = 0
        while not all(b["done"] for b in beams):
            candidates = []
            for slot, beam in enumerate(beams):
                if beam["done"]:
                    candidates.append((beam["score"], slot * K, beam))
                    continue
                for j in range(K):
                    chain, done = [], False
                    for step in range(L):
                        if step_ends is not None and chain and step_ends(chain):
                            break
                        us = [uniform(self.seed, key, round_idx, slot, j, step)]
                        tok = int(pick_tokens(self.logits(prompt_ids, beam["tokens"] + chain)[None], us,
                                              self.method.sampling)[0])
                        if tok in self.policy.eos_ids:
                            done = True
                            break
                        chain.append(tok)
                        if self.ends(beam["tokens"] + chain, len(beam["tokens"]) + len(chain) - n0):
                            done = True
                            break
                    tokens = beam["tokens"] + chain
                    candidates.append((self.reward(p["prompt"], tokens), slot * K + j,
                                       {"tokens": tokens, "done": done or not chain}))
            candidates.sort(key=lambda c: (-c[0], c[1]))
            beams = [{**b, "score": s} for s, _, b in candidates[:W]]
            round_idx += 1
        return max(beams, key=lambda b: b["score"])["tokens"]

    def speculative_rejection(self, p, prompt_ids, prefill):
        """Speculative rejection as its authors' code runs it: every sample in play grows L tokens, its whole
        text is scored afresh, the lowest-scored share alpha of the samples in play is dropped. Sample j draws
        Best-of-N's sample j. Returns (the answer's tokens, samples in play after each decision point)."""
        import math

        N, alpha, L = self.method.n, self.method.alpha, self.method.decision_every
        key, n0 = prompt_key(p["id"]), len(prefill)
        in_play = [{"tokens": list(prefill), "done": False, "lineage": j} for j in range(N)]
        dropped, kept = [], []
        while True:
            for s in in_play:
                for _ in range(L):
                    if s["done"]:
                        break
                    n_new = len(s["tokens"]) - n0
                    us = [uniform(self.seed, key, 0, 0, s["lineage"], n_new)]
                    tok = int(pick_tokens(self.logits(prompt_ids, s["tokens"])[None], us, self.method.sampling)[0])
                    if tok in self.policy.eos_ids:
                        s["done"] = True
                        break
                    s["tokens"].append(tok)
                    s["done"] = self.ends(s["tokens"], n_new + 1)
                s["score"] = self.search_reward(p["prompt"], s["tokens"])
            if all(s["done"] for s in in_play):
                break
            depth = L * (len(kept) + 1)  # new tokens every sample in play has grown at this decision
            if isinstance(alpha, str):  # a schedule: the alpha of the deepest listed t <= depth (else the first)
                steps = [(int(t), float(a)) for t, a in (x.split(":") for x in alpha.split(","))]
                at = [a for t, a in steps if t <= depth]
                rate = at[-1] if at else steps[0][1]
            else:
                rate = alpha
            keep = max(1, math.ceil(round((1 - rate) * len(in_play), 9)))
            ranked = sorted(in_play, key=lambda s: (-s["score"], s["lineage"]))
            dropped += [s for s in ranked[keep:] if s["done"]]
            in_play = sorted(ranked[:keep], key=lambda s: s["lineage"])
            kept.append(keep)
        best = min(in_play + dropped, key=lambda s: (-s["score"], s["lineage"]))
        return best["tokens"], kept
