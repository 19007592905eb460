from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from training import two_tower
from training.config import TwoTowerConfig
from training.encoding import ItemFeatures, Vocabularies, Vocabulary
from training.two_tower import (
    SampledSoftmaxTask,
    TwoTowerModel,
    TwoTowerServing,
    TwoTowerSizes,
)

N_CATEGORIES = 6
ITEMS_PER_CATEGORY = 8
N_ITEMS = N_CATEGORIES * ITEMS_PER_CATEGORY
HISTORY = 5
MAX_TAGS = 3


def vocabularies() -> Vocabularies:
    def vocab(name: str, n: int) -> Vocabulary:
        return Vocabulary(name, tuple(f"{name}{i}" for i in range(n)))

    return Vocabularies(
        item=vocab("i", N_ITEMS),
        user=vocab("u", 4),
        item_type=vocab("type", 2),
        category=vocab("cat", N_CATEGORIES),
        tag=vocab("tag", N_CATEGORIES * 2),
        creator=vocab("creator", N_CATEGORIES),
        age_group=vocab("age", 3),
        region=vocab("region", 3),
        language=vocab("lang", 2),
        surface=vocab("surface", 2),
        device=vocab("device", 2),
        user_buckets=64,
        max_tags=MAX_TAGS,
        history_length=HISTORY,
    )


def catalog() -> ItemFeatures:
    """Items 1..N_ITEMS; item i belongs to category (i-1) // ITEMS_PER_CATEGORY, with its two tags."""
    item_index = np.arange(1, N_ITEMS + 1, dtype=np.int64)
    category = (item_index - 1) // ITEMS_PER_CATEGORY
    tags = np.zeros((N_ITEMS, MAX_TAGS), dtype=np.int64)
    tags[:, 0] = 2 * category + 1
    tags[:, 1] = 2 * category + 2
    return ItemFeatures(
        item_ids=np.asarray([f"i{i - 1}" for i in item_index], dtype=np.str_),
        id_index=item_index,
        item_type=np.ones(N_ITEMS, dtype=np.int64),
        category=category + 1,
        tags=tags,
        creator=category + 1,
        region=np.zeros(N_ITEMS, dtype=np.int64),
        language=np.zeros(N_ITEMS, dtype=np.int64),
    )


def toy_batch(rng: np.random.Generator, items: ItemFeatures, size: int) -> dict[str, torch.Tensor]:
    """Users who like one category: their history and their positive come from it."""
    category = rng.integers(0, N_CATEGORIES, size)
    pick = category[:, None] * ITEMS_PER_CATEGORY + rng.integers(0, ITEMS_PER_CATEGORY, (size, HISTORY + 1))
    positive = pick[:, 0]
    return {
        "user_bucket": torch.as_tensor(rng.integers(0, 64, size)),
        "history": torch.as_tensor(items.id_index[pick[:, 1:]]),
        "age_group": torch.zeros(size, dtype=torch.int64),
        "region": torch.zeros(size, dtype=torch.int64),
        "language": torch.zeros(size, dtype=torch.int64),
        "item_index": torch.as_tensor(items.id_index[positive]),
        "item_type": torch.as_tensor(items.item_type[positive]),
        "category": torch.as_tensor(items.category[positive]),
        "tags": torch.as_tensor(items.tags[positive]),
        "creator": torch.as_tensor(items.creator[positive]),
        "log_q": torch.full((size,), math.log(1 / N_ITEMS)),
    }


def config() -> TwoTowerConfig:
    return TwoTowerConfig(embedding_dim=16, id_dim=8, content_dim=8, hidden_dims=(32,), item_id_dropout=0.5)


def train(model: TwoTowerModel, steps: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    items = catalog()
    task = SampledSoftmaxTask(temperature=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    model.train()
    for _ in range(steps):
        batch = toy_batch(rng, items, 64)
        users, positives = model(batch)
        loss = task(users, positives, batch["log_q"], batch["item_index"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_shapes_and_normalisation() -> None:
    sizes = TwoTowerSizes.from_vocabularies(vocabularies())
    model = TwoTowerModel(config(), sizes).eval()
    batch = toy_batch(np.random.default_rng(0), catalog(), 7)
    users, items = model(batch)
    assert users.shape == (7, 16) and items.shape == (7, 16)
    torch.testing.assert_close(users.norm(dim=-1), torch.ones(7))
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(7))
    assert sizes.item == N_ITEMS + 1 and sizes.user_buckets == 64


def test_sizes_must_be_positive() -> None:
    with pytest.raises(AssertionError, match="at least one row"):
        TwoTowerSizes(0, 1, 1, 1, 1, 1, 1, 1, 1)


def test_loss_decreases_on_a_toy_problem() -> None:
    model = TwoTowerModel(config(), TwoTowerSizes.from_vocabularies(vocabularies()))
    losses = train(model, steps=150)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.75 * first, f"loss went from {first:.3f} to {last:.3f}"


def test_unseen_item_embeds_near_its_category_from_content() -> None:
    vocabs = vocabularies()
    model = TwoTowerModel(config(), TwoTowerSizes.from_vocabularies(vocabs))
    train(model, steps=250)
    serving = TwoTowerServing(model, vocabs)
    items = catalog()
    seen = serving.item_embeddings(items)
    centroids = np.stack([seen[items.category == c + 1].mean(axis=0) for c in range(N_CATEGORIES)])
    # A brand-new item: unknown id (0), only its content says which category it is in.
    new_items = ItemFeatures(
        item_ids=np.asarray([f"new{c}" for c in range(N_CATEGORIES)], dtype=np.str_),
        id_index=np.zeros(N_CATEGORIES, dtype=np.int64),
        item_type=np.ones(N_CATEGORIES, dtype=np.int64),
        category=np.arange(1, N_CATEGORIES + 1, dtype=np.int64),
        tags=np.stack([[2 * c + 1, 2 * c + 2, 0] for c in range(N_CATEGORIES)]).astype(np.int64),
        creator=np.arange(1, N_CATEGORIES + 1, dtype=np.int64),
        region=np.zeros(N_CATEGORIES, dtype=np.int64),
        language=np.zeros(N_CATEGORIES, dtype=np.int64),
    )
    fresh = serving.item_embeddings(new_items)
    nearest = np.argmax(fresh @ centroids.T, axis=1)
    assert (nearest == np.arange(N_CATEGORIES)).all(), f"nearest category centroids: {nearest.tolist()}"
    own = (fresh * centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).sum(axis=1)
    assert own.min() > 0.8, f"cosine to own category centroid: {own.round(2).tolist()}"


def test_logq_correction_shifts_each_column_by_its_log_probability() -> None:
    torch.manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    plain = SampledSoftmaxTask(0.1, logq_correction=False).logits(users, items, log_q)
    corrected = SampledSoftmaxTask(0.1).logits(users, items, log_q)
    torch.testing.assert_close(plain, users @ items.T / 0.1)
    torch.testing.assert_close(corrected - plain, -log_q.expand(4, 4))
    # The popular item (column 0) gains least: it is the most likely negative, so its logit is
    # lowered the most relative to rarer items.
    assert (corrected - plain)[:, 0].max() < (corrected - plain)[:, 2].min()


def test_accidental_hits_are_masked_but_not_the_diagonal() -> None:
    users = torch.eye(3)
    items = torch.eye(3)
    log_q = torch.zeros(3)
    logits = SampledSoftmaxTask(1.0).logits(users, items, log_q, item_ids=torch.tensor([5, 5, 0]))
    very_low = torch.finfo(logits.dtype).min
    assert logits[0, 1] == very_low and logits[1, 0] == very_low
    assert logits[0, 0] == 1.0 and logits[1, 1] == 1.0
    # Unknown ids (0) are never the same item.
    assert logits[2, 2] == 1.0 and logits[2, 0] > very_low


def test_serving_user_embedding_and_round_trip(tmp_path) -> None:
    vocabs = vocabularies()
    model = TwoTowerModel(config(), TwoTowerSizes.from_vocabularies(vocabs))
    serving = TwoTowerServing(model, vocabs)
    one = serving.user_embedding(["i3", "unknown-item", "i4"], {"age_group": "age1"}, user_id="u-new")
    assert one.shape == (16,) and math.isclose(float(np.linalg.norm(one)), 1.0, rel_tol=1e-5)
    encoded = serving.encode_history([["i3", "unknown-item", "i4"]])
    assert encoded.tolist() == [[4, 5, 0, 0, 0]]
    anonymous = serving.user_embeddings([None, "u1"], [[], []])
    assert anonymous.shape == (2, 16)

    serving.save(tmp_path)
    loaded = TwoTowerServing.load(tmp_path, vocabs)
    np.testing.assert_allclose(loaded.item_embeddings(catalog()), serving.item_embeddings(catalog()))
    np.testing.assert_allclose(
        loaded.user_embedding(["i3"], user_id="u1"), serving.user_embedding(["i3"], user_id="u1")
    )


def test_single_user_embeddings_are_remembered_and_equal_a_fresh_computation(monkeypatch) -> None:
    vocabs = vocabularies()
    serving = TwoTowerServing(TwoTowerModel(config(), TwoTowerSizes.from_vocabularies(vocabs)), vocabs)
    fresh = TwoTowerServing(serving.model, vocabs)
    profile = {"age_group": "age1", "region": None, "language": None}
    first = serving.user_embeddings(["u1"], [["i3", "i4"]], [profile])
    again = serving.user_embeddings(["u1"], [("i3", "i4")], [dict(profile)])
    assert again is first and not first.flags.writeable
    np.testing.assert_array_equal(first, fresh.user_embeddings(["u1"], [["i3", "i4"]], [profile]))
    # Any input that differs is embedded anew.
    assert serving.user_embeddings(["u1"], [["i4", "i3"]], [profile]) is not first
    assert serving.user_embeddings([None], [["i3", "i4"]], [profile]) is not first
    assert serving.user_embeddings(["u1"], [["i3", "i4"]], [{"age_group": "age2"}]) is not first
    # Batches are neither remembered nor answered from memory.
    batch = serving.user_embeddings(["u1", "u2"], [["i3", "i4"], []], [profile, {}])
    assert batch.flags.writeable
    np.testing.assert_allclose(batch[0], first[0], atol=1e-6)
    # The memory is bounded.
    monkeypatch.setattr(two_tower, "RECENT_USERS", 3)
    for n in range(5):
        serving.user_embeddings([f"v{n}"], [[]], [{}])
    assert len(serving._recent_users) == 3


# -- data helpers (pure functions of training.datasets and training.train_ranker) ---------------


def test_first_per_event_keeps_one_row_per_event_in_order() -> None:
    import pyarrow as pa

    from training.datasets import _first_per_event

    batch = pa.table({"event_id": ["b", "a", "b", "c", "a"], "value": [1, 2, 3, 4, 5]})
    kept = _first_per_event(batch)
    assert kept.column("event_id").to_pylist() == ["b", "a", "c"]
    assert kept.column("value").to_pylist() == [1, 2, 4]


def test_training_positive_rule_honours_types_and_watch_time() -> None:
    import pyarrow as pa

    from training.config import DatasetConfig
    from training.datasets import TrainingPositiveRule

    events = pa.table(
        {
            "event_type": ["click", "view", "watch", "watch", "like", "skip"],
            "watch_time_s": pa.array([None, None, 10.0, 45.0, None, None], pa.float32()),
        }
    )
    rule = TrainingPositiveRule.from_config(DatasetConfig())
    assert rule.mask(events).tolist() == [True, False, False, True, True, False]
    likes_only = TrainingPositiveRule.from_config(DatasetConfig(positive_event_types=("like",)))
    assert likes_only.mask(events).tolist() == [False, False, False, False, True, False]
    rated = events.append_column("rating", pa.array([None, 3.0, None, None, None, 2.0], pa.float32()))
    by_rating = TrainingPositiveRule.from_config(
        DatasetConfig(positive_event_types=("like",), train_min_rating=3.0)
    )
    assert by_rating.mask(rated).tolist() == [False, True, False, False, True, False]


def test_history_encoder_builds_time_ordered_histories() -> None:
    import pyarrow as pa

    from training.datasets import HistoryEncoder, item_log_q
    from training.encoding import UserFeatures

    vocabs = vocabularies()
    items = catalog()
    counts = np.zeros(len(vocabs.item), dtype=np.int64)
    counts[1:] = 1
    encoder = HistoryEncoder(
        vocabularies=vocabs,
        items=items,
        users=UserFeatures.from_table(pa.table({"user_id": ["u1"], "age_group": ["age2"]}), vocabs),
        log_q=item_log_q(counts),
    )
    ts = pa.array([3, 1, 2, 4], pa.timestamp("us", tz="UTC"))
    group = pa.table(
        {
            "event_id": ["e3", "e1", "e2", "e4"],
            "user_id": ["u1"] * 4,
            "item_id": ["i2", "i0", "i1", "i0"],
            "ts": ts,
            "surface": ["home"] * 4,
            "device": [None] * 4,
        }
    )
    rows = encoder(group)
    # i0 at t=1, i1 at t=2, i2 at t=3; the repeat of i0 at t=4 is dropped.
    assert rows["item_index"].tolist() == [1, 2, 3]
    assert rows["history"][:, :3].tolist() == [[0, 0, 0], [1, 0, 0], [2, 1, 0]]
    assert rows["history"].shape == (3, HISTORY)
    assert rows["age_group"].tolist() == [3, 3, 3]
    assert rows["category"].tolist() == items.category[:3].tolist()
    np.testing.assert_allclose(rows["log_q"], np.log(1 / N_ITEMS), rtol=1e-5)


def test_final_histories_and_histories_at_agree() -> None:
    import pyarrow as pa

    from training.datasets import final_histories
    from training.train_ranker import histories_at

    positives = {
        "user_index": np.array([1, 1, 1, 2], dtype=np.int64),
        "item_index": np.array([5, 6, 7, 8], dtype=np.int64),
        "ts_us": np.array([10, 30, 20, 5], dtype=np.int64),
    }
    final = final_histories(pa.table(positives), n_users=3, width=2)
    assert final.tolist() == [[0, 0], [6, 7], [8, 0]]
    at = histories_at(positives, np.array([1, 1, 2, 0]), np.array([25, 10, 100, 50]), width=2)
    assert at.tolist() == [[7, 5], [0, 0], [8, 0], [0, 0]]


# -- configuration and the `rayrec train` options ----------------------------------------------


def test_train_config_from_yaml_merges_sections_and_refuses_unknown_keys(tmp_path) -> None:
    import pydantic

    from training.config import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("two_tower_train:\n  lr: 0.01\ndata:\n  protocol: temporal\n")
    config = TrainConfig.from_yaml(path, smoke_test=True)
    assert config.two_tower_train.lr == 0.01
    assert config.two_tower_train.epochs == TrainConfig.smoke_test().two_tower_train.epochs
    assert config.data.protocol == "temporal"
    path.write_text("two_tower_train:\n  learning_rate: 0.01\n")
    with pytest.raises(pydantic.ValidationError, match="learning_rate"):
        TrainConfig.from_yaml(path)


def test_train_command_options_override_the_config() -> None:
    from cluster.cli import build_parser
    from training.commands import _train_config

    args = build_parser().parse_args(["train", "--smoke-test", "--protocol", "temporal", "--no-register"])
    config = _train_config(args)
    assert config.data.protocol == "temporal"
    assert config.register_bundle is False
    assert config.two_tower.embedding_dim == 16
    default = _train_config(build_parser().parse_args(["train"]))
    assert default.register_bundle is True and default.data.protocol == "published"


# -- the ranker built on the two-tower embeddings --------------------------------------------


def test_ranker_features_model_and_round_trip(tmp_path) -> None:
    from training.config import RankerConfig
    from training.ranker import (
        DENSE_FEATURES,
        HEADS,
        ItemStats,
        MultiTaskRanker,
        MultiTaskTask,
        RankerFeatureBuilder,
        RankerServing,
        RankerSizes,
        SimilarityLookup,
    )

    vocabs = vocabularies()
    items = catalog()
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((N_ITEMS, 16)).astype(np.float32)
    ids = items.item_ids
    similarity = SimilarityLookup.from_neighbours(
        ids, {"i0": [("i1", 0.9), ("i2", 0.5)], "i3": [("i1", 0.4)]}
    )
    assert similarity.pair_scores(np.array([0, 3, 0, -1]), np.array([1, 1, 5, 1])).tolist() == pytest.approx(
        [0.9, 0.4, 0.0, 0.0]
    )
    counts = np.arange(N_ITEMS)
    stats = ItemStats.from_counts(ids, counts, counts * 10, counts, counts // 2, counts * 40, counts * 2)
    builder = RankerFeatureBuilder(items, embeddings, stats, similarity, vocabs)
    users = rng.standard_normal((3, 16)).astype(np.float32)
    # History i0 and i3 (vocabulary indices 1 and 4); candidate i1 (row 1) is their neighbour.
    history = np.tile(np.array([[1, 4, 0, 0, 0]]), (3, 1))
    inputs = builder.build(
        users, history, np.array([1, 2, 40]), np.ones(3, int), np.zeros(3, int), np.array([1, 5, 24])
    )
    dense = inputs["dense"]
    assert dense.shape == (3, len(DENSE_FEATURES))
    assert dense[0, DENSE_FEATURES.index("item_item_max")] == pytest.approx(0.9)
    assert dense[0, DENSE_FEATURES.index("item_item_mean")] == pytest.approx((0.9 + 0.4) / 2)
    # i0 and i3 are in category 1, like i1 and i2; item 40 is in another category.
    assert dense[:, DENSE_FEATURES.index("category_affinity")].tolist() == [1.0, 1.0, 0.0]
    # Items of a category share its tags and its creator here.
    assert dense[:, DENSE_FEATURES.index("tag_affinity")].tolist() == [1.0, 1.0, 0.0]
    assert dense[:, DENSE_FEATURES.index("creator_affinity")].tolist() == [1.0, 1.0, 0.0]
    # A creator's rate pools more exposures than one item's, so it sits nearer its own value.
    creator_ctr = dense[:, DENSE_FEATURES.index("creator_ctr")]
    item_ctr = dense[:, DENSE_FEATURES.index("ctr")]
    assert creator_ctr[2] < item_ctr[2] and abs(creator_ctr[2] - 0.05) < abs(item_ctr[2] - 0.05)
    assert inputs["position"].tolist() == [0, 0, 0]

    model = MultiTaskRanker(
        RankerConfig(hidden_dims=(8,)), RankerSizes(16, len(vocabs.surface), len(vocabs.device))
    )
    model.set_dense_statistics(np.asarray(dense, dtype=np.float32))
    from training.train_ranker import _to_tensors

    outputs = model(_to_tensors(inputs))
    assert set(outputs) == set(HEADS) and all(v.shape == (3,) for v in outputs.values())
    labels = {name: torch.tensor([1.0, 0.0, 0.0]) for name in ("click", "like", "purchase", "watch_log1p")}
    loss, parts = MultiTaskTask()(outputs, labels)
    assert loss.item() == pytest.approx(sum(parts.values()), rel=1e-5)

    from training.config import HeadWeights

    serving = RankerServing(model, builder, {"default": HeadWeights(), "video": HeadWeights(watch_time=5.0)})
    scores = serving.score(users[0], history[0], np.array([1, 2, 40]), surface="video", hour=13)
    serving.save(tmp_path)
    loaded = RankerServing.load(tmp_path, builder)
    np.testing.assert_allclose(
        loaded.score(users[0], history[0], np.array([1, 2, 40]), surface="video", hour=13), scores
    )
    assert loaded.surface_weights["video"].watch_time == 5.0


def test_vocabulary_lookup_is_the_same_by_value_and_by_arrow() -> None:
    vocab = Vocabulary("i", tuple(f"i{k}" for k in range(5000)))
    values = ["i3", None, "", "nope", "i4999", "i0", "i3"]
    expected = [4, 0, 0, 0, 5000, 1, 4]
    assert vocab.lookup(values).tolist() == expected
    assert vocab.lookup(pa.array(values, type=pa.string())).tolist() == expected
    # Longer inputs go through Arrow; the answer must not change with the path.
    many = values * 1000
    assert vocab.lookup(many).tolist() == expected * 1000
