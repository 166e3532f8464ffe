"""Data adapters: the real sets in the data folder (and their hub names) to the pairs and prompts contracts.

pairs:   {"id", "prompt", "chosen", "rejected"}   prompt = conversation so far, chosen/rejected = replies only
prompts: {"id", "prompt", ...}                     extra fields (reference, target) ride along

Named sets (deterministic splits, usable wherever a file path is; their files are found or fetched by
common/sources.py):
  hh-rlhf:train / hh-rlhf:heldout / hh-rlhf     Anthropic HH-RLHF harmless-base test file, 2,000 / 307 / all
  gsm8k-pairs:train / gsm8k-pairs:heldout       GSM8K correct/incorrect model solutions, split by problem
  hub sets (need a network, or $SPPRM_HUB_MIRROR, a local copy laid out as on the hub):
  hh-rlhf-hub:train|test       all of Anthropic/hh-rlhf (4 preference subsets; --subset picks some)
  tldr-hub:train|validation    openai/summarize_from_feedback comparisons (TL;DR)
  math-pairs-hub:train         RLHFlow/Deepseek-ORM-Data-Pairwise (pairwise math solutions)
  hh-redteam-hub               prompt set: first requests of the HH red-team attempts
  Any pairs source takes --fraction F (a seeded share: the paper's 20% / 33% subsets).
  prompt sets: hh-rlhf:heldout, hh-helpful, advbench, tldr, gsm8k (GSM8K test; :train), gsm8k:heldout (the
               held-out problems of gsm8k-pairs, for RMs trained on gsm8k-pairs:train), mt-bench
"""
import functools
import gzip
import hashlib
import json
import logging
import os

from common.dialogue import ASSISTANT, HUMAN, prompt_to_messages
from common.io import NAMED_SET_CHECKSUMS, DataError, read_jsonl
from common.sources import (HUB_MIRROR_ENV, data_file, recording_files,  # noqa: F401 (resolve_data_dir: API)
                            resolve_data_dir)

log = logging.getLogger("data")
HH_TRAIN_SIZE = 2000
GSM8K_TRAIN_SHARE = 0.8
ADVBENCH_PREFILL = "Sure here's"


def _sha1(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def records_checksums(load):
    """A loader of named sets that records, for the manifests (common/io.py), the sha256 of the data file a
    set was read from ({file: sha256} for a set made of several, as gsm8k:heldout)."""
    @functools.wraps(load)
    def loader(spec, *args, **kwargs):
        with recording_files() as files:
            result = load(spec, *args, **kwargs)
        if files:  # a named set (a JSONL file given by its path is hashed by input_checksums itself)
            NAMED_SET_CHECKSUMS[spec] = next(iter(files.values())) if len(files) == 1 else dict(sorted(files.items()))
        return result
    return loader


# ---------------------------------------------------------------------------------------------- HH-RLHF

def split_hh_dialogue(chosen, rejected):
    """(prompt, chosen_reply, rejected_reply), or None when the two dialogues do not share a prompt.

    prompt = chosen up to and including its last "\\n\\nAssistant:"; rejected must start with the same
    prompt and have no later assistant turn. Replies keep their text minus surrounding whitespace.
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return None
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        return None
    chosen_reply, rejected_reply = chosen[len(prompt):], rejected[len(prompt):]
    if ASSISTANT in rejected_reply or HUMAN in rejected_reply:
        return None
    return prompt, chosen_reply.strip(), rejected_reply.strip()


def hh_rows_to_pairs(rows, id_prefix="hh-rlhf"):
    """Split dialogue rows into pairs, sorted by SHA-1 of the prompt (ties by row index). Returns (pairs, skipped)."""
    kept, skipped = [], 0
    for index, row in enumerate(rows):
        split = split_hh_dialogue(row["chosen"], row["rejected"])
        if split is None:
            skipped += 1
            continue
        prompt, chosen, rejected = split
        kept.append((_sha1(prompt), index, {"id": f"{id_prefix}-{index:05d}", "prompt": prompt,
                                            "chosen": chosen, "rejected": rejected}))
    kept.sort(key=lambda item: (item[0], item[1]))
    return [pair for _, _, pair in kept], skipped


def load_hh_rlhf(data_dir=None, split="all"):
    path = data_file("hh_rlhf/harmless-base_test.jsonl.gz", data_dir)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pairs, skipped = hh_rows_to_pairs(rows)
    return _take_split(pairs, split, HH_TRAIN_SIZE, "hh-rlhf"), skipped, len(rows)


# ---------------------------------------------------------------------------------------------- the hub

HH_PAIR_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def hub_rows(repo, split, subfolder=None, config=None):
    """Rows of a Hugging Face hub data set. With $SPPRM_HUB_MIRROR=FOLDER they are read from FOLDER/<repo>,
    laid out as on the hub (subfolder or config name, then files named by split): offline copies, tests."""
    from datasets import load_dataset

    mirror = os.environ.get(HUB_MIRROR_ENV)
    try:
        if mirror:
            local = os.path.join(mirror, repo)
            if not os.path.isdir(local):
                raise DataError(f"{local}: no such folder (${HUB_MIRROR_ENV} mirror of {repo})")
            return load_dataset(local, data_dir=subfolder or config, split=split)
        return load_dataset(repo, config, data_dir=subfolder, split=split)
    except (OSError, ValueError, ConnectionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{repo} ({subfolder or config or 'default'}, split {split}): cannot load it from the "
                        f"hub (no network here? set ${HUB_MIRROR_ENV} to a local copy): {first}") from None


def load_hh_rlhf_hub(split="test", subset=None):
    """All of HH-RLHF from the hub (its four preference subsets, or the comma list `subset`); the same
    dialogue split rule as the local file, ids keep subset and row."""
    subsets = subset.split(",") if subset else HH_PAIR_SUBSETS
    unknown = sorted(set(subsets) - set(HH_PAIR_SUBSETS))
    if unknown:
        raise DataError(f"hh-rlhf-hub: unknown subset {unknown} (choose from {', '.join(HH_PAIR_SUBSETS)})")
    pairs, skipped, total = [], 0, 0
    for name in subsets:
        ds = hub_rows("Anthropic/hh-rlhf", split, subfolder=name)
        got, lost = hh_rows_to_pairs(ds, id_prefix=f"hh-rlhf-hub-{name}-{split}")
        pairs, skipped, total = pairs + got, skipped + lost, total + len(ds)
    return pairs, skipped, total


def load_redteam_prompts_hub():
    """HH-RLHF red-team attempts (harmful requests for the AdvBench setting): the first human turn of each
    transcript as a one-turn prompt, once per distinct request."""
    rows, seen = [], set()
    for index, row in enumerate(hub_rows("Anthropic/hh-rlhf", "train", subfolder="red-team-attempts")):
        messages = prompt_to_messages(row["transcript"])
        if not messages or messages[0]["role"] != "user" or not messages[0]["content"]:
            continue
        text = messages[0]["content"]
        if text not in seen:
            seen.add(text)
            rows.append({"id": f"hh-redteam-{index:05d}", "prompt": f"{HUMAN} {text}{ASSISTANT}"})
    return rows


def load_tldr_comparisons_hub(split="train"):
    """TL;DR human comparisons (openai/summarize_from_feedback, "comparisons"): the preferred summary
    (summaries[choice]) is chosen; the prompt is the post as in the tldr prompt set."""
    pairs, skipped = [], 0
    ds = hub_rows("openai/summarize_from_feedback", split, config="comparisons")
    for index, row in enumerate(ds):
        info, summaries, choice = row.get("info") or {}, row.get("summaries") or [], row.get("choice")
        post = info.get("post") or info.get("article")
        if choice not in (0, 1) or len(summaries) != 2 or not post:
            skipped += 1
            continue
        prompt = tldr_prompt({"subreddit": info.get("subreddit") or "", "title": info.get("title") or "",
                              "instruction": post})
        pairs.append({"id": f"tldr-hub-{split}-{index:06d}", "prompt": prompt,
                      "chosen": summaries[choice]["text"].strip(), "rejected": summaries[1 - choice]["text"].strip()})
    return pairs, skipped, len(ds)


def load_math_pairs_hub(split="train"):
    """Pairwise math solutions (RLHFlow/Deepseek-ORM-Data-Pairwise): chosen / rejected are chat message lists
    that share every turn but the last assistant one. A one-turn question becomes the prompt text itself."""
    pairs, skipped = [], 0
    ds = hub_rows("RLHFlow/Deepseek-ORM-Data-Pairwise", split)
    for index, row in enumerate(ds):
        chosen, rejected = row.get("chosen") or [], row.get("rejected") or []
        if (not chosen or not rejected or chosen[:-1] != rejected[:-1] or chosen[-1].get("role") != "assistant"
                or rejected[-1].get("role") != "assistant" or not chosen[:-1]):
            skipped += 1
            continue
        context = chosen[:-1]
        if len(context) == 1 and context[0]["role"] == "user":
            prompt = context[0]["content"]
        else:
            prompt = "".join(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in context) + ASSISTANT
        pairs.append({"id": f"math-pairs-hub-{split}-{index:07d}", "prompt": prompt,
                      "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]})
    return pairs, skipped, len(ds)


def sample_fraction(items, fraction, seed):
    """A seeded uniform share of the items in their order (the paper's 20% / 33% subsets)."""
    import random

    if fraction is None or fraction >= 1:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), int(round(len(items) * fraction))))
    return [items[i] for i in keep]


def _take_split(items, split, train_size, name):
    if split == "train":
        return items[:train_size]
    if split == "heldout":
        return items[train_size:]
    if split == "all":
        return items
    raise DataError(f"{name}: unknown split '{split}' (use train, heldout or all)")


# ---------------------------------------------------------------------------------------------- GSM8K

def _gsm8k_problems(data_dir=None):
    """GSM8K test problems that have a correct and an incorrect model solution, in split order (sorted by
    SHA-1 of the question), and how many of them are train. Each: (sha1, line, row, pairs)."""
    path = data_file("gsm8k/example_model_solutions.jsonl", data_dir)
    problems = []
    for lineno, row in read_jsonl(path, required=("question",)):
        sols = [v for v in row.values() if isinstance(v, dict) and "solution" in v and "is_correct" in v]
        correct = [s["solution"] for s in sols if s["is_correct"]]
        wrong = [s["solution"] for s in sols if not s["is_correct"]]
        pairs = [{"id": f"gsm8k-{lineno - 1:04d}-{i}-{j}", "prompt": row["question"], "chosen": c, "rejected": w}
                 for i, c in enumerate(correct) for j, w in enumerate(wrong)]
        if pairs:
            problems.append((_sha1(row["question"]), lineno, row, pairs))
    problems.sort(key=lambda p: (p[0], p[1]))
    return problems, int(round(len(problems) * GSM8K_TRAIN_SHARE))


def load_gsm8k_pairs(data_dir=None, split="all"):
    """Correct/incorrect model solutions of the same GSM8K test problem (every correct x incorrect combination).

    Problems (not pairs) are split: sorted by SHA-1 of the question, the first 80% are train.
    """
    problems, n_train = _gsm8k_problems(data_dir)
    chosen_problems = _take_split(problems, split, n_train, "gsm8k-pairs")
    chosen_pairs = [pair for *_, pairs in chosen_problems for pair in pairs]
    return chosen_pairs, 0, sum(len(pairs) for *_, pairs in problems)


def load_gsm8k_heldout_prompts(data_dir=None):
    """gsm8k:heldout: the held-out problems of the gsm8k-pairs split, once each, with GSM8K's own answer
    (steps and "#### N") as the reference. No RM trained on gsm8k-pairs:train has seen one of them."""
    problems, n_train = _gsm8k_problems(data_dir)
    path = data_file("gsm8k/test.jsonl", data_dir)
    answers = {r["question"]: r["answer"] for _, r in read_jsonl(path, required=("question", "answer"))}
    return [{"id": f"gsm8k-{lineno - 1:04d}", "prompt": row["question"],
             "reference": answers.get(row["question"], row.get("ground_truth"))}
            for _, lineno, row, _ in problems[n_train:]]


# ---------------------------------------------------------------------------------------------- pairs

@records_checksums
def load_pairs(spec, data_dir=None, on_error="raise", stats=None, subset=None, fraction=None, seed=0):
    """Pairs from a named set ("hh-rlhf:train") or a pairs JSONL file. Returns a list of dicts.

    stats (a dict) receives read / skipped counts. subset: hh-rlhf-hub subsets (comma list); fraction: keep
    a seeded uniform share of the pairs (any source).
    """
    stats = stats if stats is not None else {}
    name, _, split = spec.partition(":")
    if subset and name != "hh-rlhf-hub":
        raise DataError(f"{spec}: --subset applies to hh-rlhf-hub only")
    if os.path.exists(spec) or name not in ("hh-rlhf", "hh-rlhf-hub", "gsm8k-pairs", "tldr-hub", "math-pairs-hub"):
        # An empty reply is a legitimate side of a preference (the real HH data has one), so chosen and
        # rejected must be strings but may be empty; the prompt may not.
        rows = [row for _, row in read_rows(spec, "pairs", nonempty=("prompt",), strings=("chosen", "rejected"),
                                            on_error=on_error, stats=stats)]
        return sample_fraction(rows, fraction, seed)
    if name == "hh-rlhf":
        pairs, skipped, total = load_hh_rlhf(data_dir, split or "all")
    elif name == "hh-rlhf-hub":
        pairs, skipped, total = load_hh_rlhf_hub(split or "test", subset)
    elif name == "tldr-hub":
        pairs, skipped, total = load_tldr_comparisons_hub(split or "train")
    elif name == "math-pairs-hub":
        pairs, skipped, total = load_math_pairs_hub(split or "train")
    else:
        pairs, skipped, total = load_gsm8k_pairs(data_dir, split or "all")
    stats["read"] = total  # rows of the whole set; the split keeps len(pairs) of the usable ones
    stats["skipped"] = skipped
    if skipped:
        stats["skip_reasons"] = {"rows without a usable pair": skipped}
    return sample_fraction(pairs, fraction, seed)


# ---------------------------------------------------------------------------------------------- prompt sets

@records_checksums
def load_prompts(spec, data_dir=None, limit=None, advbench_prefill=False, offset=0):
    """Prompts from a named set or a JSONL file with "id" and "prompt". Rows may carry "reference"/"target".
    offset, limit: the prompts after the first `offset`, at most `limit` of them."""
    name, _, split = spec.partition(":")
    if os.path.exists(spec):
        rows = [row for _, row in read_rows(spec, "prompts", nonempty=("prompt",))]
    elif name in ("hh-rlhf", "hh-rlhf-hub", "gsm8k-pairs", "tldr-hub", "math-pairs-hub"):
        rows = [{"id": p["id"], "prompt": p["prompt"]} for p in load_pairs(spec, data_dir)]
    elif name == "hh-redteam-hub":
        rows = load_redteam_prompts_hub()
    elif name == "hh-helpful":
        path = data_file("dove_tldr_helpful/anthropic_helpful_test.jsonl", data_dir)
        rows = [{"id": f"hh-helpful-{n - 1:03d}", "prompt": r["instruction"], "reference": r["gold_response"]}
                for n, r in read_jsonl(path, nonempty=("instruction",))]
    elif name == "tldr":
        path = data_file("dove_tldr_helpful/tldr_test.jsonl", data_dir)
        rows = [{"id": f"tldr-{r['instruction_id']}", "prompt": tldr_prompt(r), "reference": r["gold_response"]}
                for _, r in read_jsonl(path, nonempty=("instruction",))]
    elif name == "advbench":
        path = data_file("advbench/harmful_behaviors.jsonl", data_dir)
        rows = [{"id": r["id"], "prompt": r["goal"], "target": r["target"]}
                for _, r in read_jsonl(path, nonempty=("goal",))]
        if advbench_prefill:
            for r in rows:
                r["prefill"] = ADVBENCH_PREFILL
    elif name == "gsm8k" and split == "heldout":
        rows = load_gsm8k_heldout_prompts(data_dir)
    elif name == "gsm8k":
        path = data_file(f"gsm8k/{split or 'test'}.jsonl", data_dir)
        rows = [{"id": f"gsm8k-{split or 'test'}-{n - 1:04d}", "prompt": r["question"],
                 "reference": r["answer"]} for n, r in read_jsonl(path, nonempty=("question",))]
    elif name == "mt-bench":
        path = data_file("mt_bench/question.jsonl", data_dir)
        rows = [{"id": f"mt-bench-{r['question_id']}", "prompt": r["turns"][0], "category": r["category"]}
                for _, r in read_jsonl(path, required=("turns",))]
    else:
        raise DataError(f"{spec}: neither a file nor a known prompt set "
                        "(hh-rlhf:heldout, hh-helpful, advbench, tldr, gsm8k, mt-bench)")
    rows = rows[offset:]
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------------------------------------- contamination

def _normal_text(text):
    return " ".join(str(text).split())


def rm_training_prompts(model_path, data_dir=None):
    """(input spec, set of prompt texts) an RM was trained on, read from the manifest.json that 03_train.py
    writes beside it; (None, None) when that is not known (a hub RM, or an input no longer on disk)."""
    from common.models import training_args  # loads torch: only when an RM is checked

    spec = training_args(model_path).get("input")
    if not spec:
        return None, None
    if os.path.isfile(spec):
        prompts = {_normal_text(row["prompt"]) for _, row in read_jsonl(spec, on_error="skip") if "prompt" in row}
    elif spec.partition(":")[0] in ("hh-rlhf", "gsm8k-pairs"):
        prompts = {_normal_text(p["prompt"]) for p in load_pairs(spec, data_dir)}
    else:
        return spec, None
    return spec, prompts


def check_prompt_overlap(rows, what, rm_paths, data_dir=None, allow=False):
    """Refuse to evaluate an RM on prompts it was trained on (e.g. gsm8k against an RM trained on
    gsm8k-pairs:train, whose problems are GSM8K test problems). rows: dicts with "prompt". Returns the
    number of overlapping rows per RM; raises DataError unless allow."""
    texts = [_normal_text(r["prompt"]) for r in rows]
    found = {}
    for path in rm_paths:
        spec, trained = rm_training_prompts(path, data_dir)
        if trained is None:
            if spec:
                log.warning("%s: its training input %s cannot be read; overlap with %s not checked", path, spec, what)
            continue
        n = sum(t in trained for t in texts)
        found[path] = n
        if n and not allow:
            raise DataError(f"{what}: {n} of {len(texts)} prompts are prompts of {spec}, the training data of "
                            f"the RM {path} (its manifest.json says so); use held-out prompts (e.g. "
                            "gsm8k:heldout, hh-rlhf:heldout) or pass --allow-train-overlap")
        if n:
            log.warning("%s: %d of %d prompts were in the training data of %s (allowed)", what, n, len(texts), path)
    return found


def read_rows(path, what, id_required=False, **checks):
    """[(line, row)] of a JSONL file of rows keyed by "id" (a string or an integer, kept as a string; "line-N"
    where absent unless id_required; anything else, null included, is refused). `checks` go to read_jsonl. A
    repeated id (later lookups by id would skip or overwrite rows) is refused naming both lines, and a file
    without rows is refused too."""
    stats = checks.setdefault("stats", {})
    if id_required:
        checks["required"] = ("id",) + tuple(checks.get("required", ()))
    rows, seen = [], {}
    for lineno, row in read_jsonl(path, ids=("id",), **checks):
        row["id"] = str(row.get("id", f"line-{lineno}"))
        if row["id"] in seen:
            raise DataError(f"{path}:{lineno}: field 'id': {row['id']!r} repeats the id of line {seen[row['id']]}")
        seen[row["id"]] = lineno
        rows.append((lineno, row))
    if not rows:
        skipped = f" ({stats['skipped']} bad lines skipped)" if stats.get("skipped") else ""
        raise DataError(f"{path}: no {what} in the file{skipped}")
    return rows


def tldr_prompt(row):
    return (f"SUBREDDIT: r/{row['subreddit']}\nTITLE: {row['title']}\nPOST: {row['instruction']}\n\n"
            "Summarize the post above in one or two sentences.")
