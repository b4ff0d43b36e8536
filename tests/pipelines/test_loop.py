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


def seeded_batches(seed: int):
    """An endless stream whose batches depend on the loader's seed: a new segment, new batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield {"x": torch.randn(4, generator=generator), "meta": [{}]}


def _train(out, max_iters: int, checkpoint_every: int, data_segment: int) -> torch.Tensor:
    task = LinearTask()
    options = LoopOptions(out=out, max_iters=max_iters, checkpoint_every=checkpoint_every,
                          data_segment=data_segment, sample_every=0, progress=False)
    task.sample_columns = lambda batch: [torch.zeros(1, 3, 2, 2)]
    task.export = lambda path: None
    Trainer(task, options, seeded_batches, torch.device("cpu")).run()
    return task.model.w.detach().clone()


def test_the_data_order_does_not_depend_on_the_checkpoint_interval(tmp_path):
    """Segments of 3 micro-batches: saving every 2 or every 5 steps trains on the same batches,
    and a run resumed with another segment length keeps the one it recorded."""
    every_two = _train(tmp_path / "a", 7, 2, 3)
    every_five = _train(tmp_path / "b", 7, 5, 3)
    assert torch.equal(every_two, every_five)
    assert not torch.equal(every_two, _train(tmp_path / "c", 7, 2, 4))  # the segment length does matter
    _train(tmp_path / "d", 4, 4, 3)
    resumed = _train(tmp_path / "d", 7, 5, 5)  # extended, with other settings: the recorded segment wins
    assert torch.equal(resumed, every_two)
