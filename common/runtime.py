"""The training runtime of 03_train.py: plain PyTorch on one process or a DeepSpeed engine, checkpoints that
a resumed run continues from, and the final save. The training loop speaks to both the same way.

Checkpoints. A checkpoint is a folder (OUTPUT/checkpoint) written beside as checkpoint.tmp and swapped in so
that a complete one exists at every instant (the current one steps aside as checkpoint.old, the new one moves
in, then the old one goes); its trainer_state.json, written last, makes it complete and records the SHA-256 of
every other file in it. A resume takes the newest complete one (an interrupted swap is finished), checks every
file against those checksums and loads tensors only: torch.load with weights only, for DeepSpeed's own loads too
(TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides its weights_only=False; its few own classes are allowed by name).
Anything else is refused with one line before any file is unpickled.

Distributed runs (DeepSpeed on several ranks): every rank must run the same collectives in the same order
(ZeRO-3 gathers the parameters at every forward). The loop gives every rank the same number of micro-batches
(`rank_share`), one forward each; every rank makes the checks that stop a run, on the same data or agreed.

A training run (03_train.py) speaks to the runtime in four words: `Resume.find` (before any model loads),
`Runtime.start`, `step(loss, counts)` for each of `batches(epoch)` of `epochs()`, and `save`. The runtime keeps
the loop's position, the log, the checkpoints and where the reward statistics come from."""
import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common.io import DataError, current_umask, dumps, read_jsonl, sha256_file, write_json, write_jsonl
from common.metrics import reward_statistics
from common.models import dist_backend
from common.ranks import launcher_world
from common.rewards import reward_at, score, training_batches

log = logging.getLogger("train")

STATE_FILE = "trainer_state.json"
# the files of a finished run besides its tokenizer's: an earlier run's that a new one lacks are removed
FINAL_FILES = ("config.json", "model.safetensors", "manifest.json", "reward_stats.json", "eval.json",
               "train_log.jsonl")
# the only classes (besides tensors and containers) that DeepSpeed's checkpoint files hold
DEEPSPEED_CHECKPOINT_CLASSES = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                                "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


@dataclass(frozen=True)
class TrainSettings:
    """A training run's settings as they act (each default resolved: lr by model family, grad_accum by DeepSpeed)."""
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    batch_size: int          # rows per device per micro-batch (whole pairs when grouped)
    grad_accum: int          # micro-batches per optimizer step
    epochs: int
    seed: int
    batching_window: int     # common.rewards.BATCHING_WINDOWS
    deepspeed: str = None    # DeepSpeed JSON config, or None: plain PyTorch on one process
    save_steps: int = 0      # checkpoint every N optimizer steps (0: never)
    log_steps: int = 10
    stop_after_steps: int = None

    @property
    def world(self):
        """How many ranks train: the launcher's under DeepSpeed, else one process."""
        return launcher_world() if self.deepspeed else 1


class BatchPlan:
    """Every rank's micro-batches of each epoch, fixed by (seed, epoch): each rank takes every world-th batch,
    padded to the same count on every rank (`rank_share`); the optimizer steps once per grad_accum micro-batches
    and at the end of each epoch."""

    def __init__(self, units, settings):
        self.units, self.settings, self.world = units, settings, settings.world
        self.total_steps = sum(math.ceil(len(self.of(epoch, 0)[0]) / settings.grad_accum)
                               for epoch in range(settings.epochs))

    def of(self, epoch, rank):
        """(this rank's batches of `epoch`, how many of them are its own: the rest only keep the ranks in step)."""
        s = self.settings
        return rank_share(training_batches(self.units, s.batch_size, s.seed, epoch, s.batching_window), rank,
                          self.world)


@dataclass
class MicroBatch:
    units: list      # training units (common.rewards.training_units)
    padding: bool    # only keeps the ranks in step: trained with weight 0


class LogWindow:
    """What the next log entry averages: each micro-batch's loss since the last entry, its rows, forwards and
    real tokens, and the time."""

    def __init__(self):
        self.loss, self.n, self.rows, self.forwards, self.tokens, self.t0 = 0.0, 0, 0, 0, 0, time.time()

    def add(self, loss, counts):
        self.loss += loss
        self.n += 1
        self.rows += counts["rows"]
        self.forwards += counts["forwards"]
        self.tokens += counts["tokens"]

    def entry(self, step, epoch, lr, world):
        dt = max(time.time() - self.t0, 1e-9)
        return {"step": step, "epoch": epoch, "loss": self.loss / self.n, "lr": lr,
                "rows_per_s": self.rows * world / dt, "rows_per_forward": self.rows / max(self.forwards / 2, 1),
                "tokens_per_s": self.tokens * world / dt, "tokens": self.tokens * world}


# Without a held-out evaluation, reward_stats.json comes from the scores the loss computed anyway: the complete
# replies of the last quarter of the training steps (the linear schedule has brought the lr to a quarter of its
# peak by then, so the model barely moves). Too few of them (a file of cuts) and a capped sample is scored instead.
STATS_FROM_STEPS = 0.75
STATS_MIN_SCORES = 64
STATS_SAMPLE_PAIRS = 128


def training_responses(rows, limit=STATS_SAMPLE_PAIRS):
    """Complete (prompt, response) of the training rows: rows marked complete, else all rows (pairs file)."""
    complete = [r for r in rows if r.get("complete", True)]
    pairs = complete[:limit]
    return [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]


@dataclass
class Resume:
    """Where a run starts, decided before any model loads: afresh, from a checkpoint that is known safe to load
    (`check_checkpoint`), or nowhere (`finished`: --resume into a folder that already holds this run's model)."""
    folder: str               # OUTPUT/checkpoint
    fingerprint: dict         # what a checkpoint must share with the run that resumes it
    path: str = None          # the checkpoint to load (the folder, or a swap's .tmp/.old)
    state: dict = None
    finished: bool = False

    @classmethod
    def find(cls, output, fingerprint, world, wanted):
        resume = cls(os.path.join(output, "checkpoint"), fingerprint)
        if not wanted:
            return resume
        resume.path = find_checkpoint(resume.folder)
        if resume.path is None:  # a finished model: nothing to resume, or another run's
            check_finished(output, fingerprint)
            resume.finished = os.path.isfile(os.path.join(output, "config.json"))
        else:  # a checkpoint that is not this run's, or not as its run wrote it, is refused
            resume.state = check_checkpoint(resume.path, fingerprint, world)
        return resume


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


def deepspeed_config(path, settings, grad_accum, world, cuda, dtype):
    """The DeepSpeed config of a run: the file's, with the run's batch, accumulation, clipping, lr and precision.

    The optimizer is PyTorch's AdamW unless the file says otherwise (torch_adam): DeepSpeed's own FusedAdam is
    compiled at first use and needs the CUDA toolkit (nvcc) on the machine. The schedule is not DeepSpeed's: the
    runtime passes the same linear schedule with warm-up as the plain path's."""
    with open(path) as f:
        config = json.load(f)
    config["train_micro_batch_size_per_gpu"] = settings.batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = settings.batch_size * grad_accum * world
    config["gradient_clipping"] = settings.max_grad_norm
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update({"lr": settings.lr, "weight_decay": settings.weight_decay})
    if optimizer["type"].lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)
    config.pop("scheduler", None)
    config.pop("bf16", None)
    config.pop("fp16", None)
    if cuda and dtype in (torch.bfloat16, torch.float16):
        config["bf16" if dtype == torch.bfloat16 else "fp16"] = {"enabled": True}
    if not cuda:  # CPU (gloo): fp32, no offload
        config.setdefault("zero_optimization", {}).pop("offload_optimizer", None)
        config["zero_optimization"].pop("offload_param", None)
        config["zero_allow_untested_optimizer"] = True
    return config


def rank_share(batches, rank, world):
    """This rank's micro-batches: every world-th batch, then, where the count does not divide evenly, one repeat
    of a batch as padding (trained with weight 0), so that every rank runs the same number of micro-batches and
    optimizer steps. Returns (share, real): the first `real` are this rank's own batches."""
    share = batches[rank::world]
    real = len(share)
    rounds = math.ceil(len(batches) / world)
    return share + [share[-1] if share else batches[0]] * (rounds - real), real


class ScoreForward(torch.nn.Module):
    """A reward model as one module whose forward is `reward_at`, so that DeepSpeed's engine runs every forward
    of the loss: ZeRO-3 counts the micro-batches of an accumulation window in the engine's forward, and a
    forward that bypasses it makes each backward overwrite the gradient accumulated so far."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, positions, decoder):
        return reward_at(self.model, batch, positions, decoder)


class Runtime:
    """Plain PyTorch on one process, or a DeepSpeed engine; the training loop speaks to both the same way.

    settings: a TrainSettings (or anything with its lr, weight_decay, warmup_ratio, max_grad_norm, deepspeed and,
    under DeepSpeed, batch_size). `Runtime.start` makes the runtime of a training run; the constructor alone gives
    the engine, its checkpoints and the final save.

    Precision: fp32 on the CPU. On a GPU, DeepSpeed trains in the config's half precision (bf16, or fp16 where
    bf16 is not supported); plain PyTorch keeps fp32 weights and runs forwards under autocast in that dtype
    (fp16 with a gradient scaler)."""

    def __init__(self, settings, model, total_steps, grad_accum, device, dtype):
        self.settings, self.grad_accum, self.total_steps = settings, grad_accum, total_steps
        self.deepspeed = settings.deepspeed is not None
        self.rank, self.world = 0, 1
        self.cuda, self.dtype = device.type == "cuda", dtype
        self.scaler = None
        warmup = int(settings.warmup_ratio * total_steps)

        def schedule(optimizer):
            return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

        if self.deepspeed:
            import deepspeed
            import torch.distributed as dist

            # a rank that waits longer than DEEPSPEED_TIMEOUT minutes (default 10) for the others fails
            deepspeed.init_distributed(dist_backend=dist_backend(device))
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            config = deepspeed_config(settings.deepspeed, settings, grad_accum, self.world, self.cuda, dtype)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=ScoreForward(model), model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=config, lr_scheduler=schedule)
            self.model = self.engine.module.model
            self.device = self.engine.device
        else:
            self.device = device
            self.model = model.to(self.device)
            if self.cuda and dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")
            # the fused kernel (one pass over all parameters, as the standard trainer's default adamw_torch_fused);
            # the per-tensor loop it replaces cost a tenth of a MiniLM run on the CPU
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                               fused=self.device.type in ("cpu", "cuda"))
            self.scheduler = schedule(self.optimizer)

    @property
    def is_main(self):
        return self.rank == 0

    def train(self):
        (self.engine if self.deepspeed else self.model).train()

    def autocast(self):
        """Forwards run in the chosen half precision (--dtype bf16 or fp16) under autocast, on a GPU and on the
        CPU alike, over fp32 weights (the optimizer steps them in fp32; the score head stays fp32, see
        common.rewards.fp32_scores); DeepSpeed on a GPU casts the model itself (its config's bf16/fp16). fp32:
        everything as the weights are."""
        if self.dtype == torch.float32 or (self.deepspeed and self.cuda):
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.cuda else "cpu", dtype=self.dtype)

    def scores(self, batch, positions, decoder):
        """The training forward: the scores at `positions` (see reward_at), through the engine under DeepSpeed."""
        if self.deepspeed:
            return self.engine(batch, positions, decoder)
        return reward_at(self.model, batch, positions, decoder)

    def backward(self, loss, boundary):
        """boundary: this micro-batch ends an accumulation window (the loop's: every grad_accum micro-batches and
        at the end of each epoch). DeepSpeed is told, so that an epoch's last, shorter window steps too (its
        own counter knows no epochs)."""
        if self.deepspeed:
            self.engine.set_gradient_accumulation_boundary(boundary)
            self.engine.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss / self.grad_accum).backward()
        else:
            (loss / self.grad_accum).backward()

    def optimizer_step(self, boundary):
        """Micro-step; at an accumulation boundary also the optimizer step. Returns the current lr."""
        if self.deepspeed:
            self.engine.step()
        elif boundary:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return self.scheduler.get_last_lr()[0]

    # -------------------------------------------------------------------------------- a training run

    @classmethod
    def start(cls, settings, model, units, device, dtype, output, resume):
        """The runtime of a training run over `units`: every rank's batches planned, the checkpoint of `resume`
        loaded (else an earlier run's partial log removed), and this run's log opened. The log of the run in
        progress is OUTPUT/train_log.jsonl.partial; it joins the model as train_log.jsonl when the model is saved
        (an earlier model in the folder stays as it was, its log too, until the new one is complete)."""
        plan = BatchPlan(units, settings)
        rt = cls(settings, model, plan.total_steps, settings.grad_accum, device, dtype)
        rt.plan, rt.output, rt.resume = plan, output, resume
        rt.log_path = os.path.join(output, "train_log.jsonl.partial")
        rt.state = {"epoch": 0, "micro": 0, "step": 0}  # where the loop stands: the next micro-batch
        os.makedirs(output, exist_ok=True)
        if resume.path:
            loaded = rt.load_checkpoint(resume.path, resume.state, resume.folder)
            rt.state = {k: loaded[k] for k in rt.state}
            if rt.is_main:
                log.info("resuming from %s at epoch %d, step %d", resume.path, rt.state["epoch"], rt.state["step"])
                truncate_log(rt.log_path, rt.state["step"])
        elif rt.is_main and os.path.exists(rt.log_path):
            os.remove(rt.log_path)
        rt.log_file = open(rt.log_path, "a", encoding="utf-8") if rt.is_main else None
        rt.train_scores, rt.evaluation, rt.heldout, rt.stopped = [], None, None, False
        return rt

    def epochs(self):
        """The epochs left to train. After each (and the caller's evaluation of it) a checkpoint, but after the
        last: the final save follows."""
        for epoch in range(self.state["epoch"], self.settings.epochs):
            self.epoch = epoch
            yield epoch
            if self.stopped:
                return
            self.state = {"epoch": epoch + 1, "micro": 0, "step": self.state["step"]}
            if epoch + 1 < self.settings.epochs:
                self._checkpoint()

    def batches(self, epoch):
        """This rank's micro-batches of `epoch` from where the run stands (MicroBatch: units, padding)."""
        batches, real = self.plan.of(epoch, self.rank)
        self.train()
        self.n_micro, self.window = len(batches), LogWindow()
        with tqdm(total=len(batches), initial=self.state["micro"], desc=f"epoch {epoch + 1}/{self.settings.epochs}",
                  unit="batch", disable=not self.is_main) as self.bar:
            for micro in range(self.state["micro"], len(batches)):
                self.micro = micro
                yield MicroBatch([self.plan.units[i] for i in batches[micro]], padding=micro >= real)
                if self.stopped:
                    return

    def step(self, loss, counts):
        """One micro-batch's loss (and its counts, common.rewards.batch_loss): backward; at the end of an
        accumulation window (every grad_accum micro-batches and the epoch's last) the optimizer step, a log
        entry every --log-steps, a checkpoint every --save-steps; --stop-after-steps stops here as if killed."""
        if not self.all_true(torch.isfinite(loss)):
            raise DataError(f"non-finite loss at epoch {self.epoch + 1}, micro-batch {self.micro}: stopping")
        boundary = (self.micro + 1) % self.grad_accum == 0 or self.micro + 1 == self.n_micro
        self.backward(loss, boundary)
        lr = self.optimizer_step(boundary)
        self.window.add(loss.item(), counts)
        if self.epoch == self.settings.epochs - 1 and self.state["step"] >= STATS_FROM_STEPS * self.total_steps:
            self.train_scores += counts["complete_scores"]
        self.bar.update(1)
        if not boundary:
            return
        self.state = {"epoch": self.epoch, "micro": self.micro + 1, "step": self.state["step"] + 1}
        step, s = self.state["step"], self.settings
        if step % s.log_steps == 0 or self.micro + 1 == self.n_micro:
            entry = self.window.entry(step, self.epoch + (self.micro + 1) / self.n_micro, lr, self.world)
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", rows_s=f"{entry['rows_per_s']:.1f}")
            self.log(entry)
            self.window = LogWindow()
        self.stopped = bool(s.stop_after_steps) and step >= s.stop_after_steps
        if self.stopped or (s.save_steps and step % s.save_steps == 0):
            self._checkpoint()
        if self.stopped:
            log.info("stopped after %d steps; continue with --resume", step)

    def log(self, entry):
        """One line of the run's log (the first rank writes it)."""
        if self.log_file:
            self.log_file.write(dumps(entry) + "\n")
            self.log_file.flush()

    def evaluated(self, result, scores, prefix_scores, source):
        """The held-out evaluation after an epoch: logged; the last one's scores are the reward statistics'."""
        self.evaluation = {"epoch": self.epoch + 1, **result}
        self.heldout = (scores, prefix_scores, source)
        self.log({"step": self.state["step"], "eval": self.evaluation})
        if self.is_main:
            log.info("eval after epoch %d: accuracy %.4f, AR_RM-SC %s", self.evaluation["epoch"],
                     result["accuracy"], result["ar_sc"])

    def _checkpoint(self):
        self.save_checkpoint(self.resume.folder, {**self.state, "fingerprint": self.resume.fingerprint})

    def reward_stats(self, fmt, rows, data_name):
        """reward_statistics of the trained RM (its reward_stats.json, which `04_decode.py --reward-norm std`
        reads): the last held-out evaluation's scores; without one, the scores the loss computed in the last
        quarter of the steps; too few of those (a file of cuts), a capped sample of the training pairs' complete
        replies scored now. Every rank takes the same path (the scores are gathered from every rank)."""
        train_scores = self.gather(self.train_scores)
        if self.evaluation is not None:
            scores, prefix_scores, source = self.heldout
            return reward_statistics(scores, prefix_scores,
                                     f"{source} ({len(scores) // 2} held-out pairs, chosen and rejected)")
        if len(train_scores) >= STATS_MIN_SCORES:
            return reward_statistics(train_scores, None, (
                f"{data_name} ({len(train_scores)} complete training replies, scored by the loss in the last "
                f"{100 - int(100 * STATS_FROM_STEPS)}% of the training steps)"))
        prompts, responses = training_responses(rows)
        with self.autocast():
            scores = score(self.model, fmt, prompts, responses, self.settings.batch_size)
        return reward_statistics(scores, None, f"{data_name} (complete responses of the first {len(responses) // 2} "
                                               "training pairs, scored after training)")

    def save(self, tokenizer, stats, manifest):
        """The trained model with its reward_stats.json, manifest.json, last evaluation (eval.json) and log, swapped
        into OUTPUT (`save_model`); then the checkpoints go."""
        extra_files = {"reward_stats.json": stats, "manifest.json": manifest}
        if self.evaluation is not None:
            extra_files["eval.json"] = self.evaluation
        if self.log_file:
            self.log_file.close()
        self.save_model(self.output, tokenizer, extra_files, self.log_path)
        if self.is_main:
            remove_checkpoints(self.resume.folder)
            log.info("saved %s", self.output)

    # -------------------------------------------------------------------------------- agreement between ranks

    def all_true(self, flag):
        """True on every rank when the flag is true on every rank (a check that stops the run stops all ranks)."""
        if self.world == 1:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, items):
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def barrier(self):
        if self.deepspeed:
            import torch.distributed as dist

            dist.barrier()

    # -------------------------------------------------------------------------------- checkpoints

    def _rng_state(self):
        state = {"torch": torch.get_rng_state().numpy().tobytes().hex()}
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes().hex()
        return state

    def _restore_rng(self, state):
        torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
        if self.cuda and "cuda" in state:
            torch.cuda.set_rng_state(torch.frombuffer(bytearray.fromhex(state["cuda"]), dtype=torch.uint8))

    def save_checkpoint(self, folder, state):
        """Model, optimizer, schedule, loop state and every rank's random state; written beside, then swapped in."""
        tmp = folder + ".tmp"
        if self.is_main:
            discard_checkpoint(tmp)
        self.barrier()
        if self.deepspeed:
            self.engine.save_checkpoint(tmp, tag="state")
        elif self.is_main:
            os.makedirs(tmp)
            self.model.save_pretrained(tmp, safe_serialization=True)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(tmp, "optimizer.pt"))
        rng = self.gather([self._rng_state()])
        self.barrier()  # every rank's files are written
        if self.is_main:
            state = {**state, "world": self.world, "rng": rng, "files": file_checksums(tmp)}
            write_json(os.path.join(tmp, STATE_FILE), state)  # last: the checkpoint is complete
            swap_in(tmp, folder)
        self.barrier()

    def load_checkpoint(self, path, state, folder):
        """Continue from the checkpoint at `path` whose state `check_checkpoint` returned; loads tensors only. When
        `path` is not `folder` (a swap that a kill interrupted), the swap is finished once every rank has read it."""
        try:
            with weights_only_loads():
                if self.deepspeed:
                    loaded, _ = self.engine.load_checkpoint(path, tag="state")
                    if loaded is None:
                        raise DataError(f"{path}: DeepSpeed found no checkpoint to load")
                else:
                    from safetensors.torch import load_file

                    self.model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
                    opt = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
                    self.optimizer.load_state_dict(opt["optimizer"])
                    self.scheduler.load_state_dict(opt["scheduler"])
        except (pickle.UnpicklingError, RuntimeError, KeyError, ValueError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: not a checkpoint this program can load ({first}); rerun without "
                            "--resume to start over") from None
        try:
            self._restore_rng(state["rng"][self.rank])
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError):
            raise DataError(f"{path}: {STATE_FILE}: unreadable random state of rank {self.rank}; rerun without "
                            "--resume to start over") from None
        self.barrier()  # every rank has read it: the first may now finish an interrupted swap
        if self.is_main:
            settle_checkpoint(path, folder)
        self.barrier()
        return {k: state[k] for k in ("epoch", "micro", "step", "fingerprint")}

    # -------------------------------------------------------------------------------- the final model

    def save_model(self, output, tokenizer, extra_files, log_path=None):
        """Write the model beside (OUTPUT/.final.tmp), then swap it in: the earlier model in the folder stays as it
        was until the new one is complete. The swap takes the earlier config.json away first and puts the new one
        in last, so a folder is a model only when it is whole (a kill inside the swap leaves no mixed model).
        log_path: the run's log, copied in as train_log.jsonl."""
        tmp = os.path.join(output, ".final.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        if self.deepspeed:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict() \
                if self.engine.zero_optimization_partition_weights() else self.engine.module.state_dict()
            if self.is_main:  # the engine's names are ScoreForward's: "model." and the reward model's own
                state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
                self.model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        elif self.is_main:
            self.model.save_pretrained(tmp, safe_serialization=True)
        if self.is_main:
            tokenizer.save_pretrained(tmp)
            for name, obj in extra_files.items():
                write_json(os.path.join(tmp, name), obj)
            if log_path and os.path.exists(log_path):
                shutil.copyfile(log_path, os.path.join(tmp, "train_log.jsonl"))
            mode = 0o666 & ~current_umask()  # the library writes its weights 0600; outputs follow the umask
            for name in os.listdir(tmp):
                os.chmod(os.path.join(tmp, name), mode)
            swap_files_in(tmp, output)
            if log_path and os.path.exists(log_path):
                os.remove(log_path)
        self.barrier()


# ------------------------------------------------------------------------------------------ checkpoint files

def file_checksums(folder):
    """{relative path: SHA-256} of every file under a checkpoint folder but its state file."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != STATE_FILE:
                out[rel] = sha256_file(path)
    return out


def find_checkpoint(folder):
    """The newest complete checkpoint of `folder`, or None. A checkpoint is complete when its state file exists
    (written last). A swap interrupted by a kill leaves the newest in checkpoint.tmp (complete, not yet moved
    in) or in checkpoint.old (moved aside, the new one not yet in)."""
    for path in (folder + ".tmp", folder, folder + ".old"):
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    return None


def read_state(path):
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable {STATE_FILE} ({e}); rerun without --resume to start over") from None
    missing = [k for k in ("epoch", "micro", "step", "world", "rng", "files") if k not in state] \
        if isinstance(state, dict) else ["its fields"]
    if missing:
        raise DataError(f"{path}: {STATE_FILE} lacks {', '.join(missing)} (not written by this version of the "
                        "program); rerun without --resume to start over")
    return state


def check_checkpoint(path, fingerprint, world):
    """The state of the checkpoint at `path` once it is known safe to load, before any model is loaded: made from
    the same input, starting model and settings, by as many processes, holding exactly the files its run wrote
    (SHA-256), and no pickle that names a class beyond tensors' and DeepSpeed's. Otherwise one DataError line.
    Every rank checks (the same files, the same answer), so that all refuse together."""
    state = read_state(path)
    saved = state.get("fingerprint") or {}
    differs = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if differs:
        raise DataError(f"{path}: the checkpoint was made with other inputs or settings ("
                        + ", ".join(f"{k}: {saved.get(k)!r} then, {fingerprint.get(k)!r} now" for k in differs)
                        + "); rerun without --resume to start over")
    if state["world"] != world:
        raise DataError(f"{path}: the checkpoint was made by {state['world']} processes, this run has {world}; "
                        "resume with as many, or rerun without --resume to start over")
    problem = checkpoint_problem(path, state)
    if problem:
        raise DataError(problem)
    return state


def checkpoint_problem(path, state):
    """Why the checkpoint at `path` must not be loaded, or None: a file that is missing, changed or not written by
    its run (by the SHA-256 its state file records), or a pickle that names any class but tensors' and
    DeepSpeed's own (read without running it)."""
    recorded, found = state["files"], file_checksums(path)
    if not isinstance(recorded, dict):
        return f"{path}: {STATE_FILE} holds no file checksums; rerun without --resume to start over"
    for rel in sorted(set(recorded) | set(found)):
        if rel not in found:
            why = "is missing"
        elif rel not in recorded:
            why = "was not written by the run that made the checkpoint"
        elif found[rel] != recorded[rel]:
            why = "changed after the checkpoint was written (its SHA-256 differs)"
        else:
            continue
        return f"{os.path.join(path, rel)}: {why}; refusing to resume from it (rerun without --resume to start over)"
    for rel in sorted(found):
        if not rel.endswith((".pt", ".bin", ".pth")):
            continue
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(path, rel))
        except Exception as e:  # not a zip checkpoint of torch.save: nothing this program writes
            return (f"{os.path.join(path, rel)}: not a torch checkpoint ({e}); refusing to resume from it (rerun "
                    "without --resume to start over)")
        unexpected = sorted(set(named) - set(DEEPSPEED_CHECKPOINT_CLASSES))
        if unexpected:
            return (f"{os.path.join(path, rel)}: its pickle names {', '.join(unexpected)} (only tensors are loaded); "
                    "refusing to resume from it (rerun without --resume to start over)")
    return None


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside loads tensors and plain containers only, whatever its caller asked for (DeepSpeed
    passes weights_only=False), plus DeepSpeed's checkpoint classes: no pickle can run code."""
    import importlib

    allowed = []
    for name in DEEPSPEED_CHECKPOINT_CLASSES:
        module, _, cls = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), cls))
        except ImportError:  # no DeepSpeed installed: the plain path needs none of them
            pass
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def discard_checkpoint(path):
    """Remove a checkpoint folder, its state file first (a half-removed folder is never taken as complete)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, STATE_FILE))
    shutil.rmtree(path, ignore_errors=True)


def swap_in(new, folder):
    """Move the complete checkpoint `new` into place so that a complete one exists at every instant: the current
    one steps aside as .old, the new one moves in, then .old goes."""
    old = folder + ".old"
    if os.path.exists(folder):
        discard_checkpoint(old)
        os.replace(folder, old)
    os.replace(new, folder)
    discard_checkpoint(old)


def settle_checkpoint(path, folder):
    """Once `path` has been loaded: finish the swap that a kill interrupted (`path` is checkpoint.tmp or
    checkpoint.old) and remove what a kill left half made or half removed beside it."""
    if path == folder + ".tmp":
        swap_in(path, folder)
    elif path == folder + ".old":
        discard_checkpoint(folder)
        os.replace(path, folder)
    discard_checkpoint(folder + ".tmp")
    discard_checkpoint(folder + ".old")


def remove_checkpoints(folder):
    for path in (folder + ".tmp", folder, folder + ".old"):
        discard_checkpoint(path)


def swap_files_in(tmp, output):
    """Move the files of the complete model in `tmp` into `output`: the earlier model's config.json leaves first
    (the folder stops being a model), then its files that the new model lacks, then the new files come in with
    config.json last."""
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output, "config.json"))
    for name in FINAL_FILES:
        if name not in names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output, name))
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(output, name))
    os.rmdir(tmp)


def truncate_log(path, step):
    """A resumed run repeats the steps after its checkpoint: drop their log entries."""
    if not os.path.exists(path):
        return
    kept = [line for _, line in read_jsonl(path) if line.get("step", 0) <= step]
    write_jsonl(path, kept)
