"""`python -m bit_pytorch.train`: fine-tune a released BiT model with BiT-HyperRule in PyTorch.

The schedule, evaluation and checkpoint cadence, resume, signals and logging are bit_common's
shared loop (`bit_common.loop.main`); this module supplies the PyTorch `Backend`: the model, SGD
with momentum 0.9 (no weight decay), mixup, `--batch_split` gradient accumulation, evaluation,
and the canonical state for checkpoints.

Multi-GPU / multi-node: launch with `torchrun --nproc_per_node N -m bit_pytorch.train ...`. Each
process trains on its contiguous slice of the global `--batch` under DistributedDataParallel
(nccl on GPU, gloo on CPU); rank 0 writes the logs and checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bit_common import checkpoint, hyperrule, loop, precision
from bit_common.datasets import DatasetInfo, Split
from bit_common.errors import BiTError
from bit_common.loop import RunSetup
from bit_pytorch import data, models

# --precision -> autocast dtype (fp32: no autocast); the bench trains timm with the same.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_grad_scaler(device_type: str) -> torch.amp.GradScaler:
    """fp16's dynamic loss scale on bit_common.precision's schedule (TF2 scales by the same)."""
    return torch.amp.GradScaler(device_type, init_scale=precision.LOSS_SCALE_INIT,
                                growth_factor=2.0, backoff_factor=0.5,
                                growth_interval=precision.LOSS_SCALE_GROWTH_INTERVAL)


def mixed_precision_available(device: torch.device) -> bool:
    """Whether --precision bf16/fp16 may run on `device` (GPUs only; see bit_common.precision).
    The tests patch this to run the mixed-precision step's logic on a CPU."""
    return device.type == "cuda"


def _init_distributed(device_type: str) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with N > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


class TorchBackend(loop.Backend):
    """Model, optimizer and input pipeline of one process."""

    def __init__(self, setup: RunSetup):
        args = setup.args
        self.setup, self.args = setup, args
        cuda = torch.cuda.is_available()
        precision.require_accelerator(args.precision, "PyTorch",
                                      mixed_precision_available(
                                          torch.device("cuda" if cuda else "cpu")))
        if cuda:  # bind the device before joining the process group (NCCL)
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
            if args.precision == "fp32":  # true float32, as the other frameworks (parity)
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        else:
            self.device = torch.device("cpu")
        self.rank, self.world = _init_distributed("cuda" if cuda else "cpu")
        self.is_chief = self.rank == 0
        if args.batch % self.world:
            raise BiTError(f"--batch {args.batch} is not divisible by the {self.world} "
                           f"processes; every process needs the same share of the batch.")
        local = args.batch // self.world
        if local % args.batch_split:
            raise BiTError(f"Each of the {self.world} processes gets {local} examples of the "
                           f"batch, which --batch_split {args.batch_split} does not divide.")
        # channels_last: tensor cores on GPUs; on CPU oneDNN's NHWC kernels are 2-4% faster and,
        # against a float64 run, exactly as accurate as NCHW.
        self.memory_format = torch.channels_last
        self.amp_dtype = AMP_DTYPES.get(args.precision)
        self.scaler = (make_grad_scaler(self.device.type)
                       if precision.needs_loss_scaling(args.precision) else None)

        self.model = models.from_params(setup.arch, setup.params).to(
            self.device, memory_format=self.memory_format).train()
        self.net: nn.Module = self.model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if cuda else None,
                broadcast_buffers=False, gradient_as_bucket_view=True)
        self.params = dict(self.model.named_parameters())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=0.9,
                                         dampening=0.0, weight_decay=0.0, nesterov=False)
        # One mixup shard per process keeps every partner inside this process's rows.
        self.plan = dataclasses.replace(setup.plan, shards=self.world)
        self.rows = range(self.rank * local, (self.rank + 1) * local)
        # Loaded now, so a missing or broken evaluation split fails before the run folder exists.
        self.eval_split = data.load_eval_split(args, setup.dataset, setup.train)
        self.pin = cuda

    # ---- input ------------------------------------------------------------------------------
    def train_batches(self, start_step: int) -> Iterator[data.TrainBatch]:
        n = self.plan.num_examples
        end = hyperrule.total_steps(n)
        if self.args.steps is not None:
            end = min(end, self.args.steps)
        return data.train_batches(self.setup.train, self.setup.train_indices, self.plan,
                                  start_step, end, self.rows, self.args.workers, self.pin)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- one optimizer step -------------------------------------------------------------------
    def train_step(self, batch: data.TrainBatch, lr: float) -> float:
        x = self._to_device(batch.images)
        y = batch.labels.to(self.device, non_blocking=True)
        lam = float(batch.mixup_lambda)
        if lam != 1.0:  # mix the whole (per-process) batch first, then split it
            perm = batch.mixup_perm.to(self.device)
            x = lam * x + (1.0 - lam) * x[perm]
            y2 = y[perm]
        else:
            y2 = y
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        split = self.args.batch_split
        micro = x.shape[0] // split
        total = torch.zeros((), device=self.device)
        for i in range(split):
            rows = slice(i * micro, (i + 1) * micro)
            sync = i == split - 1 or self.net is self.model
            with (contextlib.nullcontext() if sync else self.net.no_sync()), self._autocast():
                logits = self.net(x[rows]).float()
                loss = F.cross_entropy(logits, y[rows])
                if lam != 1.0:
                    loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, y2[rows])
            scaled = loss / split
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        total /= split
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return float(total)

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        split = self.eval_split
        rows = data.shard_rows(len(split), self.rank, self.world)
        k = min(5, self.setup.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # top1, top5, loss, n
        self.model.eval()
        try:
            with torch.inference_mode(), self._autocast():
                for images, labels in data.eval_batches(split, self.setup.crop,
                                                        self.args.batch_eval, rows,
                                                        self.args.workers, self.pin):
                    logits = self.model(self._to_device(images)).float()
                    labels = labels.to(self.device)
                    topk = logits.topk(k, dim=1).indices
                    hit = topk == labels[:, None]
                    sums[0] += hit[:, 0].sum()
                    sums[1] += hit.any(dim=1).sum()
                    sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
                    sums[3] += labels.shape[0]
        finally:
            self.model.train()
        if self.world > 1:
            dist.all_reduce(sums)
        top1, top5, loss, n = sums.tolist()
        n = max(n, 1.0)
        return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n}

    # ---- state ----------------------------------------------------------------------------------
    def _momentum(self) -> dict[str, np.ndarray]:
        out = {}
        for name, p in self.params.items():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            out[name] = (np.zeros(tuple(p.shape), np.float32) if buf is None
                         else buf.detach().float().cpu().numpy().copy())  # not a view
        return out

    def get_state(self) -> dict[str, np.ndarray]:
        arch, c = self.setup.arch, self.setup.num_classes
        state = models.to_params(self.model)
        state = loop.join_state(state, checkpoint.from_framework(self._momentum(), arch, c,
                                                                 "pytorch"))
        if self.scaler:
            scaler = self.scaler.state_dict()
            state.update(precision.loss_scale_state(scaler["scale"], scaler["_growth_tracker"]))
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        arch, c = self.setup.arch, self.setup.num_classes
        params, momentum = loop.split_state(state, arch, c)
        fw_params = checkpoint.to_framework(params, "pytorch")
        fw_momentum = checkpoint.to_framework(momentum, "pytorch")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(fw_params[name], np.float32)))
                buf = torch.empty_like(p).copy_(
                    torch.from_numpy(np.asarray(fw_momentum[name], np.float32)))
                self.optimizer.state[p]["momentum_buffer"] = buf
        if self.scaler:
            scale, good_steps = precision.read_loss_scale(state)
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": scale,
                                         "_growth_tracker": good_steps})

    def agree(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


class _PyTorch:
    """What bit_common's loop needs from this package."""

    name = "pytorch"

    @staticmethod
    def load_train_split(args: argparse.Namespace, info: DatasetInfo) -> Split:
        return data.load_train_split(args, info)

    @staticmethod
    def make_backend(setup: RunSetup) -> TorchBackend:
        return TorchBackend(setup)


FRAMEWORK = _PyTorch()


def main(argv: list[str] | None = None) -> int:
    try:
        return loop.main(FRAMEWORK, argv)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
