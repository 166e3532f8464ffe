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
train_log.jsonl (loss, lr, step, rows/s, rows per forward, real tokens/s), reward_stats.json (mean and std
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
import time

import torch
from tqdm import tqdm

from common.data import load_pairs
from common.io import (DataError, add_device_args, add_max_length_arg, check_output_differs, dumps, fraction,
                       input_checksums, make_manifest, non_negative_float, non_negative_int, positive_float,
                       positive_int, prefix_lengths, probability, run_main)
from common.metrics import heldout_evaluation, reward_statistics
from common.models import (device_setup, is_decoder_rm, load_reward_model, load_tokenizer, model_family,
                           model_identity, same_model)
from common.rewards import BATCHING_WINDOWS, RMFormat, batch_loss, score, training_batches, training_units
from common.runtime import Runtime, check_checkpoint, find_checkpoint, rank_share, remove_checkpoints, truncate_log

log = logging.getLogger("train")
DEFAULT_LR = {"decoder": 5e-6, "deberta": 1e-6, "encoder": 5e-5}
# what a checkpoint must share with the run that resumes it
FINGERPRINT_ARGS = ("lr", "epochs", "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "max_length",
                    "limit", "seed", "grouping", "keep_dropout", "deepspeed", "grad_accum", "subset", "fraction",
                    "batching", "resolved_dtype")


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


def check_finished(output, fingerprint):
    """--resume into a folder that holds a finished model (no checkpoint left): refused, changing nothing, unless
    that model was made from the same input, starting model and settings."""
    manifest = os.path.join(output, "manifest.json")
    if not os.path.isfile(os.path.join(output, "config.json")) or not os.path.isfile(manifest):
        return
    with open(manifest, encoding="utf-8") as f:
        made = json.load(f).get("fingerprint")
    if made is None:
        raise DataError(f"{output}: holds a finished model whose manifest does not say what it was trained from; "
                        "rerun without --resume to replace it, or give another --output")
    differs = [k for k in sorted(set(made) | set(fingerprint)) if made.get(k) != fingerprint.get(k)]
    if differs:
        raise DataError(f"{output}: holds a finished model made with other inputs or settings ("
                        + ", ".join(f"{k}: {made.get(k)!r} then, {fingerprint.get(k)!r} now" for k in differs)
                        + "); rerun without --resume to replace it, or give another --output")


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


def new_window():
    return {"loss": 0.0, "n": 0, "rows": 0, "forwards": 0, "tokens": 0, "t0": time.time()}


# Without --eval, reward_stats.json comes from the scores the loss computed anyway: the complete replies of
# the last quarter of the training steps (the linear schedule has brought the lr to a quarter of its peak by
# then, so the model barely moves). Too few of them (a file of cuts) and a capped sample is scored instead.
STATS_FROM_STEPS = 0.75
STATS_MIN_SCORES = 64
STATS_SAMPLE_PAIRS = 128


def training_responses(rows, limit=STATS_SAMPLE_PAIRS):
    """Complete (prompt, response) of the training rows: rows marked complete, else all rows (pairs file)."""
    complete = [r for r in rows if r.get("complete", True)]
    pairs = complete[:limit]
    return [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    family = model_family(args.init)
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[family]
    grad_accum = args.grad_accum or (16 if args.deepspeed else 1)
    torch.manual_seed(args.seed)
    device, dtype = device_setup(args)

    # under a launcher only the first rank writes the folder (and holds its lock)
    check_output_differs(args.output, args.input, folder=True, claim=int(os.environ.get("RANK", "0")) == 0)
    checksums = input_checksums([args.input, args.eval])
    init_identity = model_identity(args.init)
    reference = check_reference(args, init_identity)
    rows = load_rows(args)
    fingerprint = {"input": checksums.get(args.input) or args.input, "init": init_identity["weights_sha256"]
                   or init_identity["name"], **{k: getattr(args, k) for k in FINGERPRINT_ARGS}}
    ckpt = os.path.join(args.output, "checkpoint")
    world = int(os.environ.get("WORLD_SIZE", 1)) if args.deepspeed else 1
    resume_from = find_checkpoint(ckpt) if args.resume else None
    if args.resume and resume_from is None:
        check_finished(args.output, fingerprint)  # a finished model: nothing to resume, or another run's
        if os.path.isfile(os.path.join(args.output, "config.json")):
            log.info("%s: already trained with these inputs and settings; nothing to do", args.output)
            return
    # before any model loads: a checkpoint that is not this run's, or not as its run wrote it, is refused
    resume_state = check_checkpoint(resume_from, fingerprint, world) if resume_from else None
    tokenizer = load_tokenizer(args.init)
    model = load_reward_model(args.init, tokenizer=tokenizer, allow_new_head=True)
    if not args.keep_dropout:
        disable_dropout(model)
    fmt = RMFormat(tokenizer, model, max_length=args.max_length)
    grouped = is_decoder_rm(model) and fmt.fast_prefixes and args.grouping == "auto"
    units = training_units(fmt, rows, grouped)
    n_rows = sum(u["n_rows"] for u in units)
    skipped_zero = len(rows) - n_rows
    if not units:
        raise DataError(f"{args.input}: no pair with a positive weight to train on")
    eval_pairs = load_pairs(args.eval, args.data_dir)[: args.eval_limit] if args.eval else None
    prefix_lengths = args.eval_prefix_lengths

    # Each rank takes every world-th batch, padded to the same count on every rank (rank_share); the optimizer
    # steps once per grad_accum micro-batches and at the end of each epoch.

    def epoch_batches(epoch, rank):
        return rank_share(training_batches(units, args.batch_size, args.seed, epoch, BATCHING_WINDOWS[args.batching]),
                          rank, world)

    total_steps = sum(math.ceil(len(epoch_batches(epoch, 0)[0]) / grad_accum) for epoch in range(args.epochs))
    rt = Runtime(args, model, total_steps, grad_accum, device, dtype)
    decoder = is_decoder_rm(rt.model)
    os.makedirs(args.output, exist_ok=True)
    # the log of the run in progress; it joins the model as train_log.jsonl when the model is saved (an earlier
    # model in the folder stays as it was, its log too, until the new one is complete)
    log_path = os.path.join(args.output, "train_log.jsonl.partial")

    state = {"epoch": 0, "micro": 0, "step": 0, "fingerprint": fingerprint}
    if resume_from:
        state = rt.load_checkpoint(resume_from, resume_state, ckpt)
        if rt.is_main:
            log.info("resuming from %s at epoch %d, step %d", resume_from, state["epoch"], state["step"])
            truncate_log(log_path, state["step"])
    elif rt.is_main and os.path.exists(log_path):
        os.remove(log_path)
    if rt.is_main:
        log.info("%d rows (%d of weight 0 skipped, %d truncated inputs), %s: %d forward sequences an epoch, "
                 "%d optimizer steps, lr %g, accum %d, world %d", n_rows, skipped_zero, fmt.truncated,
                 "grouped by pair" if grouped else "one forward per row and side",
                 sum(len(u["sequences"]) for u in units), total_steps, args.lr, grad_accum, rt.world)

    log_file = open(log_path, "a", encoding="utf-8") if rt.is_main else None
    eval_history, eval_scores, eval_prefix_scores, train_scores = [], None, None, []
    stopped = False
    for epoch in range(state["epoch"], args.epochs):
        batches, real = epoch_batches(epoch, rt.rank)
        rt.train()
        window = new_window()
        bar = tqdm(total=len(batches), initial=state["micro"], desc=f"epoch {epoch + 1}/{args.epochs}",
                   unit="batch", disable=not rt.is_main)
        for micro in range(state["micro"], len(batches)):
            # one process: a forward per group of similar lengths; several: one padded forward on every rank
            with rt.autocast():
                loss, counts = batch_loss(rt.model, [units[i] for i in batches[micro]], tokenizer.pad_token_id,
                                          decoder, rt.device, length_grouped=rt.world == 1, padding=micro >= real,
                                          forward=lambda batch, positions: rt.scores(batch, positions, decoder))
            if not rt.all_true(torch.isfinite(loss)):
                raise DataError(f"non-finite loss at epoch {epoch + 1}, micro-batch {micro}: stopping")
            boundary = (micro + 1) % grad_accum == 0 or micro + 1 == len(batches)
            rt.backward(loss, boundary)
            lr = rt.step(boundary)
            window["loss"] += loss.item()
            window["n"] += 1
            if epoch == args.epochs - 1 and state["step"] >= STATS_FROM_STEPS * total_steps:
                train_scores += counts["complete_scores"]
            for key in ("rows", "forwards", "tokens"):
                window[key] += counts[key]
            bar.update(1)
            if not boundary:
                continue
            state = {"epoch": epoch, "micro": micro + 1, "step": state["step"] + 1, "fingerprint": fingerprint}
            if state["step"] % args.log_steps == 0 or micro + 1 == len(batches):
                dt = max(time.time() - window["t0"], 1e-9)
                entry = {"step": state["step"], "epoch": epoch + (micro + 1) / len(batches),
                         "loss": window["loss"] / window["n"], "lr": lr,
                         "rows_per_s": window["rows"] * rt.world / dt,
                         "rows_per_forward": window["rows"] / max(window["forwards"] / 2, 1),
                         "tokens_per_s": window["tokens"] * rt.world / dt}
                bar.set_postfix(loss=f"{entry['loss']:.4f}", rows_s=f"{entry['rows_per_s']:.1f}")
                if log_file:
                    log_file.write(dumps(entry) + "\n")
                    log_file.flush()
                window = new_window()
            if args.save_steps and state["step"] % args.save_steps == 0:
                rt.save_checkpoint(ckpt, state)
            if args.stop_after_steps and state["step"] >= args.stop_after_steps:
                rt.save_checkpoint(ckpt, state)
                stopped = True
                break
        bar.close()
        if stopped:
            log.info("stopped after %d steps; continue with --resume", state["step"])
            return
        state = {"epoch": epoch + 1, "micro": 0, "step": state["step"], "fingerprint": fingerprint}
        if eval_pairs:
            with rt.autocast():
                result, eval_scores, eval_prefix_scores = heldout_evaluation(rt.model, fmt, eval_pairs, prefix_lengths,
                                                                             args.batch_size)
            result = {"epoch": epoch + 1, **result}
            eval_history.append(result)
            if log_file:
                log_file.write(dumps({"step": state["step"], "eval": result}) + "\n")
                log_file.flush()
            if rt.is_main:
                log.info("eval after epoch %d: accuracy %.4f, AR_RM-SC %s", epoch + 1, result["accuracy"],
                         result["ar_sc"])
        if epoch + 1 < args.epochs:  # after the last epoch the final save follows: no checkpoint needed
            rt.save_checkpoint(ckpt, state)

    train_scores = rt.gather(train_scores)  # every rank's, on every rank: all take the same path below
    if eval_scores is None and len(train_scores) >= STATS_MIN_SCORES:
        eval_scores = train_scores
        source = (f"{args.input} ({len(train_scores)} complete training replies, scored by the loss in the last "
                  f"{100 - int(100 * STATS_FROM_STEPS)}% of the training steps)")
    elif eval_scores is None:  # a capped sample of the training pairs' complete responses (every rank scores it)
        prompts, responses = training_responses(rows)
        with rt.autocast():
            eval_scores = score(rt.model, fmt, prompts, responses, args.batch_size)
        source = (f"{args.input} (complete responses of the first {len(responses) // 2} training pairs, scored after "
                  "training)")
    else:
        source = f"{args.eval} ({len(eval_scores) // 2} held-out pairs, chosen and rejected)"
    stats = reward_statistics(eval_scores, eval_prefix_scores, source)
    manifest = make_manifest(args.output, args, inputs=checksums, extra={
        "reference": reference, "init": init_identity, "rows": n_rows, "grouped": grouped,
        "zero_weight_skipped": skipped_zero, "truncated": fmt.truncated, "grad_accum": grad_accum,
        "world_size": rt.world, "total_steps": total_steps, "fingerprint": fingerprint})
    extra_files = {"reward_stats.json": stats, "manifest.json": manifest}
    if eval_history:
        extra_files["eval.json"] = eval_history[-1]
    if log_file:
        log_file.close()
    rt.save_model(args.output, tokenizer, extra_files, log_path)
    if rt.is_main:
        remove_checkpoints(ckpt)
        log.info("saved %s", args.output)


def main_on_every_rank():
    """Under a launcher every rank meets the same expected failure (the checks are the same or agreed): the first
    rank says it in one line, the others end with the same exit status, quietly."""
    try:
        main()
    except DataError:
        if int(os.environ.get("RANK", "0")) == 0:
            raise
        sys.exit(2)


if __name__ == "__main__":
    run_main(main_on_every_rank)
