"""The training runtime of 03_train.py: plain PyTorch on one process or a DeepSpeed engine, checkpoints that
a resumed run continues from, and the final save. The training loop speaks to both the same way."""
import json
import os
import shutil

import torch
from transformers import get_linear_schedule_with_warmup

from common.io import DataError, current_umask, read_jsonl, write_json, write_jsonl
from common.models import dist_backend


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
        if self.deepspeed:
            import deepspeed
            import torch.distributed as dist

            deepspeed.init_distributed(dist_backend=dist_backend(device))
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            config = self._deepspeed_config(total_steps)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
            self.model = self.engine.module
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
            warmup = int(args.warmup_ratio * total_steps)
            self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, total_steps)

    def _deepspeed_config(self, total_steps):
        with open(self.args.deepspeed) as f:
            config = json.load(f)
        a = self.args
        config["train_micro_batch_size_per_gpu"] = a.batch_size
        config["gradient_accumulation_steps"] = self.grad_accum
        config["train_batch_size"] = a.batch_size * self.grad_accum * self.world
        config["gradient_clipping"] = a.max_grad_norm
        config.setdefault("optimizer", {"type": "AdamW", "params": {}})
        config["optimizer"]["params"].update({"lr": a.lr, "weight_decay": a.weight_decay})
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_min_lr": 0.0, "warmup_max_lr": a.lr,
            "warmup_num_steps": max(1, int(a.warmup_ratio * total_steps)), "warmup_type": "linear"}}
        config.pop("bf16", None)
        config.pop("fp16", None)
        if self.cuda and self.dtype in (torch.bfloat16, torch.float16):
            config["bf16" if self.dtype == torch.bfloat16 else "fp16"] = {"enabled": True}
        if not self.cuda:  # CPU (gloo): fp32, no fused GPU optimizers
            config.setdefault("zero_optimization", {}).pop("offload_optimizer", None)
            config["zero_optimization"].pop("offload_param", None)
            config["zero_allow_untested_optimizer"] = True
        return config

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
        import contextlib

        if self.dtype == torch.float32 or (self.deepspeed and self.cuda):
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.cuda else "cpu", dtype=self.dtype)

    def backward(self, loss):
        if self.deepspeed:
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

    def save_checkpoint(self, folder, state):
        """Model, optimizer, schedule and loop state; written beside, then swapped in."""
        tmp = folder + ".tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        if self.deepspeed:
            self.engine.save_checkpoint(tmp, tag="state")
        elif self.is_main:
            os.makedirs(tmp)
            self.model.save_pretrained(tmp, safe_serialization=True)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(tmp, "optimizer.pt"))
        if self.is_main:
            state = {**state, "torch_rng": torch.get_rng_state().tolist()}
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        self.barrier()

    def load_checkpoint(self, folder, fingerprint):
        """Continue from a checkpoint, which must come from the same input, starting model and settings."""
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
        saved = state.get("fingerprint") or {}
        differs = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
        if differs:
            raise DataError(f"{folder}: the checkpoint was made with other inputs or settings ("
                            + ", ".join(f"{k}: {saved.get(k)!r} then, {fingerprint.get(k)!r} now" for k in differs)
                            + "); rerun without --resume to start over")
        if self.deepspeed:
            self.engine.load_checkpoint(folder, tag="state")
        else:
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
            opt = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
        return state

    def save_model(self, output, tokenizer, extra_files):
        """Write the model beside, then move it in with config.json last: a folder is a model only when
        complete (a killed save leaves no loadable half)."""
        tmp = os.path.join(output, ".final.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        if self.deepspeed:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict() \
                if self.engine.zero_optimization_partition_weights() else self.model.state_dict()
            if self.is_main:
                self.model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        elif self.is_main:
            self.model.save_pretrained(tmp, safe_serialization=True)
        if self.is_main:
            tokenizer.save_pretrained(tmp)
            for name, obj in extra_files.items():
                write_json(os.path.join(tmp, name), obj)
            names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
            mode = 0o666 & ~current_umask()  # the library writes its weights 0600; outputs follow the umask
            for name in names:
                os.chmod(os.path.join(tmp, name), mode)
                os.replace(os.path.join(tmp, name), os.path.join(output, name))
            os.rmdir(tmp)
        self.barrier()

    def barrier(self):
        if self.deepspeed:
            import torch.distributed as dist

            dist.barrier()


def truncate_log(path, step):
    """A resumed run repeats the steps after its checkpoint: drop their log entries."""
    if not os.path.exists(path):
        return
    kept = [line for _, line in read_jsonl(path) if line.get("step", 0) <= step]
    write_jsonl(path, kept)
