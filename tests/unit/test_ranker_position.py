"""The ranker's wide path and position bias, trained on impressions whose clicks depend on the slot."""

from __future__ import annotations

import numpy as np
import torch

from training.config import RankerConfig
from training.ranker import DENSE_FEATURES, HEADS, MultiTaskRanker, MultiTaskTask, RankerSizes

N = 6000
DIM = 4


def _impressions(rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clicks driven by one dense column and, as strongly, by the slot the item was shown in."""
    dense = rng.standard_normal((N, len(DENSE_FEATURES))).astype(np.float32)
    position = rng.integers(0, 10, N)
    logit = -1.0 + 1.2 * dense[:, 0] - 1.0 * np.log1p(position)
    click = (rng.random(N) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    inputs = {
        "user_embedding": torch.zeros(N, DIM),
        "item_embedding": torch.zeros(N, DIM),
        "dense": torch.from_numpy(dense),
        "surface": torch.ones(N, dtype=torch.int64),
        "device": torch.zeros(N, dtype=torch.int64),
        "hour": torch.zeros(N, dtype=torch.int64),
        "position": torch.from_numpy(position),
    }
    labels = {"click": torch.from_numpy(click), "like": torch.zeros(N), "purchase": torch.zeros(N)}
    labels["watch_log1p"] = torch.zeros(N)
    return inputs, labels


def test_position_bias_absorbs_the_slot_and_serving_ranks_by_the_item() -> None:
    torch.manual_seed(0)
    inputs, labels = _impressions(np.random.default_rng(0))
    model = MultiTaskRanker(RankerConfig(hidden_dims=(8,), objective="pointwise"), RankerSizes(DIM, 3, 2))
    model.set_dense_statistics(inputs["dense"].numpy())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    task = MultiTaskTask()
    for _ in range(300):
        loss, _ = task(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    bias = model.position_bias.weight[:, HEADS.index("click")].detach().numpy()
    # The learned slot effect follows the true one, log1p(9) = 2.3 logits from top to tenth slot.
    assert bias[0] - bias[9] > 1.5
    assert np.all(np.diff(bias[:10]) < 0.3)

    # Scored at the top slot, as serving does, the order follows the item's own column only.
    model.eval()
    probe = {name: value[:200] for name, value in inputs.items()}
    probe["position"] = torch.zeros(200, dtype=torch.int64)
    with torch.no_grad():
        click = model(probe)["click"].numpy()
    column = probe["dense"][:, 0].numpy()
    assert np.corrcoef(click, column)[0, 1] > 0.95
    # Without a position input the model scores as at the top slot plus nothing: the same order.
    del probe["position"]
    with torch.no_grad():
        unplaced = model(probe)["click"].numpy()
    assert np.allclose(unplaced - click, unplaced[0] - click[0], atol=1e-5)


def test_an_untrained_model_ignores_position_and_the_wide_path() -> None:
    torch.manual_seed(0)
    inputs, _ = _impressions(np.random.default_rng(1))
    model = MultiTaskRanker(RankerConfig(hidden_dims=(8,), objective="pointwise"), RankerSizes(DIM, 3, 2))
    model.set_dense_statistics(inputs["dense"].numpy())
    model.eval()
    with torch.no_grad():
        placed = model(inputs)
        inputs["position"] = torch.zeros(N, dtype=torch.int64)
        top = model(inputs)
    for name in HEADS:
        assert torch.equal(placed[name], top[name])


def test_early_stopping_keeps_the_best_epoch_and_stops_after_the_patience() -> None:
    from training.train_ranker import _BestEpoch

    model = torch.nn.Linear(2, 1)
    best = _BestEpoch(patience=2)
    for epoch, auc in enumerate([0.60, 0.70, 0.65], start=1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        best.update(epoch, auc, model)
        assert not best.exhausted(epoch)
    best.update(4, float("nan"), model)
    assert best.exhausted(4) and best.epoch == 2
    assert best.state is not None and torch.all(best.state["weight"] == 2.0)

    unlimited = _BestEpoch(patience=None)
    unlimited.update(1, 0.9, model)
    assert unlimited.state is None and not unlimited.exhausted(100)
