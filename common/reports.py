"""The Markdown of a run, rendered in one place: reproduce.py's results.md (and the tables/ and specrej/ parts'
pages) and the tables of notebooks/tables.ipynb. Everything is read from the run folder: the metric and compare
files of 05_evaluate.py, the RMs' eval.json, the reference choice (reference.json), and the settings that acted
from the generations' rows (each row of 04_decode.py records its method's params and reward_norm)."""
import math
import os

from common.figures import (first_generation_row, generation_params, metric_files, paired_differences, read_json,
                            run_tables)

# reproduce.py's names: SST weighting scheme -> (folder, label); method -> label
VARIANTS = {"entropy": ("sp-prm", "SP-PRM"), "uniform": ("ablation", "Ablation"), "filter": ("filter", "Filter")}
METHODS = {"argsg": "ARGS", "tbs": "TBS", "cbs": "CBS", "cards": "CARDS", "bon": "BoN"}
# a method's settings in a caption, from its rows' params (the knobs' names)
SETTINGS = {"argsg": "ARGS k={k}, w={w:g}", "tbs": "TBS W, K = {beam}, {successors}",
            "cbs": "CBS W, K, L = {beam}, {successors}, {chunk}", "bon": "BoN N={n}"}


def fmt_ci(value, ci, scale=1.0, digits=3):
    return f"{value * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def verdict(ci, sign=1.0):
    """How a claimed positive difference fares against its 95% interval."""
    lo, hi = sorted((sign * ci[0], sign * ci[1]))
    if lo > 0:
        return "reproduces"
    if hi < 0:
        return "does not reproduce (the opposite holds)"
    return "cannot be told apart at this size"


def higher(ci, a, b):
    """Which run of a paired difference A - B is higher, by its 95% interval."""
    return f"{a} higher" if ci[0] > 0 else f"{b} higher" if ci[1] < 0 else "cannot be told apart"


def prompts_for_half_width(ci, n, target=0.05):
    """Prompts an interval measured on n would need for a half-width of `target`: n (h / target)^2, h its
    half-width (a bootstrap interval's width shrinks as 1/sqrt(n) with the spread unchanged)."""
    return max(1, math.ceil(n * ((ci[1] - ci[0]) / 2 / target) ** 2))


def reach_words(ci):
    """Whether a paired difference from the reference run is below it, above it, or cannot be told apart."""
    return "below" if ci[1] < 0 else "above" if ci[0] > 0 else "cannot be told apart"


def reward_norm_words(params, flag=True):
    """How the guiding RMs' rewards entered the search, as the rows of guided runs record it."""
    norms = sorted({p.get("reward_norm") for p in params if p.get("reward_norm")})
    words = {"std": "rewards normalised", "none": "raw rewards"}
    if len(norms) == 1 and norms[0] in words:
        return words[norms[0]] + (f" (`--reward-norm {norms[0]}`)" if flag else "")
    return "reward normalisation " + ", ".join(f"`{n}`" for n in norms)


def changed_knobs(method, params):
    """The knobs of a run that differ from its method's defaults, as 04's flags (CARDS' small-reply settings)."""
    from common.search import make_method

    defaults = make_method(method).params()  # in the method's own knob order
    changed = {k: params[k] for k in defaults if k in params and params[k] != defaults[k]}
    return " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                    for k, v in changed.items())


def write(path, text):
    """A report written (a temporary name renamed when complete) and shown."""
    from common.io import atomic_open

    with atomic_open(path) as f:
        f.write(text)
    print("\n" + text)


def where_to_look(scale_name, out, figures, seconds, stages_run):
    """The five lines a run ends with: its time, and where its table, figures, results and notebooks are."""
    notebooks = "notebooks/tables.ipynb, notebooks/figures.ipynb"
    reads = "" if os.path.abspath(out) == os.path.abspath("runs/demo") else f" (with SPPRM_RUN_DIR={out})"
    return "\n".join([
        f"reproduce --scale {scale_name} finished in {seconds / 60:.1f} min "
        f"({stages_run} stages run now; each stage's seconds: {out}/stage_seconds.json)",
        f"  table:     {out}/table.md",
        "  figures:   " + ", ".join(os.path.relpath(f) for f in figures),
        f"  results:   {out}/results.md (every table, paired difference and claim, in words)",
        f"  notebooks: {notebooks}{reads} (how to open them: README, Notebooks)"])


def cost_line(costs, prefixes, note=""):
    part = {k: v for k, v in costs.items() if k.startswith(prefixes)}
    return f"Cost of the part's stages: {sum(part.values()) / 60:.1f} min{note}."


# ------------------------------------------------------------------------------------------ results.md

def results_markdown(scale, scale_name, out, figures, costs):
    """results.md of reproduce.py's table1 part: RMs, agreement, decoding, the claims, costs."""
    make = {"demo": "make demo", "cpu": "make reproduce"}.get(scale_name, f"make reproduce SCALE={scale_name}")
    lines = [f"Made by `python reproduce.py --scale {scale_name} --out {out}` (`{make}`). Every interval is a 95% "
             "interval: percentile bootstrap over pairs or prompts (10,000 resamples), or a t-interval over "
             "training seeds.", ""]
    agreement = read_json(f"{out}/agreement.json")["rms"]
    compares = {m: read_json(f"{out}/compare_{m}.json")["metrics"] for m in scale.methods}
    lines += rm_section(scale, out) + agreement_section(agreement) + decoding_section(scale, out, compares)
    lines += claims_section(scale, agreement, compares)
    lines += ["", "### Cost of each stage (seconds on this machine)", "",
              ", ".join(f"{name} {sec:.0f}" for name, sec in costs.items()),
              f"Total of the stages: {sum(costs.values()) / 60:.1f} min.", "",
              "Figures: " + ", ".join(os.path.relpath(f, out) for f in figures)]
    return "\n".join(lines) + "\n"


def rm_section(scale, out):
    from common.metrics import seed_interval

    choice = read_json(f"{out}/reference.json")
    lines = ["### Reward models: held-out accuracy on hh-rlhf:heldout", "",
             "| RM | held-out accuracy | role |", "|---|---|---|"]
    accs = []
    for seed in scale.seeds:
        e = read_json(f"{out}/orm_s{seed}/eval.json")
        accs.append(e["accuracy"])
        role = "converted into the PRM" if seed == scale.seeds[0] else (
            "reference" if choice["path"] == f"{out}/orm_s{seed}" else "reference candidate")
        lines.append(f"| ORM, MiniLM-L6, seed {seed} | {fmt_ci(e['accuracy'], e['accuracy_ci95'])} (n={e['n']}) "
                     f"| {role} |")
    for name, c in choice["candidates"].items():
        if not c["path"].startswith(f"{out}/orm_s"):
            lines.append(f"| {name} | {fmt_ci(c['accuracy'], c['accuracy_ci95'])} | "
                         + ("reference" if name == choice["name"] else "reference candidate") + " |")
    if len(accs) > 1:
        mean, ci = seed_interval(accs)
        lines.append(f"| ORM, mean over seeds {', '.join(map(str, scale.seeds))} | {fmt_ci(mean, ci)} (t over seeds) "
                     "| |")
    for name, label in (VARIANTS[v] for v in scale.variants):
        e = read_json(f"{out}/{name}/eval.json")
        lines.append(f"| {label} (from the seed-{scale.seeds[0]} ORM) | {fmt_ci(e['accuracy'], e['accuracy_ci95'])}"
                     " | |")
    return lines + ["", f"The reference is {choice['name']} (`{choice['path']}`), the candidate with the highest "
                    "held-out accuracy; it was chosen on the same held-out pairs the agreement curves use.", ""]


def agreement_section(rms):
    """AR_RM-SC(t) of every RM, each one's paired difference from the first (the SP-PRM; Table 5: SST), Delta_r(t)."""
    first = next(iter(rms))
    ts = [c["t"] for c in rms[first]["curve"]]
    header = ["| RM | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    lines = ["### Agreement with the data's preference, AR_RM-SC(t), on all held-out pairs (paper Figure 5)", "",
             *header]
    lines += [f"| {name} | " + " | ".join(fmt_ci(c["ar_rm_sc"], c["ar_rm_sc_ci95"]) for c in rm["curve"]) + " |"
              for name, rm in rms.items()]
    lines += ["", f"Paired difference from the {first} over the same pairs (RM minus {first}):", "", *header]
    lines += [f"| {name} - {first} | " + " | ".join(fmt_ci(c["ar_rm_sc_diff"], c["ar_rm_sc_diff_ci95"])
                                                    for c in rm["curve"]) + " |"
              for name, rm in rms.items() if name != first]
    lines += ["", "Reward gap Delta_r(t) = mean |r(y_w[:t]) - r(y_l[:t])|:", "", *header]
    return lines + [f"| {name} | " + " | ".join(f"{c['reward_gap']:.3f}" for c in rm["curve"]) + " |"
                    for name, rm in rms.items()]


def decoding_section(scale, out, compares):
    choice = read_json(f"{out}/reference.json")
    with open(f"{out}/table.md", encoding="utf-8") as f:
        table = f.read().strip()
    n_prompts = read_json(f"{out}/metrics_greedy.json")["n"]
    new_tokens = generation_params(f"{out}/metrics_greedy.json")["max_new_tokens"]
    guided = {m: generation_params(f"{out}/metrics_{m}_orm.json") for m in scale.methods}
    settings = "; ".join(SETTINGS[m].format(**p) for m, p in guided.items())
    lines = ["", f"### Decoding (paper Table 1): {n_prompts} held-out prompts, SmolLM2-135M-Instruct, "
             f"{new_tokens} new tokens, {reward_norm_words(guided.values())}", "",
             "Reward = the reference RM's score (it guided none of these runs, but its scores weighted the "
             "SP-PRM's training pairs); Reward (Independent) = an RM that shaped nothing here"
             + (f" (`{choice['independent']}`)" if choice["independent"] else "")
             + "; Win rate = (wins + ties / 2) / prompts against greedy judged by the reference RM (a proxy †). "
             f"{settings} (the methods run: {', '.join(METHODS[m] for m in scale.methods)}).", "", table, "",
             "Paired SP-PRM-guided minus ORM-guided, over the same prompts:", "",
             "| method | reward (reference RM) | reward (independent RM) | reward (ORM's own view) "
             "| reward (SP-PRM's own view) |", "|---|---|---|---|---|"]
    for method in scale.methods:
        cells = [fmt_ci(x["diff"], x["diff_ci95"], digits=4) if x else "-"
                 for x in (compares[method].get(k) for k in ("reward", "reward_Independent", "reward_ORM",
                                                              "reward_SP-PRM"))]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "ARGS reward (reference RM) against w:", ""]
    for name, points in read_json(f"{out}/args_sweep.json")["rms"].items():
        lines.append(f"- guided by {name}: " + ", ".join(
            f"w={pt['w']:g}: {fmt_ci(pt['reward_mean'], pt['reward_mean_ci95'], digits=4)}"
            if pt.get("reward_mean_ci95") else f"w={pt['w']:g}: {pt['reward_mean']:.4f}" for pt in points))
    return lines


def claims_section(scale, rms, compares):
    growth = rms["ORM"]["growth"]
    lines = ["", "### The paper's claims at this size", "",
             f"- Observation 1, ORM agreement grows with t: AR_RM-SC(t={growth['to_t']}) - AR_RM-SC(t="
             f"{growth['from_t']}) = {fmt_ci(growth['diff'], growth['diff_ci95'])}: {verdict(growth['diff_ci95'])}."]
    flipped = lambda c: fmt_ci(-c["ar_rm_sc_diff"], [-c["ar_rm_sc_diff_ci95"][1], -c["ar_rm_sc_diff_ci95"][0]])  # noqa: E731
    for c in (c for c in rms["ORM"]["curve"] if c["t"] <= 10):
        lines.append(f"- Figure 5, SP-PRM above the ORM at t={c['t']}: SP-PRM - ORM = {flipped(c)}: "
                     f"{verdict(c['ar_rm_sc_diff_ci95'], -1)}.")
    for method in scale.methods:
        label = METHODS[method]
        for key, who in (("reward", "reference RM"), ("reward_Independent", "independent RM")):
            x = compares[method].get(key)
            if x:
                lines.append(f"- Table 1, SP-PRM-guided {label} beats ORM-guided {label} ({who}'s reward): "
                             f"{fmt_ci(x['diff'], x['diff_ci95'], digits=4)}: {verdict(x['diff_ci95'])}.")
    for c in (c for c in rms.get("Ablation", {"curve": []})["curve"] if c["t"] <= 10):
        lines.append(f"- Ablation, removing the reference hurts at t={c['t']}: SP-PRM - Ablation = {flipped(c)}: "
                     f"{verdict(c['ar_rm_sc_diff_ci95'], -1)}.")
    return lines


# ------------------------------------------------------------------------------------------ make tables

def tables_markdown(scale_name, t, costs):
    """tables/results_tables.md: Tables 1, 3 and 4 with their paired differences; captions from the rows."""
    choice = read_json(f"{os.path.dirname(t)}/reference.json")
    reference, independent = choice["path"], choice["independent"]
    runs = {m: generation_params(f"{t}/table1_metrics_{m}_orm.json") for m in ("argsg", "tbs", "cbs", "cards")}
    bon_params = [generation_params(p) for p in metric_files(t, "table1_") if os.path.basename(p).startswith(
        "table1_metrics_bon") and p.endswith("_orm.json")]
    lines = [f"Made by `python reproduce.py --scale {scale_name} --part tables --out {os.path.dirname(t)}`. Policy "
             f"SmolLM2-135M-Instruct; {reward_norm_words([*runs.values(), *bon_params])}; "
             + "; ".join(SETTINGS[m].format(**runs[m]) for m in ("argsg", "tbs", "cbs"))
             + f"; CARDS `{changed_knobs('cards', runs['cards'])}`; BoN N = "
             f"{', '.join(str(p['n']) for p in bon_params)}. ± is the half-width of the 95% bootstrap interval over "
             f"prompts. Reward = the reference RM's score (`{reference}`, it guided no run; Table 4: the GSM8K "
             "reference); Reward (decoding RM) = the score of the RM that guided the row (the paper's reward column, "
             "C.2); Reward (ORM), (SP-PRM) = those RMs' views"
             + (f"; Reward (Independent) = `{independent}`, an RM that shaped nothing." if independent else "."), ""]
    done = [name for name in ("table1", "table3", "table4") if os.path.exists(f"{t}/{name}.md")]
    size = {name: (read_json(f"{t}/{name}_metrics_greedy.json")["n"],
                   generation_params(f"{t}/{name}_metrics_greedy.json")["max_new_tokens"]) for name in done}
    offset = read_json(read_json(f"{t}/table1_metrics_greedy.json")["generations"] + ".manifest.json")["args"].get(
        "offset") or 0
    span = f" ({offset + 1}-{offset + size['table1'][0]}, after the first {offset})" if offset else ""
    for name in done:
        with open(f"{t}/{name}.md", encoding="utf-8") as f:
            lines += [f"### {table_title(t, name, size[name], span)}", "", f.read().strip(), "",
                      "Paired differences over the same prompts "
                      "(reward: the reference RM's), each with the prompts its interval would need for a half-width "
                      "of 0.05 (n (h / 0.05)^2: a half-width shrinks as 1/sqrt(n)):", ""]
        for c in (m.replace("_metrics_", "_compare_") for m in metric_files(t, f"{name}_")):
            if not os.path.exists(c):
                continue
            d = read_json(c)
            n = read_json(d["a"])["n"]
            cells = [f"{k} {fmt_ci(v['diff'], v['diff_ci95'], digits=4)} (n for +-0.05: "
                     f"{prompts_for_half_width(v['diff_ci95'], n)})" for k, v in d["metrics"].items()
                     if k in ("reward", "reward_Independent", "asr", "asr_target_opening", "accuracy")]
            lines.append(f"- {read_json(d['a'])['label']} minus {read_json(d['b'])['label']}: " + "; ".join(cells))
        lines.append("")
    for name in ("table3", "table4"):
        if name not in done:  # a run stopped before this table's stages (rerun the same command to finish it)
            lines += [f"({name.replace('table', 'Table ')}: its stages have not finished in this run.)", ""]
    lines += [cost_line(costs, ("table", "gsm8k"), " (the HH RMs it shares with `make reproduce` not counted)"), ""]
    return "\n".join(lines) + "\n"


def table_title(t, name, size, span=""):
    """A table's heading from its greedy run's size (prompts, new tokens); Table 4's names its own GSM8K RMs'
    sizes and held-out accuracy."""
    if name == "table1":
        return (f"Table 1 (HH-RLHF): {size[0]} held-out prompts{span}, {size[1]} new tokens; Win rate against greedy "
                "judged by the reference RM (a proxy †)")
    if name == "table3":
        return (f"Table 3 (AdvBench, \"Sure here's\" after each instruction): {size[0]} prompts, {size[1]} new "
                "tokens, guided by the HH RMs")
    gorm, gref = (read_json(f"{t}/gsm8k_{rm}/eval.json") for rm in ("orm", "reference"))
    gorm_args, gref_args = (read_json(f"{t}/gsm8k_{rm}/manifest.json")["args"] for rm in ("orm", "reference"))
    epochs = gref_args.get("epochs", 1)
    return (f"Table 4 (GSM8K): {size[0]} held-out problems (gsm8k:heldout), {size[1]} new tokens; RMs trained on "
            f"gsm8k-pairs:train (ORM {gorm_args.get('limit') or 'all'} pairs, held-out accuracy {gorm['accuracy']:.3f}; "
            f"reference {gref_args.get('limit') or 'all'} pairs, {epochs} epoch{'s' if epochs > 1 else ''}, "
            f"{gref['accuracy']:.3f}); accuracy by exact match (no LLM judge offline)")


# ------------------------------------------------------------------------------------------ make table5

PAPER_TABLE5 = {"ARGS": (2.85, 2.69), "CBS": (3.73, 3.70)}  # reward (SST, TLT), Llama-3-8B-Instruct, paper Table 5


def training_cost(path, seconds):
    """Rows, real tokens (summed over 03's log) and seconds of training the RM at PATH."""
    from common.io import read_jsonl

    tokens = sum(entry.get("tokens", 0) for _, entry in read_jsonl(f"{path}/train_log.jsonl"))
    return {"rows": read_json(f"{path}/manifest.json")["rows"], "tokens": tokens, "seconds": seconds}


def table5_markdown(scale_name, out, figures, costs):
    """table5/results_table5.md: SST against TLT at the same number of partial pairs (paper Table 5)."""
    d = f"{out}/table5"
    choice = read_json(f"{out}/reference.json")
    cuts = {label: read_json(f"{d}/{tag}.jsonl.manifest.json") for tag, label in (("sst", "SST"), ("tlt", "TLT"))}
    sst_args = cuts["SST"]["args"]
    lines = [f"Made by `python reproduce.py --scale {scale_name} --part table5 --out {out}` (`make table5`). SST "
             f"(K = {sst_args['K']}) and TLT cut the first {sst_args.get('limit') or 'all'} hh-rlhf:train pairs; TLT "
             "keeps a seeded sample of its cuts, as many as SST's. Both are weighted by the reference "
             f"(`{choice['path']}`, entropy scheme) and trained from the seed-0 ORM with the same seed and settings. "
             "± is the half-width of the 95% bootstrap interval (over pairs, or prompts).", "",
             "### Training data and cost, held-out accuracy", "",
             "| RM | partial pairs (of cut) | rows trained (weight > 0) | tokens | seconds | held-out accuracy |",
             "|---|---|---|---|---|---|"]
    for tag, label in (("sst", "SST"), ("tlt", "TLT")):
        c, e = training_cost(f"{d}/{tag}-prm", costs.get(f"table5-{tag}-prm")), read_json(f"{d}/{tag}-prm/eval.json")
        counts = cuts[label]["counts"]
        seconds = "-" if c["seconds"] is None else f"{c['seconds']:.0f}"
        lines.append(f"| {label} | {counts['rows_written']} (of {counts['rows_cut']}) | {c['rows']} | {c['tokens']} | "
                     f"{seconds} | {fmt_ci(e['accuracy'], e['accuracy_ci95'])} (n={e['n']}) |")
    lines += ["", *agreement_section(read_json(f"{d}/agreement.json")["rms"]), ""]
    n = read_json(f"{d}/table5_metrics_greedy.json")["n"]
    new_tokens = generation_params(f"{d}/table5_metrics_greedy.json")["max_new_tokens"]
    params = {m: generation_params(f"{d}/table5_metrics_{m}_sst.json") for m in ("argsg", "cbs")}
    with open(f"{d}/table5.md", encoding="utf-8") as f:
        lines += [f"### Decoding guided by each: {n} held-out prompts, {new_tokens} new tokens, SmolLM2-135M-Instruct; "
                  f"{reward_norm_words(list(params.values()))}; "
                  + "; ".join(SETTINGS[m].format(**p) for m, p in params.items()), "", f.read().strip(), "",
                  "SST-guided minus TLT-guided, paired over prompts, beside the paper's (Llama-3-8B-Instruct, its "
                  "reward column):", ""]
    for m, label in (("argsg", "ARGS"), ("cbs", "CBS")):
        c = read_json(f"{d}/table5_compare_{m}_tlt.json")["metrics"]
        paper = PAPER_TABLE5[label]
        cells = [f"by the {k[len('reward_'):] or 'reference'} RM {fmt_ci(v['diff'], v['diff_ci95'], digits=4)}: "
                 f"{higher(v['diff_ci95'], 'SST', 'TLT')}"
                 for k, v in c.items() if k in ("reward", "reward_Independent")]
        lines.append(f"- {label}: " + "; ".join(cells) + f" (paper: SST {paper[0]:.2f} against TLT {paper[1]:.2f}, "
                     f"{paper[0] - paper[1]:+.2f})")
    return "\n".join(lines + ["", cost_line(costs, ("table5",), " (the HH ORM and reference it shares with `make "
                                                          "reproduce` not counted)"),
                               "", "Figures: " + ", ".join(os.path.relpath(f, d) for f in figures)]) + "\n"


# ------------------------------------------------------------------------------------------ make specrej

def specrej_markdown(scale_name, out, points, consistency, figures, costs, reach=None, part="specrej",
                     calibration=None, decoder_rms=None, matched=None):
    """PART/results_PART.md: Best-of-N against speculative rejection, each guided by the ORM and the SP-PRM; with
    `reach` (reach_ratios), the compute at which each rejector reaches its Best-of-N's reward first; with
    `decoder_rms` (the part's rm_init and rm_bar), its own decoder RMs' held-out accuracy and agreement curves;
    with `matched` (matched_compute), adaptive against fixed rejection at matched compute."""
    n_max = max(p["n"] for p in points)
    target_n = reach["target_n"] if reach else n_max
    params = generation_params(next(p["file"] for p in points if p["alpha"] is not None))
    vs_bon = {p["file"]: read_json(p["file"].replace("metrics_", "vs_bon_"))["metrics"]["reward"]
              for p in points if os.path.exists(p["file"].replace("metrics_", "vs_bon_"))}
    lines = [f"Made by `python reproduce.py --scale {scale_name} --part {part} --out {out}`: "
             f"{consistency['n_prompts']} held-out prompts, {params['max_new_tokens']} new tokens, a decision every "
             f"{params['decision_every']} tokens, {reward_norm_words([params], flag=False)}. Reward = the "
             "reference RM's score; Independent = an RM that shaped nothing. Compute = policy + RM tokens computed "
             "per reply; ends before the limit = the share of chosen replies that stop before the new-token limit "
             "(a reply that stops early leaves rejection less to save). Every interval is a 95% bootstrap interval over prompts.", ""]
    if any((first_generation_row(p["file"]).get("stats") or {}).get("samples_of") for p in points):
        lines[-2] += (" Best-of-N guided by the SP-PRM ranks the samples the ORM's Best-of-N drew (04 --samples-of:"
                      " the samples it would draw, each token keyed by prompt and sample); its policy work and "
                      "seconds are that run's.")
    lines += reach_section(reach) if reach else []
    lines += calibration_section(calibration) if calibration else []
    lines += matched_section(matched) if matched and any(matched.values()) else []
    lines += ["| run | guided by | compute | seconds | ends before the limit | reward (reference) | reward "
              f"(independent) | reward - Best-of-{target_n} (same RM, paired) |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["rm"], p["family"], p["n"])):
        d = vs_bon.get(p["file"])
        early = "-" if p.get("ended_early") is None else f"{p['ended_early']:.0%}"
        lines.append(f"| {p['family']}, N={p['n']} | {p['rm']} | {p['compute']:.0f} | {p['seconds']:.2f} | {early} | "
                     f"{fmt_ci(p['reward_mean'], p['reward_mean_ci95'], digits=4)} | "
                     + (fmt_ci(p["independent"], p["independent_ci95"], digits=4) if p["independent"] is not None
                        else "-") + " | "
                     + (fmt_ci(d["diff"], d["diff_ci95"], digits=4) + f": {reach_words(d['diff_ci95'])}" if d else "-")
                     + " |")
    lines += ["", f"Compute needed to reach Best-of-{target_n}'s reward (the cheapest run whose paired difference "
                  f"from Best-of-{target_n} guided by the same RM, by the reference RM, is not below zero):", ""]
    for rm in ("ORM", "SP-PRM"):
        full = next(p for p in points if p["rm"] == rm and p["n"] == target_n and p["alpha"] is None)
        ok = [p for p in points if p["rm"] == rm and (p is full or (
            p["file"] in vs_bon and reach_words(vs_bon[p["file"]]["diff_ci95"]) != "below"))]
        best = min(ok, key=lambda p: p["compute"])
        lines.append(f"- rejector {rm}: {best['family']}, N={best['n']}: {best['compute']:.0f} tokens per reply, "
                     f"{best['compute'] / full['compute']:.2f}x Best-of-{target_n}'s {full['compute']:.0f}.")
    lines += ["", "ORM-rejector minus SP-PRM-rejector reward (reference RM), paired over prompts:", ""]
    for p in sorted((p for p in points if p["rm"] == "ORM"), key=lambda p: (p["family"], p["n"])):
        d = read_json(p["file"].replace("metrics_", "compare_").replace("_orm.json", ".json"))["metrics"]["reward"]
        lines.append(f"- {p['family']}, N={p['n']}: {fmt_ci(d['diff'], d['diff_ci95'], digits=4)}: "
                     f"{higher(d['diff_ci95'], 'the ORM-rejector', 'the SP-PRM-rejector')}")
    lines += same_n_section(points)
    lines += consistency_section(consistency, target_n)
    lines += ["", *decoder_rms_section(f"{out}/{part}", *decoder_rms)] if decoder_rms else []
    lines += ["", cost_line(costs, (part,)), "", "Figures: " + ", ".join(os.path.relpath(f, out) for f in figures)]
    return "\n".join(lines) + "\n"


# the yardsticks of a specrej part: name -> (its per-prompt reward in 05's rows, its words)
YARDSTICKS = {"independent": ("reward_Independent", "the independent RM"), "reference": ("reward", "the reference RM")}


def per_prompt(point, key, cost):
    """(ids, rewards by the yardstick's `key`, costs) of one run, per prompt in id order (05's rows file): cost
    "compute" is policy + RM tokens, "seconds" the wall seconds 04 recorded."""
    from common.io import read_jsonl

    need = (key, "seconds") if cost == "seconds" else (key, "policy_tokens", "rm_tokens")
    rows = sorted((r for _, r in read_jsonl(os.path.splitext(point["file"])[0] + ".rows.jsonl", required=need)),
                  key=lambda r: str(r["id"]))
    costs = [r["seconds"] if cost == "seconds" else r["policy_tokens"] + r["rm_tokens"] for r in rows]
    return [r["id"] for r in rows], [float(r[key]) for r in rows], [float(c) for c in costs]


def reach_ratios(points, target_n, seed=0):
    """Per yardstick and cost (policy + RM tokens, seconds): for each rejector, the cost at which its
    speculative-rejection runs reach the reward of its own Best-of-target_n (the least cost ratio among the
    runs whose mean reward is at least Best-of-N's), with 95% intervals over prompts (common/metrics.py,
    reach_ratio); and the shares of resamples in which the SP-PRM-rejector reaches it at less cost than the
    ORM-rejector and at more (both resampled alike; ties, both unreached among them, count in neither).
    Ratios that no resample reaches are inf (json_safe writes them as null)."""
    import numpy as np

    from common.metrics import reach_ratio

    out = {"target_n": target_n}
    for yardstick, (key, _) in YARDSTICKS.items():
        if yardstick == "independent" and any(p["independent"] is None for p in points):
            continue  # no independent RM at this scale
        out[yardstick] = {}
        for cost in ("compute", "seconds"):
            found = {}
            for rm in ("ORM", "SP-PRM"):
                target = next(p for p in points if p["rm"] == rm and p["n"] == target_n and p["alpha"] is None)
                ids, goal, goal_cost = per_prompt(target, key, cost)
                runs = [per_prompt(p, key, cost) for p in points if p["rm"] == rm and p["alpha"] is not None]
                if any(r[0] != ids for r in runs):
                    raise ValueError(f"the {rm}-guided runs did not decode the same prompts")
                found[rm] = reach_ratio(goal, goal_cost, [(r, c) for _, r, c in runs], seed, keep_resamples=True)
            sp, orm = found["SP-PRM"].pop("resamples"), found["ORM"].pop("resamples")
            out[yardstick][cost] = {**found, "sp_prm_cheaper_share": float(np.mean(sp < orm)),
                                    "orm_cheaper_share": float(np.mean(orm < sp))}
    return out


def matched_compute(points, seed=0):
    """Adaptive against fixed rejection at matched compute, per yardstick and rejector: each run of one
    rejection rule minus the other rule's reward-against-compute curve (policy + RM tokens, linear between its
    N) at that run's compute, paired over prompts (common/metrics.py, matched_compute_difference). Only where a
    rule has at least two N (one point is no curve)."""
    from common.metrics import matched_compute_difference

    rules = sorted({p["family"] for p in points if p["alpha"] is not None})
    out = {}
    for yardstick, (key, _) in YARDSTICKS.items():
        if yardstick == "independent" and any(p["independent"] is None for p in points):
            continue
        out[yardstick] = []
        rows = {p["file"]: per_prompt(p, key, "compute") for p in points if p["alpha"] is not None}  # read once
        for rm in ("ORM", "SP-PRM"):
            for rule in rules:
                for against in rules:
                    curve = [rows[p["file"]] for p in points if p["rm"] == rm and p["family"] == against]
                    if against == rule or len(curve) < 2:
                        continue
                    for p in sorted((p for p in points if p["rm"] == rm and p["family"] == rule),
                                    key=lambda p: p["n"]):
                        ids, reward, compute = rows[p["file"]]
                        if any(c[0] != ids for c in curve):
                            raise ValueError(f"the {rm}-guided runs did not decode the same prompts")
                        out[yardstick].append({"rm": rm, "run": f"{rule}, N={p['n']}", "against": against,
                                               **matched_compute_difference(reward, compute,
                                                                            [c[1:] for c in curve], seed)})
    return out


def matched_section(matched):
    """The matched-compute comparison as a table, each difference worded by its interval."""
    yardsticks = [y for y in YARDSTICKS if y in matched]
    lines = ["Adaptive against fixed rejection at matched compute: each run's reward minus the other rule's curve "
             "(linear between its N, guided by the same RM) at the run's policy + RM tokens; 95% bootstrap "
             "intervals over prompts, over the resamples in which the run's compute lies within that curve's span:",
             "", "| rejector | run | against the curve of | " + " | ".join(f"difference ({YARDSTICKS[y][1]})"
                                                                     for y in yardsticks) + " |",
             "|---|---|---|" + "---|" * len(yardsticks)]
    for i, entry in enumerate(matched[yardsticks[0]]):
        cells = []
        for y in yardsticks:
            e = matched[y][i]
            cells.append("outside its span" if e["diff"] is None else
                         f"{fmt_ci(e['diff'], e['ci95'], digits=4)}: "
                         + higher(e["ci95"], e["run"].split(",")[0], e["against"]))
        lines.append(f"| {entry['rm']} | {entry['run']} | {entry['against']} | " + " | ".join(cells) + " |")
    return lines + [""]


def json_safe(obj):
    """OBJ with every infinite float as None (JSON has no inf)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isinf(obj) else obj


def reach_section(reach):
    """The headline: the cost at which speculative rejection reaches Best-of-N's reward, per rejector."""
    n = reach["target_n"]
    words = lambda r: "not reached" if math.isinf(r) else f"{r:.2f}x"  # noqa: E731
    lines = [f"**Cost at which speculative rejection reaches Best-of-{n}'s reward, over Best-of-{n}'s cost** (each "
             f"rejector against its own Best-of-{n}; the cheapest of its runs whose mean reward is at least "
             "Best-of-N's; 95% bootstrap intervals over prompts; an upper end 'not reached': in more than 2.5% of "
             "resamples no run reaches it; seconds: a batch's wall seconds shared by its prompts):", "",
             "| yardstick | cost | ORM-rejector | SP-PRM-rejector | SP-PRM cheaper / ORM cheaper (shares of resamples) |",
             "|---|---|---|---|---|"]
    for yardstick, (_, label) in YARDSTICKS.items():
        for cost, by in reach.get(yardstick, {}).items():
            cells = [f"{words(by[rm]['ratio'])} [{words(by[rm]['ci95'][0])}, {words(by[rm]['ci95'][1])}]"
                     for rm in ("ORM", "SP-PRM")]
            lines.append(f"| {label} | {'policy + RM tokens' if cost == 'compute' else 'seconds'} | {cells[0]} | "
                         f"{cells[1]} | {by['sp_prm_cheaper_share']:.2f} / {by['orm_cheaper_share']:.2f} |")
    return lines + [""] + reach_verdict(reach) + [""]


def reach_verdict(reach, at_most=0.35):
    """The question as the field asks it, answered by interval: does the SP-PRM as rejector reach Best-of-N's
    reward (by the independent RM where there is one) at <= at_most of its policy + RM tokens, and at less
    compute than the ORM as rejector?"""
    yardstick = "independent" if "independent" in reach else "reference"
    by = reach[yardstick]["compute"]
    lo, hi = by["SP-PRM"]["ci95"]
    if hi <= at_most:
        answer = f"yes: its whole interval is at or below {at_most:g}x"
    elif math.isinf(lo):
        answer = "no: in over 97.5% of resamples no run reaches it"
    elif lo > at_most:
        answer = f"no: its interval lies above {at_most:g}x"
    else:
        answer = f"not decided at this size: the interval holds {at_most:g}x"
    sp, orm = by["sp_prm_cheaper_share"], by["orm_cheaper_share"]
    return [f"- Does the SP-PRM as rejector reach Best-of-{reach['target_n']}'s reward (by {YARDSTICKS[yardstick][1]}) "
            f"at <= {at_most:g}x its policy + RM tokens? {answer}.",
            f"- At less compute than the ORM as rejector? Less in {sp:.0%} of resamples, more in {orm:.0%} "
            + ("(yes, beyond the noise)." if sp >= 0.975 else "(no, beyond the noise)." if orm >= 0.975
               else "(cannot be told apart).")]


def decoder_rms_section(d, rm_init, bar):
    """The part's own decoder RMs: held-out accuracy against the bar said before running (experiment.py,
    guides_by_the_bar: under it the MiniLM RMs guide), and their agreement curves beside the MiniLM ones."""
    lines = [f"### The decoder RMs ({rm_init}): held-out accuracy against the bar said before running ({bar:g})", ""]
    weak = []
    for tag, label in (("orm", "ORM"), ("sp-prm", "SP-PRM"), ("ablation", "Ablation")):
        e = read_json(f"{d}/{tag}/eval.json")
        if e["accuracy"] < bar:
            weak += [label] if tag != "ablation" else []  # the ablation guides nothing
        lines.append(f"- {label}: {fmt_ci(e['accuracy'], e['accuracy_ci95'])} (n={e['n']}): "
                     + ("too weak to rank" if e["accuracy"] < bar else "reaches the bar"))
    lines += ["", f"The decoder {' and '.join(weak)} fell under the bar: every run here is guided by make reproduce's "
                  "MiniLM RMs, their compute counted as it is (an encoder re-reads prompt and prefix at each decision)."
              if weak else "Both guides reach the bar: every run here is guided by these decoder RMs."]
    return lines + ["", *agreement_section(read_json(f"{d}/agreement.json")["rms"]), ""]


def calibration_section(calibration):
    """The adaptive rule's schedules and the consistency they came from."""
    lines = [f"Adaptive rejection (alpha=auto): alpha(t) = {calibration['alpha_max']:g} * clip(tau(t), 0, 1), tau(t) "
             "each rejector's Kendall's tau between its prefix scores at t and its own final scores, measured on "
             f"{calibration['n_prompts']} other held-out prompts (Best-of-N's samples there):", ""]
    for rm, entry in calibration["rms"].items():
        taus = ", ".join(f"t={c['t']}: {c['kendall_tau']:.2f}" for c in entry["curve"])
        lines.append(f"- {rm}: tau {taus}; schedule `{entry['alpha_schedule']}`")
    return lines + [""]


def specrej_points(runs):
    """One point a (family, N, alpha, tag, guide label, metrics file) run: its compute per reply and rewards
    (specrej/points.json, the reward-against-compute figure's input)."""
    points = []
    for family, n, alpha, _, rm_label, path in runs:
        metric = read_json(path)
        c = metric["compute_per_response"]
        points.append({"family": family, "n": n, "alpha": alpha, "rm": rm_label, "file": path,
                       "compute": c["policy_tokens"] + c["rm_tokens"], "policy_tokens": c["policy_tokens"],
                       "rm_tokens": c["rm_tokens"], "seconds": c["seconds"], "reward_mean": metric["reward_mean"],
                       "reward_mean_ci95": metric["reward_mean_ci95"],
                       "independent": metric.get("reward_Independent_mean"),
                       "independent_ci95": metric.get("reward_Independent_mean_ci95"),
                       "ended_early": ended_early(path)})
    return points


def ended_early(metrics_path):
    """The share of a run's replies that end (EOS or a stop string) before its max_new_tokens, from 05's rows
    file; None where the rows predate their token counts. A reply that ends early leaves rejection less to
    save: the payoff needs replies that run long."""
    from common.io import read_jsonl

    rows_path = os.path.splitext(metrics_path)[0] + ".rows.jsonl"
    counts = [r.get("new_tokens") for _, r in read_jsonl(rows_path)] if os.path.exists(rows_path) else []
    if not counts or None in counts:
        return None
    limit = generation_params(metrics_path)["max_new_tokens"]
    return sum(c < limit for c in counts) / len(counts)


def same_n_section(points):
    """Each rejection run against Best-of-N at its own N guided by the same RM (05 compare: vs_same_n_*.json):
    what rejecting part of the same N samples costs in reward, and saves in seconds."""
    lines = []
    for p in sorted((p for p in points if p["alpha"] is not None), key=lambda p: (p["rm"], p["family"], p["n"])):
        path = p["file"].replace("metrics_", "vs_same_n_")
        if not os.path.exists(path):
            continue
        m = read_json(path)["metrics"]
        cells = [fmt_ci(m[k]["diff"], m[k]["diff_ci95"], digits=4) + f": {reach_words(m[k]['diff_ci95'])}"
                 if k in m else "-" for k in ("reward_Independent", "reward")]
        lines.append(f"| {p['family']}, N={p['n']} | {p['rm']} | {cells[0]} | {cells[1]} | "
                     f"{m['seconds']['a'] / m['seconds']['b']:.2f}x |")
    return ["", "Each rejection run against Best-of-N at the same N guided by the same RM (the same samples drawn, "
                "part of them rejected early), paired over prompts:", "",
            "| run | guided by | reward - Best-of-N (independent) | reward - Best-of-N (reference) | seconds, over "
            "Best-of-N's |", "|---|---|---|---|---|", *lines] if lines else []


def consistency_section(consistency, n):
    lines = ["", f"Prefix consistency on Best-of-{n}'s samples (Kendall's tau with the reference's scores of "
                 "the complete samples; the share of prompts whose best sample survives one rejection of "
                 f"alpha = {consistency['alpha']:g}):", "",
             "| RM | t | Kendall's tau | best survives | difference from the first RM (tau; survives) |",
             "|---|---|---|---|---|"]
    for rm, entry in consistency["rms"].items():
        for c in entry["curve"]:
            diff = (f"{fmt_ci(c['kendall_tau_diff'], c['kendall_tau_diff_ci95'])}; "
                    f"{fmt_ci(c['best_survives_diff'], c['best_survives_diff_ci95'])}") if "diff_vs" in c else "-"
            lines.append(f"| {rm} | {c['t']} | {fmt_ci(c['kendall_tau'], c['kendall_tau_ci95'])} | "
                         f"{fmt_ci(c['best_survives'], c['best_survives_ci95'])} | {diff} |")
    return lines


# ------------------------------------------------------------------------------------------ notebooks/tables.ipynb

def run_tables_markdown(run_dir):
    """[Markdown] of every table a run folder holds (figures.run_tables), one section a table."""
    from common.metrics import markdown_table

    return [f"### {title}\n\n" + markdown_table(rows) for title, rows in run_tables(run_dir)]


def paired_differences_markdown(run_dir):
    """Every SP-PRM-guided minus other-guided difference of a run, one row each, or None when it has none."""
    records = paired_differences(run_dir)
    if not records:
        return None
    lines = ["| table | method | SP-PRM-guided minus | reward by | difference [95% interval] | |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['table']} | {r['method']} | {r['against']}-guided | the {r['yardstick']} RM | "
              f"{r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {sp_prm_verdict(r['ci95'])} |"
              for r in records]
    return "\n".join(lines)


def sp_prm_verdict(ci):
    return "SP-PRM higher" if ci[0] > 0 else "SP-PRM lower" if ci[1] < 0 else "cannot be told apart"


def rm_accuracy_markdown(run_dir):
    """Held-out accuracy and AR_RM-SC(t) of every RM of a run (03_train.py's eval.json; make tables' GSM8K RMs
    too), or None when it has none."""
    paths = sorted(glob_eval(run_dir, "*") + glob_eval(run_dir, os.path.join("tables", "*")))
    rows, header = [], None
    for path in paths:
        e = read_json(path)
        ci = e.get("accuracy_ci95")
        acc = f"{e['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        rows.append(f"| {os.path.relpath(os.path.dirname(path), run_dir)} | {acc} | "
                    + " | ".join(f"{v:.3f}" for v in e["ar_sc"].values()) + " |")
        header = header or "| RM | accuracy | " + " | ".join(f"AR t={t}" for t in e["ar_sc"]) + " |"
    if not rows:
        return None
    return "\n".join([header, "|---" * (len(rows[0].split("|")) - 2) + "|"] + rows)


def glob_eval(run_dir, pattern):
    import glob

    return glob.glob(os.path.join(run_dir, pattern, "eval.json"))
