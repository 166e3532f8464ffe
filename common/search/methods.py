"""The search methods: one small class each, registered by name. The engine (engine.py) runs any of them.

A method says
- its knobs (`Knob`: flag, type, default, help): 04_decode.py builds its flags from them;
- its shape: rows per prompt W, candidates K per row, chain length L (`shape`);
- how candidates are proposed: K sampled (or greedy) chains of up to L tokens, or the K most likely next
  tokens (`proposal = "top_k"`), with an optional end of a chain before an uncertain token (`segment_ends`);
- which uniform number draws each sampled token (`seed_coords`): a row carries a stable lineage id, so
  dropping or re-ranking rows never changes which samples are drawn;
- which candidates it keeps or accepts each round (`choose`), and which row is the answer (`answer`).
The engine owns the caches, the sampling, the scoring and the records.

Adding a method: subclass `Method`, give it a `name`, its knobs and `choose` (plus whatever else differs
from the defaults), decorate it with `@register`, and test it against a literal loop in
tests/reference_search.py.
"""
import math
from dataclasses import dataclass, field

from common.io import finite_float, fraction, non_negative_int, positive_float, positive_int, probability

REGISTRY = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Knob:
    name: str              # attribute; the flag is --name with dashes
    type: object           # argparse type (checks the value before any model loads)
    default: object
    help: str = ""
    choices: tuple = None


@dataclass
class Row:
    """One beam / sample of one prompt."""
    prompt: int             # index into the batch
    lineage: int            # which samples it draws (beam slot, sample index)
    tokens: list            # response token ids so far (prefill included)
    finished: bool = False
    score: float = None     # the search reward of the accepted response
    state: dict = field(default_factory=dict)  # what the method keeps per row


@dataclass
class Choice:
    """A row of the next round: `row`, grown from row `parent` of this round by the `accepted` tokens."""
    parent: int
    row: Row
    accepted: list


SAMPLING = (Knob("temperature", positive_float, 1.0, "sampling temperature"),
            Knob("top_p", probability, 1.0, "nucleus sampling mass"),
            Knob("top_k", non_negative_int, 0, "sample among the top k tokens (0: all)"))


class Method:
    name = None
    uses_rm = True          # needs a reward model
    samples = True          # tokens are drawn with seeded uniforms (else argmax)
    proposal = "chains"     # "chains": K chains of up to L tokens; "top_k": the K most likely next tokens
    serves = False          # runs on a serving backend (served.py: sampled chains, no per-token distribution)
    knobs = ()

    def __init__(self, **values):
        known = {k.name: k for k in self.knobs}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"method {self.name}: no knob {', '.join(unknown)} (it has {', '.join(known) or 'none'})")
        for name, knob in known.items():
            value = values.get(name)
            setattr(self, name, knob.default if value is None else value)
        self.validate()

    @classmethod
    def knob_names(cls):
        return {k.name for k in cls.knobs}

    def validate(self):
        """Raise ValueError for settings that cannot work together."""

    def shape(self, max_new_tokens):
        """(rows W per prompt, candidates K per row, chain length L)."""
        return 1, 1, 1

    def params(self):
        """The settings that matter for this method (recorded with every generation)."""
        return {k.name: getattr(self, k.name) for k in self.knobs}

    def check_vocabulary(self, size):
        """Raise ValueError when the method cannot run on a vocabulary of `size` tokens."""

    def bind(self, normalize, stats):
        """Settings that come from the reward model: whether its rewards are normalised, and its reward
        statistics {"mean", "std"} or None (called before the first batch)."""

    def new_batch(self, n_prompts, prompt_scores):
        """The method's state for one batch (prompt_scores: r(x) of each prompt, or None)."""
        return {}

    def seed_coords(self, row, round_idx, chain, step):
        """What picks the uniform number of token `step` of candidate chain `chain` of `row` this round."""
        return round_idx, row.lineage, chain, step

    def decision_points(self, L):
        """Steps of a round (0 < step < L) at which the chains grown so far are scored and `prune` may stop
        some of them."""
        return ()

    def prune(self, rows, partial, batch):
        """[(row, chain)] to stop, given partial.chains / done / dropped and partial.scores ([R, K]) so far."""
        return []

    def checks_entropy(self, step):
        """True when the next token's entropy may end a chain at this step (segment methods)."""
        return False

    def segment_ends(self, entropy):
        """True when a chain stops before a token of this next-token entropy."""
        return False

    def choose(self, rows, cand, batch):
        """[Choice] for the next round. cand.chains[i][j] (tokens), cand.done[i][j] (the response ended),
        cand.logp[i] (K LM log-probabilities, top_k proposals), cand.scores[i] (K search rewards, or None)."""
        raise NotImplementedError

    def answer(self, rows, batch, b):
        """The answer among the final rows of prompt b: the best search reward (the first row without one)."""
        best = rows[0]
        for r in rows[1:]:
            if r.score is not None and (best.score is None or r.score > best.score):
                best = r
        return best

    def record(self, batch, b):
        """Extra stats of prompt b."""
        return {}


def take(i, r, cand, j):
    """The row grown by candidate j of row i."""
    chain = cand.chains[i][j]
    score = float(cand.scores[i, j]) if cand.scores is not None else None
    return Choice(i, Row(r.prompt, r.lineage, r.tokens + chain, cand.done[i][j] or not chain, score, r.state), chain)


def unchanged(i, r):
    return Choice(i, r, [])


# ------------------------------------------------------------------------------------------ plain decoding

@register
class Greedy(Method):
    """The most likely next token, one at a time."""
    name = "greedy"
    uses_rm = False
    samples = False

    def choose(self, rows, cand, batch):
        return [unchanged(i, r) if r.finished else take(i, r, cand, 0) for i, r in enumerate(rows)]


@register
class Sample(Greedy):
    """Ancestral sampling (temperature, top-p, top-k)."""
    name = "sample"
    samples = True
    knobs = SAMPLING


# ------------------------------------------------------------------------------------------ ARGS

@register
class ARGS(Method):
    """ARGS-greedy (Khanov et al., 2024; the paper's Algorithm 2): for the top-k next tokens v by LM
    likelihood, score(v) = log p(v | x) + w * r([x, v]); take the argmax."""
    name = "argsg"
    samples = False
    proposal = "top_k"
    knobs = (Knob("k", positive_int, 30, "ARGS candidates (top-k by LM likelihood)"),
             Knob("w", finite_float, 1.5, "ARGS reward weight"))

    def shape(self, max_new_tokens):
        return 1, self.k, 1

    def check_vocabulary(self, size):
        if self.k > size:
            raise ValueError(f"--k {self.k}: more candidates than the policy's vocabulary ({size} tokens)")

    def choose(self, rows, cand, batch):
        import torch

        best = [int(torch.argmax(cand.logp[i] + self.w * cand.scores[i])) for i in range(len(rows))]
        return [unchanged(i, r) if r.finished else take(i, r, cand, best[i]) for i, r in enumerate(rows)]


# ------------------------------------------------------------------------------------------ beam search

def top_w(rows, cand, W, K):
    """Per prompt, the top W of its rows' candidates by search reward (a finished row is its own candidate;
    ties by beam slot and chain), as the new beams 0..W-1 (Algorithm 3's H)."""
    out, by_prompt = [], {}
    for i, r in enumerate(rows):
        by_prompt.setdefault(r.prompt, []).append(i)
    for b in sorted(by_prompt):
        ranked = []
        for i in by_prompt[b]:
            r = rows[i]
            if r.finished:
                ranked.append((r.score, r.lineage * K, i, None))
                continue
            for j in range(K):
                ranked.append((float(cand.scores[i, j]), r.lineage * K + j, i, j))
        ranked.sort(key=lambda c: (-c[0], c[1]))
        for slot, (s, _, i, j) in enumerate(ranked[:W]):
            r = rows[i]
            if j is None:
                out.append(Choice(i, Row(b, slot, r.tokens, True, s), []))
            else:
                chain = cand.chains[i][j]
                out.append(Choice(i, Row(b, slot, r.tokens + chain, cand.done[i][j] or not chain, s), chain))
    return out


@register
class CBS(Method):
    """Chunk-level beam search (Zhou et al., 2024, weak-to-strong search; the paper's Algorithm 3): W beams,
    K sampled successors of L tokens each per beam, keep the top W by r. It starts from W copies of the
    prompt, each beam slot drawing its own samples, so the first round ranks W * K candidates."""
    name = "cbs"
    serves = True
    knobs = (Knob("beam", positive_int, 8, "beams W"), Knob("successors", positive_int, 8, "successors K per beam"),
             Knob("chunk", positive_int, 30, "chunk length L")) + SAMPLING

    def shape(self, max_new_tokens):
        return self.beam, self.successors, self.chunk

    def choose(self, rows, cand, batch):
        W, K, _ = self.shape(None)
        return top_w(rows, cand, W, K)


@register
class TBS(CBS):
    """Token-level beam search: CBS with L = 1."""
    name = "tbs"
    serves = False  # token-level: a request per token gains nothing from a server
    knobs = (Knob("beam", positive_int, 8, "beams W"),
             Knob("successors", positive_int, 8, "successors K per beam")) + SAMPLING

    def shape(self, max_new_tokens):
        return self.beam, self.successors, 1


@register
class BestOfN(Method):
    """Best-of-N: N complete samples, the best by r (Algorithm 3 with W = 1, K = N, L = the token budget)."""
    name = "bon"
    serves = True
    knobs = (Knob("n", positive_int, 16, "samples N"),) + SAMPLING

    def shape(self, max_new_tokens):
        return 1, self.n, max_new_tokens

    def choose(self, rows, cand, batch):
        return top_w(rows, cand, 1, self.n)


# ------------------------------------------------------------------------------------------ CARDS

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


@register
class CARDS(Method):
    """CARDS (Li et al., 2024, Cascade Reward Sampling): a segment grows from min_segment tokens until the next
    token's entropy reaches tau_u or it has max_segment tokens; it is accepted by the rule (soft: with
    probability min(1, exp((r - tau(t)) / beta))), else resampled; after max_retries rejections the best
    attempt so far is taken."""
    name = "cards"
    knobs = (Knob("cards_rule", str, "soft", "soft/hard: CARDS' adaptive threshold; prefix: r >= r(prefix)",
                  CARDS_RULES),
             Knob("entropy_threshold", positive_float, 7.0, "tau_u: a segment ends before a token this uncertain"),
             Knob("reward_threshold", finite_float, None, "r*, CARDS' target reward (default: one std above the "
                                                         "RM's mean: 1.0 with --reward-norm std)"),
             Knob("cards_alpha", fraction, 0.5, "r_0 = (1 - alpha) r(x) + alpha r*"),
             Knob("cards_beta", positive_float, 0.7, "soft acceptance temperature"),
             Knob("min_segment", positive_int, 4, "tokens before the entropy cut may end a segment"),
             Knob("max_segment", positive_int, 64, "longest segment"),
             Knob("max_retries", non_negative_int, 20, "rejections of a segment before the best attempt is taken"),
             Knob("temperature", positive_float, 0.7, "sampling temperature"),
             Knob("top_p", probability, 1.0, "nucleus sampling mass"),
             Knob("top_k", non_negative_int, 40, "sample among the top k tokens (0: all)"))

    def validate(self):
        if self.cards_rule not in CARDS_RULES:
            raise ValueError(f"unknown CARDS rule {self.cards_rule!r}; choose from {CARDS_RULES}")
        if self.min_segment > self.max_segment:
            raise ValueError(f"--min-segment {self.min_segment} is above --max-segment {self.max_segment}")

    def shape(self, max_new_tokens):
        return 1, 1, self.max_segment

    def bind(self, normalize, stats):
        """r* by default: one standard deviation above the RM's mean reward (1.0 in normalised units)."""
        if self.cards_rule == "prefix" or self.reward_threshold is not None:
            return
        if normalize:
            self.reward_threshold = 1.0
        elif stats is not None:
            self.reward_threshold = stats["mean"] + stats["std"]
        else:
            raise ValueError(f"CARDS' {self.cards_rule} rule needs a target reward r*: give --reward-threshold R, "
                             "or --reward-norm std, or reward statistics (reward_stats.json beside the RM, or "
                             "--reward-stats FILE)")

    def new_batch(self, n_prompts, prompt_scores):
        return {"r_prompt": prompt_scores, "tried": [0] * n_prompts}

    def checks_entropy(self, step):
        return step >= max(1, self.min_segment)

    def segment_ends(self, entropy):
        return entropy >= self.entropy_threshold

    def accepts(self, row, chain, s, batch):
        threshold = self.reward_threshold
        if self.cards_rule != "prefix":
            t = len(row.tokens) + len(chain) - batch.prefill_len[row.prompt]
            threshold = cards_threshold(batch.state["r_prompt"][row.prompt], self.reward_threshold,
                                        self.cards_alpha, t, batch.max_new_tokens)
        u = batch.uniform(row.prompt, batch.round_idx, row.lineage, "accept", 0) if self.cards_rule == "soft" else None
        return cards_accepts(self.cards_rule, s, u, r_prefix=row.score, threshold=threshold, beta=self.cards_beta)

    def choose(self, rows, cand, batch):
        out = []
        for i, r in enumerate(rows):
            if r.finished:
                out.append(unchanged(i, r))
                continue
            batch.state["tried"][r.prompt] += 1
            s = float(cand.scores[i, 0])
            attempt = (s, cand.chains[i][0], cand.done[i][0])
            attempts, best = r.state.get("attempts", 0), r.state.get("best")
            if best is None or s > best[0]:
                best = attempt
            # as CARDS: after max_retries rejections the best attempt so far (this one included) is taken;
            # before that, the attempt is accepted or the segment is resampled next round
            if attempts >= self.max_retries:
                s, chain, fin = best
            elif self.accepts(r, cand.chains[i][0], s, batch):
                s, chain, fin = attempt
            else:
                out.append(Choice(i, Row(r.prompt, r.lineage, r.tokens, False, r.score,
                                         {"attempts": attempts + 1, "best": best}), []))
                continue
            out.append(Choice(i, Row(r.prompt, r.lineage, r.tokens + chain, fin or not chain, s), chain))
        return out

    def record(self, batch, b):
        return {"segments_tried": batch.state["tried"][b]}


# ------------------------------------------------------------------------------------------ speculative rejection

@register
class SpeculativeRejection(BestOfN):
    """Speculative rejection (Sun et al., 2024, Fast Best-of-N Decoding via Speculative Rejection): Best-of-N's
    N samples, but every L new tokens the m samples still in play are ranked by the RM's current score (a live
    sample by its prefix, a finished one by its final score) and only the top ceil((1 - alpha) m) go on (at
    least one); the answer is the best finished sample. Sample j draws the tokens of Best-of-N's sample j, so
    with alpha 0 it is Best-of-N."""
    name = "specrej"
    serves = True
    knobs = (Knob("n", positive_int, 16, "samples N"),
             Knob("alpha", fraction, 0.5, "share of the samples in play rejected at each decision point"),
             Knob("decision_every", positive_int, 32, "new tokens L between decision points")) + SAMPLING

    def decision_points(self, L):
        return range(self.decision_every, L, self.decision_every)

    def kept(self, m):
        return max(1, math.ceil(round((1 - self.alpha) * m, 9)))

    def new_batch(self, n_prompts, prompt_scores):
        return {"kept": [[] for _ in range(n_prompts)]}

    def prune(self, rows, partial, batch):
        stop = []
        for i, r in enumerate(rows):
            if r.finished:
                continue
            in_play = [j for j in range(self.n) if not partial.dropped[i][j]]
            if all(partial.done[i][j] for j in in_play):  # nothing left to decide
                continue
            keep = self.kept(len(in_play))
            ranked = sorted(in_play, key=lambda j: (-float(partial.scores[i, j]), j))
            stop += [(i, j) for j in ranked[keep:]]
            batch.state["kept"][r.prompt].append(keep)
        return stop

    def choose(self, rows, cand, batch):
        """The best of the samples that finished: those still in play, and those that had finished when a
        later decision dropped them."""
        out = []
        for i, r in enumerate(rows):
            if r.finished:
                out.append(unchanged(i, r))
                continue
            pool = [j for j in range(self.n) if not cand.dropped[i][j] or cand.done[i][j]]
            out.append(take(i, r, cand, min(pool, key=lambda j: (-float(cand.scores[i, j]), j))))
        return out

    def record(self, batch, b):
        return {"kept": batch.state["kept"][b]}


# ------------------------------------------------------------------------------------------ registry helpers

def method_knobs():
    """Every knob of every method, once (methods that share a knob name share its flag)."""
    seen = {}
    for cls in REGISTRY.values():
        for knob in cls.knobs:
            seen.setdefault(knob.name, knob)
    return list(seen.values())


def make_method(name, **values):
    """The method `name` with the given knob values (None: its default); other methods' knobs are ignored."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    return cls(**{k: v for k, v in values.items() if k in cls.knob_names()})
