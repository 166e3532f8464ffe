"""Stage 3: train a scalar reward model with the (weighted) Bradley-Terry loss.

    # CPU, plain PyTorch
    python 03_train.py --input runs/x/weighted.jsonl --init minilm-l6 --output runs/x/prm --eval hh-rlhf:heldout
    # GPUs, DeepSpeed ZeRO-3 (the launcher adds --local_rank)
    deepspeed --num_gpus 8 03_train.py --input ... --init weqweasdas/RM-Gemma-2B --output ... \\
        --deepspeed configs/zero3.json

Loss: L = -mean(w * log sigmoid(r(x, y_w) - r(x, y_l))) over the rows of a batch, w from the input's
"weight" field (1 when absent; rows of weight 0 add nothing and are skipped). Batches are random draws of
pairs (--batching length: similar lengths together, faster, less accurate); inputs are truncated by the RM
input rule (docs/scoring.md), never dropped. AdamW, linear schedule with warm-up, 1 epoch.
Defaults per model family: lr 5e-6 for decoder RMs (Gemma, Llama) and 1e-6 for DeBERTa (the paper's),
5e-5 for small encoders (MiniLM: the standard reward trainer's setting; docs/results.md, parity table); grad-accum 16
under DeepSpeed, 1 in plain mode. The optimizer steps every grad-accum micro-batches and at the end of each epoch.

DeepSpeed: PyTorch's AdamW (configs/zero3.json: torch_adam, nothing to compile) and the same linear schedule as
the plain path; every forward of the loss runs through the engine. On several ranks every rank does the same
collective work, as ZeRO-3 needs: one padded forward per micro-batch (length groups only on one process), the
same number of micro-batches (ranks short of one repeat a batch with weight 0), the same statistics and eval
forwards. A rank left waiting longer than DEEPSPEED_TIMEOUT minutes (default 10) fails the run.

Grouped training (decoder RMs): the score of a prefix y[:t] is the head at the position of its last token
in one causal forward over (x, y), so all cut points of a pair share one forward of the chosen side and
one of the rejected side (the same fact `score_prefixes` uses for scoring). The rows of a partial or
weighted file are grouped by pair_id; the loss is the same mean over rows, with every row's scores read off
those forwards: the same equation, fewer forwards (SST with K = 5: about 5 rows per forward). A batch is a
set of whole pairs of about --batch-size rows. Encoder RMs, and --grouping off, keep one forward per row.

Out: a Hugging Face folder (safetensors, tokenizer, config) for AutoModelForSequenceClassification, plus
train_log.jsonl (loss, lr, step, rows/s, rows per forward, real tokens and tokens/s), reward_stats.json (mean and std
of the trained RM's scores of complete responses, for `04_decode.py --reward-norm std`) and, with --eval,
held-out full-response accuracy and AR_RM-SC at --eval-prefix-lengths after each epoch (eval.json).
A model already in the folder stays as it was until the new one is complete (the running log is
train_log.jsonl.partial). --save-steps writes a checkpoint (OUTPUT/checkpoint) that --resume continues from
(same final weights as an uninterrupted run); a resume checks every file of it against the SHA-256 its run
recorded and loads tensors only (common/runtime.py).
"""
import argparse
import json
import logging
import math
import os
import sys

import torch

from common.data import load_pairs
from common.io import (DataError, add_device_args, add_max_length_arg, check_output_differs, fraction,
                       input_checksums, make_manifest, non_negative_float, non_negative_int, positive_float,
                       positive_int, prefix_lengths, probability, run_main)
from common.metrics import heldout_evaluation
from common.models import (device_fields, device_setup, dtype_name, is_decoder_rm, load_reward_model, load_tokenizer,
                           model_family, model_identity, same_model)
from common.ranks import launcher_rank
from common.rewards import BATCHING_WINDOWS, RMFormat, batch_loss, training_units
from common.runtime import Resume, Runtime, TrainSettings

log = logging.getLogger("train")
DEFAULT_LR = {"decoder": 5e-6, "deberta": 1e-6, "encoder": 5e-5}
# what a checkpoint must share with the run that resumes it (besides the input, the starting model, the lr as it
# acts and the dtype)
FINGERPRINT_ARGS = ("epochs", "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "max_length", "limit",
                    "seed", "grouping", "keep_dropout", "deepspeed", "grad_accum", "subset", "fraction", "batching")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="pairs, partial or weighted JSONL, or a named pairs set")
    p.add_argument("--init", required=True, help="starting model: alias, hub id or folder (an RM or backbone)")
    p.add_argument("--output", required=True, help="folder for the trained RM")
    p.add_argument("--eval", default=None, help="held-out pairs for accuracy and AR_RM-SC (e.g. hh-rlhf:heldout)")
    p.add_argument("--eval-prefix-lengths", type=prefix_lengths, default=[5, 10, 20, 50])
    p.add_argument("--eval-limit", type=positive_int, default=None, help="use only the first N eval pairs")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--lr", type=positive_float, default=None, help="default by model family (see above)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per device per micro-batch (whole pairs when grouped)")
    p.add_argument("--grad-accum", type=positive_int, default=None, help="default 16 under DeepSpeed, else 1")
    p.add_argument("--warmup-ratio", type=fraction, default=0.03)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--max-grad-norm", type=non_negative_float, default=1.0)
    p.add_argument("--keep-dropout", action="store_true",
                   help="train with the model's dropout (default: off, as the standard reward trainer does: "
                        "dropout noise on both sides of a pair adds noise to their score difference)")
    add_max_length_arg(p, trained=False)
    p.add_argument("--limit", type=positive_int, default=None, help="train on the first N rows only")
    p.add_argument("--batching", choices=list(BATCHING_WINDOWS), default="random",
                   help="random: batches drawn at random (the standard trainer's); window: random windows of 4 "
                        "batches, sorted by length inside (less padding); length: windows of 50 (least padding, "
                        "lower accuracy; docs/scoring.md)")
    p.add_argument("--grouping", choices=["auto", "off"], default="auto",
                   help="auto: a decoder RM scores all cut points of a pair side from one forward (same loss)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-self-reference", action="store_true",
                   help="train on weights that --init itself computed as the reference (self-confirmation)")
    p.add_argument("--save-steps", type=non_negative_int, default=100, help="checkpoint every N optimizer steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint if present")
    p.add_argument("--stop-after-steps", type=positive_int, default=None,
                   help="stop after N optimizer steps as if killed (the schedule still plans the whole run)")
    p.add_argument("--log-steps", type=positive_int, default=10)
    p.add_argument("--subset", default=None, help="hh-rlhf-hub: comma list of its subsets (default: all four)")
    p.add_argument("--fraction", type=probability, default=None, help="keep a seeded share of the pairs (--seed)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (e.g. configs/zero3.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                   help="set by the deepspeed launcher")
    add_device_args(p)
    return p.parse_args()


def check_reference(args, init_identity):
    """Refuse to train --init on rows weighted by --init itself: the paper's reference is a separate,
    stronger RM; with the model as its own reference the filter keeps only what it already believes."""
    manifest = args.input + ".manifest.json"
    if not os.path.isfile(manifest):
        return None
    with open(manifest, encoding="utf-8") as f:
        reference = json.load(f).get("reference")
    if not reference:
        return None
    if same_model(reference, init_identity):
        message = (f"{args.input}: its weights were computed with reference {reference['name']}, the model given "
                   f"as --init ({args.init}): the reference must be a different, stronger RM "
                   "(or pass --allow-self-reference)")
        if not args.allow_self_reference:
            raise DataError(message)
        log.warning("%s; training anyway (--allow-self-reference)", message.split(": ", 1)[1])
    return reference


def load_rows(args):
    stats = {}
    rows = load_pairs(args.input, args.data_dir, stats=stats, subset=args.subset, fraction=args.fraction,
                      seed=args.seed)
    if args.limit:
        rows = rows[: args.limit]
    for row in rows:
        w = row.get("weight", 1.0)
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DataError(f"{args.input}: row {row.get('id')}: field 'weight': expected a finite number >= 0")
    return rows


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def train_settings(args):
    """The settings as they act: lr by model family and grad-accum by DeepSpeed where not given."""
    return TrainSettings(
        lr=args.lr if args.lr is not None else DEFAULT_LR[model_family(args.init)],
        grad_accum=args.grad_accum or (16 if args.deepspeed else 1), weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
        epochs=args.epochs, seed=args.seed, batching_window=BATCHING_WINDOWS[args.batching], deepspeed=args.deepspeed,
        save_steps=args.save_steps, log_steps=args.log_steps, stop_after_steps=args.stop_after_steps)


def fingerprint_of(args, settings, checksums, init_identity, dtype):
    """What a checkpoint, or a finished model resumed into, must share with this run."""
    return {"input": checksums.get(args.input) or args.input, "init": init_identity["weights_sha256"]
            or init_identity["name"], "lr": settings.lr, **{k: getattr(args, k) for k in FINGERPRINT_ARGS},
            "resolved_dtype": dtype_name(dtype)}


def load_model(args):
    """The starting model, its tokenizer and the RM input format; dropout off unless --keep-dropout."""
    tokenizer = load_tokenizer(args.init)
    model = load_reward_model(args.init, tokenizer=tokenizer, allow_new_head=True)
    if not args.keep_dropout:
        disable_dropout(model)
    return tokenizer, model, RMFormat(tokenizer, model, max_length=args.max_length)


def compute_loss(rt, batch, pad_id, decoder):
    """The weighted Bradley-Terry loss of a micro-batch, and its counts (common.rewards.batch_loss). One process:
    a forward per group of similar lengths; several ranks: one padded forward each (ZeRO-3 gathers the parameters
    collectively at every forward, so every rank runs as many)."""
    with rt.autocast():
        return batch_loss(rt.model, batch.units, pad_id, decoder, rt.device, length_grouped=rt.world == 1,
                          padding=batch.padding, forward=lambda inputs, positions: rt.scores(inputs, positions, decoder))


def evaluate(rt, fmt, pairs, args):
    """Held-out accuracy and AR_RM-SC after an epoch (eval.json; the last one's scores give reward_stats.json)."""
    with rt.autocast():
        result, scores, prefix_scores = heldout_evaluation(rt.model, fmt, pairs, args.eval_prefix_lengths,
                                                           args.batch_size)
    rt.evaluated(result, scores, prefix_scores, args.eval)


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = train_settings(args)
    torch.manual_seed(args.seed)
    device, dtype = device_setup(args)
    # under a launcher only the first rank writes the folder (and holds its lock)
    check_output_differs(args.output, args.input, folder=True, claim=launcher_rank() == 0)
    checksums = input_checksums([args.input, args.eval])
    init_identity = model_identity(args.init)
    reference = check_reference(args, init_identity)
    rows = load_rows(args)
    fingerprint = fingerprint_of(args, settings, checksums, init_identity, dtype)
    resume = Resume.find(args.output, fingerprint, settings.world, args.resume)  # before any model loads
    if resume.finished:
        log.info("%s: already trained with these inputs and settings; nothing to do", args.output)
        return
    tokenizer, model, fmt = load_model(args)
    grouped = is_decoder_rm(model) and fmt.fast_prefixes and args.grouping == "auto"
    units = training_units(fmt, rows, grouped)
    if not units:
        raise DataError(f"{args.input}: no pair with a positive weight to train on")
    n_rows = sum(u["n_rows"] for u in units)
    eval_pairs = load_pairs(args.eval, args.data_dir)[: args.eval_limit] if args.eval else None

    rt = Runtime.start(settings, model, units, device, dtype, args.output, resume)
    decoder = is_decoder_rm(rt.model)
    if rt.is_main:
        log.info("%d rows (%d of weight 0 skipped, %d truncated inputs), %s: %d forward sequences an epoch, "
                 "%d optimizer steps, lr %g, accum %d, world %d", n_rows, len(rows) - n_rows, fmt.truncated,
                 "grouped by pair" if grouped else "one forward per row and side",
                 sum(len(u["sequences"]) for u in units), rt.total_steps, settings.lr, settings.grad_accum, rt.world)
    for epoch in rt.epochs():
        for batch in rt.batches(epoch):
            loss, counts = compute_loss(rt, batch, tokenizer.pad_token_id, decoder)
            rt.step(loss, counts)
        if rt.stopped:
            return
        if eval_pairs:
            evaluate(rt, fmt, eval_pairs, args)

    stats = rt.reward_stats(fmt, rows, args.input)
    made = {"reference": reference, "init": init_identity, "rows": n_rows, "grouped": grouped,
            "zero_weight_skipped": len(rows) - n_rows, "truncated": fmt.truncated, "grad_accum": settings.grad_accum,
            "world_size": rt.world, "total_steps": rt.total_steps, "fingerprint": fingerprint}
    rt.save(tokenizer, stats, make_manifest(args.output, args, checksums, made,
                                            resolved={"lr": settings.lr, **device_fields(device, dtype)}))


def main_on_every_rank():
    """Under a launcher every rank meets the same expected failure (the checks are the same or agreed): the first
    rank says it in one line, the others end with the same exit status, quietly."""
    try:
        main()
    except DataError:
        if launcher_rank() == 0:
            raise
        sys.exit(2)


if __name__ == "__main__":
    run_main(main_on_every_rank)
