"""The PyTorch backend of distillation (bit_common.distill): a frozen teacher, a trained
student, the KL loss of function matching, and torch.optim.AdamW on clipped gradients.

Each step mixes both images of the batch with its mixup pair, computes the teacher's logits on
the teacher's image in the same step (no gradient, inference mode: no cached outputs) and the
student's on the student's, and minimises `T² · KL(softmax(teacher / T) ‖ softmax(student / T))`
averaged over the batch. The gradient is clipped to a global norm, then AdamW steps at the
learning rate the shared loop passes, with weight decay `wd / base_lr` on the kernels only, so
that each step subtracts `lr / base_lr · wd · kernel` (big_vision's decoupled decay).

Several processes (torchrun) each take their contiguous slice of the global batch; only the
student is under DistributedDataParallel (the teacher has no gradient to all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bit_common import distill
from bit_common.distill import DistillSetup
from bit_pytorch import data, distill_data, models
from bit_pytorch.backend import ProcessBackend, _peer_losses


def kl_terms(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float
             ) -> torch.Tensor:
    """Per example `T² · KL(softmax(teacher / T) ‖ softmax(student / T))`, float32 [b]."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return temperature ** 2 * (t.exp() * (t - s)).sum(dim=1)


class Distiller(ProcessBackend):
    """Teacher, student, optimizer and input pipeline of one process."""

    def __init__(self, setup: DistillSetup):
        super().__init__(setup.config)
        self.setup = setup
        self.teacher = self._to_model(
            models.from_params(setup.teacher_arch, setup.teacher_params)).eval()
        self.teacher.requires_grad_(False)
        self.model = self._to_model(models.from_params(setup.arch, setup.params)).train()
        self.params = dict(self.model.named_parameters())
        self.net = self._ddp(self.model)
        names = {models.param_name(k): k for k in setup.params}
        decayed = [p for n, p in self.params.items() if distill.decayed(names[n])]
        others = [p for n, p in self.params.items() if not distill.decayed(names[n])]
        # fused=False keeps Adam's step count on the CPU, where set_state puts it.
        self.optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": setup.weight_decay / setup.base_lr},
             {"params": others, "weight_decay": 0.0}],
            lr=0.0, betas=(distill.ADAM_B1, distill.ADAM_B2), eps=distill.ADAM_EPS,
            fused=False)

    # ---- input ------------------------------------------------------------------------------
    def train_batches(self, start_step: int) -> Iterator[tuple[int, distill_data.DistillBatch]]:
        batches = distill_data.train_batches(self.setup, start_step, self.setup.end_step,
                                             self.rows, self.world, self.config.workers,
                                             self.pin)
        return ((b.step, b) for b in batches)

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.teacher(x).float()

    # ---- one optimizer step -------------------------------------------------------------------
    @_peer_losses
    def train_step(self, batch: distill_data.DistillBatch, lr: float) -> float:
        xs, xt = self._to_device(batch.student), self._to_device(batch.teacher)
        lam = float(batch.mixup_lambda)
        if lam != 1.0:  # the same pairs and ratio for both images
            perm = batch.mixup_perm.to(self.device)
            xs = lam * xs + (1.0 - lam) * xs[perm]
            xt = lam * xt + (1.0 - lam) * xt[perm]

        def micro_loss(rows: slice) -> torch.Tensor:
            teacher = self._teacher_logits(xt[rows])
            student = self.net(xs[rows]).float()
            return kl_terms(teacher, student, self.setup.temperature).mean()

        mean = self._accumulate(self.optimizer, lr, xs.shape[0], micro_loss)
        self._update(self.optimizer, self.setup.clip_norm)
        return self._mean_over_processes(mean)

    # ---- evaluation ---------------------------------------------------------------------------
    @_peer_losses
    def eval_sums(self) -> np.ndarray:
        rows = data.shard_rows(len(self.setup.eval), self.rank, self.world)
        k = min(5, self.setup.num_classes)
        sums = torch.zeros(len(distill.EVAL_SUMS), dtype=torch.float64, device=self.device)
        self.model.eval()
        try:
            with torch.inference_mode(), self._autocast():
                for xs, xt, labels in distill_data.eval_batches(
                        self.setup, self.config.batch_eval, rows, self.config.workers, self.pin):
                    student = self.model(self._to_device(xs)).float()
                    teacher = self.teacher(self._to_device(xt)).float()
                    labels = labels.to(self.device)
                    top = student.topk(k, dim=1).indices
                    hit = top == labels[:, None]
                    agree = top == teacher.argmax(dim=1)[:, None]
                    parts = (hit[:, 0].sum(), hit.any(dim=1).sum(),
                             F.cross_entropy(student, labels, reduction="sum"),
                             agree[:, 0].sum(), agree.any(dim=1).sum(),
                             kl_terms(teacher, student, self.setup.temperature).sum(),
                             (teacher.argmax(dim=1) == labels).sum(),
                             torch.tensor(labels.shape[0], device=self.device))
                    sums += torch.stack([v.double() for v in parts])  # EVAL_SUMS' order
        finally:
            self.model.train()
        if self.world > 1:
            dist.all_reduce(sums)
        return sums.cpu().numpy()

    # ---- state ----------------------------------------------------------------------------------
    def _moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        mu, nu, count = {}, {}, 0
        for name, p in self.params.items():
            st = self.optimizer.state.get(p, {})
            for out, key in ((mu, "exp_avg"), (nu, "exp_avg_sq")):
                v = st.get(key)
                out[name] = (np.zeros(tuple(p.shape), np.float32) if v is None
                             else v.detach().float().cpu().numpy().copy())  # not a view
            if "step" in st:
                count = int(st["step"])
        return mu, nu, count

    def get_state(self) -> dict[str, np.ndarray]:
        arch, c = self.setup.arch, self.setup.num_classes
        mu, nu, count = self._moments()
        state = distill.join_state(models.to_params(self.model),
                                   models.from_state_dict(mu, arch, c),
                                   models.from_state_dict(nu, arch, c), count)
        state.update(self._loss_scale_state())
        return state

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        params, mu, nu, count = distill.split_state(state, self.setup.arch,
                                                    self.setup.num_classes)
        fw = [models.to_state_dict(part) for part in (params, mu, nu)]

        def like(p: torch.Tensor, value: np.ndarray) -> torch.Tensor:
            return torch.empty_like(p).copy_(torch.from_numpy(np.asarray(value, np.float32)))

        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(fw[0][name], np.float32)))
                # AdamW's own state layout (fused=False: the step count is a CPU scalar).
                self.optimizer.state[p] = {"step": torch.tensor(float(count)),
                                           "exp_avg": like(p, fw[1][name]),
                                           "exp_avg_sq": like(p, fw[2][name])}
        self._set_loss_scale(state)
