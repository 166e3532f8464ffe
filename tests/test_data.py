import gzip
import hashlib
import json
import os

import pytest

from common.data import (hh_rows_to_pairs, load_gsm8k_pairs, load_pairs, load_prompts, prompt_to_messages,
                         render_plain, resolve_data_dir, split_hh_dialogue)
from common.io import DataError, ResumableJsonlWriter, read_jsonl


def test_split_hh_dialogue():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert split_hh_dialogue(prompt + " fine, thanks", prompt + " go away") == (prompt, "fine, thanks", "go away")
    # rejected continues with another turn: does not split
    assert split_hh_dialogue(prompt + " ok", prompt + " no\n\nHuman: why?\n\nAssistant: because") is None
    # different prompts
    assert split_hh_dialogue(prompt + " ok", "\n\nHuman: other\n\nAssistant: no") is None


def test_real_hh_split_matches_the_design_rule():
    root = resolve_data_dir()
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
