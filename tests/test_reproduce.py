"""reproduce.py and common/experiment.py: the scales as data, the stages' command lines, the reference choice as
a stage of its own, the judgement of a claim by its interval, and captions that say the settings the runs' rows
record."""
import importlib.util
import json
import math
import os

import pytest

from common import experiment, reports
from common.pipeline import command
from conftest import ROOT

spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "reproduce.py"))
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_verdict_by_interval():
    assert reports.verdict([0.01, 0.2]) == "reproduces"
    assert reports.verdict([-0.2, -0.01]).startswith("does not reproduce")
    assert reports.verdict([-0.1, 0.1]) == "cannot be told apart at this size"
    assert reports.verdict([0.0, 0.1]) == "cannot be told apart at this size"  # zero inside: no claim
    # a difference taken the other way round (ORM - SP-PRM for "SP-PRM above the ORM")
    assert reports.verdict([-0.2, -0.01], sign=-1) == "reproduces"


def test_a_paired_difference_is_read_by_its_sign():
    """specrej's ORM-rejector minus SP-PRM-rejector: a difference below zero favours the SP-PRM (Best-of-4 there)."""
    assert reports.higher([-0.0843, -0.0021], "the ORM-rejector", "the SP-PRM-rejector") == \
        "the SP-PRM-rejector higher"
    assert reports.higher([0.01, 0.2], "A", "B") == "A higher"
    assert reports.higher([-0.03, 0.05], "A", "B") == "cannot be told apart"


def test_independent_yardstick_skips_the_reference_and_its_parent():
    candidates = {"ORM seed 1": "r/orm_s1", "ORM seed 2": "r/orm_s2", "MiniLM, 2 epochs": "r/ref_2ep"}
    # the reference was trained on from seed 1: seed 2 is the only RM that shaped nothing
    assert experiment.independent_of(candidates, "r/ref_2ep", {"r/ref_2ep": "r/orm_s1"}) == "r/orm_s2"
    assert experiment.independent_of(candidates, "r/ref_2ep", {"r/ref_2ep": "r/orm_s2"}) == "r/orm_s1"
    assert experiment.independent_of(candidates, "r/orm_s1", {"r/ref_2ep": "r/orm_s1"}) == "r/orm_s2"
    assert experiment.independent_of({"ORM seed 1": "r/orm_s1"}, "r/orm_s1", {}) is None


@pytest.mark.e2e
def test_gpu_scale_runs_end_to_end_at_its_smoke_size(gpu_smoke_run):
    """The gpu scale's stages (a SmolLM2 reference candidate, SST K = 5, every method of Table 1) at a size the
    CPU finishes in minutes, then the speculative-rejection part on the same RMs; each writes its results (the
    run is shared with tests/test_notebooks.py: conftest's gpu_smoke_run)."""
    import json

    out, procs = gpu_smoke_run
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = procs[0].stdout.strip().splitlines()[-5:]  # the run ends saying where to look
    assert last[0].startswith("reproduce --scale gpu-smoke finished in")
    assert last[1].strip() == f"table:     {out}/table.md"
    assert "paired_differences.png" in last[2] and "results.md" in last[3] and "notebooks/tables.ipynb" in last[4]
    results = (out / "results.md").read_text()
    assert "SmolLM2-135M RM" in results and "| SP-PRM |" in results
    assert (out / "agreement_ar_rm_sc.png").exists() and (out / "args_sweep.json").exists()
    specrej = (out / "specrej" / "results_specrej.md").read_text()
    assert "Compute needed to reach Best-of-4's reward" in specrej and "Kendall's tau" in specrej
    kept = [json.loads(line)["stats"]["kept"] for line in open(out / "specrej" / "gen_specrej4_a0.5_orm.jsonl")]
    assert any(kept) and all(k[0] == 2 for k in kept if k)  # ceil(0.5 * 4) go on after the first decision
    for figure in ("specrej_reference_vs_compute.png", "specrej_reference_vs_seconds.png",
                   "specrej_prefix_consistency.png"):
        assert (out / "specrej" / figure).exists()


CHOICE = {"path": "r/ref", "independent": "r/orm_s1"}


def plan(scale, part):
    """Every stage command of a part after the RMs (no file is read: the reference choice is given)."""
    s = reproduce.SCALES[scale]
    stages = experiment.PARTS[part][0](s, "r", None, CHOICE)
    return {st.name or st.output: command(st) for st in stages if not callable(st)}  # steps: run, not spelled


def flags(cmd):
    """{flag: its last value (True: a bare flag)} of a command."""
    out = {}
    for i, token in enumerate(cmd):
        if token.startswith("--"):
            value = cmd[i + 1] if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else True
            out[token] = value
    return out


@pytest.mark.parametrize("scale", list(reproduce.SCALES))
def test_every_scale_is_one_dataclass_whose_stages_build(scale):
    """Every scale has every setting (no missing keys), its method knobs are the methods' own (checked against
    their params() while the commands are built) and each of its parts builds."""
    import dataclasses

    s = reproduce.SCALES[scale]
    assert dataclasses.is_dataclass(s) and dataclasses.fields(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prompts = 1
    for part in ("table1", "specrej") + (("tables",) if s.tables else ()) + (("table5",) if s.table5 else ()) + \
            (("payoff",) if s.payoff else ()):
        commands = plan(scale, part)
        assert commands and all(c[0].endswith(".py") for c in commands.values())
    greedy = plan(scale, "table1")["decode-greedy"]
    assert "--reward-norm" not in greedy and "--rm" not in greedy  # an unguided run has no reward settings
    args = flags(plan(scale, "table1")["decode-argsg-sp-prm"])
    assert args["--method"] == "argsg" and args["--reward-norm"] == s.reward_norm
    assert (int(args["--k"]), float(args["--w"])) == (s.search["argsg"]["k"], s.search["argsg"]["w"])


def test_demo_is_the_cpu_scale_made_small():
    assert reproduce.DEMO == dataclasses_replace(reproduce.CPU, **{
        f: getattr(reproduce.DEMO, f) for f in ("seeds", "orm_pairs", "eval_pairs", "references", "reference_pairs",
                                                  "sst_k", "sst_pairs", "variants", "max_length", "prompts",
                                                  "new_tokens", "methods", "prefix_lengths", "tables", "table5", "specrej",
                                                  "payoff")})
    assert reproduce.DEMO.search == reproduce.CPU.search and reproduce.DEMO.reward_norm == "std"


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_tables_part_names_every_table1_row_and_full_scale_is_the_papers_unit():
    rows = experiment.table_methods(reproduce.CPU)
    assert [label for _, label, _ in rows] == ["ARGS", "TBS", "CBS", "CARDS", "BoN-4", "BoN-8"]
    commands = plan("cpu", "tables")
    tbs = commands["table1-decode-tbs-orm"]
    assert tbs[tbs.index("--method") + 1] == "tbs" and "--chunk" not in tbs and "--beam" in tbs
    bon8 = flags(commands["table1-decode-bon8-sp-prm"])
    assert (bon8["--method"], bon8["--n"]) == ("bon", "8")
    assert flags(commands["table1-decode-cards-orm"])["--max-retries"] == "4"
    full = reproduce.FULL
    assert full.reward_norm == "none" and full.search["argsg"]["w"] == 1.5  # the paper's w on the raw reward scale
    train = {st.name: command(st) for st in experiment.rm_stages(full, "r", None)}["orm-s0"]
    assert int(flags(train)["--batch-size"]) * int(flags(train)["--grad-accum"]) == 64  # the paper's Table 10 batch
    smollm2 = next(command(st) for st in experiment.reference_stages(full, "r", None) if st.name == "ref-smollm2")
    assert int(flags(smollm2)["--batch-size"]) * int(flags(smollm2)["--grad-accum"]) == 32  # its Table 11 batch
    assert "--batch-size" not in command(experiment.rm_stages(reproduce.CPU, "r", None)[0])  # 03's default
    # every guided decode of SCALE=full runs on the raw reward scale, the tables part's too
    for part in ("table1", "tables", "specrej"):
        guided = [flags(c) for c in plan("full", part).values() if c[0] == "04_decode.py" and "--rm" in c]
        assert guided and {g["--reward-norm"] for g in guided} == {"none"}


def test_a_method_knob_it_does_not_have_is_refused_before_any_stage_runs():
    s = dataclasses_replace(reproduce.CPU, search={**reproduce.CPU.search, "cbs": {"beam": 2, "width": 2}})
    with pytest.raises(ValueError, match="method cbs has no knob width"):
        [command(st) for st in experiment.table1_part(s, "r", None, CHOICE)]


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def test_table5_trains_sst_and_size_matched_tlt_alike_and_compares_sst_with_tlt():
    """Both cut the same pairs (TLT sampled to SST's row count), are weighted by the one reference and trained from
    the seed-0 ORM with the same settings; ARGS and CBS guided by each, SST minus TLT paired over prompts."""
    commands = plan("cpu", "table5")
    sst, tlt = flags(commands["table5-sst"]), flags(commands["table5-tlt"])
    assert (sst["--truncation"], sst["--K"], tlt["--truncation"]) == ("sst", "5", "tlt")
    assert tlt["--match-rows"] == "r/table5/sst.jsonl" and sst["--limit"] == tlt["--limit"] == "400"
    assert "--seed" not in commands["table5-sst"] and "--seed" not in commands["table5-tlt"]  # 01's one default
    trains = {tag: commands[f"table5-{tag}-prm"] for tag in ("sst", "tlt")}
    same = [c[c.index("--input") + 2:] for c in trains.values()]
    assert flags(trains["sst"])["--init"] == flags(trains["tlt"])["--init"] == "r/orm_s0"
    assert [x for x in same[0] if "sst" not in x] == [x for x in same[1] if "tlt" not in x]  # only the data differ
    assert flags(commands["table5-weight-sst"])["--ref-rm"] == flags(commands["table5-weight-tlt"])["--ref-rm"] == \
        CHOICE["path"]
    assert {n for n in commands if "decode" in n} == {"table5-decode-greedy", "table5-decode-argsg-sst",
                                                      "table5-decode-argsg-tlt", "table5-decode-cbs-sst",
                                                      "table5-decode-cbs-tlt"}
    compare = commands["r/table5/table5_compare_argsg_tlt.json"]
    assert compare[2:4] == ["r/table5/table5_metrics_argsg_sst.json", "r/table5/table5_metrics_argsg_tlt.json"]
    assert flags(commands["table5-decode-argsg-sst"])["--limit"] == "64"


def test_choosing_the_reference_is_a_stage_that_writes_its_choice(tmp_path):
    """The candidate with the highest held-out accuracy; the independent yardstick is the first candidate that is
    neither it nor what it was trained from (its manifest's --init)."""
    run = tmp_path / "run"
    for name, accuracy, init in (("orm_s1", 0.61, "minilm-l6"), ("orm_s2", 0.64, "minilm-l6"),
                                 ("ref_minilm_2ep", 0.66, str(run / "orm_s1"))):
        write(str(run / name / "eval.json"), {"accuracy": accuracy, "accuracy_ci95": [0.5, 0.7], "n": 64})
        write(str(run / name / "manifest.json"), {"args": {"init": init}})
    stages = experiment.reference_stages(dataclasses_replace(reproduce.CPU, seeds=(0, 1, 2)), str(run), None)
    assert [st.name for st in stages] == ["ref-minilm-2ep", "choose-reference"]
    assert flags(command(stages[0]))["--init"] == str(run / "orm_s2")  # the better other-seed ORM
    cmd = command(stages[1])
    assert cmd[:2] == ["reproduce.py", "choose-reference"]
    experiment.choose_reference(cmd[2:])
    choice = json.loads((run / "reference.json").read_text())
    assert choice["name"].startswith("MiniLM-L6, 2 epochs (orm_s2 + 1)") and choice["accuracy"] == 0.66
    assert choice["path"] == str(run / "ref_minilm_2ep") and choice["candidates"]["ORM seed 1"]["accuracy"] == 0.61
    assert choice["independent"] == str(run / "orm_s2")  # the 2ep reference's manifest names orm_s1 as its start
    assert (run / "reference.json.manifest.json").exists()


def decoded_run(tmp_path, reward_norm, w):
    """A run folder with what the decoding section of results.md reads: greedy and ARGS guided by each RM, their
    generations' rows recording the params 04_decode.py writes."""
    run = tmp_path / f"run_{reward_norm}"
    write(str(run / "reference.json"), {"name": "ORM seed 1", "path": "r/orm_s1", "independent": None,
                                         "candidates": {}})
    write(str(run / "table.md"), "| Method |\n|---|\n| Greedy |")
    for tag, params in (("greedy", {"max_new_tokens": 24, "seed": 0}),
                        ("argsg_orm", {"k": 5, "w": w, "reward_norm": reward_norm, "max_new_tokens": 24, "seed": 0}),
                        ("argsg_sp-prm", {"k": 5, "w": w, "reward_norm": reward_norm, "max_new_tokens": 24, "seed": 0})):
        write(str(run / f"gen_{tag}.jsonl"), json.dumps({"id": "1", "params": params}) + "\n")
        write(str(run / f"metrics_{tag}.json"), {"generations": str(run / f"gen_{tag}.jsonl"), "n": 8,
                                                 "reward_mean": 0.1, "reward_mean_ci95": [0.0, 0.2]})
    write(str(run / "compare_argsg.json"), {"metrics": {"reward": {"diff": 0.01, "diff_ci95": [-0.1, 0.1]}}})
    return run


@pytest.mark.parametrize("reward_norm,words", [("std", "rewards normalised (`--reward-norm std`)"),
                                               ("none", "raw rewards (`--reward-norm none`)")])
def test_captions_say_the_settings_the_rows_record(tmp_path, reward_norm, words):
    """SCALE=full decodes with --reward-norm none: the caption says so (it once said std for every scale), and
    ARGS' k and w come from the generations, as does the w of the reward-against-w curve."""
    from common.figures import reward_vs_w

    run = decoded_run(tmp_path, reward_norm, w=1.5 if reward_norm == "none" else 10.0)
    curve = reward_vs_w([("ORM", str(run / "metrics_greedy.json")), ("ORM", str(run / "metrics_argsg_orm.json"))])
    write(str(run / "args_sweep.json"), curve)
    assert [p["w"] for p in curve["rms"]["ORM"]] == [0.0, 1.5 if reward_norm == "none" else 10.0]
    scale = dataclasses_replace(reproduce.DEMO, methods=("argsg",))
    text = "\n".join(reports.decoding_section(scale, str(run), {"argsg": {"reward": None}}))
    assert f"8 held-out prompts, SmolLM2-135M-Instruct, 24 new tokens, {words}" in text
    assert ("ARGS k=5, w=1.5" if reward_norm == "none" else "ARGS k=5, w=10") in text
    assert "CBS" not in text.split("Paired")[0]  # a method that did not run has no settings in the caption
    assert "--reward-norm std" not in text or reward_norm == "std"


@pytest.mark.slow
def test_table5_part_runs_at_smoke_size(tmp_path):
    """make table5's stages at the smoke size (about 4 min on 2 cores): both RMs trained on as many partial pairs,
    their accuracy, cost and agreement, ARGS and CBS guided by each, SST minus TLT beside the paper's."""
    import subprocess
    import sys

    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--scale", "smoke", "--part", "table5",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = out / "table5"
    rows = {cut: sum(1 for _ in open(d / f"{cut}.jsonl")) for cut in ("sst", "tlt")}
    assert rows["sst"] == rows["tlt"] > 0
    text = (d / "results_table5.md").read_text()
    assert "SST (K = 2) and TLT cut the first 8 hh-rlhf:train pairs" in text
    assert f"| SST | {rows['sst']} (of {rows['sst']}) |" in text  # SST keeps all it cut
    assert "| TLT | " + f"{rows['tlt']} (of " in text and "| SST - TLT |" not in text and "| TLT - SST |" in text
    for method in ("ARGS (SST)", "ARGS (TLT)", "CBS (SST)", "CBS (TLT)"):
        assert f"| {method} |" in text
    assert "- ARGS: by the reference RM" in text and "(paper: SST 2.85 against TLT 2.69, +0.16)" in text
    assert (d / "paired_differences.png").exists() and (d / "agreement_ar_rm_sc.png").exists()
    log = [json.loads(line) for line in open(d / "tlt-prm" / "train_log.jsonl")]
    assert sum(e.get("tokens", 0) for e in log) > 0


@pytest.mark.slow
def test_payoff_part_runs_at_smoke_size(tmp_path):
    """make payoff's stages at the smoke size: decoder RMs of its own on SmolLM2's lower layers, scored on the
    engine's cached path; the adaptive schedule calibrated on other prompts and spelled on the command line;
    alpha 0 would be Best-of-N (tests/test_search.py); the page leads with the reach ratio."""
    import subprocess
    import sys

    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--scale", "smoke", "--part", "payoff",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = out / "payoff"
    calibration = json.loads((d / "calibration.json").read_text())
    assert calibration["reference"] == "self" and set(calibration["rms"]) == {"ORM", "SP-PRM"}
    for rm in ("ORM", "SP-PRM"):
        rows = [json.loads(line) for line in open(d / f"gen_specrej4_aauto_{rm.lower()}.jsonl")]
        assert {r["params"]["alpha"] for r in rows} == {calibration["rms"][rm]["alpha_schedule"]}
        assert {r["stats"]["rm_path"] for r in rows} == {"cached"}  # a decoder RM with the policy's tokenizer
    commands = json.loads((out / "stage_commands.json").read_text())
    assert calibration["rms"]["SP-PRM"]["alpha_schedule"] in commands["payoff-decode-specrej4_aauto-sp-prm"]
    text = (d / "results_payoff.md").read_text()
    assert text.index("Cost at which speculative rejection reaches Best-of-4's reward") < text.index("| run |")
    assert "Adaptive rejection (alpha=auto)" in text
    agreement = json.loads((d / "agreement.json").read_text())
    assert "SP-PRM (smollm2-135m-l6)" in agreement["rms"] and "ORM (minilm-l6)" in agreement["rms"]
    for figure in ("payoff_reference_vs_compute.png", "payoff_reference_vs_seconds.png",
                   "payoff_prefix_consistency.png"):  # the smoke scale has no independent RM
        assert (d / figure).exists()
    # the decoder RMs read 512 tokens: their cache holds these prompts whole, so every run, however often it
    # decides, reads each sample token once, as the policy computes it (the two prompt formats differ by a few
    # tokens); at 256 the prompts' kept tails would make every decision read prompt and prefix afresh
    for gen in d.glob("gen_*.jsonl"):
        for stats in (json.loads(line)["stats"] for line in open(gen)):
            assert stats["rm_path"] == "cached" and abs(stats["rm_tokens"] - stats["policy_tokens"]) <= 8, gen


@pytest.mark.slow
def test_tables_part_runs_every_row_at_smoke_size(tmp_path):
    """make tables' stages at the smoke size: Table 1 with every method guided by three RMs, Table 3 on AdvBench
    with both ASR measures, Table 4 with GSM8K RMs of its own (13 min on 2 cores)."""
    import subprocess
    import sys

    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--scale", "smoke", "--part", "tables",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "tables" / "results_tables.md").read_text()
    for method in ("ARGS", "TBS", "CBS", "CARDS", "BoN-2", "BoN-3"):
        for rm in ("SP-PRM", "ORM", "Ablation"):
            assert f"| {method} ({rm}) |" in text
    assert "Reward (decoding RM)" in text and "ASR, target opening (%)" in text and "Accuracy (%)" in text
    assert "CARDS (SP-PRM) minus CARDS (Ablation)" in text
    # the notebooks read make tables' layout (tables/table<N>_*)
    from conftest import execute_notebook

    text = execute_notebook("tables.ipynb", out)
    assert "### Table 4 (GSM8K" in text and "| CARDS (Ablation) |" in text and "| CARDS | Ablation-guided |" in text
    execute_notebook("figures.ipynb", out)
    assert (out / "paired_differences.png").stat().st_size > 10000


def test_stages_run_by_their_own_path_from_any_working_folder(tmp_path, monkeypatch):
    """reproduce.py started from another folder runs each stage script from the folder reproduce.py is in (the
    stage commands it records keep the script's name, so a record stays valid when the repository moves)."""
    import subprocess
    import sys

    from common import pipeline

    class FirstStage(Exception):
        pass

    ran = []

    def record(argv, **kwargs):
        ran.append(argv)
        raise FirstStage
    monkeypatch.setattr(pipeline.subprocess, "run", record)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--scale", "demo", "--out", "runs/demo"])
    with pytest.raises(FirstStage):
        reproduce.main()
    python, script, *args = ran[0]
    assert python == sys.executable and script == os.path.join(ROOT, "03_train.py")
    assert args[:2] == ["--input", "hh-rlhf:train"] and "runs/demo/orm_s0" in args
    assert (tmp_path / "runs" / "demo").is_dir()
    # that path starts the stage from here
    monkeypatch.undo()
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "--input" in proc.stdout, proc.stderr[-2000:]


def test_a_scale_without_a_tables_part_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--scale", "demo", "--part", "tables", "--out",
                                      str(tmp_path / "out")])
    assert reproduce.main() == 2
    assert capsys.readouterr().err == "error: the demo scale has no tables part (its sizes or the ablation RM)\n"
    assert not (tmp_path / "out").exists()


def test_the_tables_page_says_the_settings_its_rows_record(tmp_path):
    """make tables' caption and titles from the generations' rows and the GSM8K RMs' manifests: the reward
    normalisation that acted, each method's knobs, CARDS' knobs beyond its defaults, the prompts and tokens."""
    run = tmp_path / "run"
    t = run / "tables"
    write(str(run / "reference.json"), {"name": "ORM seed 1", "path": "r/orm_s1", "independent": "r/orm_s2",
                                         "candidates": {}})
    knobs = {"argsg": {"k": 30, "w": 1.5}, "tbs": {"beam": 8, "successors": 8}, "cbs": {"beam": 8, "successors": 8,
             "chunk": 30}, "cards": {"max_segment": 12, "max_retries": 4, "reward_threshold": 2.5},
             "bon16": {"n": 16}, "bon64": {"n": 64}}
    for table, n, tokens in (("table1", 115, 128), ("table3", 520, 128), ("table4", 1319, 256)):
        write(str(t / f"{table}.md"), f"| Method |\n|---|\n| Greedy ({table}) |")
        runs = [("greedy", {})] + [(f"{tag}_{rm}", {**k, "reward_norm": "none"}) for tag, k in knobs.items()
                                   for rm in ("sp-prm", "orm")]
        for tag, params in runs:
            gen = str(t / f"{table}_gen_{tag}.jsonl")
            write(gen, json.dumps({"params": {**params, "max_new_tokens": tokens}}) + "\n")
            write(str(t / f"{table}_metrics_{tag}.json"), {"generations": gen, "n": n, "label": tag})
            write(gen + ".manifest.json", {"args": {"offset": 192 if table == "table1" else 0}})
        write(str(t / f"{table}_compare_argsg_orm.json"), {
            "a": str(t / f"{table}_metrics_argsg_sp-prm.json"), "b": str(t / f"{table}_metrics_argsg_orm.json"),
            "metrics": {"reward": {"diff": 0.25, "diff_ci95": [0.125, 0.375]}}})
    for rm, accuracy, args in (("orm", 0.71, {"limit": None, "epochs": 1}), ("reference", 0.75,
                                                                               {"limit": 600, "epochs": 3})):
        write(str(t / f"gsm8k_{rm}" / "eval.json"), {"accuracy": accuracy})
        write(str(t / f"gsm8k_{rm}" / "manifest.json"), {"args": args})
    text = reports.tables_markdown("full", str(t), {"table1-decode-greedy": 60.0, "orm-s0": 600.0})
    assert ("Policy SmolLM2-135M-Instruct; raw rewards (`--reward-norm none`); ARGS k=30, w=1.5; TBS W, K = 8, 8; "
            "CBS W, K, L = 8, 8, 30; CARDS `--reward-threshold 2.5 --max-segment 12 --max-retries 4`; BoN N = 16, 64"
            ) in text
    assert "Table 1 (HH-RLHF): 115 held-out prompts (193-307, after the first 192), 128 new tokens" in text
    assert "Table 3 (AdvBench, \"Sure here's\" after each instruction): 520 prompts, 128 new tokens" in text
    assert "Table 4 (GSM8K): 1319 held-out problems (gsm8k:heldout), 256 new tokens" in text
    assert "(ORM all pairs, held-out accuracy 0.710; reference 600 pairs, 3 epochs, 0.750)" in text
    # half-width 0.125 at n prompts: n * 2.5^2 for +-0.05
    for n in (719, 3250, 8244):
        assert f"- argsg_sp-prm minus argsg_orm: reward 0.2500 [0.1250, 0.3750] (n for +-0.05: {n})" in text
    assert "Cost of the part's stages: 1.0 min" in text and "`r/orm_s2`, an RM that shaped nothing" in text
    # a run stopped after Table 1 renders Table 1 and says which tables have not finished
    for table in ("table3", "table4"):
        os.remove(t / f"{table}.md")
    text = reports.tables_markdown("full", str(t), {})
    assert "Table 1 (HH-RLHF): 115 held-out prompts" in text and "### Table 3" not in text
    assert "(Table 3: its stages have not finished in this run.)" in text and "### Table 4" not in text


def test_the_specrej_page_reads_its_runs(tmp_path):
    """make specrej's page: points from the metric files, the caption's tokens, decision interval and reward
    normalisation from the rows, the cheapest run that reaches Best-of-N, the rejectors' paired differences."""
    d = tmp_path / "specrej"
    s = dataclasses_replace(reproduce.SMOKE, specrej=reproduce.Specrej(ns=(2, 4), alphas=(0.5,), decision_every=2))
    runs = experiment.specrej_runs(s.specrej, str(d))
    for family, n, alpha, tag, rm, m in runs:
        gen = str(d / f"gen_{tag}_{rm.lower()}.jsonl")
        params = {"n": n, "reward_norm": "none", "max_new_tokens": 8, **({"alpha": alpha, "decision_every": 2}
                                                                          if alpha else {})}
        ranked = {"samples_of": gen.replace("sp-prm", "orm")} if alpha is None and rm == "SP-PRM" else {}
        write(gen, json.dumps({"params": params, "stats": ranked}) + "\n")
        compute = 10 * n * (0.5 if alpha else 1)
        write(m, {"generations": gen, "compute_per_response": {"policy_tokens": compute, "rm_tokens": compute,
                                                                "seconds": 1.0},
                  "reward_mean": 0.1 * n, "reward_mean_ci95": [0.0, 0.5]})
        if not (alpha is None and n == 4):  # against Best-of-4 guided by the same RM: only N=2 falls short
            write(m.replace("metrics_", "vs_bon_"), {"metrics": {"reward": {
                "diff": -0.2, "diff_ci95": [-0.3, -0.1] if n == 2 else [-0.1, 0.1]}}})
        write(str(d / f"compare_{tag}.json"), {"metrics": {"reward": {"diff": 0.05, "diff_ci95": [0.01, 0.09]}}})
        if alpha:  # against Best-of-N at its own N: the reward holds zero, the seconds are half
            write(m.replace("metrics_", "vs_same_n_"), {"metrics": {
                "reward": {"diff": -0.01, "diff_ci95": [-0.04, 0.02]}, "seconds": {"a": 1.0, "b": 2.0},
                "reward_Independent": {"diff": -0.05, "diff_ci95": [-0.08, -0.02]}}})
        if n == 4:  # one of four replies ends before the 8-token limit; N=2's rows predate the token counts
            write(m.replace(".json", ".rows.jsonl"), "".join(json.dumps({"id": i, "new_tokens": k}) + "\n"
                                                            for i, k in enumerate((8, 3, 8, 8))))
    consistency = {"n_prompts": 3, "alpha": 0.5, "rms": {"SP-PRM": {"curve": [
        {"t": 2, "kendall_tau": 0.5, "kendall_tau_ci95": [0.1, 0.9], "best_survives": 1.0,
         "best_survives_ci95": [1.0, 1.0]}]}}}
    points = reports.specrej_points(runs)
    assert [(p["family"], p["n"], p["rm"], p["compute"]) for p in points][:3] == [
        ("Best-of-N", 2, "ORM", 40.0), ("Best-of-N", 4, "ORM", 80.0), ("specrej alpha=0.5", 2, "ORM", 20.0)]
    text = reports.specrej_markdown("smoke", str(tmp_path), points, consistency, [], {"specrej-x": 120.0})
    assert "3 held-out prompts, 8 new tokens, a decision every 2 tokens, raw rewards." in text
    assert "Best-of-N guided by the SP-PRM ranks the samples the ORM's Best-of-N drew" in text
    assert "- rejector ORM: specrej alpha=0.5, N=4: 40 tokens per reply, 0.50x Best-of-4's 80." in text
    assert ("| specrej alpha=0.5, N=2 | SP-PRM | -0.0500 [-0.0800, -0.0200]: below | -0.0100 [-0.0400, 0.0200]: "
            "cannot be told apart | 0.50x |") in text
    assert "- Best-of-N, N=2: 0.0500 [0.0100, 0.0900]: the ORM-rejector higher" in text
    assert "| SP-PRM | 2 | 0.500 [0.100, 0.900] | 1.000 [1.000, 1.000] | - |" in text
    assert "| Best-of-N, N=4 | ORM | 80 | 1.00 | 25% | " in text and "| Best-of-N, N=2 | ORM | 40 | 1.00 | - | " in text
    assert "Cost of the part's stages: 2.0 min." in text


def write_alike_prompts(runs, reward, cost_share):
    """Metrics and 05's rows of specrej runs whose three prompts are alike (so every interval is a point):
    reward(rm, alpha, n); policy and RM tokens 10 * n each, times cost_share[alpha] for rejection."""
    for family, n, alpha, tag, rm, m in runs:
        compute = 10 * n * cost_share.get(alpha, 1)
        r = reward(rm, alpha, n)
        write(m, {"compute_per_response": {"policy_tokens": compute, "rm_tokens": compute, "seconds": compute / 10},
                  "reward_mean": r, "reward_mean_ci95": [r, r], "independent": r, "reward_Independent_mean": r,
                  "reward_Independent_mean_ci95": [r, r]})
        write(m.replace(".json", ".rows.jsonl"), "".join(json.dumps(
            {"id": i, "reward": r, "reward_Independent": r, "policy_tokens": compute, "rm_tokens": compute,
             "seconds": compute / 10}) + "\n" for i in ("a", "b", "c")))


def test_adaptive_against_fixed_rejection_at_matched_compute(tmp_path):
    """Each run of one rule against the other rule's curve at its compute, by hand: alpha 0.5 costs 20 and 40
    tokens (N = 2, 4) for rewards 0.2 and 0.4; auto 30 and 60 for 0.35 and 0.56. Auto at N=2 (30) against the
    fixed curve there (0.3): +0.05; fixed at N=4 (40) against the auto curve (0.35 + 0.21 / 3 = 0.42): -0.02;
    the other two lie outside the other curve's span."""
    x = reproduce.Specrej(ns=(2, 4), alphas=(0.5, "auto"), decision_every=2, target_n=4)
    runs = experiment.specrej_runs(x, str(tmp_path / "payoff"))
    reward = {(0.5, 2): 0.2, (0.5, 4): 0.4, ("auto", 2): 0.35, ("auto", 4): 0.56}
    write_alike_prompts(runs, lambda rm, alpha, n: reward.get((alpha, n), 0.1), {0.5: 0.5, "auto": 0.75})
    matched = reports.matched_compute(reports.specrej_points(runs))
    for yardstick in ("independent", "reference"):
        got = {(e["rm"], e["run"]): e for e in matched[yardstick]}
        assert len(got) == 8
        for rm in ("ORM", "SP-PRM"):
            assert got[rm, "specrej alpha=auto, N=2"]["diff"] == pytest.approx(0.05)
            assert got[rm, "specrej alpha=auto, N=2"]["against"] == "specrej alpha=0.5"
            assert got[rm, "specrej alpha=0.5, N=4"]["diff"] == pytest.approx(-0.02)
            assert got[rm, "specrej alpha=0.5, N=2"]["diff"] is None and got[rm, "specrej alpha=auto, N=4"]["diff"] is None
    lines = reports.matched_section(matched)
    assert ("| ORM | specrej alpha=auto, N=2 | specrej alpha=0.5 | 0.0500 [0.0500, 0.0500]: specrej alpha=auto higher | "
            "0.0500 [0.0500, 0.0500]: specrej alpha=auto higher |") in lines
    assert "| SP-PRM | specrej alpha=auto, N=4 | specrej alpha=0.5 | outside its span | outside its span |" in lines


def test_the_reach_ratio_headline_reads_per_prompt_rows(tmp_path):
    """The payoff page leads with the cost at which each rejector's speculative rejection reaches its own
    Best-of-N's reward: per prompt rewards and costs from 05's rows files; here every prompt alike, so the
    intervals are points: the ORM reaches Best-of-4 only at N=4 (40 of 80 tokens: 0.50x), the SP-PRM already at
    N=2 (20 of 80: 0.25x), cheaper in every resample."""
    d = tmp_path / "payoff"
    x = reproduce.Specrej(ns=(2, 4), alphas=(0.5,), decision_every=2, target_n=4)
    runs = experiment.specrej_runs(x, str(d))
    reward = {("ORM", None, 4): 0.4, ("ORM", 0.5, 2): 0.2, ("ORM", 0.5, 4): 0.4,
              ("SP-PRM", None, 4): 0.4, ("SP-PRM", 0.5, 2): 0.45, ("SP-PRM", 0.5, 4): 0.5}
    write_alike_prompts(runs, lambda rm, alpha, n: reward.get((rm, alpha, n), 0.1), {0.5: 0.5})
    reach = reports.reach_ratios(reports.specrej_points(runs), 4)
    for yardstick in ("independent", "reference"):
        for cost in ("compute", "seconds"):
            by = reach[yardstick][cost]
            assert (by["ORM"]["ratio"], by["ORM"]["ci95"]) == (0.5, [0.5, 0.5])
            assert (by["SP-PRM"]["ratio"], by["SP-PRM"]["ci95"]) == (0.25, [0.25, 0.25])
            assert (by["sp_prm_cheaper_share"], by["orm_cheaper_share"]) == (1.0, 0.0)
    lines = reports.reach_section(reach)
    assert ("| the independent RM | policy + RM tokens | 0.50x [0.50x, 0.50x] | 0.25x [0.25x, 0.25x] | 1.00 / 0.00 |"
            in lines)
    assert ("- Does the SP-PRM as rejector reach Best-of-4's reward (by the independent RM) at <= 0.35x its policy + "
            "RM tokens? yes: its whole interval is at or below 0.35x.") in lines
    assert ("- At less compute than the ORM as rejector? Less in 100% of resamples, more in 0% (yes, beyond the "
            "noise).") in lines


@pytest.mark.parametrize("ci,shares,answer,than", [
    ([0.2, 0.5], (0.6, 0.3), "not decided at this size: the interval holds 0.35x", "(cannot be told apart)"),
    ([0.4, 0.9], (0.01, 0.98), "no: its interval lies above 0.35x", "(no, beyond the noise)"),
    ([0.3, math.inf], (0.5, 0.1), "not decided at this size: the interval holds 0.35x", "(cannot be told apart)"),
    ([math.inf, math.inf], (0.0, 0.0), "no: in over 97.5% of resamples no run reaches it", "(cannot be told apart)")])
def test_the_reach_verdict_is_worded_by_its_interval(ci, shares, answer, than):
    """By the interval, not the point: an interval that holds 0.35x decides nothing; ties (both rejectors
    unreached) count for neither."""
    reach = {"target_n": 16, "reference": {"compute": {"SP-PRM": {"ci95": ci}, "sp_prm_cheaper_share": shares[0],
                                                       "orm_cheaper_share": shares[1]}}}
    lines = reports.reach_verdict(reach)
    assert lines[0].endswith(f"(by the reference RM) at <= 0.35x its policy + RM tokens? {answer}.")
    assert lines[1].endswith(than + ".")


@pytest.mark.parametrize("sp_prm_accuracy,guide", [(0.544, "minilm"), (0.56, "decoder")])
def test_the_payoff_applies_the_bar_said_before_running(tmp_path, capsys, sp_prm_accuracy, guide):
    """A decoder RM under the bar cannot rank: then make reproduce's MiniLM RMs guide every run, calibration
    included; at the bar the part's own decoder RMs guide."""
    s = dataclasses_replace(reproduce.CPU, payoff=dataclasses_replace(reproduce.CPU.payoff, prompts=4))
    decoder = {"orm": str(tmp_path / "payoff" / "orm"), "sp-prm": str(tmp_path / "payoff" / "sp-prm")}
    minilm = {"orm": "r/orm_s0", "sp-prm": "r/sp-prm"}
    for rm, accuracy in (("orm", 0.583), ("sp-prm", sp_prm_accuracy)):
        write(os.path.join(decoder[rm], "eval.json"), {"accuracy": accuracy})
    choice = {"path": "r/orm_s2", "independent": "r/orm_s1"}
    stages = experiment.guides_by_the_bar(s, s.payoff, str(tmp_path / "payoff"), "data", choice, "payoff", decoder,
                                          minilm)
    decodes = [st for st in stages if not callable(st) and st.script == "04_decode.py"]
    expected = minilm if guide == "minilm" else decoder
    assert {st.settings["rm"] for st in decodes} == set(expected.values())
    assert all(st.settings["rm"] == expected["orm"] for st in decodes if st.name.endswith("-orm"))
    assert {st.settings["max_length"] for st in decodes} == {512}  # an encoder guide reads what the yardsticks do
    # encoder guides score through text: the SP-PRM's Best-of-N ranks the ORM's samples instead of drawing them
    ranked = {st.name: st.settings.get("samples_of") for st in decodes if st.method[0] == "bon"}
    assert ranked["payoff-decode-bon8-sp-prm"] == (str(tmp_path / "payoff" / "gen_bon8_orm.jsonl")
                                                   if guide == "minilm" else None)
    assert ranked["payoff-decode-bon8-orm"] is None
    saved = {st.name for st in decodes if st.settings.get("save_candidates")}
    assert saved == ({f"payoff-decode-bon{n}-orm" for n in s.payoff.ns} | {"payoff-calibration-decode"}
                     if guide == "minilm" else {"payoff-decode-bon16-orm", "payoff-calibration-decode"})
    calibration = next(st for st in decodes if st.name == "payoff-calibration-decode")
    assert calibration.method == ("bon", {"n": 32})  # its own N: more samples, a steadier tau
    said = capsys.readouterr().out
    assert ("held-out accuracy under the bar 0.56: sp-prm (smollm2-135m-l6) 0.544" in said) == (guide == "minilm")


def test_a_stopped_payoff_has_its_headline_runs_first():
    runs = experiment.specrej_runs(reproduce.CPU.payoff, "d")
    order = [(tag, rm) for _, _, _, tag, rm, _ in experiment.headline_first(runs, 16)]
    assert sorted(order) == sorted((tag, rm) for _, _, _, tag, rm, _ in runs)
    # rejection at N = 32 after every Best-of-N
    assert [tag for tag, _ in order[::2]] == ["specrej16_a0.5", "specrej16_aauto", "bon16", "bon4", "bon8", "bon32",
                                              "specrej32_a0.5", "specrej32_aauto"]
    assert [rm for _, rm in order] == ["ORM", "SP-PRM"] * 8


def test_the_payoff_page_judges_its_decoder_rms_by_the_bar_said_before_running(tmp_path):
    d = tmp_path / "payoff"
    for tag, accuracy in (("orm", 0.583), ("sp-prm", 0.559), ("ablation", 0.56)):
        write(str(d / tag / "eval.json"), {"accuracy": accuracy, "accuracy_ci95": [accuracy - 0.05, accuracy + 0.05],
                                           "n": 307})
    curve = [{"t": 16, "ar_rm_sc": 0.55, "ar_rm_sc_ci95": [0.5, 0.6], "ar_rm_sc_diff": 0.0,
              "ar_rm_sc_diff_ci95": [0.0, 0.0], "reward_gap": 0.25}]
    write(str(d / "agreement.json"), {"rms": {"SP-PRM (smollm2-135m-l6)": {"curve": curve},
                                              "ORM (minilm-l6)": {"curve": curve}}})
    lines = reports.decoder_rms_section(str(d), "smollm2-135m-l6", 0.56)
    assert lines[0] == ("### The decoder RMs (smollm2-135m-l6): held-out accuracy against the bar said before running "
                        "(0.56)")
    assert lines[2:5] == ["- ORM: 0.583 [0.533, 0.633] (n=307): reaches the bar",
                          "- SP-PRM: 0.559 [0.509, 0.609] (n=307): too weak to rank",
                          "- Ablation: 0.560 [0.510, 0.610] (n=307): reaches the bar"]
    assert lines[6].startswith("The decoder SP-PRM fell under the bar: every run here is guided by make reproduce's")
    assert "| ORM (minilm-l6) - SP-PRM (smollm2-135m-l6) | 0.000 [0.000, 0.000] |" in lines


def test_the_reach_file_holds_null_where_no_run_reaches(tmp_path):
    from common.io import write_json

    write_json(str(tmp_path / "reach.json"), reports.json_safe({"ORM": {"ratio": math.inf, "ci95": [0.5, math.inf]}}))
    assert json.loads((tmp_path / "reach.json").read_text()) == {"ORM": {"ratio": None, "ci95": [0.5, None]}}
