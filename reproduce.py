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
The scales are the table below; what each part runs, stage by stage, is common/experiment.py.
Finished stages are skipped (rerun the same command to resume); --redo STAGE[,STAGE] or --redo all reruns.
A stage whose input was remade after its output runs again; an output made with other settings is refused
(--redo it, or use another --out).
"""
import argparse
import os
import sys
from dataclasses import dataclass, field, replace

from common import experiment, reports
from common.io import DEVICES
from common.pipeline import Pipeline


# ------------------------------------------------------------------------------------------ scales
# Sizes: None = all (pairs, prompts). Method settings are the methods' knobs by their own names (04's flags).

@dataclass(frozen=True)
class Specrej:
    """make specrej: Best-of-N at each N against speculative rejection at each N and alpha, guided by make
    reproduce's ORM and SP-PRM. make payoff: the same at long replies with decoder RMs of its own (rm_init)."""
    prompts: int = None
    ns: tuple = (4, 8, 16)                   # Best-of-N's N (the largest: the yardstick run)
    alphas: tuple = (0.5, 0.75)              # a share, or "auto": the schedule calibrated on other prompts
    new_tokens: int = 32
    decision_every: int = 8
    prefix_lengths: tuple = (4, 8, 16, 24)   # RM tokens at which prefix consistency is measured
    specrej_ns: tuple = None                 # speculative rejection's N (None: ns)
    rm_init: str = None                      # decoder RMs of the part's own from this backbone (None: make
    rm_pairs: int = None                     # reproduce's RMs); their train pairs, SST's K and 03's --lr
    sst_k: int = 5
    rm_lr: float = None
    rm_bar: float = 0.56                     # said before running: under this held-out accuracy a decoder RM
                                             # cannot rank, and make reproduce's MiniLM RMs guide instead
    # their input budget: at 512 the RM's cache holds a prompt of up to 256 tokens whole, so a partial reply is
    # read by its new tokens (at 256 a prompt of over 128 keeps a tail, and every short reply beside the whole
    # prompt is read afresh: the truncation rule, docs/scoring.md)
    rm_max_length: int = 512
    alpha_max: float = 0.8                   # "auto": alpha(t) = alpha_max * clip(tau(t), 0, 1)
    calibration_prompts: int = 16            # "auto": held-out prompts after the decoded ones
    calibration_n: int = None                # "auto": the samples drawn for each of them (None: the largest N)
    target_n: int = None                     # the Best-of-N every run is measured against (None: the largest)


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
    prompts: int = None                           # Tables 3 and 4 (and Table 1 without table1_prompts)
    table1_prompts: int = None
    table1_offset: int = 0                        # Table 1's prompts start after this many held-out prompts
    new_tokens: int = 128
    bon_ns: tuple = (16, 64)                      # Best-of-N rows at each N
    cards: dict = field(default_factory=dict)     # CARDS' knobs beyond its defaults
    gsm8k: GSM8K = GSM8K()


@dataclass(frozen=True)
class Table5:
    """make table5: SST (K = sst_k) against TLT cut to the same number of partial pairs, both from the ORM."""
    pairs: int = None          # train pairs cut (TLT keeps a seeded sample of its cuts, as many as SST's)
    sst_k: int = 5
    prompts: int = None        # held-out prompts decoded by ARGS and CBS guided by each
    new_tokens: int = 24


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
    table5: Table5 = None         # None: the scale has no table5 part
    payoff: Specrej = None        # None: the scale has no payoff part
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
            # What a process RM buys at replies long enough for rejection to pay: decoder RMs on SmolLM2-135M's
            # lower 6 layers (the full model trains at about 1 pair/s here: hours), which share the policy's
            # tokenizer, so a prefix costs its new tokens. Said before running: held-out accuracy under 0.56 is
            # too weak to rank, and the part then falls back to the MiniLM RMs (rm_bar; experiment.py applies it).
            payoff=Specrej(prompts=64, ns=(4, 8, 16, 32), specrej_ns=(16, 32), alphas=(0.5, "auto"), new_tokens=128,
                           decision_every=16, prefix_lengths=(16, 32, 64, 96), rm_init="smollm2-135m-l6",
                           rm_pairs=1000, rm_lr=2e-5, calibration_prompts=16, calibration_n=32, target_n=16),
            # Table 1 sized by power: at 16 prompts its SP-PRM minus ORM differences had 95% half-widths up to 0.15
            # (ARGS 0.150, CARDS 0.152, TBS 0.090, CBS 0.086, BoN 0.02; docs/tables-results.md); a half-width shrinks
            # as 1/sqrt(n), so +-0.05 needs n = 16 * (h / 0.05)^2 = 148 prompts for the widest. The held-out prompts no
            # earlier run decoded are 193-307 (make reproduce and make specrej 1-64, the 192-prompt ARGS run): 115,
            # which gives about +-0.057 for the widest
            tables=Tables(prompts=16, table1_prompts=115, table1_offset=192, new_tokens=24, bon_ns=(4, 8),
                          cards=CARDS_SMALL,
                          gsm8k=GSM8K(orm_pairs=600, prompts=16, new_tokens=64)),
            table5=Table5(pairs=400, prompts=64))
# the pipeline end to end in minutes; its numbers show it working, not the method's effect
DEMO = replace(CPU, seeds=(0,), orm_pairs=128, eval_pairs=64, references=("minilm-pairs",), reference_pairs=320,
               sst_k=5, sst_pairs=48, variants=("entropy",), max_length=128, prompts=8, new_tokens=24,
               methods=("argsg", "bon"), prefix_lengths=(5, 10, 20, 50), tables=None, table5=None, payoff=None,
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
                              gsm8k=GSM8K(orm_pairs=24, reference_pairs=48, prompts=2, new_tokens=6)),
                table5=Table5(pairs=8, sst_k=2, prompts=2, new_tokens=4),
                payoff=Specrej(prompts=2, ns=(2, 4), specrej_ns=(4,), alphas=(0.5, "auto"), new_tokens=6,
                               decision_every=2, prefix_lengths=(2, 4), rm_init="smollm2-135m-l6", rm_pairs=8,
                               sst_k=2, calibration_prompts=2, rm_bar=0.0))  # no bar: 8 pairs rank nothing
# one GPU (untested on a GPU; docs/gpu.md counts its work): all held-out prompts, the paper's search settings,
# a SmolLM2 reference
PAPER_SEARCH = {"argsg": {"k": 30, "w": 1.5}, "cbs": {"beam": 8, "successors": 8, "chunk": 30}, "bon": {"n": 16}}
GPU = replace(CPU, device="cuda", references=("smollm2",), sst_k=5, prompts=None, new_tokens=128, batch_size=32,
              search=PAPER_SEARCH, specrej=Specrej(new_tokens=128, decision_every=32, prefix_lengths=(8, 16, 32, 64)),
              tables=Tables(gsm8k=GSM8K(reference_epochs=3)), table5=Table5(new_tokens=128),
              # the payoff at the speculative-rejection authors' lengths, with decoder RMs on the full SmolLM2-135M
              payoff=Specrej(prompts=256, ns=(4, 8, 16, 32), specrej_ns=(16, 32), alphas=(0.5, "auto"),
                             new_tokens=1024, decision_every=128, prefix_lengths=(128, 256, 512, 768),
                             rm_init="smollm2-135m-instruct", rm_max_length=2048, calibration_prompts=32,
                             target_n=16))
# the gpu scale's stages at a size the CPU runs in minutes (tests/test_reproduce.py; numbers meaningless)
GPU_SMOKE = replace(GPU, device=None, seeds=(0, 1), orm_pairs=24, eval_pairs=16, sst_pairs=24, prompts=3,
                    new_tokens=6, batch_size=4, search={"argsg": {"k": 3, "w": 1.5},
                                                        "cbs": {"beam": 2, "successors": 2, "chunk": 3}, "bon": {"n": 2}},
                    prefix_lengths=(5, 10), tables=None, table5=None, specrej=SMOKE.specrej, payoff=SMOKE.payoff)
# the uncut sizes with the paper's search settings: w = 1.5 on the RMs' raw scale, the paper's training batch
# (its Tables 10 and 11: 64 pairs for an encoder RM, 32 for a decoder RM, through gradient accumulation)
FULL = replace(GPU, reward_norm="none", rm_batch={"encoder": {"batch_size": 8, "grad_accum": 8},
                                                  "decoder": {"batch_size": 8, "grad_accum": 4}},
               references=("smollm2", "minilm-3ep"), batch_size=8, sweep_w=(0.5, 3.0, 5.0, 10.0))
SCALES = {"demo": DEMO, "cpu": CPU, "smoke": SMOKE, "gpu": GPU, "gpu-smoke": GPU_SMOKE, "full": FULL}


# ------------------------------------------------------------------------------------------ the run

def main():
    if sys.argv[1:2] == ["choose-reference"]:
        return experiment.choose_reference(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default="cpu")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--redo", default="", help="stages to rerun: a comma list of stage names (a run prints each as "
                   "[run] NAME or [skip] NAME; OUT/stage_seconds.json lists them), or all")
    p.add_argument("--part", choices=list(experiment.PARTS), default="table1",
                   help="table1: agreement and decoding (paper Figure 5, Table 1); tables: Table 1 with every "
                        "method row and the +Ablation rows, Table 3 (AdvBench) and Table 4 (GSM8K, its own RMs), at "
                        "the scale's `tables` sizes (make tables); specrej: Best-of-N against speculative rejection "
                        "guided by the ORM and by the SP-PRM (the same RMs; make specrej); table5: SST against TLT "
                        "at the same size, from the same ORM and reference (paper Table 5; make table5); payoff: "
                        "Best-of-N against speculative rejection at long replies with decoder RMs of its own and "
                        "adaptive rejection, reward against compute (make payoff)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="every model stage's --device (default: the scale's: cuda for gpu and full, which then "
                        "fail rather than run on the CPU; else each stage's auto)")
    args = p.parse_args()
    s, out, data = SCALES[args.scale], args.out, args.data_dir
    if args.part == "tables" and (s.tables is None or "uniform" not in s.variants) or \
            args.part in ("table5", "payoff") and getattr(s, args.part) is None:
        print(f"error: the {args.scale} scale has no {args.part} part (its sizes or the ablation RM)", file=sys.stderr)
        return 2
    os.makedirs(f"{out}/{'' if args.part == 'table1' else args.part}", exist_ok=True)
    pipeline = Pipeline("reproduce", args.redo, cost_path=f"{out}/stage_seconds.json",
                        commands_path=f"{out}/stage_commands.json", device=args.device or s.device,
                        scripts=os.path.dirname(os.path.abspath(__file__)))  # the stages beside this file
    pipeline.run_stages(experiment.rm_stages(s, out, data))
    pipeline.run_stages(experiment.reference_stages(s, out, data))
    choice = reports.read_json(f"{out}/reference.json")
    print(f"reference RM: {choice['name']} ({choice['path']}), held-out accuracy {choice['accuracy']:.3f}")
    # the specrej part needs only the SP-PRM, the tables part the SP-PRM and the ablation, table5 its own RMs,
    # payoff its own and the SP-PRM beside them
    schemes = {"table1": s.variants, "tables": s.variants[:2], "specrej": s.variants[:1], "table5": (),
               "payoff": s.variants[:1]}[args.part]
    pipeline.run_stages(experiment.variant_stages(s, out, data, schemes, choice["path"]))
    part, report = experiment.PARTS[args.part]
    pipeline.run_stages(part(s, out, data, choice))
    report(s, args.scale, out, pipeline)


if __name__ == "__main__":
    sys.exit(main())
