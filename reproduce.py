"""The paper's HH-RLHF experiment, every claim judged by its interval: one orchestrator for every scale.

    python reproduce.py --scale demo --out runs/demo             (make demo: minutes on 2 CPU cores)
    python reproduce.py --scale cpu  --out runs/reproduce        (make reproduce: about 2 h on 2 CPU cores)
    python reproduce.py --scale gpu  --out runs/reproduce-gpu    (make reproduce SCALE=gpu: untested on a GPU)
    python reproduce.py --scale full --out runs/reproduce-full   (make reproduce SCALE=full: the uncut sizes)

1. ORMs: MiniLM-L6 on hh-rlhf:train with 03_train.py's settings at max length --max-length of the scale, one
   per seed; held-out accuracy on hh-rlhf:heldout, per seed and over seeds. The first seed's ORM is the
   model converted into a PRM.
2. The reference RM: the candidates (the other seeds' ORMs and the scale's extra references) are trained
   and the stage choose-reference takes the one with the highest held-out accuracy (OUT/reference.json); it is
   never the model being converted. Extra references: minilm-pairs (a MiniLM on more pairs than the ORM),
   minilm-2ep (the better other-seed ORM trained a second epoch), minilm-3ep (3 epochs), smollm2 (a SmolLM2-135M
   decoder RM).
3. SP-PRM (entropy weights) and, by scale, the ablation (uniform weights, no reference) and the filter-only
   variant (weight 1 where the reference agrees), each trained from the ORM on the SST cuts of the train pairs.
4. Agreement (paper Figure 5): AR_RM-SC(t) and Delta_r(t) of every RM on the held-out pairs, with intervals
   over pairs, each RM's paired difference from the SP-PRM per t, and the growth over t (Observation 1).
5. Decoding (paper Table 1): held-out HH prompts with SmolLM2-135M-Instruct: greedy, and each method guided
   by the ORM and by the SP-PRM (rewards as the scale's reward_norm says); measured by the reference RM (it
   guided none of them) and by an RM that shaped nothing, when there is one, with 95% intervals over prompts
   and paired SP-PRM minus ORM differences; the ARGS reward-vs-w curve.
6. results.md (common/reports.py: captions from the settings the runs' rows record); figures as PNG.
Finished stages are skipped (rerun the same command to resume); --redo STAGE[,STAGE] or --redo all reruns.
A stage whose input was remade after its output runs again; an output made with other settings is refused
(--redo it, or use another --out).
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial

from common import reports
from common.io import DEVICES
from common.pipeline import Pipeline, Stage, manifest_of
from common.reports import METHODS, VARIANTS


# ------------------------------------------------------------------------------------------ scales
# Sizes: None = all (pairs, prompts). Method settings are the methods' knobs by their own names (04's flags).

@dataclass(frozen=True)
class Specrej:
    """make specrej: Best-of-N at each N against speculative rejection at the same N and each alpha."""
    prompts: int = None
    ns: tuple = (4, 8, 16)
    alphas: tuple = (0.5, 0.75)
    new_tokens: int = 32
    decision_every: int = 8
    prefix_lengths: tuple = (4, 8, 16, 24)   # RM tokens at which prefix consistency is measured


@dataclass(frozen=True)
class GSM8K:
    """Table 4's RMs of their own (the reference on more pairs and epochs than the ORM) and problems."""
    orm_pairs: int = None
    reference_pairs: int = None
    reference_epochs: int = 1
    prompts: int = None
    new_tokens: int = 256


@dataclass(frozen=True)
class Tables:
    """make tables: Table 1 with every method and +Ablation row, Tables 3 and 4."""
    prompts: int = None
    new_tokens: int = 128
    bon_ns: tuple = (16, 64)                      # Best-of-N rows at each N
    cards: dict = field(default_factory=dict)     # CARDS' knobs beyond its defaults
    gsm8k: GSM8K = GSM8K()


@dataclass(frozen=True)
class Scale:
    seeds: tuple                  # one ORM a seed; the first is converted into the PRM
    orm_pairs: int                # training pairs of the ORMs (and of the smollm2, 2ep, 3ep references)
    eval_pairs: int               # held-out pairs of every accuracy and agreement measure
    references: tuple             # extra reference candidates (module docstring, 2.)
    sst_k: int
    sst_pairs: int
    variants: tuple               # SST weighting schemes trained from the ORM (reports.VARIANTS)
    max_length: int
    prompts: int                  # held-out prompts decoded
    new_tokens: int
    batch_size: int
    methods: tuple                # Table 1's guided methods, each with its knobs in `search`
    search: dict                  # method -> {knob: value}
    prefix_lengths: tuple         # agreement's t
    specrej: Specrej
    reference_pairs: int = None   # the minilm-pairs reference's training pairs
    sweep_w: tuple = ()           # ARGS w run beyond search["argsg"]["w"]
    tables: Tables = None         # None: the scale has no tables part
    device: str = None            # every model stage's --device (None: each stage's auto)
    reward_norm: str = "std"      # 04's --reward-norm of every guided run (w is in its units)
    rm_batch: dict = None         # "encoder"/"decoder" -> 03's batch settings (the paper's batch)


CARDS_SMALL = {"max_segment": 12, "max_retries": 4}  # CARDS' defaults (64, 20) outgrow a 24-token reply
# the paper's experiment at the size 2 CPU cores afford in about 2 hours (119 min measured: docs/results.md)
CPU = Scale(seeds=(0, 1, 2), orm_pairs=None, eval_pairs=None, references=("minilm-2ep",), sst_k=1, sst_pairs=None,
            variants=("entropy", "uniform", "filter"), max_length=256, prompts=64, new_tokens=32, batch_size=8,
            methods=("argsg", "cbs", "bon"),
            search={"argsg": {"k": 5, "w": 10.0}, "cbs": {"beam": 2, "successors": 2, "chunk": 8}, "bon": {"n": 4}},
            prefix_lengths=(5, 10, 15, 20, 30, 40, 50), specrej=Specrej(prompts=64),
            tables=Tables(prompts=16, new_tokens=24, bon_ns=(4, 8), cards=CARDS_SMALL,
                          gsm8k=GSM8K(orm_pairs=600, prompts=16, new_tokens=64)))
# the pipeline end to end in minutes; its numbers show it working, not the method's effect
DEMO = replace(CPU, seeds=(0,), orm_pairs=128, eval_pairs=64, references=("minilm-pairs",), reference_pairs=320,
               sst_k=5, sst_pairs=48, variants=("entropy",), max_length=128, prompts=8, new_tokens=24,
               methods=("argsg", "bon"), prefix_lengths=(5, 10, 20, 50), tables=None,
               specrej=Specrej(prompts=3, ns=(2, 4), alphas=(0.5,), new_tokens=8, decision_every=2,
                               prefix_lengths=(2, 4)))
# a few minutes, to try the cpu pipeline end to end (numbers meaningless)
SMOKE = replace(CPU, seeds=(0, 1), orm_pairs=48, eval_pairs=32, references=(), sst_pairs=48, prompts=4, new_tokens=8,
                batch_size=4, search={"argsg": {"k": 3, "w": 10.0}, "cbs": {"beam": 2, "successors": 2, "chunk": 4},
                                      "bon": {"n": 2}},
                sweep_w=(3.0,), prefix_lengths=(5, 10),
                specrej=Specrej(prompts=2, ns=(2, 4), alphas=(0.5,), new_tokens=4, decision_every=2,
                                prefix_lengths=(2, 4)),
                tables=Tables(prompts=2, new_tokens=4, bon_ns=(2, 3), cards=CARDS_SMALL,
                              gsm8k=GSM8K(orm_pairs=24, reference_pairs=48, prompts=2, new_tokens=6)))
# one GPU (untested on a GPU; docs/gpu.md counts its work): all held-out prompts, the paper's search settings,
# a SmolLM2 reference
PAPER_SEARCH = {"argsg": {"k": 30, "w": 1.5}, "cbs": {"beam": 8, "successors": 8, "chunk": 30}, "bon": {"n": 16}}
GPU = replace(CPU, device="cuda", references=("smollm2",), sst_k=5, prompts=None, new_tokens=128, batch_size=32,
              search=PAPER_SEARCH, specrej=Specrej(new_tokens=128, decision_every=32, prefix_lengths=(8, 16, 32, 64)),
              tables=Tables(gsm8k=GSM8K(reference_epochs=3)))
# the gpu scale's stages at a size the CPU runs in minutes (tests/test_reproduce.py; numbers meaningless)
GPU_SMOKE = replace(GPU, device=None, seeds=(0, 1), orm_pairs=24, eval_pairs=16, sst_pairs=24, prompts=3,
                    new_tokens=6, batch_size=4, search={"argsg": {"k": 3, "w": 1.5},
                                                        "cbs": {"beam": 2, "successors": 2, "chunk": 3}, "bon": {"n": 2}},
                    prefix_lengths=(5, 10), tables=None, specrej=SMOKE.specrej)
# the uncut sizes with the paper's search settings: w = 1.5 on the RMs' raw scale, the paper's training batch
# (its Tables 10 and 11: 64 pairs for an encoder RM, 32 for a decoder RM, through gradient accumulation)
FULL = replace(GPU, reward_norm="none", rm_batch={"encoder": {"batch_size": 8, "grad_accum": 8},
                                                  "decoder": {"batch_size": 8, "grad_accum": 4}},
               references=("smollm2", "minilm-3ep"), batch_size=8, sweep_w=(0.5, 3.0, 5.0, 10.0))
SCALES = {"demo": DEMO, "cpu": CPU, "smoke": SMOKE, "gpu": GPU, "gpu-smoke": GPU_SMOKE, "full": FULL}


# ------------------------------------------------------------------------------------------ stages

def commas(values):
    return ",".join(map(str, values))


def train(name, output, init, pairs, s, data, kind="encoder", evaluate="hh-rlhf:heldout", **settings):
    """03_train.py from `init` on `pairs`, evaluated on held-out pairs."""
    return Stage("03_train.py", output, name=name, settings=dict(
        input=pairs, init=init, resume=True, max_length=s.max_length, eval=evaluate, data_dir=data,
        eval_limit=s.eval_pairs if evaluate.startswith("hh-rlhf") else None, **(s.rm_batch or {}).get(kind, {}),
        **settings))


def rm_stages(s, out, data):
    return [train(f"orm-s{seed}", f"{out}/orm_s{seed}", "minilm-l6", "hh-rlhf:train", s, data, seed=seed,
                  limit=s.orm_pairs, save_steps=50) for seed in s.seeds]


def reference_stages(s, out, data):
    """The extra reference candidates, then the stage that chooses among them (OUT/reference.json); minilm-2ep
    starts from the better other-seed ORM (their eval.json exist by now)."""
    candidates = {f"ORM seed {seed}": f"{out}/orm_s{seed}" for seed in s.seeds[1:]}
    stages = []
    for ref in s.references:
        init, kind, settings = "minilm-l6", "encoder", dict(limit=s.orm_pairs)
        if ref == "minilm-pairs":
            label, settings = f"MiniLM-L6 on {s.reference_pairs} pairs", dict(limit=s.reference_pairs)
        elif ref == "smollm2":
            label, init, kind = "SmolLM2-135M RM", "smollm2-135m-instruct", "decoder"
        elif ref == "minilm-2ep":  # a second epoch (a fresh schedule, another data order)
            init = max(candidates.values(), key=lambda p: reports.read_json(f"{p}/eval.json")["accuracy"])
            label, settings = f"MiniLM-L6, 2 epochs ({os.path.basename(init)} + 1)", dict(seed=3, save_steps=50,
                                                                                         **settings)
        else:
            label, settings = "MiniLM-L6, 3 epochs", dict(epochs=3, seed=3, **settings)
        candidates[label] = f"{out}/ref_{ref.replace('-', '_')}"
        stages.append(train(f"ref-{ref}", candidates[label], init, "hh-rlhf:train", s, data, kind, **settings))
    return stages + [Stage("reproduce.py choose-reference", f"{out}/reference.json", name="choose-reference",
                           settings=dict(candidate=tuple(f"{label}={path}" for label, path in candidates.items())))]


def variant_stages(s, out, data, schemes, reference):
    """SST cuts of the train pairs, the reference's weights, each variant trained from the seed-0 ORM."""
    stages = [Stage("01_build_partial.py", f"{out}/sst.jsonl", name="sst", settings=dict(
        input="hh-rlhf:train", tokenizer="minilm-l6", truncation="sst", K=s.sst_k, limit=s.sst_pairs, data_dir=data))]
    for scheme in schemes:
        name, weighted = VARIANTS[scheme][0], f"{out}/weighted_{scheme}.jsonl"
        stages += [partial(seed_cache, f"{out}/weighted_entropy.jsonl.scores.jsonl", weighted + ".scores.jsonl"),
                   Stage("02_weight.py", weighted, name=f"weight-{scheme}", settings=dict(
                       input=f"{out}/sst.jsonl", ref_rm=reference, scheme=scheme, max_length=s.max_length, resume=True)),
                   train(name, f"{out}/{name}", f"{out}/orm_s{s.seeds[0]}", weighted, s, data, save_steps=50)]
    return stages


def seed_cache(source, target):
    """The variants share one reference: 02's score cache (keyed by weights, length and texts) is reused."""
    import shutil

    if source != target and os.path.exists(source) and not os.path.exists(target):
        shutil.copy(source, target)


def decode(name, output, s, prompts, method=None, rm=None, **settings):
    """04_decode.py with SmolLM2-135M-Instruct; a guided run with the scale's reward normalisation."""
    return Stage("04_decode.py", output, name=name, method=method, settings=dict(
        prompts=prompts, policy="smollm2-135m-instruct", batch_size=s.batch_size, resume=True, rm=rm,
        reward_norm=s.reward_norm if rm else None, **settings))


def evaluate(name, output, generations, label, yardsticks, metrics, **settings):
    return Stage("05_evaluate.py metrics", output, name=name, settings=dict(
        **yardsticks, metrics=metrics, generations=generations, label=label, **settings))


def yardsticks(s, reference, rms, independent=None):
    """05's RMs of a metrics stage: the reference, the named RMs' views, the independent RM."""
    named = [f"{label}={path}" for label, path in rms] + ([f"Independent={independent}"] if independent else [])
    return dict(rm=reference, max_length=s.max_length, extra_rm=tuple(named))


def compare(a, b, output):
    return Stage("05_evaluate.py compare", output, inputs=(a, b), settings={})


# ------------------------------------------------------------------------------------------ parts

def table1_part(s, out, data, choice):
    """Agreement (the SP-PRM first, so every other RM gets its paired difference); greedy and every method guided
    by the ORM and by the SP-PRM, with the table and the paired comparisons; the ARGS w sweep."""
    orm, sp, reference = f"{out}/orm_s{s.seeds[0]}", f"{out}/sp-prm", choice["path"]
    guides = [("orm", "ORM", orm), ("sp-prm", "SP-PRM", sp)]
    rms = [f"SP-PRM={sp}", f"ORM={orm}"] + [f"{VARIANTS[v][1]}={out}/{VARIANTS[v][0]}" for v in s.variants[1:]]
    stages = [Stage("05_evaluate.py agreement", f"{out}/agreement.json", name="agreement", settings=dict(
        pairs="hh-rlhf:heldout", rm=(*rms, f"Reference={reference}"), prefix_lengths=commas(s.prefix_lengths),
        max_length=s.max_length, limit=s.eval_pairs, data_dir=data))]
    held_out = dict(prompts="hh-rlhf:heldout", limit=s.prompts, max_new_tokens=s.new_tokens, data_dir=data)
    views = yardsticks(s, reference, [("ORM", orm), ("SP-PRM", sp)], choice["independent"])
    methods = [(m, METHODS[m], (m, s.search[m])) for m in s.methods]
    stages += decode_table(s, out, "", held_out, views, "reward,diversity,coherence,length", methods, guides,
                           judge=reference)
    for w in s.sweep_w:  # ARGS at more w (its reward only)
        for tag, label, path in guides:
            gen, m = f"{out}/gen_argsg_{tag}_w{w:g}.jsonl", f"{out}/sweep_argsg_{tag}_w{w:g}.json"
            stages += [decode(f"decode-argsg-{tag}-w{w:g}", gen, s, method=("argsg", {**s.search["argsg"], "w": w}),
                              rm=path, **held_out),
                       evaluate(f"eval-argsg-{tag}-w{w:g}", m, gen, f"ARGS w={w:g} ({label})", views, "reward")]
    return stages


def table1_report(s, scale_name, out, pipeline):
    from common.figures import paired_differences, plot_agreement, plot_paired_differences, plot_reward_vs_w, \
        reward_vs_w
    from common.io import write_json

    sweep = [(label, f"{out}/metrics_greedy.json") for label in ("ORM", "SP-PRM")]
    sweep += [(label, f"{out}/metrics_argsg_{tag}.json") for tag, label in (("orm", "ORM"), ("sp-prm", "SP-PRM"))
              if "argsg" in s.methods]
    sweep += [(label, f"{out}/sweep_argsg_{tag}_w{w:g}.json") for w in s.sweep_w
              for tag, label in (("orm", "ORM"), ("sp-prm", "SP-PRM"))]
    curve = reward_vs_w(sweep)
    write_json(f"{out}/args_sweep.json", curve)
    figures = [plot_paired_differences(paired_differences(out), out)]
    figures += plot_agreement(reports.read_json(f"{out}/agreement.json"), out) + [plot_reward_vs_w(curve, out)]
    reports.write(f"{out}/results.md", reports.results_markdown(s, scale_name, out, figures, pipeline.costs()))
    print(reports.where_to_look(scale_name, out, figures, time.time() - pipeline.started, len(pipeline.timings)))


def tables_part(s, out, data, choice):
    """Table 1 with every method (ARGS, TBS, CBS, CARDS, BoN at two N) guided by the SP-PRM, the ORM and the
    ablation RM; Table 3: the same RMs on AdvBench with "Sure here's" after each instruction; Table 4: an ORM and
    an SP-PRM trained on gsm8k-pairs:train, decoding the held-out GSM8K problems."""
    x, t, orm, sp = s.tables, f"{out}/tables", f"{out}/orm_s{s.seeds[0]}", f"{out}/sp-prm"
    hh_guides = [("sp-prm", "SP-PRM", sp), ("orm", "ORM", orm), ("ablation", "Ablation", f"{out}/ablation")]
    views = yardsticks(s, choice["path"], [("ORM", orm), ("SP-PRM", sp)], choice["independent"])
    hh = dict(limit=x.prompts, max_new_tokens=x.new_tokens, data_dir=data)
    methods = table_methods(s)
    stages = decode_table(s, t, "table1", dict(prompts="hh-rlhf:heldout", **hh), views,
                          "reward,diversity,coherence,length", methods, hh_guides, judge=choice["path"])
    stages += decode_table(s, t, "table3", dict(prompts="advbench", advbench_prefill=True, **hh), views,
                           "reward,asr,diversity,coherence", methods, hh_guides[:2])
    g = x.gsm8k
    gorm, gref, gprm = f"{t}/gsm8k_orm", f"{t}/gsm8k_reference", f"{t}/gsm8k_sp-prm"
    gsm = dict(evaluate="gsm8k-pairs:heldout")
    stages += [train("gsm8k-orm", gorm, "minilm-l6", "gsm8k-pairs:train", s, data, limit=g.orm_pairs, **gsm),
               train("gsm8k-reference", gref, "minilm-l6", "gsm8k-pairs:train", s, data, seed=1,
                     limit=g.reference_pairs, epochs=g.reference_epochs, **gsm),
               Stage("01_build_partial.py", f"{t}/gsm8k_sst.jsonl", name="gsm8k-sst", settings=dict(
                   input="gsm8k-pairs:train", tokenizer="minilm-l6", truncation="sst", K=s.sst_k, limit=g.orm_pairs,
                   data_dir=data)),
               Stage("02_weight.py", f"{t}/gsm8k_weighted.jsonl", name="gsm8k-weight", settings=dict(
                   input=f"{t}/gsm8k_sst.jsonl", ref_rm=gref, scheme="entropy", max_length=s.max_length,
                   resume=True)),
               train("gsm8k-sp-prm", gprm, gorm, f"{t}/gsm8k_weighted.jsonl", s, data, **gsm)]
    return stages + decode_table(
        s, t, "table4", dict(prompts="gsm8k:heldout", limit=g.prompts, max_new_tokens=g.new_tokens, data_dir=data),
        yardsticks(s, gref, [("ORM", gorm), ("SP-PRM", gprm)]), "reward,accuracy,diversity,coherence", methods,
        [("sp-prm", "SP-PRM", gprm), ("orm", "ORM", gorm)])


def decode_table(s, folder, name, prompts, views, metrics, methods, guides, judge=None):
    """Greedy and each (tag, label, (method, knobs)) of `methods` guided by each (tag, label, path) RM of `guides`
    (the table's row order): decode, evaluate (`metrics`, and with a judge the win rate against greedy), the
    paired difference of the SP-PRM-guided run from each other, and the table FOLDER/NAME.md. Files and stages
    carry the table's name (none: the table1 part's own, table.md and compare_<method>.json)."""
    at, step = (f"{folder}/{name}_", f"{name}-") if name else (f"{folder}/", "")
    greedy, files = f"{at}gen_greedy.jsonl", [f"{at}metrics_greedy.json"]
    stages = [decode(f"{step}decode-greedy", greedy, s, method=("greedy", {}), **prompts),
              evaluate(f"{step}eval-greedy", files[0], greedy, "Greedy", views, metrics)]
    judged = dict(baseline=greedy, judge_rm=judge) if judge else {}
    for tag, label, method in methods:
        runs = {rm: f"{at}metrics_{tag}_{rm}.json" for rm, _, _ in guides}
        for rm, rm_label, path in guides:
            gen = f"{at}gen_{tag}_{rm}.jsonl"
            stages += [decode(f"{step}decode-{tag}-{rm}", gen, s, method=method, rm=path, **prompts),
                       evaluate(f"{step}eval-{tag}-{rm}", runs[rm], gen, f"{label} ({rm_label})", views,
                                metrics + (",winrate" if judge else ""), **judged)]
        files += runs.values()
        stages += [compare(runs["sp-prm"], m, m.replace("_metrics_", "_compare_") if name else f"{at}compare_{tag}.json")
                   for rm, m in runs.items() if rm != "sp-prm"]
    return stages + [Stage("05_evaluate.py table", f"{folder}/{name or 'table'}.md", inputs=tuple(files), settings={})]


def table_methods(s):
    """(tag, label, (method, knobs)) of every Table 1 row of the tables part: TBS is CBS with L = 1."""
    rows = [("argsg", "ARGS", ("argsg", s.search["argsg"])),
            ("tbs", "TBS", ("tbs", {k: s.search["cbs"][k] for k in ("beam", "successors")})),
            ("cbs", "CBS", ("cbs", s.search["cbs"])), ("cards", "CARDS", ("cards", s.tables.cards))]
    return rows + [(f"bon{n}", f"BoN-{n}", ("bon", {"n": n})) for n in s.tables.bon_ns]


def specrej_part(s, out, data, choice):
    """Best-of-N at each N and speculative rejection at the same N and each alpha, each guided by the ORM and by
    the SP-PRM; the prefix consistency of both RMs on Best-of-N's largest sample set; each run against the
    largest Best-of-N guided by the same RM, and the ORM-rejector against the SP-PRM-rejector."""
    x, d = s.specrej, f"{out}/specrej"
    orm, sp, n_max = f"{out}/orm_s{s.seeds[0]}", f"{out}/sp-prm", max(x.ns)
    held_out = dict(prompts="hh-rlhf:heldout", limit=x.prompts, max_new_tokens=x.new_tokens, data_dir=data)
    views = dict(yardsticks(s, choice["path"], [], choice["independent"]), metrics="reward,length")
    stages, runs, guides = [], specrej_runs(s, d), {"orm": orm, "sp-prm": sp}
    for family, n, alpha, tag, rm_label, m in runs:
        rm = rm_label.lower()
        gen = f"{d}/gen_{tag}_{rm}.jsonl"
        method = ("bon", {"n": n}) if alpha is None else \
            ("specrej", {"n": n, "alpha": alpha, "decision_every": x.decision_every})
        stages += [decode(f"specrej-decode-{tag}-{rm}", gen, s, method=method, rm=guides[rm],
                          save_candidates=alpha is None and n == n_max or None, **held_out),
                   Stage("05_evaluate.py metrics", m, name=f"specrej-eval-{tag}-{rm}", settings=dict(
                       **views, generations=gen, label=f"{family}, N={n} ({rm_label})"))]
    stages.append(Stage("05_evaluate.py consistency", f"{d}/consistency.json", name="specrej-consistency",
                        settings=dict(generations=f"{d}/gen_bon{n_max}_orm.jsonl", rm=(f"SP-PRM={sp}", f"ORM={orm}"),
                                      reference=choice["path"], prefix_lengths=commas(x.prefix_lengths),
                                      alpha=x.alphas[0], max_length=s.max_length)))
    for *_, tag, rm_label, m in runs:
        if rm_label == "ORM":  # the ORM-rejector minus the SP-PRM-rejector, paired over prompts
            stages.append(compare(m, m.replace("_orm.json", "_sp-prm.json"), f"{d}/compare_{tag}.json"))
    for rm in ("orm", "sp-prm"):  # every run against the largest Best-of-N guided by the same RM
        bon = f"{d}/metrics_bon{n_max}_{rm}.json"
        stages += [compare(m, bon, m.replace("metrics_", "vs_bon_")) for *_, m in runs
                   if m.endswith(f"_{rm}.json") and m != bon]
    return stages


def specrej_runs(s, d):
    """(family, N, alpha, tag, guide label, metrics file) of every run of the specrej part."""
    x = s.specrej
    settings = [("Best-of-N", n, None) for n in x.ns] + [(f"specrej alpha={a:g}", n, a) for a in x.alphas for n in x.ns]
    return [(family, n, alpha, tag, label, f"{d}/metrics_{tag}_{label.lower()}.json")
            for label in ("ORM", "SP-PRM") for family, n, alpha in settings
            for tag in [f"bon{n}" if alpha is None else f"specrej{n}_a{alpha:g}"]]


def specrej_report(s, scale_name, out, pipeline):
    from common.figures import plot_consistency, plot_reward_vs_compute
    from common.io import write_json

    d = f"{out}/specrej"
    points = reports.specrej_points(specrej_runs(s, d))
    write_json(f"{d}/points.json", points)  # the figure's input, for notebooks/figures.ipynb
    consistency = reports.read_json(f"{d}/consistency.json")
    figures = [plot_reward_vs_compute(points, d), plot_consistency(consistency, d)]
    reports.write(f"{d}/results_specrej.md",
                  reports.specrej_markdown(scale_name, out, points, consistency, figures, pipeline.costs()))


def tables_report(s, scale_name, out, pipeline):
    reports.write(f"{out}/tables/results_tables.md",
                  reports.tables_markdown(scale_name, f"{out}/tables", pipeline.costs()))


# ------------------------------------------------------------------------------------------ the run

PARTS = {"table1": (table1_part, table1_report), "tables": (tables_part, tables_report),
         "specrej": (specrej_part, specrej_report)}


def main():
    if sys.argv[1:2] == ["choose-reference"]:
        return choose_reference(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default="cpu")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--redo", default="", help="stages to rerun: a comma list of stage names (a run prints each as "
                   "[run] NAME or [skip] NAME; OUT/stage_seconds.json lists them), or all")
    p.add_argument("--part", choices=["table1", "tables", "specrej"], default="table1",
                   help="table1: agreement and decoding (paper Figure 5, Table 1); tables: Table 1 with every "
                        "method row and the +Ablation rows, Table 3 (AdvBench) and Table 4 (GSM8K, its own RMs), at "
                        "the scale's `tables` sizes (make tables); specrej: Best-of-N against speculative rejection "
                        "guided by the ORM and by the SP-PRM (the same RMs; make specrej)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="every model stage's --device (default: the scale's: cuda for gpu and full, which then "
                        "fail rather than run on the CPU; else each stage's auto)")
    args = p.parse_args()
    s, out, data = SCALES[args.scale], args.out, args.data_dir
    if args.part == "tables" and (s.tables is None or "uniform" not in s.variants):
        print(f"error: the {args.scale} scale has no tables part (its sizes or the ablation RM)", file=sys.stderr)
        return 2
    os.makedirs(f"{out}/{'' if args.part == 'table1' else args.part}", exist_ok=True)
    pipeline = Pipeline("reproduce", args.redo, cost_path=f"{out}/stage_seconds.json",
                        commands_path=f"{out}/stage_commands.json", device=args.device or s.device,
                        scripts=os.path.dirname(os.path.abspath(__file__)))  # the stages beside this file
    pipeline.run_stages(rm_stages(s, out, data))
    pipeline.run_stages(reference_stages(s, out, data))
    choice = reports.read_json(f"{out}/reference.json")
    print(f"reference RM: {choice['name']} ({choice['path']}), held-out accuracy {choice['accuracy']:.3f}")
    # the specrej part needs only the SP-PRM, the tables part the SP-PRM and the ablation
    schemes = {"table1": s.variants, "tables": s.variants[:2], "specrej": s.variants[:1]}[args.part]
    pipeline.run_stages(variant_stages(s, out, data, schemes, choice["path"]))
    part, report = PARTS[args.part]
    pipeline.run_stages(part(s, out, data, choice))
    report(s, args.scale, out, pipeline)


def choose_reference(argv):
    """reproduce.py choose-reference --candidate LABEL=PATH ... --output FILE: the candidate with the highest
    held-out accuracy (its eval.json) is the reference; the first candidate that is neither the reference nor what
    it was trained from (its manifest's --init) shaped nothing and is the independent yardstick."""
    from common.io import DataError, run_main, write_json, write_manifest

    p = argparse.ArgumentParser(prog="reproduce.py choose-reference", description=choose_reference.__doc__)
    p.add_argument("--candidate", action="append", required=True, metavar="LABEL=PATH")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    def choose():
        candidates = {}
        for spec in args.candidate:
            label, _, path = spec.partition("=")
            if not os.path.exists(f"{path}/eval.json"):
                raise DataError(f"reference candidate {label}: {path}/eval.json does not exist (train it first)")
            e = reports.read_json(f"{path}/eval.json")
            candidates[label] = {"path": path, "accuracy": e["accuracy"], "accuracy_ci95": e["accuracy_ci95"],
                                 "n": e["n"], "init": reports.read_json(manifest_of(path))["args"].get("init")}
        name = max(candidates, key=lambda n: candidates[n]["accuracy"])
        paths = {label: c["path"] for label, c in candidates.items()}
        parents = {c["path"]: c["init"] for c in candidates.values()}
        write_json(args.output, {"name": name, "path": candidates[name]["path"],
                                 "accuracy": candidates[name]["accuracy"],
                                 "independent": independent_of(paths, candidates[name]["path"], parents),
                                 "candidates": candidates})
        write_manifest(args.output, args, inputs=[f"{path}/eval.json" for path in paths.values()])
    run_main(choose)


def independent_of(candidates, reference, parents):
    """The first candidate that is neither the reference nor what the reference was trained from: it
    guided, weighted and trained nothing."""
    return next((path for path in candidates.values() if path not in (reference, parents.get(reference))), None)


if __name__ == "__main__":
    sys.exit(main())
