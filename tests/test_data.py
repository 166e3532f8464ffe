import gzip
import hashlib
import json
import os

import pytest

from common.data import hh_rows_to_pairs, load_gsm8k_pairs, load_pairs, load_prompts, resolve_data_dir, split_hh_dialogue
from common.dialogue import prompt_to_messages, render_plain
from common.io import DataError, ResumableJsonlWriter, read_jsonl
from conftest import real_data_dir


def test_split_hh_dialogue():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert split_hh_dialogue(prompt + " fine, thanks", prompt + " go away") == (prompt, "fine, thanks", "go away")
    # rejected continues with another turn: does not split
    assert split_hh_dialogue(prompt + " ok", prompt + " no\n\nHuman: why?\n\nAssistant: because") is None
    # different prompts
    assert split_hh_dialogue(prompt + " ok", "\n\nHuman: other\n\nAssistant: no") is None


def test_real_hh_split_matches_the_design_rule():
    root = real_data_dir()  # the data folder, or the cache make data filled: where the stages read it
    with gzip.open(os.path.join(root, "hh_rlhf", "harmless-base_test.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2312
    train = load_pairs("hh-rlhf:train")
    heldout = load_pairs("hh-rlhf:heldout")
    assert len(train) == 2000 and len(heldout) == 307
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    # independent re-derivation of the order: SHA-1 of the prompt, ties by row index
    kept = []
    for i, r in enumerate(rows):
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        prompt = r["chosen"][:cut]
        rest = r["rejected"][len(prompt):]
        if r["rejected"].startswith(prompt) and "\n\nAssistant:" not in rest:
            kept.append((hashlib.sha1(prompt.encode()).hexdigest(), i))
    kept.sort()
    assert [p["id"] for p in train] == [f"hh-rlhf-{i:05d}" for _, i in kept[:2000]]
    stats = {}
    load_pairs("hh-rlhf:heldout", stats=stats)
    assert stats["skipped"] == 5 and stats["read"] == 2312


def test_prompt_to_messages_and_plain_rendering():
    prompt = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: tell me a joke\n\nAssistant:"
    msgs = prompt_to_messages(prompt)
    assert msgs == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                    {"role": "user", "content": "tell me a joke"}]
    assert render_plain(msgs) == "Human: hi\n\nAssistant: hello there\n\nHuman: tell me a joke\n\nAssistant:"
    assert prompt_to_messages("Summarize this.") == [{"role": "user", "content": "Summarize this."}]


def test_gsm8k_pairs_split_by_problem():
    train, _, total = load_gsm8k_pairs(split="train")
    heldout, _, _ = load_gsm8k_pairs(split="heldout")
    assert len(train) + len(heldout) == total == 2429
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}


def test_prompt_sets():
    adv = load_prompts("advbench", advbench_prefill=True)
    assert len(adv) == 520 and adv[0]["prefill"] == "Sure here's" and adv[0]["target"].startswith("Sure, here is")
    assert len(load_prompts("mt-bench")) == 80
    tldr = load_prompts("tldr", limit=3)
    assert len(tldr) == 3 and "POST:" in tldr[0]["prompt"] and tldr[0]["reference"]
    gsm = load_prompts("gsm8k", limit=2)
    assert gsm[0]["reference"].strip().splitlines()[-1].startswith("####")
    assert len(load_prompts("hh-rlhf:heldout")) == 307


def test_data_dir_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPRM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SPPRM_CACHE", str(tmp_path / "cache"))  # an empty cache: what make data filled is not seen
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(tmp_path / "no-mirror"))  # and nothing is fetched
    assert resolve_data_dir() == str(tmp_path)
    assert resolve_data_dir("/x/y") == "/x/y"
    with pytest.raises(DataError, match="no such file"):
        load_pairs("hh-rlhf:train")


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', ":2: malformed JSON"),
    (b'{"prompt": "a", "chosen": "b"}\n', ":1: field 'rejected': missing"),
    (b'{"prompt": "", "chosen": "b", "rejected": "c"}\n', ":1: field 'prompt': empty"),
    (b'{"prompt": "a", "chosen": 3, "rejected": "c"}\n', ":1: field 'chosen': expected a string"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff\xfe", "chosen": "b", "rejected": "c"}\n',
     ":2: line is not valid UTF-8"),
    (b'[1, 2]\n', ":1: expected a JSON object"),
])
def test_bad_pairs_give_file_line_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_pairs(str(path))
    assert str(path) + message in str(e.value)
    stats = {}
    if content.count(b"\n") == 1:  # its only line is bad: nothing is left, which is an error too
        with pytest.raises(DataError, match="no pairs in the file .1 bad lines skipped"):
            load_pairs(str(path), on_error="skip", stats=stats)
        return
    pairs = load_pairs(str(path), on_error="skip", stats=stats)
    assert stats["skipped"] == 1 and len(pairs) == stats["read"] - 1


def test_resumable_writer_repairs_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResumableJsonlWriter(str(path)) as w:
        w.write({"id": "a", "x": 1})
        w.write({"id": "b", "x": 2})
    with open(path, "a") as f:
        f.write('{"id": "c", "x"')  # killed mid-write
    w = ResumableJsonlWriter(str(path), resume=True)
    assert w.done == {"a", "b"}
    w.write({"id": "c", "x": 3})
    w.close()
    rows = [r for _, r in read_jsonl(str(path))]
    assert [r["id"] for r in rows] == ["a", "b", "c"]


def test_gsm8k_heldout_prompts_are_the_unseen_problems():
    from common.metrics import gsm8k_correct

    rows = load_prompts("gsm8k:heldout")
    train_problems = {p["prompt"] for p in load_gsm8k_pairs(split="train")[0]}
    heldout_problems = {p["prompt"] for p in load_gsm8k_pairs(split="heldout")[0]}
    assert len(rows) == len({r["prompt"] for r in rows}) == len(heldout_problems) == 146  # 731 problems, 20%
    assert {r["prompt"] for r in rows} == heldout_problems and not heldout_problems & train_problems
    assert all(r["reference"].strip().splitlines()[-1].startswith("####") for r in rows)
    # the reference is GSM8K's own answer: its final number is judged correct against itself
    assert all(gsm8k_correct(r["reference"], r["reference"]) for r in rows[:20])
    assert len({r["id"] for r in rows}) == len(rows)


def test_prompt_overlap_with_an_rms_training_pairs(tmp_path):
    from common.data import check_prompt_overlap, rm_training_prompts
    from conftest import run_script

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "manifest.json").write_text(json.dumps({"args": {"input": "gsm8k-pairs:train"}}))
    spec, trained = rm_training_prompts(str(rm))
    assert spec == "gsm8k-pairs:train" and len(trained) == 585
    # the GSM8K test set holds every training problem of gsm8k-pairs; its held-out prompt set none
    with pytest.raises(DataError, match="585 of 1319 prompts are prompts of gsm8k-pairs:train"):
        check_prompt_overlap(load_prompts("gsm8k"), "gsm8k", [str(rm)])
    assert check_prompt_overlap(load_prompts("gsm8k"), "gsm8k", [str(rm)], allow=True) == {str(rm): 585}
    assert check_prompt_overlap(load_prompts("gsm8k:heldout"), "gsm8k:heldout", [str(rm)]) == {str(rm): 0}
    # a file input: its rows' prompts (whitespace-normalised) count
    rows = tmp_path / "pairs.jsonl"
    rows.write_text(json.dumps({"prompt": "  What is\n2+2? ", "chosen": "4", "rejected": "5"}) + "\n")
    (rm / "manifest.json").write_text(json.dumps({"args": {"input": str(rows)}}))
    assert check_prompt_overlap([{"prompt": "What is 2+2?"}, {"prompt": "x"}], "p", [str(rm)], allow=True) == {str(rm): 1}
    # an RM without a manifest (a hub RM) is not checked
    assert check_prompt_overlap([{"prompt": "x"}], "p", [str(tmp_path)]) == {}
    # 04 refuses before any model loads, in one line
    (rm / "manifest.json").write_text(json.dumps({"args": {"input": "gsm8k-pairs:train"}}))
    proc = run_script("04_decode.py", "--prompts", "gsm8k", "--rm", rm, "--method", "argsg",
                      "--output", tmp_path / "g.jsonl", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: gsm8k: 585 of 1319 prompts")
    assert "Traceback" not in proc.stderr


@pytest.fixture
def hub_mirror(tmp_path, monkeypatch):
    """Local copies of the hub data sets, with the hub's folders, file names, splits and row fields."""
    from datasets import Dataset

    root = tmp_path / "mirror"

    def gz(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    def dialogue(q, a):
        return f"\n\nHuman: {q}\n\nAssistant: {a}"
    for subset in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"):
        for split, n in (("train", 10), ("test", 3)):
            gz(root / "Anthropic/hh-rlhf" / subset / f"{split}.jsonl.gz",
               [{"chosen": dialogue(f"{subset} {split} q{i}", "good"), "rejected": dialogue(f"{subset} {split} q{i}", "bad")}
                for i in range(n)])
    gz(root / "Anthropic/hh-rlhf/red-team-attempts/red_team_attempts.jsonl.gz",
       [{"transcript": dialogue(f"how do I do harm {i % 3}", "I can't help with that.") + "\n\nHuman: please",
         "min_harmlessness_score_transcript": -1.0, "num_params": "52B", "model_type": "plain lm", "rating": 2.0,
         "task_description": "harm", "task_descripton_harmlessness_score": 0.1, "red_team_member_id": 7,
         "is_upworker": False, "tags": None} for i in range(5)])
    comparisons = [{"info": {"id": f"t3_{i}", "post": f"My long post {i}", "title": f"Title {i}", "subreddit": "tifu",
                             "article": None, "site": None},
                    "summaries": [{"text": f" summary A{i} ", "policy": "sup", "note": None},
                                  {"text": f"summary B{i}", "policy": "ppo", "note": None}],
                    "choice": i % 2, "worker": "w", "batch": "b1", "split": "train", "extra": {"confidence": 5}}
                   for i in range(4)]
    (root / "openai/summarize_from_feedback/comparisons").mkdir(parents=True)
    Dataset.from_list(comparisons).to_parquet(str(root / "openai/summarize_from_feedback/comparisons/train-00000-of-00001.parquet"))
    Dataset.from_list(comparisons[:2]).to_parquet(str(root / "openai/summarize_from_feedback/comparisons/validation-00000-of-00001.parquet"))
    math = [{"chosen": [{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": f"{2 * i}"}],
             "rejected": [{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": f"{2 * i + 1}"}]}
            for i in range(5)]
    math.append({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                 "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "c"}]})
    (root / "RLHFlow/Deepseek-ORM-Data-Pairwise/data").mkdir(parents=True)
    Dataset.from_list(math).to_parquet(str(root / "RLHFlow/Deepseek-ORM-Data-Pairwise/data/train-00000-of-00001.parquet"))
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(root))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return root


def test_hub_adapters_on_local_copies(hub_mirror):
    stats = {}
    everything = load_pairs("hh-rlhf-hub:train", stats=stats)
    assert len(everything) == 40 and stats["read"] == 40  # all four preference subsets
    assert {p["id"].rsplit("-", 2)[0] for p in everything} >= {"hh-rlhf-hub-helpful-online"}
    assert all(p["chosen"] == "good" and p["rejected"] == "bad" and p["prompt"].endswith("\n\nAssistant:")
               for p in everything)
    harmless = load_pairs("hh-rlhf-hub:test", subset="harmless-base")
    assert len(harmless) == 3 and all("harmless-base test" in p["prompt"] for p in harmless)
    # a seeded 20% share, in order, the same for the same seed
    share = load_pairs("hh-rlhf-hub:train", fraction=0.2, seed=1)
    assert len(share) == 8 and share == load_pairs("hh-rlhf-hub:train", fraction=0.2, seed=1)
    assert share != load_pairs("hh-rlhf-hub:train", fraction=0.2, seed=2)
    order = {p["id"]: k for k, p in enumerate(everything)}
    assert [order[p["id"]] for p in share] == sorted(order[p["id"]] for p in share)
    with pytest.raises(DataError, match="unknown subset"):
        load_pairs("hh-rlhf-hub:train", subset="harmless")
    # TL;DR comparisons: summaries[choice] is chosen
    tldr = load_pairs("tldr-hub:train")
    assert [p["chosen"] for p in tldr] == ["summary A0", "summary B1", "summary A2", "summary B3"]
    assert [p["rejected"] for p in tldr] == ["summary B0", "summary A1", "summary B2", "summary A3"]
    assert tldr[0]["prompt"].startswith("SUBREDDIT: r/tifu\nTITLE: Title 0\nPOST: My long post 0")
    assert len(load_pairs("tldr-hub:validation")) == 2
    # pairwise math: the shared question is the prompt; a row whose turns differ is skipped and counted
    stats = {}
    math = load_pairs("math-pairs-hub:train", stats=stats)
    assert len(math) == 5 and stats["skipped"] == 1
    assert math[3] == {"id": "math-pairs-hub-train-0000003", "prompt": "What is 3+3?", "chosen": "6", "rejected": "7"}
    # red-team requests as a prompt set, one per distinct request
    red = load_prompts("hh-redteam-hub")
    assert [r["prompt"] for r in red] == [f"\n\nHuman: how do I do harm {i}\n\nAssistant:" for i in range(3)]


def test_hub_sets_without_network_or_mirror_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="SPPRM_HUB_MIRROR"):
        load_pairs("tldr-hub:train")


@pytest.mark.parametrize("bad_id,named", [("null", "null"), ('{"a": 1}', "object"), ("[1]", "array"),
                                          ("1.5", "number"), ("true", "true/false")])
def test_an_id_that_is_not_a_string_or_an_integer_is_refused(tmp_path, bad_id, named):
    """Pairs, prompts and generations readers: an id is a string or an integer; null or an object would become
    the string "None" or "{'a': 1}" and match the wrong rows."""
    from common.data import read_rows

    good = '{"id": 7, "prompt": "p", "chosen": "a", "rejected": "b", "response": "r"}\n'
    path = tmp_path / "rows.jsonl"
    path.write_text(good + good.replace('"id": 7', f'"id": {bad_id}'))
    expected = f"{path}:2: field 'id': expected a string or an integer, got {named}"
    with pytest.raises(DataError) as pairs:
        load_pairs(str(path))
    with pytest.raises(DataError) as prompts:
        load_prompts(str(path))
    assert str(pairs.value) == str(prompts.value) == expected
    with pytest.raises(DataError) as generations:  # 05 reads generations with the id required
        read_rows(str(path), "generations", id_required=True, nonempty=("prompt",), strings=("response",))
    assert str(generations.value) == (f"{path}:2: field 'id': missing" if bad_id == "null" else expected)
    # --on-error skip counts it and keeps the good row, its integer id as a string
    stats = {}
    assert [p["id"] for p in load_pairs(str(path), on_error="skip", stats=stats)] == ["7"]
    assert stats["skipped"] == 1
