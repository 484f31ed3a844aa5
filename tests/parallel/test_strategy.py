"""The parallel strategies' own step, checkpoint state and choice, on a model of two parameters.

The multi-process layouts are checked against one process under torchrun (test_distributed.py,
test_fsdp.py); here the single-process numbers are worked by hand.
"""

from __future__ import annotations

import pytest
import torch

from opd_sdk.parallel.distributed import Distributed
from opd_sdk.parallel.fsdp import FSDPStrategy
from opd_sdk.parallel.strategy import (
    OPTIMIZER_FILE,
    DataParallel,
    SingleProcess,
    make_strategy,
)
from opd_sdk.parallel.zero import ZeroStrategy


class Two(torch.nn.Module):
    """loss = 3 a + 4 b: the gradient is (3, 4), its L2 norm 5."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.0))
        self.b = torch.nn.Parameter(torch.tensor(2.0))

    def loss(self) -> torch.Tensor:
        return 3 * self.a + 4 * self.b


def one_step(strategy, lr: float = 0.1) -> tuple[Two, float | None]:
    model = strategy.prepare_model(Two())
    strategy.prepare_optimizer(model, torch.optim.SGD(model.parameters(), lr=lr))
    strategy.backward(model.loss(), True)
    return model, strategy.step()


def test_single_process_clips_to_max_grad_norm_then_steps():
    model, norm = one_step(SingleProcess(max_grad_norm=1.0))
    assert norm == pytest.approx(5.0)  # the norm before clipping
    # clipped gradient (3, 4) / 5 = (0.6, 0.8); SGD at lr 0.1: (1 - 0.06, 2 - 0.08)
    assert model.a.item() == pytest.approx(0.94, abs=1e-6)
    assert model.b.item() == pytest.approx(1.92, abs=1e-6)


def test_single_process_without_clipping_steps_the_whole_gradient():
    model, norm = one_step(SingleProcess(max_grad_norm=None))
    assert norm is None
    assert (model.a.item(), model.b.item()) == pytest.approx((0.7, 1.6))  # (1 - 0.3, 2 - 0.4)


def test_a_gradient_under_the_norm_is_not_scaled():
    model, norm = one_step(SingleProcess(max_grad_norm=10.0))
    assert norm == pytest.approx(5.0)
    assert (model.a.item(), model.b.item()) == pytest.approx((0.7, 1.6))


def test_data_parallel_of_one_process_takes_the_single_process_step():
    model, norm = one_step(DataParallel(Distributed(), max_grad_norm=1.0))
    assert norm == pytest.approx(5.0)
    assert (model.a.item(), model.b.item()) == pytest.approx((0.94, 1.92), abs=1e-6)


def test_the_optimizer_state_saves_to_optimizer_pt_and_loads_back(tmp_path):
    saved = SingleProcess(max_grad_norm=None)
    model = Two()
    saved.prepare_optimizer(model, torch.optim.Adam(model.parameters(), lr=0.1))
    saved.backward(model.loss(), True)
    saved.step()
    saved.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [OPTIMIZER_FILE]

    loaded = SingleProcess(max_grad_norm=None)
    fresh = Two()
    optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    loaded.prepare_optimizer(fresh, optimizer)
    loaded.load(tmp_path)
    moments = [optimizer.state[p]["exp_avg"].item() for p in fresh.parameters()]
    assert moments == pytest.approx([0.3, 0.4])  # (1 - beta1) * gradient, beta1 = 0.9
    assert optimizer.state[fresh.a]["step"].item() == 1


def test_the_launch_picks_its_strategy():
    assert type(make_strategy(Distributed(), max_grad_norm=1.0)) is SingleProcess
    assert type(make_strategy(Distributed(world_size=2), max_grad_norm=1.0)) is DataParallel
    assert type(make_strategy(Distributed(world_size=2, fsdp=True), max_grad_norm=1.0)) is FSDPStrategy
    assert type(make_strategy(Distributed(world_size=2, zero_stage=2), max_grad_norm=1.0)) is ZeroStrategy
    # lockstep: every backward a collective; FSDP only over several processes, ZeRO always
    assert make_strategy(Distributed(world_size=2, fsdp=True), max_grad_norm=None).lockstep
    assert not make_strategy(Distributed(fsdp=True), max_grad_norm=None).lockstep
    assert make_strategy(Distributed(zero_stage=1), max_grad_norm=None).lockstep
    assert not make_strategy(Distributed(world_size=2), max_grad_norm=None).lockstep


def test_one_process_samples_everything_and_asks_itself():
    one = Distributed()
    assert one.sample_share([1, 2, 3], lambda share: sum(share), join=lambda shares: -1) == 6
    assert one.main_first(lambda: "mine") == "mine"
    assert one.main_only(lambda x: x + 1)(1) == 2
    assert Distributed(rank=1, world_size=2).main_only(lambda x: x + 1)(1) is None
