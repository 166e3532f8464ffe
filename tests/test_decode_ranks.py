"""04_decode.py under torchrun as a GPU box runs it, on two CPU ranks: unequal work per rank, a resume after a
kill, a resume with another world size. Every prompt's row must come out exactly once, with the tokens of a
one-process run."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, save_tiny_rm, write_jsonl
from test_decode import read
from test_search import save_tiny_policy

N_PROMPTS = 7  # odd: the ranks' shares differ in size as well as in length


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("models")
    policy = save_tiny_policy(root / "policy", smol_tokenizer)
    rm = save_tiny_rm(root / "rm", "llama", smol_tokenizer, seed=1)
    # rank 0 takes the even rows: long prompts (about 300 tokens); rank 1 the odd rows: a few tokens
    long_text = " ".join(f"item {k} of a long list of things to weigh carefully" for k in range(30))
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"id": f"p{i}", "prompt": f"\n\nHuman: {long_text if i % 2 == 0 else 'Hi'} ({i})?\n\nAssistant:"}
        for i in range(N_PROMPTS)])
    return policy, rm, prompts


def flags(folders, out):
    policy, rm, prompts = folders
    return ["--prompts", prompts, "--policy", policy, "--rm", rm, "--method", "cbs", "--beam", 2, "--successors",
            2, "--chunk", 3, "--max-new-tokens", 6, "--batch-size", 2, "--device", "cpu", "--output", out]


def torchrun(args, port):
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    proc = subprocess.run([launcher, "--nproc_per_node", "2", "--master_port", str(port),
                           os.path.join(ROOT, "04_decode.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.jsonl"
    run_script("04_decode.py", *flags(folders, out))
    return read(out)


def leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and not p.name.endswith(".manifest.json"))


def killed_state(out, rows, world, kept_per_shard):
    """What a run of `world` ranks killed midway leaves: a few rows in each shard, a torn last line in one,
    and the lock files of the killed ranks."""
    for r in range(world):
        mine = rows[r::world][:kept_per_shard]
        text = "".join(json.dumps(row) + "\n" for row in mine)
        if r == 0:
            text += json.dumps(rows[r::world][kept_per_shard])[:25]  # the row in flight when the kill came
        shard = out.parent / f"{out.name}.shard{r}-of-{world}.jsonl"
        shard.write_text(text)
        (out.parent / (shard.name + ".lock")).write_text("12345")


def test_ranks_with_unequal_work_give_every_row_once(folders, one_process, tmp_path):
    out = tmp_path / "two.jsonl"
    torchrun(flags(folders, out), 29541)
    rows = read(out)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(N_PROMPTS)]
    assert [r["response"] for r in rows] == [r["response"] for r in one_process]
    assert leftovers(out) == []
    assert json.loads((tmp_path / "two.jsonl.manifest.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("world_before,world_now", [(2, 2), (2, 1), (3, 2)])
def test_resume_after_a_kill_with_any_world_size(folders, one_process, tmp_path, world_before, world_now):
    out = tmp_path / "resumed.jsonl"
    killed_state(out, one_process, world_before, kept_per_shard=1)
    args = [*flags(folders, out), "--resume"]
    if world_now == 1:
        run_script("04_decode.py", *args)
    else:
        torchrun(args, 29542 + world_before)
    rows = read(out)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(N_PROMPTS)]  # each once, in prompt order
    assert [r["response"] for r in rows] == [r["response"] for r in one_process]
    assert leftovers(out) == []  # no shard, partial or lock file of either run is left


def test_a_rerun_without_resume_ignores_and_removes_an_earlier_runs_rows(folders, one_process, tmp_path):
    out = tmp_path / "fresh.jsonl"
    stale = [{**row, "response": "stale text"} for row in one_process]
    killed_state(out, stale, 3, kept_per_shard=2)
    run_script("04_decode.py", *flags(folders, out))
    rows = read(out)
    assert [r["response"] for r in rows] == [r["response"] for r in one_process]
    assert leftovers(out) == []


def test_the_rank_helpers_merge_in_prompt_order_and_resume_any_split(tmp_path):
    """common.ranks without a launcher: a resume counts the rows of every row file an earlier run left (here a
    3-rank split, one torn line), refuses rows of another run, and the merge writes each prompt's row once, in
    prompt order, leaving no row or lock file."""
    from common.io import DataError
    from common.ranks import earlier_rows, finish_output, shard_path

    out = str(tmp_path / "out.jsonl")
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(5)]
    rows = [{"id": p["id"], "prompt": p["prompt"], "method": "greedy", "response": f"r{i}"}
            for i, p in enumerate(prompts)]
    killed_state(tmp_path / "out.jsonl", rows, 3, kept_per_shard=1)  # p0, p1, p2 done; a torn p3 in shard 0
    earlier, done = earlier_rows(out, 1, True, prompts, {"method": "greedy"})
    assert done == {"p0", "p1", "p2"} and len(earlier) == 3
    with pytest.raises(DataError, match="made by another run"):
        earlier_rows(out, 1, True, prompts, {"method": "bon"})
    assert earlier_rows(out, 1, False, prompts, {"method": "bon"}) == (earlier, set())  # stale, not read
    with open(shard_path(out, 0, 1), "w") as f:  # this run's rows, written out of order
        f.writelines(json.dumps(r) + "\n" for r in (rows[4], rows[3]))
    finish_output(out, 1, earlier, True, prompts)
    assert [r["id"] for r in read(tmp_path / "out.jsonl")] == ["p0", "p1", "p2", "p3", "p4"]
    assert leftovers(tmp_path / "out.jsonl") == []
