"""Step losses: checked and summed per step on CPU, once per epoch when deferred (CUDA: no host sync per batch),
with the same totals and the same error naming the first bad step."""

from __future__ import annotations

import pytest
import torch

from chiptag.features.views import TensorBatches
from chiptag.training.epoch import NonFiniteLoss, StepLosses


@pytest.mark.parametrize("deferred", [False, True])
def test_totals_are_the_same_deferred_or_not(deferred):
    losses = StepLosses(epoch=3, first_step=0, totals=(1.0, 2), deferred=deferred)
    for v, n in [(0.5, 4), (0.25, 4), (1.0, 2)]:
        losses.add(torch.tensor(v), n)
    r = losses.result()
    assert r.totals == (1.0 + 2.0 + 1.0 + 2.0, 12) and r.loss == pytest.approx(6.0 / 12)


@pytest.mark.parametrize("deferred", [False, True])
def test_first_non_finite_step_is_named(deferred):
    losses = StepLosses(epoch=2, first_step=5, totals=(0.0, 0), deferred=deferred)
    losses.add(torch.tensor(0.5), 4)
    with pytest.raises(NonFiniteLoss, match="loss is nan at epoch 2, step 6"):
        losses.add(torch.tensor(float("nan")), 4)
        losses.add(torch.tensor(float("inf")), 4)
        losses.result()


def test_tensor_batches_move_the_epoch_order_to_the_features_device():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10.0).view(10, 1)
    batches = TensorBatches(x, y, 4, order=lambda: torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]))
    got = torch.cat([b for b, _ in batches]).view(-1).tolist()
    assert got == list(range(9, -1, -1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (features kept on the device)")
def test_head_epoch_on_cuda_keeps_features_on_the_device(tiny_config):
    import numpy as np
    from torch import nn

    from chiptag.training.epoch import Step, train_one_epoch
    from chiptag.training.phases import feature_inputs

    cfg = tiny_config()
    feats, y = torch.randn(1, 40, 8).half(), np.random.default_rng(0).integers(0, 2, (40, 3)).astype(np.float32)
    inputs = feature_inputs(feats, y, {"train": np.arange(30), "val": np.arange(30, 35), "test": np.arange(35, 40)},
                            cfg.batch_size(), cfg.training.seed, cfg.features.tta, "cuda")
    x, t = next(iter(inputs.train))
    assert x.is_cuda and t.is_cuda
    head = nn.Linear(8, 3).cuda()
    r = train_one_epoch(head, inputs.train, torch.optim.SGD(head.parameters(), lr=0.1),
                        Step(nn.BCEWithLogitsLoss(), torch.device("cuda")))
    assert r.totals[1] == 30 and np.isfinite(r.loss)
