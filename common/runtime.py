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
(`rank_share`), one forward each; every rank makes the checks that stop a run, on the same data or agreed."""
import contextlib
import json
import math
import os
import pickle
import shutil

import torch
from transformers import get_linear_schedule_with_warmup

from common.io import DataError, current_umask, read_jsonl, sha256_file, write_json, write_jsonl
from common.models import dist_backend
from common.rewards import reward_at

STATE_FILE = "trainer_state.json"
# the files of a finished run besides its tokenizer's: an earlier run's that a new one lacks are removed
FINAL_FILES = ("config.json", "model.safetensors", "manifest.json", "reward_stats.json", "eval.json",
               "train_log.jsonl")
# the only classes (besides tensors and containers) that DeepSpeed's checkpoint files hold
DEEPSPEED_CHECKPOINT_CLASSES = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                                "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


def deepspeed_config(path, args, grad_accum, world, cuda, dtype):
    """The DeepSpeed config of a run: the file's, with the run's batch, accumulation, clipping, lr and precision.

    The optimizer is PyTorch's AdamW unless the file says otherwise (torch_adam): DeepSpeed's own FusedAdam is
    compiled at first use and needs the CUDA toolkit (nvcc) on the machine. The schedule is not DeepSpeed's: the
    runtime passes the same linear schedule with warm-up as the plain path's."""
    with open(path) as f:
        config = json.load(f)
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = args.batch_size * grad_accum * world
    config["gradient_clipping"] = args.max_grad_norm
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update({"lr": args.lr, "weight_decay": args.weight_decay})
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
    """Plain PyTorch on one process, or a DeepSpeed engine; the loop below speaks to both the same way.

    Precision: fp32 on the CPU. On a GPU, DeepSpeed trains in the config's half precision (bf16, or fp16 where
    bf16 is not supported); plain PyTorch keeps fp32 weights and runs forwards under autocast in that dtype
    (fp16 with a gradient scaler)."""

    def __init__(self, args, model, total_steps, grad_accum, device, dtype):
        self.args, self.grad_accum = args, grad_accum
        self.deepspeed = args.deepspeed is not None
        self.rank, self.world = 0, 1
        self.cuda, self.dtype = device.type == "cuda", dtype
        self.scaler = None
        warmup = int(args.warmup_ratio * total_steps)

        def schedule(optimizer):
            return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

        if self.deepspeed:
            import deepspeed
            import torch.distributed as dist

            # a rank that waits longer than DEEPSPEED_TIMEOUT minutes (default 10) for the others fails
            deepspeed.init_distributed(dist_backend=dist_backend(device))
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            config = deepspeed_config(args.deepspeed, args, grad_accum, self.world, self.cuda, dtype)
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
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
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

    def step(self, boundary):
        """Micro-step; at an accumulation boundary also the optimizer step. Returns the current lr."""
        if self.deepspeed:
            self.engine.step()
        elif boundary:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return self.scheduler.get_last_lr()[0]

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
