"""The DARTS/PDE-Global CIFAR recipe: cutout, the drop path schedule, auxiliary towers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from autobuild.errors import AutobuildError
from autobuild.models.darts import DartsNetwork
from autobuild.train import TrainConfig, train
from autobuild.train.regularize import (
    auxiliary_heads,
    auxiliary_loss,
    cutout,
    drop_path_modules,
    set_drop_path,
)

SYNTH32 = "synthetic:size=3x32x32,classes=10,train=64,val=16"


def _reference_cutout(img: np.ndarray, y: int, x: int, length: int) -> np.ndarray:
    """PDE-Global's utils.Cutout (one hole) with its centre given."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return img * mask[None]


@pytest.mark.parametrize("length", [16, 7, 1, 40])
def test_cutout_is_the_reference_cutout(length: int) -> None:
    x = torch.randn(6, 3, 32, 32)
    ours = cutout(x.clone(), length, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same centres, drawn as cutout draws them
    ys, xs = torch.randint(32, (6, 1, 1), generator=g), torch.randint(32, (6, 1, 1), generator=g)
    for i in range(6):
        ref = _reference_cutout(x[i].numpy(), int(ys[i]), int(xs[i]), length)
        np.testing.assert_array_equal(ours[i].numpy(), ref)
    assert cutout(x, 0) is x
    nhwc = x.clone().contiguous(memory_format=torch.channels_last)
    assert cutout(nhwc, length).is_contiguous(memory_format=torch.channels_last)


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean() -> None:
    net = DartsNetwork(4, layers=5)
    drop = drop_path_modules(net)
    assert len(drop) == 5  # one per cell
    set_drop_path(drop, 0.2, epoch=1, epochs=10)
    assert drop[0].drop_prob == 0.0  # DARTS starts at 0...
    set_drop_path(drop, 0.2, epoch=10, epochs=10)
    assert drop[0].drop_prob == pytest.approx(0.18)  # ...and ends just under the rate
    m = drop[0]
    m.drop_prob = 0.5
    x = torch.ones(4000, 2, 3, 3)
    m.train()
    y = m(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()  # whole samples
    assert y.mean().item() == pytest.approx(1.0, abs=0.1)
    m.eval()
    assert m(x) is x


def test_an_identity_op_is_never_dropped() -> None:
    net = DartsNetwork(4, layers=5)
    cell = net.cells[0]  # normal cell: two skip_connect ops are identities
    skips = [k for k, op in enumerate(cell._ops) if isinstance(op, torch.nn.Identity)]
    assert skips
    cell.train()
    cell.drop_path.drop_prob = 0.999
    states = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)]
    torch.manual_seed(0)
    assert torch.equal(cell._op(skips[0], states), states[cell._indices[skips[0]]])


def test_the_auxiliary_loss_is_weighted_and_let_go() -> None:
    net = DartsNetwork(4, layers=5, auxiliary=True).train()
    heads = auxiliary_heads(net)
    net(torch.randn(2, 3, 32, 32))
    assert heads[0].auxiliary_logits is None  # outside a training run nothing is kept
    heads[0].collect = True
    y = torch.tensor([1, 2])
    out = net(torch.randn(2, 3, 32, 32))
    logits = heads[0].auxiliary_logits
    ce = torch.nn.CrossEntropyLoss()
    assert auxiliary_loss(heads, ce, y, 0.4).item() == pytest.approx(0.4 * ce(logits, y).item())
    assert heads[0].auxiliary_logits is None and out.shape == (2, 10)
    net.eval()
    net(torch.randn(2, 3, 32, 32))
    assert heads[0].auxiliary_logits is None  # the tower does not run at evaluation


def test_training_trains_the_tower_and_adds_its_weighted_loss() -> None:
    torch.manual_seed(0)
    net = DartsNetwork(4, layers=5, auxiliary=True)
    before = net.auxiliary_head.classifier.weight.detach().clone()
    rates: list[float] = []

    def on_epoch(metrics) -> bool:
        rates.append(drop_path_modules(net)[0].drop_prob)
        return True

    cfg = TrainConfig(epochs=2, batch_size=16, drop_path=0.2, cutout=8, device="cpu",
                      warmup_epochs=0, ema=0.9)
    result = train(net, SYNTH32, cfg, callback=on_epoch)
    assert not torch.equal(before, net.auxiliary_head.classifier.weight)
    assert rates == [0.0, pytest.approx(0.1)]  # 0.2 x (epoch - 1) / 2
    # After the run, the model and its EMA copy: rates back to 0, the towers idle, so a
    # training-mode forward keeps nothing and the model can be copied.
    for model in (net, result.model):
        assert drop_path_modules(model)[0].drop_prob == 0.0
        assert all(not h.collect and h.auxiliary_logits is None
                   for h in auxiliary_heads(model))
        model.train()(torch.randn(2, 3, 32, 32))
        copy.deepcopy(model)


def test_a_zero_weight_tower_changes_nothing_else() -> None:
    """With weight 0 the tower runs for nothing (DDP then gets the zero gradients it waits
    for): the rest of the network trains as the same network without a tower."""
    torch.manual_seed(0)
    with_tower = DartsNetwork(4, layers=5, auxiliary=True)
    without = DartsNetwork(4, layers=5)
    without.load_state_dict({k: v for k, v in with_tower.state_dict().items()
                             if not k.startswith("auxiliary_head.")})
    cfg = TrainConfig(epochs=1, batch_size=16, drop_path=0.2, cutout=8, device="cpu",
                      warmup_epochs=0)
    train(with_tower, SYNTH32, cfg.replace(aux_weight=0.0))
    train(without, SYNTH32, cfg)
    trained = without.state_dict()
    for name, value in with_tower.state_dict().items():
        if not name.startswith("auxiliary_head."):
            torch.testing.assert_close(value, trained[name], rtol=0, atol=1e-6)


def test_a_tower_on_other_than_8x8_features_is_refused_before_training() -> None:
    net = DartsNetwork(4, layers=5, auxiliary=True)
    with pytest.raises(AutobuildError, match="8x8 features"):
        train(net, "synthetic:size=3x64x64,classes=10,train=16,val=4",
              TrainConfig(epochs=1, batch_size=8, device="cpu"))


def test_drop_path_compiles_once_for_every_rate() -> None:
    """The rate is data in compiled code: a new rate each epoch recompiles nothing (a float
    attribute did, until dynamo gave up after 8 and ran the network eagerly)."""
    import torch._dynamo

    torch._dynamo.reset()
    m = drop_path_modules(DartsNetwork(4, layers=5))[0].train()
    compiled = torch.compile(m, backend="eager")
    x = torch.ones(64, 2, 3, 3)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for rate in (0.0, 0.1, 0.2, 0.3, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9):
        m.drop_prob = rate
        y = compiled(x)
        kept = y[y != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - rate)))
    assert counters["stats"]["unique_graphs"] == 1


def test_a_zero_tower_weight_is_accepted_without_a_tower() -> None:
    from autobuild.train.regularize import check_regularizers

    net = DartsNetwork(4, layers=5)  # no tower
    check_regularizers(net, TrainConfig(aux_weight=0.0))  # asks for nothing: accepted
    with pytest.raises(AutobuildError, match="no auxiliary tower"):
        check_regularizers(net, TrainConfig(aux_weight=0.4))
