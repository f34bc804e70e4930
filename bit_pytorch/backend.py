"""The PyTorch backend the shared loop drives: the model, SGD with momentum (no weight decay),
mixup, `--batch_split` gradient accumulation, evaluation sums, and the canonical state for
checkpoints.

`--train` freezes parameters by `requires_grad=False` and leaves them out of the optimizer, so
they get no gradient (autograd then stops the backward pass at the first trained layer) and
never move.

Several processes (torchrun) train under DistributedDataParallel, each on its contiguous slice
of the global `--batch`; rank 0 writes the logs and checkpoints (`bit_pytorch.train`).
`ProcessBackend` holds what this and distillation's backend (`bit_pytorch.distiller`) share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bit_common import hyperrule, loop, precision, trainable
from bit_common.errors import BiTError, collective_peer_failure, peer_losses
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


def local_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def init_distributed() -> int:
    """Join the process group when launched by torchrun with more than one process (the GPU is
    bound first, as NCCL needs); the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return world
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world


def _lost_peer(backend: PyTorchBackend, e: Exception) -> str | None:
    """Gloo and NCCL raise RuntimeError when a peer of a collective is gone."""
    if backend.world > 1 and isinstance(e, RuntimeError):
        return collective_peer_failure(e)
    return None


_peer_losses = peer_losses(_lost_peer)


def finish_distributed() -> None:
    """Leave the process group `init_distributed` joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ProcessBackend(loop.Backend):
    """What every PyTorch backend of one process shares (fine-tuning's and distillation's): its
    device and precision, its place in a multi-process run and its contiguous slice of the
    global batch, the fp16 loss scale, and agreeing with the other processes."""

    def __init__(self, config: loop.RunConfig):
        self.config = config
        self.device = local_device()
        precision.require_accelerator(config.precision, "PyTorch",
                                      mixed_precision_available(self.device))
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = ((dist.get_rank(), dist.get_world_size()) if distributed
                                 else (0, 1))
        self.is_chief = self.rank == 0
        if config.batch % self.world:
            raise BiTError(f"--batch {config.batch} is not divisible by the {self.world} "
                           f"processes; every process needs the same share of the batch.")
        local = config.batch // self.world
        if local % config.batch_split:
            raise BiTError(f"Each of the {self.world} processes gets {local} examples of the "
                           f"batch, which --batch_split {config.batch_split} does not divide.")
        self.rows = range(self.rank * local, (self.rank + 1) * local)
        # channels_last: tensor cores on GPUs; on CPU oneDNN's NHWC kernels are 2-4% faster and,
        # against a float64 run, exactly as accurate as NCHW.
        self.memory_format = torch.channels_last
        self.amp_dtype = AMP_DTYPES.get(config.precision)
        self.scaler = (make_grad_scaler(self.device.type)
                       if precision.needs_loss_scaling(config.precision) else None)
        self.pin = self.device.type == "cuda"

    def _to_model(self, model: nn.Module) -> nn.Module:
        """`model` on this process's device, in its memory format."""
        return model.to(self.device, memory_format=self.memory_format)

    def _ddp(self, model: nn.Module) -> nn.Module:
        """`model` under DistributedDataParallel in a multi-process run (it all-reduces the
        gradients of the parameters that need one), else `model` itself."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _accumulate(self, optimizer: torch.optim.Optimizer, lr: float, n: int,
                    micro_loss: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """Gradients of the mean of micro_loss(rows) over --batch_split micro-batches of this
        process's n rows, accumulated into `optimizer`'s parameters (set to learning rate
        `lr`); returns that mean loss. DDP all-reduces on the last micro-batch only."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        split = self.config.batch_split
        micro = n // split
        total = torch.zeros((), device=self.device)
        for i in range(split):
            rows = slice(i * micro, (i + 1) * micro)
            sync = i == split - 1 or self.net is self.model
            with (contextlib.nullcontext() if sync else self.net.no_sync()), self._autocast():
                loss = micro_loss(rows)
            self._backward(loss / split)
            total += loss.detach()
        return total / split

    def _update(self, optimizer: torch.optim.Optimizer, clip_norm: float = 0.0) -> None:
        """The optimizer's step on the accumulated gradients, unscaled first under fp16 (a
        step whose gradients are not finite is skipped) and clipped to global norm `clip_norm`
        (0: not clipped)."""
        if clip_norm > 0:
            if self.scaler:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], clip_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def _mean_over_processes(self, total: torch.Tensor) -> float:
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return float(total)

    def _loss_scale_state(self) -> dict[str, np.ndarray]:
        """The fp16 loss scale's checkpoint entries (none in fp32 and bf16)."""
        if not self.scaler:
            return {}
        scaler = self.scaler.state_dict()
        return precision.loss_scale_state(scaler["scale"], scaler["_growth_tracker"])

    def _set_loss_scale(self, state: Mapping[str, np.ndarray]) -> None:
        if self.scaler:
            scale, good_steps = precision.read_loss_scale(state)
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": scale,
                                         "_growth_tracker": good_steps})

    @_peer_losses
    def agree(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


class PyTorchBackend(ProcessBackend):
    """Model, optimizer and input pipeline of one process."""

    def __init__(self, setup: RunSetup):
        super().__init__(setup.config)
        self.setup = setup
        self.model = self._to_model(models.from_params(setup.arch, setup.params)).train()
        self.params = dict(self.model.named_parameters())
        # Frozen before DDP wraps the model: it all-reduces the parameters that need a gradient.
        trained = {models.param_name(k) for k in trainable.trained_keys(setup.params,
                                                                        self.config.train)}
        for name, p in self.params.items():
            p.requires_grad_(name in trained)
        self.net: nn.Module = self._ddp(self.model)
        self.optimizer = torch.optim.SGD([p for p in self.params.values() if p.requires_grad],
                                         lr=0.0, momentum=hyperrule.MOMENTUM, dampening=0.0,
                                         weight_decay=0.0, nesterov=False)
        # One mixup shard per process keeps every partner inside this process's rows.
        self.plan = dataclasses.replace(setup.plan, shards=self.world)

    # ---- input ------------------------------------------------------------------------------
    def train_batches(self, start_step: int) -> Iterator[tuple[int, data.TrainBatch]]:
        batches = data.train_batches(self.setup.train, self.setup.train_indices, self.plan,
                                     start_step, self.setup.end_step, self.rows,
                                     self.config.workers, self.pin)
        return ((b.step, b) for b in batches)

    # ---- one optimizer step -------------------------------------------------------------------
    @_peer_losses
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

        def micro_loss(rows: slice) -> torch.Tensor:
            logits = self.net(x[rows]).float()
            loss = F.cross_entropy(logits, y[rows])
            if lam != 1.0:
                loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, y2[rows])
            return loss

        mean = self._accumulate(self.optimizer, lr, x.shape[0], micro_loss)
        self._update(self.optimizer)
        return self._mean_over_processes(mean)

    # ---- evaluation ---------------------------------------------------------------------------
    @_peer_losses
    def eval_sums(self) -> np.ndarray:
        split = self.setup.eval
        rows = data.shard_rows(len(split), self.rank, self.world)
        k = min(5, self.setup.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # top1, top5, loss, n
        self.model.eval()
        try:
            with torch.inference_mode(), self._autocast():
                for images, labels in data.eval_batches(split, self.setup.crop,
                                                        self.config.batch_eval, rows,
                                                        self.config.workers, self.pin):
                    logits = self.model(self._to_device(images)).float()
                    labels = labels.to(self.device)
                    hit = logits.topk(k, dim=1).indices == labels[:, None]
                    sums[0] += hit[:, 0].sum()
                    sums[1] += hit.any(dim=1).sum()
                    sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
                    sums[3] += labels.shape[0]
        finally:
            self.model.train()
        if self.world > 1:
            dist.all_reduce(sums)
        return sums.cpu().numpy()

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
        state = loop.join_state(models.to_params(self.model),
                                models.from_state_dict(self._momentum(), arch, c))
        state.update(self._loss_scale_state())
        return state

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        params, momentum = loop.split_state(state, self.setup.arch, self.setup.num_classes)
        fw_params, fw_momentum = models.to_state_dict(params), models.to_state_dict(momentum)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(fw_params[name], np.float32)))
                buf = torch.empty_like(p).copy_(
                    torch.from_numpy(np.asarray(fw_momentum[name], np.float32)))
                self.optimizer.state[p]["momentum_buffer"] = buf
        self._set_loss_scale(state)
