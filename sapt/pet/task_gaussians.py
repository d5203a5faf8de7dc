"""EPI's task identification (Wang et al., ACL 2023): per-class means of each finished task's features and
one shared covariance, and the task whose nearest class mean is closest in Mahalanobis distance.

After task t:   mean_c     = mean of the features of task t's items of class c           (C_t, d)
                Sigma_t    = covariance of all of task t's features (class-agnostic, as the
                             official code computes it: its per-class covariances are all this)
                Sigma      = (Sigma_1 + ... + Sigma_t) / t, kept as its pseudo-inverse
At test:        task(x)    = argmin_t min_c (f(x) - mean_c)^T Sigma^+ (f(x) - mean_c)

Everything comes from additive sums (feature sums per class, the sum of outer products, counts), so
the workers compute them on their shards and all-reduce them. Buffers, not parameters: nothing here
trains, and ZeRO-3 leaves buffers whole. Shapes: B batch, K classes of all tasks, T tasks, d features.
"""

from __future__ import annotations

import torch
from torch import nn


class TaskGaussians(nn.Module):
    """The statistics of the tasks finished so far and the selection they give."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("class_means", torch.zeros(0, dim))  # (K, d), tasks in order
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))  # (K,) the task of each class
        self.register_buffer("covariance_sum", torch.zeros(dim, dim))  # sum of the tasks' covariances
        self.register_buffer("precision", torch.zeros(dim, dim))  # pinv(covariance_sum / tasks)

    @property
    def num_tasks(self) -> int:
        return int(self.class_task.max()) + 1 if self.class_task.numel() else 0

    @staticmethod
    def batch_sums(features_Bd: torch.Tensor, classes_B: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
        """The additive statistics of one batch: per-class feature sums and counts, the feature sum
        and the sum of outer products (float64: a task's sums must not lose the covariance)."""
        x = features_Bd.double()
        class_sums = x.new_zeros(num_classes, x.shape[1]).index_add_(0, classes_B, x)
        class_counts = x.new_zeros(num_classes).index_add_(0, classes_B, torch.ones_like(x[:, 0]))
        return {"class_sums": class_sums, "class_counts": class_counts, "feature_sum": x.sum(0), "outer_sum": x.T @ x}

    @torch.no_grad()
    def add_task(self, sums: dict[str, torch.Tensor], count: int) -> None:
        """Takes one finished task's summed statistics (over every item of its split) in."""
        if count < 2:
            raise ValueError(f"a task's covariance needs at least 2 items, got {count}")
        n = float(count)
        task_mean = sums["feature_sum"].double() / n
        covariance = (sums["outer_sum"].double() - n * torch.outer(task_mean, task_mean)) / (n - 1)
        counts = sums["class_counts"].double()
        means = sums["class_sums"].double() / counts.clamp(min=1).unsqueeze(1)
        means[counts == 0] = task_mean  # a class the split never shows: the task's mean (the official code)
        task = self.num_tasks
        self.class_means = torch.cat([self.class_means, means.to(self.class_means)])
        self.class_task = torch.cat([self.class_task, torch.full((len(means),), task, dtype=torch.long,
                                                                device=self.class_task.device)])
        self.covariance_sum = self.covariance_sum + covariance.to(self.covariance_sum)
        shared = self.covariance_sum.double() / (task + 1)
        self.precision = torch.linalg.pinv(shared, hermitian=True).to(self.precision)

    def task_distances(self, features_Bd: torch.Tensor) -> torch.Tensor:
        """(B, T): each task's smallest Mahalanobis distance (squared) from the input to a class mean."""
        diff_BKd = features_Bd.float().unsqueeze(1) - self.class_means.float().unsqueeze(0)
        distance_BK = torch.einsum("bkd,de,bke->bk", diff_BKd, self.precision.float(), diff_BKd)
        index = self.class_task.unsqueeze(0).expand_as(distance_BK)
        out = distance_BK.new_full((distance_BK.shape[0], self.num_tasks), float("inf"))
        return out.scatter_reduce(1, index, distance_BK, reduce="amin")

    def select(self, features_Bd: torch.Tensor) -> torch.Tensor:
        """(B,): the task each input is given."""
        return self.task_distances(features_Bd).argmin(dim=-1)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: buffer.detach().float().cpu().contiguous() if buffer.is_floating_point()
                else buffer.detach().cpu().contiguous() for name, buffer in self.named_buffers()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, _ in list(self.named_buffers()):
            setattr(self, name, state[name].to(getattr(self, name).device))
