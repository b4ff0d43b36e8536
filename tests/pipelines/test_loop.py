"""The shared training loop's optimizer step: gradient clipping, on a task small enough to solve by hand."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from midms_cli.pipelines.loop import LoopOptions, Trainer


class LinearObjective(nn.Module):
    """loss = w · x, so the gradient with respect to w is exactly the batch's x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))

    def forward(self, batch):
        return {"loss": (self.w * batch["x"]).sum()}


class LinearTask:
    """A TrainingTask around LinearObjective with plain SGD at lr 1: the update is minus the
    (clipped) gradient, so its length shows the clipping (Adam's update would hide the scale)."""

    kind = "test"
    config: dict = {}
    schedulers: dict = {}
    ema_module = None

    def __init__(self) -> None:
        self.model = LinearObjective()
        self.modules = {"model": self.model}
        self.optimizers = {"sgd": torch.optim.SGD(self.model.parameters(), lr=1.0)}


def constant_batches(x: torch.Tensor):
    def make(seed: int):
        return itertools.repeat({"x": x, "meta": [{}]})

    return make


GRADIENT = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5


@pytest.mark.parametrize(
    ("grad_clip", "accumulation", "expected_norm"),
    [
        (0.0, 1, 5.0),  # off: the update is the whole gradient
        (10.0, 1, 5.0),  # a bound above the norm changes nothing
        (1.0, 1, 1.0),  # clipped to the bound
        (2.5, 2, 2.5),  # clipping acts on the accumulated gradient (mean of 2 micro-batches, norm 5)
    ],
)
def test_gradient_clipping_bounds_the_update_and_keeps_its_direction(
    tmp_path, grad_clip, accumulation, expected_norm
):
    task = LinearTask()
    options = LoopOptions(
        out=tmp_path, max_iters=1, grad_clip=grad_clip, grad_accumulation=accumulation, progress=False
    )
    trainer = Trainer(task, options, constant_batches(GRADIENT), torch.device("cpu"))
    losses, _, stepped = trainer.train_step()
    assert stepped and losses["loss"] == 0.0
    update = -task.model.w.detach()
    assert float(update.norm()) == pytest.approx(expected_norm, rel=1e-6)
    assert torch.allclose(update / update.norm(), GRADIENT / GRADIENT.norm())
