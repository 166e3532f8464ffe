"""The pipeline's resume rules: finished stages are skipped, an output made with other settings is refused
(one line, exit 2), and a stage whose input was remade after its output runs again."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from common.pipeline import Pipeline, Stage, canonical, command, first_difference

# a stage script: copies --input (if any) to --output with a manifest, and counts its runs
STAGE = textwrap.dedent("""
    import json, sys
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    open(args["--count"], "a").write("x")
    text = open(args["--input"]).read() if "--input" in args else args.get("--text", "")
    open(args["--output"], "w").write(text)
    json.dump({"args": sys.argv[1:]}, open(args["--output"] + ".manifest.json", "w"))
""")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "stage.py").write_text(STAGE)
    return tmp_path


def runs(path):
    return len(path.read_text()) if path.exists() else 0


def pipeline(d, redo=""):
    return Pipeline("test", redo, cost_path=str(d / "seconds.json"), commands_path=str(d / "commands.json"))


def test_finished_stages_are_skipped_and_costs_kept(workdir):
    d, count = workdir, workdir / "count_a"
    cmd = [d / "stage.py", "--text", "hello", "--output", d / "a.txt", "--count", count]
    pipeline(d).stage("a", str(d / "a.txt"), *cmd)
    pipeline(d).stage("a", str(d / "a.txt"), *cmd)
    assert runs(count) == 1 and (d / "a.txt").read_text() == "hello"
    assert set(json.loads((d / "seconds.json").read_text())) == {"a"}
    assert json.loads((d / "commands.json").read_text())["a"] == [str(c) for c in cmd]
    pipeline(d, redo="a").stage("a", str(d / "a.txt"), *cmd)
    assert runs(count) == 2


def test_other_settings_are_refused_in_one_line(workdir):
    d = workdir
    base = [d / "stage.py", "--output", d / "a.txt", "--count", d / "count_a"]
    pipeline(d).stage("a", str(d / "a.txt"), *base, "--text", "hello")
    script = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from common.pipeline import Pipeline; "
              f"Pipeline('test', commands_path={str(d / 'commands.json')!r}).stage('a', {str(d / 'a.txt')!r}, "
              + ", ".join(repr(str(c)) for c in [*base, "--text", "bye"]) + ")")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: test: stage a:")
    assert "'hello'" in out.stderr and "'bye'" in out.stderr and "--redo a" in out.stderr
    assert (d / "a.txt").read_text() == "hello" and runs(d / "count_a") == 1  # nothing lost


def test_a_remade_input_reruns_the_stages_after_it(workdir):
    d = workdir
    first = [d / "stage.py", "--text", "v1", "--output", d / "a.txt", "--count", d / "count_a"]
    second = [d / "stage.py", "--input", d / "a.txt", "--output", d / "b.txt", "--count", d / "count_b"]
    pipeline(d).stage("a", str(d / "a.txt"), *first)
    pipeline(d).stage("b", str(d / "b.txt"), *second)
    pipeline(d).stage("b", str(d / "b.txt"), *second)
    assert runs(d / "count_b") == 1
    time.sleep(0.05)  # the remade input must be newer than b's manifest
    first[2] = "v2"
    pipeline(d, redo="a").stage("a", str(d / "a.txt"), *first)
    pipeline(d).stage("b", str(d / "b.txt"), *second)
    assert runs(d / "count_b") == 2 and (d / "b.txt").read_text() == "v2"


# a resumable stage script: with --resume, a finished --output counts as done and is kept (as 04's rows are)
RESUMABLE = textwrap.dedent("""
    import os, sys
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    args = dict(zip(argv[::2], argv[1::2]))
    open(args["--count"], "a").write("x")
    if not ("--resume" in sys.argv and os.path.exists(args["--output"])):
        open(args["--output"], "w").write(open(args["--input"]).read())
    open(args["--output"] + ".manifest.json", "w").write("{}")
""")


def test_a_replaced_output_is_not_resumed_from(workdir):
    """A stage that resumes keeps what its finished output holds: when that output is replaced (its input
    remade, or --redo) the run goes without --resume, while the command on record keeps it (no refusal next)."""
    d = workdir
    (d / "resumable.py").write_text(RESUMABLE)
    first = [d / "stage.py", "--text", "v1", "--output", d / "a.txt", "--count", d / "count_a"]
    second = [d / "resumable.py", "--input", d / "a.txt", "--output", d / "b.txt", "--count", d / "count_b",
              "--resume"]
    pipeline(d).stage("a", str(d / "a.txt"), *first)
    pipeline(d).stage("b", str(d / "b.txt"), *second)
    time.sleep(0.05)
    first[2] = "v2"
    pipeline(d, redo="a").stage("a", str(d / "a.txt"), *first)
    pipeline(d).stage("b", str(d / "b.txt"), *second)
    assert runs(d / "count_b") == 2 and (d / "b.txt").read_text() == "v2"
    (d / "a.txt").write_text("v3")  # behind the pipeline's back: only --redo replaces b now
    os.utime(d / "a.txt", (0, 0))
    pipeline(d, redo="b").stage("b", str(d / "b.txt"), *second)
    assert runs(d / "count_b") == 3 and (d / "b.txt").read_text() == "v3"
    pipeline(d).stage("b", str(d / "b.txt"), *second)
    assert runs(d / "count_b") == 3
    assert json.loads((d / "commands.json").read_text())["b"][-1] == "--resume"


def test_an_output_made_before_commands_were_recorded_is_adopted(workdir):
    d = workdir
    cmd = [d / "stage.py", "--text", "old", "--output", d / "a.txt", "--count", d / "count_a"]
    Pipeline("test").stage("a", str(d / "a.txt"), *cmd)  # no record kept
    pipeline(d).stage("a", str(d / "a.txt"), *cmd)
    assert runs(d / "count_a") == 1
    assert json.loads((d / "commands.json").read_text())["a"] == [str(c) for c in cmd]


def test_first_difference():
    assert first_difference(["a", "--k", "5"], ["a", "--k", "6"]) == ("'5'", "'6'")
    assert first_difference(["a"], ["a", "--x", "1"]) == ("nothing", "'--x 1'")
    assert first_difference(["a", "--x", "1"], ["a"]) == ("'--x 1'", "nothing")


def test_the_same_settings_in_another_order_skip_and_a_changed_value_is_refused(workdir):
    """Commands are compared as argparse reads them: flags in any order (a repeated flag's values keep theirs)."""
    d = workdir
    cmd = [d / "stage.py", "--text", "hello", "--output", d / "a.txt", "--count", d / "count_a"]
    pipeline(d).stage("a", str(d / "a.txt"), *cmd)
    pipeline(d).stage("a", str(d / "a.txt"), cmd[0], *cmd[5:], *cmd[3:5], *cmd[1:3])  # reordered: skipped
    assert runs(d / "count_a") == 1
    assert canonical(["s.py", "x", "--rm", "A", "--k", "1", "--rm", "B"]) == ["s.py", "x", "--k", "1", "--rm", "A",
                                                                            "--rm", "B"]
    assert canonical(["s.py", "--rm", "A", "--rm", "B"]) != canonical(["s.py", "--rm", "B", "--rm", "A"])
    assert canonical(["s.py", "--resume", "--k", "1"]) == canonical(["s.py", "--k", "1", "--resume"])


def test_a_stage_command_is_built_from_its_settings_and_method():
    st = Stage("04_decode.py", "out/gen.jsonl", name="decode", method=("cbs", {"beam": 2, "successors": 2}),
               settings=dict(prompts="hh-rlhf:heldout", limit=None, resume=True, max_new_tokens=24,
                             extra_rm=("ORM=a", "SP-PRM=b")))
    assert command(st) == ["04_decode.py", "--method", "cbs", "--beam", "2", "--successors", "2", "--prompts",
                           "hh-rlhf:heldout", "--resume", "--max-new-tokens", "24", "--extra-rm", "ORM=a",
                           "--extra-rm", "SP-PRM=b", "--output", "out/gen.jsonl"]
    table = Stage("05_evaluate.py table", "out/t.md", inputs=("m1.json", "m2.json"), settings={})
    assert command(table) == ["05_evaluate.py", "table", "m1.json", "m2.json", "--output", "out/t.md"]
    with pytest.raises(ValueError, match="method argsg has no knob successors"):
        command(Stage("04_decode.py", "o", {}, method=("argsg", {"successors": 2})))
    with pytest.raises(ValueError):  # a value the method refuses (CARDS: min_segment above max_segment)
        command(Stage("04_decode.py", "o", {}, method=("cards", {"min_segment": 9, "max_segment": 4})))
