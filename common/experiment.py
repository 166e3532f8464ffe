"""The paper's experiment as stages (reproduce.py runs them at the sizes of one of its scales): the RMs, the
reference's choice, the SP-PRM variants, and each part's decoding and evaluation, as `Stage` records of the
numbered scripts (common/pipeline.py spells their command lines); each part's report (common/reports.py renders it).

A part is a function (scale, out folder, data folder, the reference choice) -> stages, and a report
(scale, scale name, out folder, pipeline) -> None; PARTS names them."""
import argparse
import os
import time
from functools import partial

from common import reports
from common.pipeline import Stage, manifest_of
from common.reports import METHODS, VARIANTS

# ------------------------------------------------------------------------------------------ stages

def commas(values):
    return ",".join(map(str, values))


def train(name, output, init, pairs, s, data, kind="encoder", evaluate="hh-rlhf:heldout", **settings):
    """03_train.py from `init` on `pairs`, evaluated on held-out pairs."""
    return Stage("03_train.py", output, name=name, settings={**dict(
        input=pairs, init=init, resume=True, max_length=s.max_length, eval=evaluate, data_dir=data,
        eval_limit=s.eval_pairs if evaluate.startswith("hh-rlhf") else None, **(s.rm_batch or {}).get(kind, {})),
        **settings})


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
    if not schemes:
        return []
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
    table1 = dict(hh, limit=x.table1_prompts or x.prompts, offset=x.table1_offset or None)
    stages = decode_table(s, t, "table1", dict(prompts="hh-rlhf:heldout", **table1), views,
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


def decode_table(s, folder, name, prompts, views, metrics, methods, guides, judge=None, lead="sp-prm"):
    """Greedy and each (tag, label, (method, knobs)) of `methods` guided by each (tag, label, path) RM of `guides`
    (the table's row order): decode, evaluate (`metrics`, and with a judge the win rate against greedy), the
    paired difference of the run guided by `lead` (a guide's tag) from each other, and the table FOLDER/NAME.md. Files and stages
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
        stages += [compare(runs[lead], m, m.replace("_metrics_", "_compare_") if name else f"{at}compare_{tag}.json")
                   for rm, m in runs.items() if rm != lead]
    return stages + [Stage("05_evaluate.py table", f"{folder}/{name or 'table'}.md", inputs=tuple(files), settings={})]


def table_methods(s):
    """(tag, label, (method, knobs)) of every Table 1 row of the tables part: TBS is CBS with L = 1."""
    rows = [("argsg", "ARGS", ("argsg", s.search["argsg"])),
            ("tbs", "TBS", ("tbs", {k: s.search["cbs"][k] for k in ("beam", "successors")})),
            ("cbs", "CBS", ("cbs", s.search["cbs"])), ("cards", "CARDS", ("cards", s.tables.cards))]
    return rows + [(f"bon{n}", f"BoN-{n}", ("bon", {"n": n})) for n in s.tables.bon_ns]


def specrej_part(s, out, data, choice, name="specrej"):
    """Best-of-N at each N and speculative rejection at each of its N and alpha, each guided by the ORM and by
    the SP-PRM (make reproduce's, or with `rm_init` decoder RMs of the part's own); "auto" alphas take the
    schedule calibrated on other held-out prompts; the prefix consistency of both RMs on the target Best-of-N's
    samples; each run against the target Best-of-N guided by the same RM, and the ORM-rejector against the
    SP-PRM-rejector. name: the scale's field and the folder (specrej, payoff)."""
    x, d = getattr(s, name), f"{out}/{name}"
    minilm = {"orm": f"{out}/orm_s{s.seeds[0]}", "sp-prm": f"{out}/sp-prm"}
    if not x.rm_init:
        return guided_stages(s, x, d, data, choice, name, minilm, encoders=True)
    stages, decoder = decoder_rm_stages(s, x, d, out, data, choice["path"], name)
    return stages + [partial(guides_by_the_bar, s, x, d, data, choice, name, decoder, minilm)]


def guides_by_the_bar(s, x, d, data, choice, name, decoder, minilm):
    """The rule said before running: the decoder RMs guide if each one's held-out accuracy reaches x.rm_bar;
    under it one of them is too weak to rank, and make reproduce's MiniLM RMs guide instead, their compute
    counted as it is (an encoder re-reads prompt and prefix at every decision)."""
    accuracy = {rm: reports.read_json(f"{path}/eval.json")["accuracy"] for rm, path in decoder.items()}
    weak = {rm: a for rm, a in accuracy.items() if a < x.rm_bar}
    if weak:
        print(f"note: {name}: held-out accuracy under the bar {x.rm_bar:g}: "
              + ", ".join(f"{rm} ({x.rm_init}) {a:.3f}" for rm, a in weak.items())
              + "; the MiniLM RMs guide (the rule said before running)")
    return guided_stages(s, x, d, data, choice, name, minilm if weak else decoder, encoders=bool(weak))


def guided_stages(s, x, d, data, choice, name, guides, encoders):
    """The part's decoding, evaluation and comparisons with GUIDES ({"orm", "sp-prm"} -> RM folder). Encoder
    guides score through text, so the SP-PRM's Best-of-N ranks the samples the ORM's drew (04 --samples-of:
    the same rows as drawing them again, policy work included); a decoder guide's cached path counts its RM
    tokens otherwise, so there each Best-of-N draws its own."""
    n_max = max(x.ns)
    n_target = x.target_n or n_max  # the Best-of-N every run is measured against; consistency reads its samples
    stages = []
    held_out = dict(prompts="hh-rlhf:heldout", limit=x.prompts, max_new_tokens=x.new_tokens, data_dir=data,
                    **guide_budget(s, x))
    # the yardsticks read as much as the guides (an encoder RM stops at its position table: MiniLM's 512)
    views = dict(yardsticks(s, choice["path"], [], choice["independent"]), metrics="reward,length",
                 max_length=rm_max_length(s, x))
    runs = specrej_runs(x, d)
    if "auto" in x.alphas:
        stages += calibration_stages(s, x, d, guides, data, name)
    for family, n, alpha, tag, rm_label, m in headline_first(runs, n_target):
        rm = rm_label.lower()
        gen = f"{d}/gen_{tag}_{rm}.jsonl"
        run = partial(decode, f"{name}-decode-{tag}-{rm}", gen, s, rm=guides[rm], **held_out)
        if alpha is None and (rm == "orm" or not encoders):
            keep = rm == "orm" and (encoders or n == n_target)  # the samples the SP-PRM ranks; consistency's
            stages.append(run(method=("bon", {"n": n}), save_candidates=keep or None))
        elif alpha is None:  # the ORM's samples (each token keyed by prompt and sample), ranked, not drawn again
            stages.append(run(method=("bon", {"n": n}), samples_of=gen.replace(f"_{rm}.jsonl", "_orm.jsonl")))
        elif alpha == "auto":  # built when the calibration exists: its command line spells the schedule
            stages.append(partial(calibrated_run, run, n, x.decision_every, f"{d}/calibration.json:{rm_label}"))
        else:
            stages.append(run(method=("specrej", {"n": n, "alpha": alpha, "decision_every": x.decision_every})))
        stages.append(Stage("05_evaluate.py metrics", m, name=f"{name}-eval-{tag}-{rm}", settings=dict(
            **views, generations=gen, label=f"{family}, N={n} ({rm_label})")))
    stages.append(Stage("05_evaluate.py consistency", f"{d}/consistency.json", name=f"{name}-consistency",
                        settings=dict(generations=f"{d}/gen_bon{n_target}_orm.jsonl",
                                      rm=(f"SP-PRM={guides['sp-prm']}", f"ORM={guides['orm']}"),
                                      reference=choice["path"], prefix_lengths=commas(x.prefix_lengths),
                                      alpha=next((a for a in x.alphas if a != "auto"), 0.5),
                                      max_length=rm_max_length(s, x))))
    for *_, tag, rm_label, m in runs:
        if rm_label == "ORM":  # the ORM-rejector minus the SP-PRM-rejector, paired over prompts
            stages.append(compare(m, m.replace("_orm.json", "_sp-prm.json"), f"{d}/compare_{tag}.json"))
    for rm in ("orm", "sp-prm"):  # every run against the target Best-of-N guided by the same RM
        bon = f"{d}/metrics_bon{n_target}_{rm}.json"
        stages += [compare(m, bon, m.replace("metrics_", "vs_bon_")) for *_, m in runs
                   if m.endswith(f"_{rm}.json") and m != bon]
    same_n = {(n, label): m for _, n, alpha, _, label, m in runs if alpha is None}
    stages += [compare(m, same_n[n, label], m.replace("metrics_", "vs_same_n_"))  # the same samples drawn, fewer kept
               for _, n, alpha, _, label, m in runs if alpha is not None and (n, label) in same_n]
    return stages


def headline_first(runs, target_n):
    """specrej_runs in the order a stopped run is most useful in: the rejection runs at the target N, the target
    Best-of-N, the other Best-of-N, the other rejection runs; each with both rejectors side by side."""
    per_rm = len(runs) // 2  # specrej_runs lists the ORM's runs, then the SP-PRM's in the same order

    def group(run):
        _, n, alpha, *_ = run
        if alpha is not None:
            return 0 if n == target_n else 3
        return 1 if n == target_n else 2
    return [runs[i] for i in sorted(range(len(runs)), key=lambda i: (group(runs[i]), i % per_rm, i // per_rm))]


def calibrated_run(run, n, decision_every, calibration):
    """The decode stage of speculative rejection with the schedule CALIBRATION (FILE:RM) holds."""
    from common.search.methods import calibrated_schedule

    schedule = calibrated_schedule(calibration)
    return [run(method=("specrej", {"n": n, "alpha": schedule, "decision_every": decision_every}))]


def decoder_rm_stages(s, x, d, out, data, reference, name):
    """Decoder RMs of the part's own from `x.rm_init` (sharing the policy's tokenizer, so the engine scores
    prefixes on its cached path): an ORM, its SP-PRM (SST cuts, the reference's entropy weights) and its
    ablation (uniform weights), each variant trained from that ORM; their agreement curves beside make
    reproduce's MiniLM ORM and SP-PRM and the reference."""
    decoder = dict(kind="decoder", save_steps=50, max_length=x.rm_max_length,
                   **({"lr": x.rm_lr} if x.rm_lr else {}))
    orm, rms = f"{d}/orm", {"sp-prm": f"{d}/sp-prm", "orm": f"{d}/orm", "ablation": f"{d}/ablation"}
    stages = [train(f"{name}-orm", orm, x.rm_init, "hh-rlhf:train", s, data, seed=s.seeds[0], limit=x.rm_pairs,
                    **decoder),
              Stage("01_build_partial.py", f"{d}/sst.jsonl", name=f"{name}-sst", settings=dict(
                  input="hh-rlhf:train", tokenizer=x.rm_init, truncation="sst", K=x.sst_k, limit=x.rm_pairs,
                  data_dir=data))]
    for scheme, variant in (("entropy", "sp-prm"), ("uniform", "ablation")):
        weighted = f"{d}/weighted_{scheme}.jsonl"
        stages += [partial(seed_cache, f"{d}/weighted_entropy.jsonl.scores.jsonl", weighted + ".scores.jsonl"),
                   Stage("02_weight.py", weighted, name=f"{name}-weight-{scheme}", settings=dict(
                       input=f"{d}/sst.jsonl", ref_rm=reference, scheme=scheme, max_length=s.max_length,
                       resume=True)),
                   train(f"{name}-{variant}", rms[variant], orm, weighted, s, data, **decoder)]
    labels = {"sp-prm": "SP-PRM", "orm": "ORM", "ablation": "Ablation"}
    stages.append(Stage("05_evaluate.py agreement", f"{d}/agreement.json", name=f"{name}-agreement", settings=dict(
        pairs="hh-rlhf:heldout", rm=(*(f"{labels[k]} ({x.rm_init})={p}" for k, p in rms.items()),
                                     f"SP-PRM (minilm-l6)={out}/sp-prm", f"ORM (minilm-l6)={out}/orm_s{s.seeds[0]}",
                                     f"Reference={reference}"),
        prefix_lengths=commas(s.prefix_lengths), max_length=s.max_length, limit=s.eval_pairs, data_dir=data)))
    return stages, {"orm": orm, "sp-prm": rms["sp-prm"]}


def calibration_stages(s, x, d, guides, data, name):
    """The adaptive rule's calibration, on held-out prompts after the decoded ones: Best-of-N's largest sample
    set there, and each rejector's consistency with its own final ranking at the decision points, turned into
    its schedule alpha(t) = alpha_max * clip(tau(t), 0, 1) (05 consistency --reference self --alpha-max)."""
    if x.prompts is None:
        raise ValueError(f"{name}: alpha auto calibrates on the prompts after the decoded ones: set its prompts")
    n_max, gen = x.calibration_n or max(x.ns), f"{d}/calibration_bon.jsonl"
    depths = list(range(x.decision_every, x.new_tokens, x.decision_every))
    return [decode(f"{name}-calibration-decode", gen, s, method=("bon", {"n": n_max}), rm=guides["orm"],
                   save_candidates=True, prompts="hh-rlhf:heldout", offset=x.prompts, limit=x.calibration_prompts,
                   max_new_tokens=x.new_tokens, data_dir=data, **guide_budget(s, x)),
            Stage("05_evaluate.py consistency", f"{d}/calibration.json", name=f"{name}-calibration", settings=dict(
                generations=gen, rm=(f"ORM={guides['orm']}", f"SP-PRM={guides['sp-prm']}"), reference="self",
                prefix_lengths=commas(depths), alpha_max=x.alpha_max, max_length=rm_max_length(s, x)))]


def guide_budget(s, x):
    """04's --max-length of a part with decoder RMs of its own: their budget, whichever RMs guide (an encoder
    guide then reads as much as the yardsticks); none for make reproduce's RMs (their training value)."""
    return {"max_length": rm_max_length(s, x)} if x.rm_init else {}


def rm_max_length(s, x):
    """The RM input budget of a specrej part's scoring: its decoder RMs' own, else the scale's."""
    return x.rm_max_length if x.rm_init else s.max_length


def specrej_runs(x, d):
    """(family, N, alpha, tag, guide label, metrics file) of every run of a specrej part (x: its settings)."""
    settings = [("Best-of-N", n, None) for n in x.ns] + \
        [(f"specrej alpha={a:g}" if a != "auto" else "specrej alpha=auto", n, a)
         for a in x.alphas for n in (x.specrej_ns or x.ns)]
    return [(family, n, alpha, tag, label, f"{d}/metrics_{tag}_{label.lower()}.json")
            for label in ("ORM", "SP-PRM") for family, n, alpha in settings
            for tag in [f"bon{n}" if alpha is None else f"specrej{n}_a{alpha if alpha == 'auto' else f'{alpha:g}'}"]]


def specrej_report(s, scale_name, out, pipeline, name="specrej"):
    from common.figures import plot_consistency, plot_reward_vs_compute
    from common.io import DataError, write_json

    x, d = getattr(s, name), f"{out}/{name}"
    points = reports.specrej_points(specrej_runs(x, d))
    write_json(f"{d}/points.json", points)  # the figure's input, for notebooks/figures.ipynb
    consistency = reports.read_json(f"{d}/consistency.json")
    try:
        reach = reports.reach_ratios(points, x.target_n or max(x.ns))
        write_json(f"{d}/reach.json", reports.json_safe(reach))
        matched = reports.matched_compute(points)
        write_json(f"{d}/matched.json", matched)
    except DataError as e:  # rows written before 05 recorded each prompt's compute
        print(f"note: no reach ratio ({e}); rerun the part's metrics stages (--redo {name}-eval-...)")
        reach, matched = {}, {}
    figures = [plot_reward_vs_compute(points, d, yardstick=y, x=c, name=f"{name}_{y}_vs_{c}.png")
               for y in ("independent", "reference") if y in reach for c in ("compute", "seconds")]
    figures.append(plot_consistency(consistency, d, name=f"{name}_prefix_consistency.png"))
    reports.write(f"{d}/results_{name}.md", reports.specrej_markdown(
        scale_name, out, points, consistency, figures, pipeline.costs(), reach=reach or None, part=name,
        calibration=reports.read_json(f"{d}/calibration.json") if "auto" in x.alphas else None,
        decoder_rms=(x.rm_init, x.rm_bar) if x.rm_init else None, matched=matched or None))


def tables_report(s, scale_name, out, pipeline):
    reports.write(f"{out}/tables/results_tables.md",
                  reports.tables_markdown(scale_name, f"{out}/tables", pipeline.costs()))


# ------------------------------------------------------------------------------------------ the parts

def table5_part(s, out, data, choice):
    """Paper Table 5: the train pairs cut by SST (K = sst_k) and by TLT, TLT's cuts sampled down to as many partial
    pairs as SST's (01 --match-rows); both weighted by the same reference (entropy scheme) and trained from the
    seed-0 ORM with the same seed and settings; their held-out accuracy (03's eval.json), agreement curves beside
    the ORM's and the reference's, and ARGS and CBS guided by each, SST minus TLT paired over prompts."""
    x, d = s.table5, f"{out}/table5"
    orm, reference = f"{out}/orm_s{s.seeds[0]}", choice["path"]
    cut = dict(input="hh-rlhf:train", tokenizer="minilm-l6", limit=x.pairs, data_dir=data)
    stages = [Stage("01_build_partial.py", f"{d}/sst.jsonl", name="table5-sst", settings=dict(
                  truncation="sst", K=x.sst_k, **cut)),
              Stage("01_build_partial.py", f"{d}/tlt.jsonl", name="table5-tlt", settings=dict(
                  truncation="tlt", match_rows=f"{d}/sst.jsonl", **cut))]
    guides = [("sst", "SST", f"{d}/sst-prm"), ("tlt", "TLT", f"{d}/tlt-prm")]
    for tag, _, path in guides:
        stages += [Stage("02_weight.py", f"{d}/weighted_{tag}.jsonl", name=f"table5-weight-{tag}", settings=dict(
                       input=f"{d}/{tag}.jsonl", ref_rm=reference, scheme="entropy", max_length=s.max_length,
                       resume=True)),
                   train(f"table5-{tag}-prm", path, orm, f"{d}/weighted_{tag}.jsonl", s, data, save_steps=50)]
    stages.append(Stage("05_evaluate.py agreement", f"{d}/agreement.json", name="table5-agreement", settings=dict(
        pairs="hh-rlhf:heldout", rm=(*(f"{label}={path}" for _, label, path in guides), f"ORM={orm}",
                                     f"Reference={reference}"),
        prefix_lengths=commas(s.prefix_lengths), max_length=s.max_length, limit=s.eval_pairs, data_dir=data)))
    methods = [(m, METHODS[m], (m, s.search[m])) for m in ("argsg", "cbs")]
    prompts = dict(prompts="hh-rlhf:heldout", limit=x.prompts, max_new_tokens=x.new_tokens, data_dir=data)
    views = yardsticks(s, reference, [(label, path) for _, label, path in guides], choice["independent"])
    return stages + decode_table(s, d, "table5", prompts, views, "reward,diversity,coherence,length", methods,
                                 guides, judge=reference, lead="sst")


def table5_report(s, scale_name, out, pipeline):
    from common.figures import paired_differences, plot_agreement, plot_paired_differences

    d = f"{out}/table5"
    figures = [plot_paired_differences(paired_differences(d, tables=("table5",)), d),
               *plot_agreement(reports.read_json(f"{d}/agreement.json"), d)]
    reports.write(f"{d}/results_table5.md", reports.table5_markdown(scale_name, out, figures, pipeline.costs()))


PARTS = {"table1": (table1_part, table1_report), "tables": (tables_part, tables_report),
         "specrej": (specrej_part, specrej_report), "table5": (table5_part, table5_report),
         "payoff": (partial(specrej_part, name="payoff"), partial(specrej_report, name="payoff"))}


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


