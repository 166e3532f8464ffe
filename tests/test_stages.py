"""01_build_partial.py and 02_weight.py run as a user runs them."""
import json
import math

import numpy as np
import pytest

from common.losses import reference_weights
from common.models import load_reward_model, load_tokenizer
from common.rewards import RMFormat, score
from conftest import run_script, save_tiny_rm, separable_pairs, write_jsonl


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory, smol_tokenizer):
    return save_tiny_rm(tmp_path_factory.mktemp("rm") / "llama", "llama", smol_tokenizer)


def test_build_partial_full_tlt_sst(tmp_path, tiny_llama_folder, smol_tokenizer):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(6))
    fmt = RMFormat(smol_tokenizer, load_reward_model(tiny_llama_folder))
    src = separable_pairs(6)
    for mode in ("full", "tlt", "sst"):
        out = tmp_path / f"{mode}.jsonl"
        run_script("01_build_partial.py", "--input", pairs, "--output", out, "--tokenizer", tiny_llama_folder,
                   "--truncation", mode, "--K", 2, "--seed", 1)
        rows = read(out)
        for pair in src:
            mine = [r for r in rows if r["pair_id"] == pair["id"]]
            n_w, n_l = len(fmt.response_ids(pair["chosen"])), len(fmt.response_ids(pair["rejected"]))
            T = max(n_w, n_l)
            if mode == "full":
                assert len(mine) == 1 and mine[0]["complete"] and mine[0]["chosen"] == pair["chosen"]
            if mode == "tlt":
                assert [r["t"] for r in mine] == list(range(1, T + 1))
            if mode == "sst":
                assert 0 <= len(mine) <= 4 and all(1 <= r["t"] <= T for r in mine)
            for r in mine:
                assert fmt.response_ids(r["chosen"]) == fmt.response_ids(pair["chosen"])[: r["t"]]
                assert fmt.response_ids(r["rejected"]) == fmt.response_ids(pair["rejected"])[: r["t"]]
                assert r["complete"] == (r["t"] == T)
        assert len({r["id"] for r in rows}) == len(rows)
    again = tmp_path / "sst2.jsonl"
    run_script("01_build_partial.py", "--input", pairs, "--output", again, "--tokenizer", tiny_llama_folder,
               "--truncation", "sst", "--K", 2, "--seed", 1)
    assert read(again) == read(tmp_path / "sst.jsonl")
    # Table 5: TLT cut to the SST row count, a seeded subset of the full TLT rows in their order
    matched = tmp_path / "tlt_matched.jsonl"
    run_script("01_build_partial.py", "--input", pairs, "--output", matched, "--tokenizer", tiny_llama_folder,
               "--truncation", "tlt", "--match-rows", again, "--seed", 3)
    full_tlt, sub = read(tmp_path / "tlt.jsonl"), read(matched)
    assert len(sub) == len(read(again)) < len(full_tlt)
    position = {r["id"]: k for k, r in enumerate(full_tlt)}
    assert all(r == full_tlt[position[r["id"]]] for r in sub)
    assert [position[r["id"]] for r in sub] == sorted(position[r["id"]] for r in sub)
    assert json.load(open(str(matched) + ".manifest.json"))["counts"]["rows_cut"] == len(full_tlt)


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tiny_llama_folder):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "prompt": "x", "chosen": "y", "rejected": "z"}\n{"id": "b", "prompt": "x"\n')
    out = tmp_path / "out.jsonl"
    proc = run_script("01_build_partial.py", "--input", bad, "--output", out, "--tokenizer", tiny_llama_folder,
                      "--truncation", "full", check=False)
    assert proc.returncode == 2
    assert f"error: {bad}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    proc = run_script("01_build_partial.py", "--input", bad, "--output", out, "--tokenizer", tiny_llama_folder,
                      "--truncation", "full", "--on-error", "skip")
    assert len(read(out)) == 1 and "skipped 1" in proc.stderr


def test_weight_stage_matches_per_row_scoring(tmp_path, tiny_llama_folder):
    pairs = separable_pairs(8)
    pairs[0]["chosen"] = "very long " * 300  # over-long: truncated by the stated rule, not dropped
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    partial = tmp_path / "partial.jsonl"
    run_script("01_build_partial.py", "--input", src, "--output", partial, "--tokenizer", tiny_llama_folder,
               "--truncation", "sst", "--K", 3)
    out = tmp_path / "weighted.jsonl"
    first = run_script("02_weight.py", "--input", partial, "--output", out, "--ref-rm", tiny_llama_folder,
                       "--scheme", "entropy", "--max-length", 128, "--pairs-per-step", 3, "--resume")
    assert "resuming" not in first.stderr  # a first run has nothing to resume, and does not say so
    rows = read(out)
    assert len(rows) == len(read(partial))
    tok = load_tokenizer(tiny_llama_folder)
    model = load_reward_model(tiny_llama_folder, tokenizer=tok).eval()
    fmt = RMFormat(tok, model, max_length=128)
    expect_c = score(model, fmt, [r["prompt"] for r in rows], [r["chosen"] for r in rows], batch_size=1)
    expect_r = score(model, fmt, [r["prompt"] for r in rows], [r["rejected"] for r in rows], batch_size=1)
    assert np.allclose([r["ref_chosen"] for r in rows], expect_c, atol=1e-4)
    assert np.allclose([r["ref_rejected"] for r in rows], expect_r, atol=1e-4)
    expected_w = reference_weights(expect_c, expect_r, "entropy")
    assert np.allclose([r["weight"] for r in rows], expected_w, rtol=1e-3, atol=1e-4)
    assert all(math.isfinite(r["weight"]) for r in rows)
    manifest = json.load(open(str(out) + ".manifest.json"))
    assert manifest["summary"]["weight_mean"] == pytest.approx(1.0)

    # --resume with every score already cached recomputes nothing and gives the same file
    uniform = tmp_path / "uniform.jsonl"
    import shutil
    shutil.copy(str(out) + ".scores.jsonl", str(uniform) + ".scores.jsonl")
    again = run_script("02_weight.py", "--input", partial, "--output", uniform, "--ref-rm", tiny_llama_folder,
                       "--scheme", "uniform", "--max-length", 128, "--resume")
    assert f"resuming: {len(rows)} rows already scored, 0 to go" in again.stderr
    assert [r["weight"] for r in read(uniform)] == [1.0] * len(rows)


def test_no_stage_writes_into_its_argument_namespace():
    """Values a stage settles after parsing (a default by model family, the device, a method object) are passed
    explicitly, never stored back on the parsed arguments: the namespace stays what the user gave."""
    import ast
    import os

    from conftest import ROOT

    for name in ("02_weight.py", "03_train.py", "04_decode.py", "05_evaluate.py", "common/models.py",
                 "common/rewards.py", "common/runtime.py", "common/judge.py"):
        tree = ast.parse(open(os.path.join(ROOT, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            written = [t for t in targets for t in ast.walk(t)
                       if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "args"]
            assert not written, f"{name}:{node.lineno}: writes args.{written[0].attr}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                assert getattr(node.args[0], "id", None) != "args", f"{name}:{node.lineno}: setattr(args, ...)"
