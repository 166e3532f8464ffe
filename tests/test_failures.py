"""Bad input, kills and reruns: each probe ends in a correct result or one `error:` line with exit code 2,
no traceback, and no earlier output changed."""
import importlib.util
import json
import os
import sys

import pytest

from conftest import ROOT, real_data_dir, run_script, save_tiny_rm, separable_pairs, write_jsonl
from test_evaluate import ScriptedServer, prefer_reply_containing
from test_search import save_tiny_policy


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fails_cleanly(proc, *words):
    """Exit 2, one `error:` line, no traceback; the message holds the given words."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("models")
    policy = save_tiny_policy(root / "policy", smol_tokenizer)
    rm = save_tiny_rm(root / "rm", "llama", smol_tokenizer, seed=1)
    ref = save_tiny_rm(root / "ref", "llama", smol_tokenizer, seed=2)
    # a plain backbone: no score head in the checkpoint
    from transformers import AutoModel

    AutoModel.from_pretrained(rm).save_pretrained(root / "backbone")
    smol_tokenizer.save_pretrained(root / "backbone")
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"id": f"p{i}", "prompt": f"\n\nHuman: Question {i}: what is {i} + {i}?\n\nAssistant:"} for i in range(4)])
    return {"policy": policy, "rm": rm, "ref": ref, "backbone": str(root / "backbone"),
            "prompts": prompts}


# 1. unparsable judge verdicts leave the denominator, are counted (and asked again on a rerun), and fail past a share
def test_unparsable_verdicts_are_counted_not_ties(tmp_path):
    rows = [{"id": f"g{i}", "prompt": f"Tell me about {i}", "response": f"good answer {i}" if i < 3 else "x"}
            for i in range(6)]
    base = [{**r, "response": f"plain answer {r['id']}"} for r in rows]
    gen, baseline = write_jsonl(tmp_path / "gen.jsonl", rows), write_jsonl(tmp_path / "base.jsonl", base)
    judge = prefer_reply_containing("good")

    def sometimes_garbage(body):  # no verdict for the pairs about 4 and 5
        text = body["messages"][-1]["content"]
        return "no idea" if ("about 4" in text or "about 5" in text) else judge(body)

    with ScriptedServer(default=sometimes_garbage) as server:
        common = ["metrics", "--generations", gen, "--baseline", baseline, "--metrics", "winrate",
                  "--judge-url", server.url, "--judge-model", "m", "--judge-cache", tmp_path / "cache" / "v.jsonl"]
        proc = run_script("05_evaluate.py", *common, "--output", tmp_path / "m.json", check=False)
        fails_cleanly(proc, "2 of 6", "--max-unparsable")
        assert not os.path.exists(tmp_path / "m.json")
        for out in ("m.json", "again.json"):  # the second run takes the parsable verdicts from the cache
            run_script("05_evaluate.py", *common, "--output", tmp_path / out, "--max-unparsable", 0.5)
            m = json.load(open(tmp_path / out))
            assert m["n_judged"] == 4 and m["unparsable"] == 2
            assert m["win"] == 0.75 and m["tie"] == 0.25 and m["win_rate"] == 0.875


# 2. 02's cached reference scores are keyed by reference weights, max length and texts, not by row id
def test_weight_resume_rescoring_when_reference_or_texts_change(tmp_path, models):
    pairs = separable_pairs(6)
    partial = tmp_path / "partial.jsonl"
    run_script("01_build_partial.py", "--input", write_jsonl(tmp_path / "p.jsonl", pairs), "--output", partial,
               "--tokenizer", models["rm"], "--truncation", "full")
    out = tmp_path / "w.jsonl"
    run_script("02_weight.py", "--input", partial, "--output", out, "--ref-rm", models["rm"], "--resume")
    first = read(out)
    run_script("02_weight.py", "--input", partial, "--output", out, "--ref-rm", models["ref"], "--resume")
    other = read(out)
    assert [r["ref_chosen"] for r in first] != [r["ref_chosen"] for r in other]
    run_script("02_weight.py", "--input", partial, "--output", tmp_path / "fresh.jsonl", "--ref-rm", models["ref"])
    fresh = read(tmp_path / "fresh.jsonl")
    assert [r["ref_chosen"] for r in fresh] == pytest.approx([r["ref_chosen"] for r in other], abs=1e-5)
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in read(partial)]  # same ids
    write_jsonl(partial, swapped)
    run_script("02_weight.py", "--input", partial, "--output", out, "--ref-rm", models["ref"], "--resume")
    flipped = read(out)
    assert [r["ref_chosen"] for r in flipped] == pytest.approx([r["ref_rejected"] for r in other], abs=1e-5)


# 3. a backbone is not a reward model: scoring stages refuse a freshly initialised head
def test_custom_reward_heads_load_or_are_refused(tmp_path, smol_tokenizer):
    """A checkpoint storing its head under its own name (UltraRM's regression_head) loads that head; a head
    of the wrong shape is refused, never replaced by a random one."""
    import torch
    from safetensors.torch import load_file, save_file

    from common.io import DataError
    from common.models import load_reward_model
    from common.rewards import RMFormat, score

    src = save_tiny_rm(tmp_path / "rm", "llama", smol_tokenizer)
    model = load_reward_model(src, tokenizer=smol_tokenizer)
    fmt = RMFormat(smol_tokenizer, model)
    expected = score(model, fmt, ["Hi", "Hello there"], ["a reply", "another"], 2)
    weights = load_file(os.path.join(src, "model.safetensors"))
    for new_name, tensor, ok in (("regression_head.weight", weights["score.weight"], True),
                                 ("v_head.summary.weight", weights["score.weight"], True),
                                 ("regression_head.weight", torch.zeros(2, weights["score.weight"].shape[1]), False)):
        custom = {k: v for k, v in weights.items() if k != "score.weight"}
        custom[new_name] = tensor
        save_file(custom, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
        if ok:
            loaded = load_reward_model(src, tokenizer=smol_tokenizer)
            assert score(loaded, fmt, ["Hi", "Hello there"], ["a reply", "another"], 2) == pytest.approx(expected, abs=1e-5)
        else:
            with pytest.raises(DataError, match="not a trained reward model"):
                load_reward_model(src, tokenizer=smol_tokenizer)


def test_random_score_heads_are_refused(tmp_path, models):
    partial = tmp_path / "partial.jsonl"
    run_script("01_build_partial.py", "--input", write_jsonl(tmp_path / "p.jsonl", separable_pairs(3)),
               "--output", partial, "--tokenizer", models["rm"], "--truncation", "full")
    proc = run_script("02_weight.py", "--input", partial, "--output", tmp_path / "w.jsonl", "--ref-rm",
                      models["backbone"], check=False)
    fails_cleanly(proc, "not a trained reward model")
    proc = run_script("04_decode.py", "--prompts", models["prompts"], "--policy", models["policy"], "--rm",
                      models["backbone"], "--method", "argsg", "--k", 2, "--max-new-tokens", 2,
                      "--output", tmp_path / "g.jsonl", check=False)
    fails_cleanly(proc, "not a trained reward model")
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"id": "a", "prompt": "hi", "response": "hello"}])
    proc = run_script("05_evaluate.py", "metrics", "--generations", gen, "--metrics", "reward", "--rm",
                      models["backbone"], "--output", tmp_path / "m.json", check=False)
    fails_cleanly(proc, "not a trained reward model")
    # training may start from a backbone, and says so
    proc = run_script("03_train.py", "--input", write_jsonl(tmp_path / "t.jsonl", separable_pairs(4)), "--init",
                      models["backbone"], "--output", tmp_path / "rm", "--lr", 1e-4)
    assert "starting from a backbone" in proc.stderr


# 4. resumes refuse rows or checkpoints made with other settings
def test_resume_refuses_other_settings(tmp_path, models):
    common = ["--prompts", models["prompts"], "--policy", models["policy"], "--max-new-tokens", 3,
              "--output", tmp_path / "g.jsonl", "--resume"]
    run_script("04_decode.py", *common, "--method", "greedy")
    before = (tmp_path / "g.jsonl").read_bytes()
    proc = run_script("04_decode.py", *common, "--method", "sample", check=False)
    fails_cleanly(proc, "method: 'greedy' then, 'sample' now")
    proc = run_script("04_decode.py", *common, "--method", "argsg", "--rm", models["rm"], "--k", 2, check=False)
    fails_cleanly(proc, "method")
    assert (tmp_path / "g.jsonl").read_bytes() == before
    data = write_jsonl(tmp_path / "t.jsonl", separable_pairs(32))
    train = ["--input", data, "--init", models["rm"], "--output", tmp_path / "rm", "--save-steps", 1,
             "--batch-size", 4]
    run_script("03_train.py", *train, "--lr", 1e-3, "--stop-after-steps", 2)
    proc = run_script("03_train.py", *train, "--lr", 2e-3, "--resume", check=False)
    fails_cleanly(proc, "lr: 0.001 then, 0.002 now")
    write_jsonl(data, separable_pairs(32, seed=5))
    proc = run_script("03_train.py", *train, "--lr", 1e-3, "--resume", check=False)
    fails_cleanly(proc, "input:")


# 5. a partial generations file is refused (or evaluated with a loud warning)
def test_partial_generations_are_refused(tmp_path, models):
    out = tmp_path / "g.jsonl"
    run_script("04_decode.py", "--prompts", models["prompts"], "--policy", models["policy"], "--method", "greedy",
               "--max-new-tokens", 3, "--output", out)
    rows = read(out)
    write_jsonl(out, rows[:2])  # as if two rows were lost; the manifest says 4
    args = ["metrics", "--generations", out, "--metrics", "length", "--output", tmp_path / "m.json"]
    fails_cleanly(run_script("05_evaluate.py", *args, check=False), "2 rows of 4", "--allow-partial")
    proc = run_script("05_evaluate.py", *args, "--allow-partial")
    assert "WARNING" in proc.stderr and json.load(open(tmp_path / "m.json"))["n"] == 2
    partial = write_jsonl(tmp_path / "x.jsonl.partial", rows[:1])
    fails_cleanly(run_script("05_evaluate.py", "metrics", "--generations", partial, "--metrics", "length",
                             "--output", tmp_path / "p.json", check=False), "partial")


# 6. a failed or killed rerun leaves the earlier output as it was (a training run's model too, until its own is
# complete)
def test_failed_reruns_keep_earlier_outputs(tmp_path, models):
    out = tmp_path / "g.jsonl"
    common = ["--prompts", models["prompts"], "--policy", models["policy"], "--max-new-tokens", 3, "--output", out]
    run_script("04_decode.py", *common, "--method", "greedy")
    before = out.read_bytes()
    proc = run_script("04_decode.py", *common, "--method", "argsg", "--rm", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and out.read_bytes() == before
    data = write_jsonl(tmp_path / "t.jsonl", separable_pairs(16))
    rm = tmp_path / "rm"
    run_script("03_train.py", "--input", data, "--init", models["rm"], "--output", rm, "--lr", 1e-3)
    finished = {name: (rm / name).read_bytes() for name in os.listdir(rm) if os.path.isfile(rm / name)}
    assert {"config.json", "model.safetensors", "manifest.json", "train_log.jsonl"} <= set(finished)
    rerun = ["03_train.py", "--input", data, "--init", models["rm"], "--output", rm, "--lr", 2e-3, "--save-steps", 1]
    run_script(*rerun, "--stop-after-steps", 1)  # a rerun killed after one step
    assert {name: (rm / name).read_bytes() for name in finished} == finished  # the earlier model, as it was
    assert json.load(open(rm / "manifest.json"))["fingerprint"]["lr"] == 1e-3
    assert os.path.exists(rm / "train_log.jsonl.partial") and os.path.exists(rm / "checkpoint")
    run_script("05_evaluate.py", "metrics", "--generations", out, "--metrics", "reward", "--rm", rm,
               "--output", tmp_path / "m.json")  # still a whole model
    run_script(*rerun, "--resume")  # the rerun completes and its model replaces the earlier one
    assert json.load(open(rm / "manifest.json"))["fingerprint"]["lr"] == 2e-3
    assert (rm / "model.safetensors").read_bytes() != finished["model.safetensors"]
    assert not {"checkpoint", "train_log.jsonl.partial", ".final.tmp"} & set(os.listdir(rm))


# 7. output == input is refused and the input kept
def test_output_equal_to_input_is_refused(tmp_path, models):
    pairs = write_jsonl(tmp_path / "p.jsonl", separable_pairs(3))
    before = open(pairs, "rb").read()
    fails_cleanly(run_script("01_build_partial.py", "--input", pairs, "--output", pairs, "--tokenizer", models["rm"],
                             check=False), "is the input")
    fails_cleanly(run_script("04_decode.py", "--prompts", pairs, "--policy", models["policy"], "--method", "greedy",
                             "--output", pairs, check=False), "is the input")
    fails_cleanly(run_script("05_evaluate.py", "metrics", "--generations", pairs, "--metrics", "length",
                             "--output", pairs, check=False), "is the input")
    assert open(pairs, "rb").read() == before


# 8. a blank line in a resumable output is skipped, not the end of the rows
def test_blank_line_in_a_resumable_output(tmp_path):
    from common.io import ResumableJsonlWriter

    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": "c"')
    with ResumableJsonlWriter(str(path), resume=True) as w:
        assert w.done == {"a", "b"}
        w.write({"id": "c"})
    assert [r["id"] for r in read(path)] == ["a", "b", "c"]


# 9. numeric arguments are checked by argparse, before any model loads
BAD_ARGS = [
    ("01_build_partial.py", ["--K", "-3"]), ("01_build_partial.py", ["--K", "0"]),
    ("01_build_partial.py", ["--limit", "-1"]),
    ("02_weight.py", ["--entropy-floor", "0"]), ("02_weight.py", ["--max-length", "0"]),
    ("02_weight.py", ["--batch-size", "0"]),
    ("03_train.py", ["--grad-accum", "-1"]), ("03_train.py", ["--epochs", "0"]), ("03_train.py", ["--lr", "-1"]),
    ("03_train.py", ["--batch-size", "0"]), ("03_train.py", ["--eval-prefix-lengths", "-5,0"]),
    ("03_train.py", ["--lr", "nan"]),
    ("04_decode.py", ["--k", "0"]), ("04_decode.py", ["--beam", "0"]), ("04_decode.py", ["--successors", "0"]),
    ("04_decode.py", ["--n", "0"]), ("04_decode.py", ["--chunk", "0"]), ("04_decode.py", ["--max-new-tokens", "-1"]),
    ("04_decode.py", ["--temperature", "-1"]), ("04_decode.py", ["--top-p", "0"]),
    ("05_evaluate.py", ["agreement", "--prefix-lengths", "-5,0"]), ("05_evaluate.py", ["metrics", "--max-length", "0"]),
]
REQUIRED = {"01_build_partial.py": ["--input", "x", "--output", "y", "--tokenizer", "t"],
            "02_weight.py": ["--input", "x", "--output", "y", "--ref-rm", "r"],
            "03_train.py": ["--input", "x", "--init", "i", "--output", "o"],
            "04_decode.py": ["--prompts", "x", "--method", "argsg", "--output", "o"],
            "05_evaluate.py": []}


@pytest.mark.parametrize("script,bad", BAD_ARGS)
def test_numeric_arguments_are_checked(script, bad, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(f"stage_{script[:2]}", os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if script == "05_evaluate.py":
        sub = bad[0]
        argv = [sub] + (["--pairs", "x", "--rm", "r", "--output", "o"] if sub == "agreement"
                        else ["--generations", "g", "--output", "o"]) + bad[1:]
    else:
        argv = REQUIRED[script] + bad
    monkeypatch.setattr(sys, "argv", [script] + argv)
    with pytest.raises(SystemExit) as e:
        module.parse_args()
    assert e.value.code == 2 and "expected" in capsys.readouterr().err


def test_k_above_the_vocabulary(tmp_path, models):
    proc = run_script("04_decode.py", "--prompts", models["prompts"], "--policy", models["policy"], "--rm",
                      models["rm"], "--method", "argsg", "--k", 10 ** 7, "--output", tmp_path / "g.jsonl", check=False)
    fails_cleanly(proc, "vocabulary")


# 10. expected failures are one line, not a traceback
def test_expected_failures_are_one_line(tmp_path, models):
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"id": "a", "prompt": "hi", "response": "hello"}])
    metrics = ["05_evaluate.py", "metrics", "--generations", gen, "--metrics", "reward", "--output", tmp_path / "m.json"]
    fails_cleanly(run_script(*metrics, "--rm", "no-such-alias", check=False), "no-such-alias")
    fails_cleanly(run_script(*metrics, "--rm", tmp_path, check=False), "not a model folder")
    fails_cleanly(run_script(*metrics, "--rm", gen, check=False), "not a model folder")
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"id": "a", "t": "abc", "prompt": "p", "chosen": "c",
                                                        "rejected": "r"}])
    fails_cleanly(run_script("02_weight.py", "--input", partial, "--output", tmp_path / "w.jsonl", "--ref-rm",
                             models["rm"], check=False), "field 't'")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "hi", "response": 12}])
    fails_cleanly(run_script("05_evaluate.py", "metrics", "--generations", bad, "--metrics", "length", "--output",
                             tmp_path / "b.json", check=False), "field 'response'")
    null_stats = write_jsonl(tmp_path / "ns.jsonl", [{"id": "a", "prompt": "hi", "response": "x", "stats": None}])
    run_script("05_evaluate.py", "metrics", "--generations", null_stats, "--metrics", "length", "--output",
               tmp_path / "ns.json")
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"id": "a", "prompt": "p", "chosen": "c", "rejected": "r", "extra": NaN}\n')
    fails_cleanly(run_script("01_build_partial.py", "--input", nan, "--output", tmp_path / "o.jsonl",
                             "--tokenizer", models["rm"], check=False), "NaN")
    with ScriptedServer(script=[(401, None)]) as server:
        base = write_jsonl(tmp_path / "base.jsonl", [{"id": "a", "prompt": "hi", "response": "yo"}])
        fails_cleanly(run_script("05_evaluate.py", "metrics", "--generations", gen, "--baseline", base, "--metrics",
                                 "winrate", "--judge-url", server.url, "--judge-model", "m", "--output",
                                 tmp_path / "w.json", check=False), "HTTP 401")
    fails_cleanly(run_script("05_evaluate.py", "metrics", "--generations", gen, "--baseline", gen, "--metrics",
                             "winrate", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                             "--judge-retries", 0, "--output", tmp_path / "w.json", check=False), "unreachable")


# 11. empty input is a clear error in every stage
def test_empty_input_is_an_error(tmp_path, models):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "o.jsonl"
    fails_cleanly(run_script("01_build_partial.py", "--input", empty, "--output", out, "--tokenizer", models["rm"],
                             check=False), "no pairs")
    fails_cleanly(run_script("02_weight.py", "--input", empty, "--output", out, "--ref-rm", models["rm"],
                             check=False), "no partial pairs")
    fails_cleanly(run_script("03_train.py", "--input", empty, "--init", models["rm"], "--output", tmp_path / "rm",
                             check=False), "no pairs")
    fails_cleanly(run_script("04_decode.py", "--prompts", empty, "--policy", models["policy"], "--method", "greedy",
                             "--output", out, check=False), "no prompts")
    fails_cleanly(run_script("05_evaluate.py", "metrics", "--generations", empty, "--metrics", "length",
                             "--output", tmp_path / "m.json", check=False), "no generations")
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".manifest.json")


# 12. duplicate ids are refused with both line numbers
def test_duplicate_ids_are_refused(tmp_path, models):
    pairs = separable_pairs(3)
    pairs[2]["id"] = pairs[0]["id"]
    dup = write_jsonl(tmp_path / "dup.jsonl", pairs)
    for proc in (run_script("01_build_partial.py", "--input", dup, "--output", tmp_path / "o.jsonl", "--tokenizer",
                            models["rm"], check=False),
                 run_script("03_train.py", "--input", dup, "--init", models["rm"], "--output", tmp_path / "rm",
                            check=False),
                 run_script("04_decode.py", "--prompts", dup, "--policy", models["policy"], "--method", "greedy",
                            "--output", tmp_path / "g.jsonl", check=False)):
        fails_cleanly(proc, ":3:", "line 1")
    gens = write_jsonl(tmp_path / "gens.jsonl", [{"id": "a", "prompt": "p", "response": "x"},
                                                  {"id": "a", "prompt": "p", "response": "y"}])
    fails_cleanly(run_script("05_evaluate.py", "metrics", "--generations", gens, "--metrics", "length",
                             "--output", tmp_path / "m.json", check=False), ":2:", "line 1")


# 13. the judge: timeout from the command line, Retry-After capped, the cache folder created
def test_judge_timeout_retry_after_and_cache_folder(tmp_path, monkeypatch):
    import time

    from common.judge import ChatJudge

    sleeps = []
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s))
    with ScriptedServer(default=lambda body: '{"verdict": "1"}') as server:
        judge = ChatJudge(server.url, "m", cache_path=str(tmp_path / "new" / "folder" / "c.jsonl"), timeout=7,
                          max_wait=5)
        assert judge.timeout == 7 and judge.compare("p", "a", "b") == "1"
        assert os.path.exists(tmp_path / "new" / "folder" / "c.jsonl")
    import urllib.error

    class Busy(urllib.error.HTTPError):
        def __init__(self):
            super().__init__("u", 429, "busy", {"Retry-After": "3600"}, None)

    def busy(*a, **k):
        raise Busy()
    monkeypatch.setattr("urllib.request.urlopen", busy)
    judge = ChatJudge("http://127.0.0.1:9/v1", "m", max_retries=2, max_wait=5)
    with pytest.raises(Exception):
        judge.compare("p", "a", "b")
    assert sleeps and max(sleeps) == 5


# 14. checkpoints load with weights_only, outputs get the usual mode, a resumed log has no repeated steps
def test_output_mode_and_resumed_log(tmp_path, models):
    data = write_jsonl(tmp_path / "t.jsonl", separable_pairs(32))
    common = ["--input", data, "--init", models["rm"], "--output", tmp_path / "rm", "--lr", 1e-3, "--batch-size", 4,
              "--save-steps", 2, "--log-steps", 1]
    run_script("03_train.py", *common, "--stop-after-steps", 3)
    run_script("03_train.py", *common, "--resume")
    steps = [e["step"] for e in read(tmp_path / "rm" / "train_log.jsonl") if "loss" in e]
    assert steps == list(range(1, 9))
    out = tmp_path / "p.jsonl"
    run_script("01_build_partial.py", "--input", data, "--output", out, "--tokenizer", models["rm"],
               "--truncation", "full")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
    assert "weights_only=True" in open(os.path.join(ROOT, "common", "runtime.py")).read()


# 15. the second round of fault probes
def test_resume_into_a_finished_folder_of_another_run(tmp_path, models):
    """03 --resume into a folder whose finished model came from other input is refused and changes nothing;
    with the same input and settings there is nothing to do; every file follows the umask."""
    import hashlib

    first = write_jsonl(tmp_path / "a.jsonl", separable_pairs(16))
    other = write_jsonl(tmp_path / "b.jsonl", separable_pairs(16, seed=5))
    common = ["--init", models["rm"], "--output", tmp_path / "rm", "--lr", 1e-3, "--batch-size", 4, "--resume"]
    run_script("03_train.py", "--input", first, *common)
    weights = tmp_path / "rm" / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    listing = sorted(os.listdir(tmp_path / "rm"))
    fails_cleanly(run_script("03_train.py", "--input", other, *common, check=False), "finished model",
                  "other inputs or settings", "input")
    fails_cleanly(run_script("03_train.py", "--input", first, *common[:-1], "--lr", 5e-4, "--resume", check=False),
                  "lr")
    proc = run_script("03_train.py", "--input", first, *common)
    assert "nothing to do" in proc.stderr
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest and sorted(os.listdir(tmp_path / "rm")) == listing
    umask = os.umask(0)
    os.umask(umask)
    for name in listing:
        if os.path.isfile(tmp_path / "rm" / name):
            assert os.stat(tmp_path / "rm" / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_second_writer_is_refused(tmp_path, models):
    """While a run holds an output, a second run writing it is refused at once; a killed holder frees it."""
    import subprocess
    import time

    out = tmp_path / "gen.jsonl"
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from common.io import claim_output; "
              "claim_output(sys.argv[2]); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script, ROOT, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        decode = ["04_decode.py", "--prompts", models["prompts"], "--policy", models["policy"], "--method", "greedy",
                  "--max-new-tokens", 3, "--output", out]
        started = time.time()
        fails_cleanly(run_script(*decode, check=False), str(out), "another run is writing it",
                      f"held by process {holder.pid}")
        assert time.time() - started < 60 and not out.exists()  # refused before any model loads
    finally:
        holder.kill()
        holder.wait()
    run_script(*decode)  # the lock went with the killed process
    assert len(read(out)) == 4 and not os.path.exists(str(out) + ".lock")


def test_a_baseline_with_other_prompts_is_refused(tmp_path):
    rows = [{"id": f"g{i}", "prompt": f"Tell me about {i}", "response": f"answer {i}"} for i in range(3)]
    base = [{**r, "prompt": f"Tell me about something else {r['id']}"} if r["id"] == "g1" else r for r in rows]
    gen, baseline = write_jsonl(tmp_path / "gen.jsonl", rows), write_jsonl(tmp_path / "base.jsonl", base)
    proc = run_script("05_evaluate.py", "metrics", "--generations", gen, "--baseline", baseline, "--metrics",
                      "winrate", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                      "--output", tmp_path / "m.json", check=False)
    fails_cleanly(proc, "'g1'", "another prompt")


def test_an_output_that_is_a_folder_is_named(tmp_path, models):
    (tmp_path / "out").mkdir()
    proc = run_script("04_decode.py", "--prompts", models["prompts"], "--policy", models["policy"], "--method",
                      "greedy", "--output", tmp_path / "out", check=False)
    fails_cleanly(proc, str(tmp_path / "out"), "is a folder")


def test_weight_summary_counts_truncation_over_resumed_rows(tmp_path, models):
    partial = tmp_path / "partial.jsonl"
    run_script("01_build_partial.py", "--input", write_jsonl(tmp_path / "p.jsonl", separable_pairs(6)), "--output",
               partial, "--tokenizer", models["rm"], "--truncation", "full")
    out = tmp_path / "w.jsonl"
    common = ["--input", partial, "--output", out, "--ref-rm", models["ref"], "--max-length", 12]
    run_script("02_weight.py", *common)
    first = json.load(open(str(out) + ".manifest.json"))["summary"]["truncated_inputs"]
    run_script("02_weight.py", *common, "--resume")  # every score from the cache
    assert first > 0 and json.load(open(str(out) + ".manifest.json"))["summary"]["truncated_inputs"] == first


# the data cache: a file altered after it was fetched is refused, not read; a named set's checksum is recorded
def test_an_altered_cached_data_file_is_refused_and_named_sets_record_checksums(tmp_path, models):
    import gzip
    import shutil

    from common.sources import SOURCES

    relpath = "hh_rlhf/harmless-base_test.jsonl.gz"
    cached = tmp_path / "cache" / "data" / relpath
    cached.parent.mkdir(parents=True)
    shutil.copyfile(os.path.join(real_data_dir(), relpath), cached)
    env = {"SPPRM_DATA_DIR": str(tmp_path / "no-data-folder"), "SPPRM_CACHE": str(tmp_path / "cache")}
    args = ["--input", "hh-rlhf:train", "--limit", 2, "--tokenizer", models["rm"], "--truncation", "full"]
    run_script("01_build_partial.py", *args, "--output", tmp_path / "a.jsonl", env=env)
    manifest = json.load(open(tmp_path / "a.jsonl.manifest.json"))
    assert manifest["inputs"]["hh-rlhf:train"] == SOURCES[relpath].sha256
    with gzip.open(cached, "rt", encoding="utf-8") as f:
        text = f.read()
    with gzip.open(cached, "wt", encoding="utf-8") as f:  # one reply changed, every row still there
        f.write(text.replace("Assistant: I", "Assistant: You", 1))
    proc = run_script("01_build_partial.py", *args, "--output", tmp_path / "b.jsonl", env=env, check=False)
    fails_cleanly(proc, str(cached), f"is not the expected {SOURCES[relpath].sha256}", "make data")
    assert not os.path.exists(tmp_path / "b.jsonl")


def test_a_fetch_into_a_cache_that_cannot_be_written_is_one_line(tmp_path):
    mirror = tmp_path / "mirror" / "Anthropic" / "hh-rlhf" / "harmless-base"
    mirror.mkdir(parents=True)
    with open(os.path.join(real_data_dir(), "hh_rlhf", "harmless-base_test.jsonl.gz"), "rb") as f:
        (mirror / "test.jsonl.gz").write_bytes(f.read())
    (tmp_path / "a-file").write_text("")
    env = {"SPPRM_DATA_DIR": str(tmp_path / "no-data-folder"), "SPPRM_CACHE": str(tmp_path / "a-file" / "cache"),
           "SPPRM_HUB_MIRROR": str(tmp_path / "mirror")}
    proc = run_script("01_build_partial.py", "--input", "hh-rlhf:train", "--tokenizer", "minilm-l6", "--output",
                      tmp_path / "out.jsonl", env=env, check=False)
    fails_cleanly(proc, "the data cache cannot be made", "SPPRM_CACHE")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a-file", "test.jsonl.gz"]


@pytest.mark.parametrize("bad_id", ["null", '{"a": 1}'])
def test_an_id_that_is_not_a_string_or_an_integer_is_one_line(tmp_path, bad_id):
    rows = separable_pairs(2)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-1] + f', "id": {bad_id}}}' + "\n")
    proc = run_script("01_build_partial.py", "--input", path, "--tokenizer", "minilm-l6", "--output",
                      tmp_path / "out.jsonl", check=False)
    fails_cleanly(proc, f"{path}:2: field 'id': expected a string or an integer")
    assert not os.path.exists(tmp_path / "out.jsonl")


# A model folder that asks to run its own code (auto_map in its config) is refused with one line; none of its
# code runs, and nothing asks on the terminal. SPPRM_TRUST_REMOTE_CODE=1 opts in.
def _asks_to_run_code(src, folder, marker):
    """A copy of a model folder whose config names custom classes in a module that, imported, writes marker."""
    import shutil

    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model",
                          "AutoModelForSequenceClassification": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import LlamaConfig as Config\n"
                                      "from transformers import LlamaForCausalLM as Model\n")
    return str(folder)


def test_a_model_that_asks_to_run_its_own_code_is_refused(tmp_path, models):
    import subprocess

    from common.io import DataError
    from common.models import load_config, load_policy, load_reward_model, load_tokenizer

    marker = tmp_path / "custom-code-ran"
    rm = _asks_to_run_code(models["rm"], tmp_path / "custom-rm", marker)
    policy = _asks_to_run_code(models["policy"], tmp_path / "custom-policy", marker)
    for load in (load_config, load_tokenizer, load_reward_model, load_policy):
        with pytest.raises(DataError, match="auto_map: AutoConfig, AutoModelForCausalLM, .*SPPRM_TRUST_REMOTE_CODE=1"):
            load(rm)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    partial = write_jsonl(tmp_path / "partial.jsonl", [{**pair, "pair_id": pair["id"], "t": 1, "complete": True}
                                                       for pair in separable_pairs(2)])
    proc = run_script("02_weight.py", "--input", partial, "--output", tmp_path / "w.jsonl", "--ref-rm", rm,
                      env=env, check=False)
    fails_cleanly(proc, "custom-rm: its config.json asks to run code", "SPPRM_TRUST_REMOTE_CODE=1")
    proc = run_script("04_decode.py", "--prompts", models["prompts"], "--policy", policy, "--method", "greedy",
                      "--max-new-tokens", 2, "--output", tmp_path / "g.jsonl", env=env, check=False)
    fails_cleanly(proc, "custom-policy: its config.json asks to run code")
    assert not marker.exists() and not os.path.exists(tmp_path / "w.jsonl")
    # opted in, the folder's code is what loads (the flag reaches transformers)
    opt_in = subprocess.run([sys.executable, "-c", f"from common.models import load_config; load_config({rm!r})"],
                            cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **env, "SPPRM_TRUST_REMOTE_CODE": "1"})
    assert opt_in.returncode == 0, opt_in.stderr[-2000:]
    assert marker.read_text() == "ran"


# 16. the third round of fault probes: checkpoints hold tensors only, survive a kill at any instant, and a rerun
# keeps the finished model until its own is complete
class _CreatesMarker:
    """Unpickling this runs code: it opens (creates) the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_payload(checkpoint, name, marker, forge):
    """Replace a checkpoint file with a torch.save file whose unpickling would create `marker`; forge=True also
    writes its SHA-256 into trainer_state.json, as an attacker who can write the folder could."""
    import hashlib

    import torch

    path = os.path.join(checkpoint, name)
    torch.save({"optimizer": _CreatesMarker(marker), "scheduler": {}}, path)
    if forge:
        state_path = os.path.join(checkpoint, "trainer_state.json")
        state = json.load(open(state_path))
        state["files"][name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        json.dump(state, open(state_path, "w"))


def test_resume_loads_tensors_only_and_refuses_in_one_line(tmp_path, models):
    """A checkpoint file that was changed (corrupt or a pickle payload) is refused by its SHA-256; with the
    checksum forged too, by the classes its pickle names (read, never run); loading itself is weights-only even
    where the caller asks otherwise (DeepSpeed does). One line each, nothing run, nothing written."""
    import shutil

    import torch

    from common.runtime import weights_only_loads

    data = write_jsonl(tmp_path / "t.jsonl", separable_pairs(16))
    common = ["--input", data, "--init", models["rm"], "--lr", 1e-3, "--batch-size", 4, "--save-steps", 1]
    run_script("03_train.py", *common, "--output", tmp_path / "cut", "--stop-after-steps", 1)
    marker = tmp_path / "payload-ran"
    for probe in ("corrupt", "forged"):
        out = tmp_path / probe
        shutil.copytree(tmp_path / "cut", out)
        if probe == "corrupt":
            with open(out / "checkpoint" / "optimizer.pt", "r+b") as f:
                f.seek(100)
                f.write(b"\0" * 64)
        else:
            _plant_payload(out / "checkpoint", "optimizer.pt", marker, forge=probe == "forged")
        listing = sorted(os.listdir(out))
        proc = run_script("03_train.py", *common, "--output", out, "--resume", check=False)
        line = fails_cleanly(proc, str(out / "checkpoint" / "optimizer.pt"), "rerun without --resume")
        assert ("names io.open" if probe == "forged" else "changed after the checkpoint was written") in line
        assert not marker.exists() and sorted(os.listdir(out)) == listing
    # the load itself: weights only, whatever weights_only the caller passes
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "forged" / "checkpoint" / "optimizer.pt", weights_only=False)
    assert not marker.exists()
    run_script("03_train.py", *common, "--output", tmp_path / "cut", "--resume")  # the untouched one resumes
    assert os.path.exists(tmp_path / "cut" / "model.safetensors")


def test_deepspeed_resume_loads_tensors_only(tmp_path, models):
    """DeepSpeed (one CPU rank): a pickle payload in its model states with a forged checksum is refused in one
    line and never unpickled; the untouched checkpoint resumes (DeepSpeed's own torch.load forced to weights only)
    and ends where a one-process run ends. 24 pairs in batches of 4 with windows of 4: the epoch's second window
    holds 2 micro-batches and steps too."""
    import glob
    import shutil

    from safetensors.torch import load_file

    from test_train import run_deepspeed

    data = write_jsonl(tmp_path / "t.jsonl", separable_pairs(24, seed=6))
    common = ["--input", data, "--init", models["rm"], "--lr", 1e-3, "--batch-size", 4, "--grad-accum", 4,
              "--save-steps", 1, "--log-steps", 1]
    deepspeed = ["--deepspeed", os.path.join(ROOT, "configs", "zero3.json")]
    run_deepspeed(1, *common, *deepspeed, "--output", tmp_path / "cut", "--stop-after-steps", 1)
    shutil.copytree(tmp_path / "cut", tmp_path / "evil")
    marker = tmp_path / "payload-ran"
    states = glob.glob(str(tmp_path / "evil" / "checkpoint" / "state" / "*model_states.pt"))
    assert len(states) == 1
    _plant_payload(tmp_path / "evil" / "checkpoint", os.path.relpath(states[0], tmp_path / "evil" / "checkpoint"),
                   marker, forge=True)
    proc = run_deepspeed(1, *common, *deepspeed, "--output", tmp_path / "evil", "--resume", check=False)
    fails_cleanly(proc, "model_states.pt: its pickle names io.open")
    assert not marker.exists() and not os.path.exists(tmp_path / "evil" / "model.safetensors")
    run_deepspeed(1, *common, *deepspeed, "--output", tmp_path / "cut", "--resume")
    steps = [e["step"] for e in read(tmp_path / "cut" / "train_log.jsonl") if "loss" in e]
    assert steps == [1, 2]
    run_script("03_train.py", *common, "--output", tmp_path / "one", "--device", "cpu")
    a, b = load_file(tmp_path / "cut" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    init = load_file(os.path.join(models["rm"], "model.safetensors"))
    for k in a:  # two Adam steps of lr 1e-3 move a weight by up to 2e-3; the runs agree to float noise
        assert (a[k] - b[k]).abs().max() <= 1e-4, (k, (a[k] - b[k]).abs().max())
    assert max((b[k] - init[k]).abs().max() for k in b) > 1e-3


class _Killed(BaseException):
    pass


def _kill_at(monkeypatch, n):
    """From now on the n-th rename or removal (0-based) kills the process: it raises _Killed instead."""
    import shutil

    calls = [0]

    def deadly(real):
        def call(*args, **kwargs):
            if calls[0] == n:
                raise _Killed()
            calls[0] += 1
            return real(*args, **kwargs)
        return call

    for module, name in ((os, "replace"), (os, "remove"), (os, "rename"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, deadly(getattr(module, name)))


def test_a_kill_during_a_checkpoint_swap_loses_nothing(tmp_path, models, monkeypatch):
    """A kill at every rename or removal of a checkpoint save leaves a complete checkpoint (the old or the new one)
    that a resume finds, checks and loads; the load finishes the interrupted swap."""
    from types import SimpleNamespace

    import torch

    from common.models import load_reward_model
    from common.runtime import Runtime, check_checkpoint, find_checkpoint

    args = SimpleNamespace(deepspeed=None, lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0)
    rt = Runtime(args, load_reward_model(models["rm"]), 10, 1, torch.device("cpu"), torch.float32)
    fingerprint = {"input": "x"}
    for n in range(40):
        folder = str(tmp_path / f"kill{n}" / "checkpoint")
        rt.save_checkpoint(folder, {"epoch": 0, "micro": 1, "step": 1, "fingerprint": fingerprint})
        with monkeypatch.context() as m:
            _kill_at(m, n)
            try:
                rt.save_checkpoint(folder, {"epoch": 0, "micro": 2, "step": 2, "fingerprint": fingerprint})
                killed = False
            except _Killed:
                killed = True
        path = find_checkpoint(folder)
        state = check_checkpoint(path, fingerprint, 1)  # complete, every file as written
        assert state["step"] in (1, 2) and (killed or (path == folder and state["step"] == 2))
        assert rt.load_checkpoint(path, state, folder)["step"] == state["step"]
        assert find_checkpoint(folder) == folder and check_checkpoint(folder, fingerprint, 1)["step"] == state["step"]
        assert not os.path.exists(folder + ".old")
        if not killed:
            break
    assert n > 5  # every rename and removal of the save was a kill point once


def test_a_kill_during_the_final_swap_leaves_one_model_or_none(tmp_path, monkeypatch):
    """The final save moves the new model's files in beside the earlier model's: at no instant does the folder
    hold a config.json with files of the other run (the earlier model stays whole until the new one is complete,
    and config.json moves last)."""
    from common.runtime import swap_files_in

    for n in range(40):
        out = tmp_path / f"kill{n}"
        (out / ".final.tmp").mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "manifest.json", "eval.json", "train_log.jsonl"):
            (out / name).write_text("old")
        for name in ("config.json", "model.safetensors", "manifest.json", "train_log.jsonl", "tokenizer.json"):
            (out / ".final.tmp" / name).write_text("new")
        with monkeypatch.context() as m:
            _kill_at(m, n)
            try:
                swap_files_in(str(out / ".final.tmp"), str(out))
                killed = False
            except _Killed:
                killed = True
        files = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
        if "config.json" in files:
            run = files["config.json"]
            assert all(files[k] == run for k in ("model.safetensors", "manifest.json", "train_log.jsonl")), files
            assert ("eval.json" in files) == (run == "old") and ("tokenizer.json" in files) == (run == "new")
        assert killed or (files.get("config.json") == "new" and not (out / ".final.tmp").exists())
        if not killed:
            break
    assert n > 5
