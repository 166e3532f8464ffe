"""The search methods: one small dataclass each, registered by name. The engine (engine.py) runs any of them.

A method's fields are its knobs (`knob`: type, default, help; 04_decode.py builds its flags from them). It says
- its shape: rows per prompt W, candidates K per row, chain length L (`shape`), and how candidates are
  proposed (`proposal`): K chains of up to L tokens, sampled with its `sampling` settings (None: argmax), or
  the K most likely next tokens (`proposal = "top_k"`);
- where a chain ends inside a round (`stop_chain`: an uncertain next token, a step delimiter), and which
  chains it stops at its decision points (`decision_points`, `prune`);
- which candidates it keeps or accepts each round (`choose`), which row is the answer (`answer`), and what it
  records (`record`). Its state lives in the method: settings of the run (`bind`, once), of a batch (`start`).
The engine owns the caches, the sampling (a row carries a stable lineage id, so dropping or re-ranking rows
never changes which samples are drawn), the scoring and the records.

Adding a method: a `@register`ed dataclass subclass of `Method` with a `name`, its knobs as fields, its
`shape` and `choose` (plus whatever else differs from the defaults), tested against a literal loop in
tests/reference_search.py.
"""
import math
from abc import ABC, abstractmethod
from argparse import ArgumentTypeError
from functools import lru_cache
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from common.io import finite_float, fraction, non_negative_int, positive_float, positive_int, probability

REGISTRY = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def knob(default, type, help, choices=None, aliases=()):
    """A method's setting, as a dataclass field: its flag is --name with dashes; `aliases` are older names that
    still work (flags, keyword arguments) and that `params` still records, so rows written before read alike."""
    return field(default=default, metadata={"type": type, "help": help, "choices": choices, "aliases": tuple(aliases)})


@dataclass(frozen=True)
class Knob:
    """A knob as 04_decode.py's flags see it."""
    name: str
    type: object           # argparse type (checks the value before any model loads)
    default: object
    help: str = ""
    choices: tuple = None
    aliases: tuple = ()

    @property
    def flags(self):
        return tuple("--" + n.replace("_", "-") for n in (self.name,) + self.aliases)


def knobs(method):
    """The knobs of a method class (or instance): its own in field order, then the sampling knobs."""
    own = [Knob(f.name, f.metadata["type"], f.default, f.metadata["help"], f.metadata["choices"],
                f.metadata["aliases"]) for f in fields(method) if "type" in f.metadata and f.default is not MISSING]
    return sorted(own, key=lambda k: k.name in _SAMPLING)


@dataclass(frozen=True)
class Sampling:
    """How a sampled token is drawn from the next-token distribution."""
    temperature: float = 1.0
    top_p: float = 1.0      # nucleus mass
    top_k: int = 0          # among the top k tokens (0: all)


_SAMPLING = {"temperature": (positive_float, "sampling temperature"),
             "top_p": (probability, "nucleus sampling mass"),
             "top_k": (non_negative_int, "sample among the top k tokens (0: all)")}


def sampling_knob(name, default):
    """One of the three sampling knobs, with a method's own default (its type and help are the same everywhere)."""
    return knob(default, *_SAMPLING[name])


@dataclass(frozen=True)
class Run:
    """What a method may know of the run it is bound to (`Method.bind`, once per run)."""
    max_new_tokens: int
    normalize: bool = False     # the search sees (r - mean) / std
    stats: dict = None          # the RM's reward statistics {"mean", "std"}, or None
    decode: object = None       # token ids -> text (the policy's tokenizer, special tokens skipped)


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


@dataclass
class Method(ABC):
    name: ClassVar[str] = None
    uses_rm: ClassVar[bool] = True      # needs a reward model
    serves: ClassVar[bool] = False      # runs on a serving backend (served.py: sampled chains, no per-token distribution)
    proposal: ClassVar[str] = "chains"  # "chains": K chains of up to L tokens; "top_k": the K most likely next tokens

    @property
    def sampling(self):
        """The Sampling that draws its tokens, or None: the most likely token (argmax)."""
        return None

    def shape(self, max_new_tokens):
        """(rows W per prompt, candidates K per row, chain length L)."""
        return 1, 1, 1

    def check_vocabulary(self, size):
        """Raise ValueError when the method cannot run on a vocabulary of `size` tokens."""
        if self.proposal == "top_k" and self.shape(1)[1] > size:
            raise ValueError(f"--k {self.shape(1)[1]}: more candidates than the policy's vocabulary ({size} tokens)")

    def params(self, normalize=None, stats=None):
        """The settings that act (recorded with every generation; an alias under its old name too). With an RM,
        `normalize` and `stats` are its reward settings, from which a method may take defaults."""
        out = {}
        for k in knobs(self):
            for name in (k.name,) + k.aliases:
                out[name] = getattr(self, k.name)
        return out

    def bind(self, run):
        """Settings of the run (a Run), before its first batch; raise ValueError when they cannot work."""

    def start(self, rows):
        """The method's state for one batch, from each prompt's first row (its prefill, r(x) when scored)."""
        return {}

    def stop_chain(self, row, chain, step, next_token):
        """True when `chain` of `row` ends before its token `step` (a segment boundary: what follows opens the
        next round). next_token.entropy: the entropy of that token's distribution."""
        return False

    def decision_points(self, L):
        """Steps of a round (0 < step < L) at which the chains grown so far are scored and `prune` may stop
        some of them."""
        return ()

    def prune(self, rows, partial, batch):
        """[(row, chain)] to stop, given partial.chains / done / dropped and partial.scores ([R, K]) so far."""
        return []

    @abstractmethod
    def choose(self, rows, cand, batch):
        """[Choice] for the next round. cand.chains[i][j] (tokens), cand.done[i][j] (the response ended),
        cand.logp[i] (K LM log-probabilities, top_k proposals), cand.scores[i] (K search rewards, or None)."""

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


@dataclass
class Sampled(Method):
    """A method whose tokens are drawn (each with its own seeded uniform) by its sampling knobs."""
    temperature: float = sampling_knob("temperature", 1.0)
    top_p: float = sampling_knob("top_p", 1.0)
    top_k: int = sampling_knob("top_k", 0)

    @property
    def sampling(self):
        return Sampling(self.temperature, self.top_p, self.top_k)


def take(i, r, cand, j):
    """The row grown by candidate j of row i."""
    chain = cand.chains[i][j]
    score = float(cand.scores[i, j]) if cand.scores is not None else None
    return Choice(i, Row(r.prompt, r.lineage, r.tokens + chain, cand.done[i][j] or not chain, score, r.state), chain)


def unchanged(i, r):
    return Choice(i, r, [])


def take_first(rows, cand):
    return [unchanged(i, r) if r.finished else take(i, r, cand, 0) for i, r in enumerate(rows)]


# ------------------------------------------------------------------------------------------ plain decoding

@register
@dataclass
class Greedy(Method):
    """The most likely next token, one at a time."""
    name = "greedy"
    uses_rm = False

    def choose(self, rows, cand, batch):
        return take_first(rows, cand)


@register
@dataclass
class Sample(Sampled):
    """Ancestral sampling (temperature, top-p, top-k)."""
    name = "sample"
    uses_rm = False

    def choose(self, rows, cand, batch):
        return take_first(rows, cand)


# ------------------------------------------------------------------------------------------ ARGS

K_HELP = "candidates K per row (ARGS: the top-k next tokens by LM likelihood; CBS, TBS, step beam: successors per beam)"


@register
@dataclass
class ARGS(Method):
    """ARGS-greedy (Khanov et al., 2024; the paper's Algorithm 2): for the top-k next tokens v by LM
    likelihood, score(v) = log p(v | x) + w * r([x, v]); take the argmax."""
    name = "argsg"
    proposal = "top_k"
    k: int = knob(30, positive_int, K_HELP)
    w: float = knob(1.5, finite_float, "ARGS reward weight")

    def shape(self, max_new_tokens):
        return 1, self.k, 1

    def choose(self, rows, cand, batch):
        best = (cand.logp + self.w * cand.scores).argmax(-1).tolist()
        return [unchanged(i, r) if r.finished else take(i, r, cand, best[i]) for i, r in enumerate(rows)]


# ------------------------------------------------------------------------------------------ beam search

def top_w(rows, cand, W, K):
    """Per prompt, the top W of its rows' candidates by search reward (a finished row is its own candidate;
    ties by beam slot and chain), as the new beams 0..W-1 (Algorithm 3's H)."""
    out, by_prompt = [], {}
    for i, r in enumerate(rows):
        by_prompt.setdefault(r.prompt, []).append(i)
    scores = cand.scores.tolist()
    for b in sorted(by_prompt):
        ranked = []
        for i in by_prompt[b]:
            r = rows[i]
            if r.finished:
                ranked.append((r.score, r.lineage * K, i, None))
                continue
            for j in range(K):
                ranked.append((scores[i][j], r.lineage * K + j, i, j))
        ranked.sort(key=lambda c: (-c[0], c[1]))
        for slot, (s, _, i, j) in enumerate(ranked[:W]):
            r = rows[i]
            if j is None:
                out.append(Choice(i, Row(b, slot, r.tokens, True, s), []))
            else:
                chain = cand.chains[i][j]
                out.append(Choice(i, Row(b, slot, r.tokens + chain, cand.done[i][j] or not chain, s), chain))
    return out


@dataclass
class BeamSearch(Sampled):
    """W beams, K sampled successors per beam, keep the top W by r (the successors' length: `shape`)."""
    beam: int = knob(8, positive_int, "beams W")
    k: int = knob(8, positive_int, K_HELP, aliases=("successors",))

    def choose(self, rows, cand, batch):
        return top_w(rows, cand, self.beam, self.k)


@register
@dataclass
class CBS(BeamSearch):
    """Chunk-level beam search (Zhou et al., 2024, weak-to-strong search; the paper's Algorithm 3): W beams,
    K sampled successors of L tokens each per beam, keep the top W by r. It starts from W copies of the
    prompt, each beam slot drawing its own samples, so the first round ranks W * K candidates."""
    name = "cbs"
    serves = True
    chunk: int = knob(30, positive_int, "chunk length L")

    def shape(self, max_new_tokens):
        return self.beam, self.k, self.chunk


@register
@dataclass
class TBS(BeamSearch):
    """Token-level beam search: CBS with L = 1."""
    name = "tbs"
    serves = False  # token-level: a request per token gains nothing from a server

    def shape(self, max_new_tokens):
        return self.beam, self.k, 1


@register
@dataclass
class StepBeam(BeamSearch):
    """Step-level beam search (as in step-level PRM search): CBS whose successors are reasoning steps, each
    ending after the delimiter (a blank line by default) or at max_step tokens."""
    name = "stepbeam"
    delimiter: str = knob("\n\n", str, "text that ends a step (step beam)")
    max_step: int = knob(64, positive_int, "longest step, in tokens (step beam)")

    def shape(self, max_new_tokens):
        return self.beam, self.k, self.max_step

    def bind(self, run):
        self._decode = run.decode

    def stop_chain(self, row, chain, step, next_token):
        return bool(chain) and self.delimiter in self._decode(chain)


@register
@dataclass
class BestOfN(Sampled):
    """Best-of-N: N complete samples, the best by r (Algorithm 3 with W = 1, K = N, L = the token budget)."""
    name = "bon"
    serves = True
    n: int = knob(16, positive_int, "samples N")

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
@dataclass
class CARDS(Sampled):
    """CARDS (Li et al., 2024, Cascade Reward Sampling): a segment grows from min_segment tokens until the next
    token's entropy reaches tau_u or it has max_segment tokens; it is accepted by the rule (soft: with
    probability min(1, exp((r - tau(t)) / beta))), else resampled; after max_retries rejections the best
    attempt so far is taken."""
    name = "cards"
    cards_rule: str = knob("soft", str, "soft/hard: CARDS' adaptive threshold; prefix: r >= r(prefix)", CARDS_RULES)
    entropy_threshold: float = knob(7.0, positive_float, "tau_u: a segment ends before a token this uncertain")
    reward_threshold: float = knob(None, finite_float, "r*, CARDS' target reward (default: one std above the "
                                                       "RM's mean: 1.0 with --reward-norm std)")
    cards_alpha: float = knob(0.5, fraction, "r_0 = (1 - alpha) r(x) + alpha r*")
    cards_beta: float = knob(0.7, positive_float, "soft acceptance temperature")
    min_segment: int = knob(4, positive_int, "tokens before the entropy cut may end a segment")
    max_segment: int = knob(64, positive_int, "longest segment")
    max_retries: int = knob(20, non_negative_int, "rejections of a segment before the best attempt is taken")
    temperature: float = sampling_knob("temperature", 0.7)   # CARDS' own sampling defaults
    top_k: int = sampling_knob("top_k", 40)

    def __post_init__(self):
        if self.cards_rule not in CARDS_RULES:
            raise ValueError(f"unknown CARDS rule {self.cards_rule!r}; choose from {CARDS_RULES}")
        if self.min_segment > self.max_segment:
            raise ValueError(f"--min-segment {self.min_segment} is above --max-segment {self.max_segment}")

    def shape(self, max_new_tokens):
        return 1, 1, self.max_segment

    def target(self, normalize, stats):
        """r*: given, else one standard deviation above the RM's mean reward (1.0 in normalised units); the
        prefix rule needs none."""
        if self.cards_rule == "prefix" or self.reward_threshold is not None:
            return self.reward_threshold
        if normalize:
            return 1.0
        if stats is not None:
            return stats["mean"] + stats["std"]
        raise ValueError(f"CARDS' {self.cards_rule} rule needs a target reward r*: give --reward-threshold R, "
                         "or --reward-norm std, or reward statistics (reward_stats.json beside the RM, or "
                         "--reward-stats FILE)")

    def params(self, normalize=None, stats=None):
        out = super().params()
        if normalize is not None:  # with an RM: the target that acts
            out["reward_threshold"] = self.target(normalize, stats)
        return out

    def bind(self, run):
        self.r_star, self.max_new_tokens = self.target(run.normalize, run.stats), run.max_new_tokens

    def start(self, rows):
        return {"r_prompt": [r.score for r in rows], "prefill": [len(r.tokens) for r in rows],
                "tried": [0] * len(rows)}

    def stop_chain(self, row, chain, step, next_token):
        # the uncertain token opens the next segment
        return step >= max(1, self.min_segment) and next_token.entropy >= self.entropy_threshold

    def accepts(self, row, chain, s, batch):
        threshold = self.r_star
        if self.cards_rule != "prefix":
            t = len(row.tokens) + len(chain) - batch.state["prefill"][row.prompt]
            threshold = cards_threshold(batch.state["r_prompt"][row.prompt], self.r_star, self.cards_alpha, t,
                                        self.max_new_tokens)
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

@lru_cache(maxsize=64)  # alpha_at reads the schedule at every decision of every row: parse each text once
def schedule_steps(text):
    """((t, alpha), ...) of a schedule 't:alpha,t:alpha,...' (t: new tokens, increasing; alpha in [0, 1])."""
    steps = []
    for part in text.split(","):
        t, sep, a = part.partition(":")
        try:
            step = (int(t), float(a))
        except ValueError:
            step = None
        if not sep or step is None or step[0] < 0 or not 0 <= step[1] <= 1:
            raise ArgumentTypeError(f"alpha schedule {text!r}: {part!r} is not t:alpha (t new tokens, alpha in "
                                    "[0, 1])")
        if steps and step[0] <= steps[-1][0]:
            raise ArgumentTypeError(f"alpha schedule {text!r}: depths must increase")
        steps.append(step)
    return tuple(steps)


def rejection_rate(value):
    """Speculative rejection's alpha: a share in [0, 1] rejected at every decision point; a schedule
    't:alpha,...' (a decision after d new tokens rejects the alpha of the largest t <= d, before the first t
    the first alpha); or 'auto:FILE[:RM]', the schedule FILE (05_evaluate.py consistency --alpha-max) holds
    for RM (the only one there if not named). Returns a float or the schedule's canonical text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 1:
            raise ArgumentTypeError(f"alpha {value} is not in [0, 1]")
        return float(value)
    if ":" not in value:
        return fraction(value)
    if value.startswith("auto:"):
        value = calibrated_schedule(value[len("auto:"):])
    return ",".join(f"{t}:{a:g}" for t, a in schedule_steps(value))


def calibrated_schedule(spec):
    """The schedule a consistency file holds for one RM: FILE (its only schedule) or FILE:RM."""
    import json

    import os

    path, rm = (spec, "") if os.path.exists(spec) or ":" not in spec else spec.rsplit(":", 1)
    try:
        with open(path) as f:
            rms = json.load(f)["rms"]
        named = {name: entry["alpha_schedule"] for name, entry in rms.items() if entry.get("alpha_schedule")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArgumentTypeError(f"alpha auto:{spec}: {path} is not a readable consistency file ({e})") from None
    if rm and rm not in named:
        raise ArgumentTypeError(f"alpha auto:{spec}: {path} holds no schedule for {rm!r} (it has {sorted(named)})")
    if not rm and len(named) != 1:
        raise ArgumentTypeError(f"alpha auto:{spec}: {path} holds {len(named)} schedules {sorted(named)}; "
                                "name one (auto:FILE:RM)")
    return named[rm] if rm else next(iter(named.values()))


def consistency_schedule(curve, alpha_max):
    """The adaptive rule: at each measured depth t, reject alpha_max * clip(tau(t), 0, 1), where tau(t) is the
    RM's prefix consistency there (Kendall's tau between its scores of the first t tokens and the complete
    samples' scores, `05_evaluate.py consistency`): little where the prefix ranking says little, up to
    alpha_max where it ranks as the end does. curve: [{"t", "kendall_tau"}] by increasing t."""
    return ",".join(f"{c['t']}:{round(alpha_max * min(1.0, max(0.0, c['kendall_tau'])), 3):g}" for c in curve)


@register
@dataclass
class SpeculativeRejection(BestOfN):
    """Speculative rejection (Sun et al., 2024, Fast Best-of-N Decoding via Speculative Rejection): Best-of-N's
    N samples, but every L new tokens the m samples still in play are ranked by the RM's current score (a live
    sample by its prefix, a finished one by its final score) and only the top ceil((1 - alpha) m) go on (at
    least one); the answer is the best finished sample. Sample j draws the tokens of Best-of-N's sample j, so
    with alpha 0 it is Best-of-N. alpha may change with depth (a schedule, `rejection_rate`): the authors note
    that a fixed rate is suboptimal where the RM's prefix ranking is unreliable early."""
    name = "specrej"
    serves = True
    alpha: float = knob(0.5, rejection_rate, "share of the samples in play rejected at each decision point: a "
                        "number in [0, 1], a schedule 't:alpha,...' (t: new tokens), or auto:FILE[:RM] (the "
                        "schedule `05_evaluate.py consistency --alpha-max` wrote)")
    # 16: at 128 new tokens and alpha 0.5 the samples in play halve 7 times, and policy + RM tokens come to about
    # 0.3x Best-of-N's (at 32, three halvings leave about 0.5x)
    decision_every: int = knob(16, positive_int, "new tokens L between decision points")

    def __post_init__(self):
        try:  # a schedule from a file is recorded as the schedule that acts
            self.alpha = rejection_rate(self.alpha)
        except ArgumentTypeError as e:
            raise ValueError(str(e)) from None

    def decision_points(self, L):
        return range(self.decision_every, L, self.decision_every)

    def alpha_at(self, depth):
        """The share rejected at a decision after `depth` new tokens."""
        if not isinstance(self.alpha, str):
            return self.alpha
        steps = schedule_steps(self.alpha)
        return next((a for t, a in reversed(steps) if t <= depth), steps[0][1])

    def kept(self, m, depth=0):
        return max(1, math.ceil(round((1 - self.alpha_at(depth)) * m, 9)))

    def start(self, rows):
        return {"kept": [[] for _ in rows]}

    def prune(self, rows, partial, batch):
        stop = []
        scores = partial.scores.tolist()
        for i, r in enumerate(rows):
            if r.finished:
                continue
            in_play = [j for j in range(self.n) if not partial.dropped[i][j]]
            if all(partial.done[i][j] for j in in_play):  # nothing left to decide
                continue
            depth = max(len(partial.chains[i][j]) for j in in_play if not partial.done[i][j])
            keep = self.kept(len(in_play), depth)
            ranked = sorted(in_play, key=lambda j: (-scores[i][j], j))
            stop += [(i, j) for j in ranked[keep:]]
            batch.state["kept"][r.prompt].append(keep)
        return stop

    def choose(self, rows, cand, batch):
        """The best of the samples that finished: those still in play, and those that had finished when a
        later decision dropped them."""
        out = []
        scores = cand.scores.tolist()
        for i, r in enumerate(rows):
            if r.finished:
                out.append(unchanged(i, r))
                continue
            pool = [j for j in range(self.n) if not cand.dropped[i][j] or cand.done[i][j]]
            out.append(take(i, r, cand, min(pool, key=lambda j: (-scores[i][j], j))))
        return out

    def record(self, batch, b):
        return {"kept": batch.state["kept"][b]}


# ------------------------------------------------------------------------------------------ registry helpers

def method_knobs():
    """Every knob of every method, once: methods that share a knob name share its flag (and its aliases)."""
    seen = {}
    for cls in REGISTRY.values():
        for k in knobs(cls):
            old = seen.get(k.name)
            if old is None:
                seen[k.name] = k
            elif set(k.aliases) - set(old.aliases):
                seen[k.name] = Knob(old.name, old.type, old.default, old.help, old.choices,
                                    old.aliases + tuple(a for a in k.aliases if a not in old.aliases))
    return list(seen.values())


def make_method(name, **values):
    """The method `name` with the given knob values (None: its default; a knob's old name works as its own);
    other methods' knobs are ignored."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    own = {}
    for k in knobs(cls):
        for given in (k.name,) + k.aliases:
            if values.get(given) is not None:
                own[k.name] = values[given]
    return cls(**own)
