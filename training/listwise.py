"""Out-of-fold candidate lists: the listwise ranker's training data.

The ranker re-orders the candidates of :mod:`training.candidates`, so it learns on such lists. A
list whose labels the collaborative model had already seen would teach the ranker to trust EASE's
in-sample scores, which no test user ever gets. So the training positives (the evaluation split's
training part, as catalog rows) are split into ``oof_folds`` folds, and for each fold:

1. EASE is fitted on the other folds;
2. each user with positives in the fold gets the candidate list serving would build from the
   other folds (EASE from that history, the two-tower user embedding from the recent positives
   outside the fold, both excluding the history);
3. the fold's positives among the candidates are the labels (``click``; ``like``, ``purchase``
   and watch time from the pair's training events);
4. the item-item table and the item statistics the features read are rebuilt without the fold.

No held-out (validation or test) pair is read: held-out items that reach a list are negatives, as
they would be in production. The two-tower weights are the only part fitted on every fold; their
score is the one feature still in-sample (see the README's offline section).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from retrieval import ItemSimilarityTable
from training.candidates import merge_candidates
from training.collaborative import CollaborativeModel, candidate_features, top_items
from training.config import TrainConfig
from training.datasets import TrainingData, final_histories
from training.ranker import RankerFeatureBuilder
from training.release import similarity_lookup
from training.train_ranker import RankerExamples, _user_embeddings, item_statistics, pair_labels
from training.two_tower import TwoTowerServing

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


def split_positives_as_rows(data: TrainingData) -> tuple[IntArray, IntArray, IntArray]:
    """The split's training positives as ``(user vocabulary index, catalog row, ts_us)``.

    Pairs whose item is not in the catalog (removed) or whose user is unknown are dropped.
    """
    train = data.split.train
    rows = data.items.positions(train.item_ids.tolist())[train.item_index]
    users = data.vocabularies.user.lookup(train.user_ids.tolist())[train.user_index]
    keep = (rows >= 0) & (users > 0)
    return users[keep].astype(np.int64), rows[keep].astype(np.int64), train.ts_us[keep]


def recent_histories(
    users: IntArray, rows: IntArray, ts_us: IntArray, wanted: IntArray, length: int | None
) -> list[IntArray]:
    """Each wanted user's positives (catalog rows), most recent first, at most ``length``.

    Args:
        users: User of each positive.
        rows: Catalog row of each positive.
        ts_us: Time of each positive.
        wanted: Users to return histories for.
        length: Cap (``None``: all).

    Returns:
        One array per wanted user.
    """
    order = np.lexsort((-ts_us, users))
    users, rows = users[order], rows[order]
    start = np.searchsorted(users, wanted, side="left")
    end = np.searchsorted(users, wanted, side="right")
    if length is not None:
        end = np.minimum(end, start + length)
    return [rows[s:e] for s, e in zip(start.tolist(), end.tolist(), strict=True)]


def oof_list_examples(
    data: TrainingData,
    positives: Mapping[str, npt.NDArray[Any]],
    serving: TwoTowerServing,
    item_embeddings: FloatArray,
    config: TrainConfig,
    *,
    surface: str,
) -> RankerExamples:
    """Out-of-fold candidate lists with their features and labels (see the module docstring).

    Args:
        data: Training data.
        positives: Two-tower rows as numpy columns (``user_index``, ``item_index``, ``ts_us``).
        serving: Two-tower serving module.
        item_embeddings: Item embeddings of the catalog rows.
        config: Folds, list size, EASE and candidate settings.
        surface: Surface the lists are built for (its context embedding).

    Returns:
        Examples in lists of ``config.ranker.list_size`` rows (``labels["mask"]`` marks padding).
    """
    ranker, cf_config = config.ranker, config.collaborative
    size, k = ranker.list_size, config.retrieval.candidates_k
    rng = np.random.default_rng(ranker.seed)
    n_items = len(data.items)
    vocab = data.vocabularies
    users, rows, ts_us = split_positives_as_rows(data)
    fold = rng.integers(0, ranker.oof_folds, size=len(users))
    keys = users * n_items + rows
    labels_of = pair_labels(data, min_watch_s=config.data.min_watch_s)
    tt_users = np.asarray(positives["user_index"], dtype=np.int64)
    tt_rows = data.items.rows_of_id_index(len(vocab.item))[
        np.asarray(positives["item_index"], dtype=np.int64)
    ]
    tt_items = np.asarray(positives["item_index"], dtype=np.int64)
    tt_ts = np.asarray(positives["ts_us"], dtype=np.int64)
    tt_keys = tt_users * n_items + tt_rows
    all_user_ids = list(vocab.user.values)
    base_inputs = data.user_inputs(all_user_ids)
    surface_index = vocab.surface.index(surface)

    interests = data.interests_by_index()
    parts: list[dict[str, npt.NDArray[Any]]] = []
    label_parts: list[dict[str, npt.NDArray[Any]]] = []
    owners: list[IntArray] = []
    for f in range(ranker.oof_folds):
        in_fold = fold == f
        fold_keys = np.unique(keys[in_fold])
        cf = CollaborativeModel.fit(users[~in_fold], rows[~in_fold], n_items, cf_config.l2)
        fold_users = np.unique(users[in_fold])
        histories = recent_histories(
            users[~in_fold], rows[~in_fold], ts_us[~in_fold], fold_users, cf_config.history_length
        )
        cf_scores = cf.scores(histories)

        # The two-tower history and the item-item table without the fold, as serving would have them.
        outside = ~np.isin(tt_keys, fold_keys)
        table = pa.table(
            {"user_index": tt_users[outside], "item_index": tt_items[outside], "ts_us": tt_ts[outside]}
        )
        tt_history = final_histories(table, len(vocab.user), vocab.history_length)
        known = (tt_rows >= 0) & outside
        similarity = ItemSimilarityTable.from_interactions(
            tt_users[known], tt_rows[known], data.items.item_ids.tolist(), config.retrieval.item_neighbours
        )
        builder = RankerFeatureBuilder(
            items=data.items,
            item_embeddings=item_embeddings,
            stats=item_statistics(data, exclude_keys=fold_keys),
            similarity=similarity_lookup(data.items, similarity),
            vocabularies=vocab,
        )
        user_inputs = {name: values[fold_users - 1] for name, values in base_inputs.items()}
        user_inputs["history"] = tt_history[fold_users]
        embeddings = _user_embeddings(serving, user_inputs)
        tt_scores = embeddings @ item_embeddings.T
        tt_scores[~np.isfinite(cf_scores)] = -np.inf
        lists = merge_candidates(top_items(tt_scores, cf_config.two_tower_k), cf_scores, k)

        fold_pairs = set(keys[in_fold].tolist())
        for b, user in enumerate(fold_users.tolist()):
            cand = lists.rows[b][lists.rows[b] >= 0]
            if len(cand) == 0:
                continue
            click = np.fromiter(((user * n_items + r) in fold_pairs for r in cand.tolist()), bool, len(cand))
            chosen = _choose(click, size, rng)
            if not click[chosen].any():
                continue
            picked = cand[chosen]
            n = len(picked)
            padded = np.zeros(size, dtype=np.int64)
            padded[:n] = picked
            score, rank = candidate_features(cf_scores[b], padded)
            inputs = builder.build(
                np.repeat(embeddings[b][None, :], size, axis=0),
                np.repeat(tt_history[user][None, :], size, axis=0),
                padded,
                np.full(size, surface_index, dtype=np.int64),
                np.zeros(size, dtype=np.int64),
                np.zeros(size, dtype=np.int64),
                score,
                rank,
                np.repeat(interests[user][None, :], size, axis=0),
                np.full(size, user_inputs["region"][b], dtype=np.int64),
                np.full(size, user_inputs["language"][b], dtype=np.int64),
            )
            mask = np.zeros(size, dtype=np.float32)
            mask[:n] = 1.0
            positive = np.zeros(size, dtype=np.float32)
            positive[:n] = click[chosen]
            pair = labels_of.lookup(np.full(size, user, dtype=np.int64), padded)
            parts.append(inputs)
            label_parts.append(
                {
                    "click": positive,
                    "like": pair["like"] * positive,
                    "purchase": pair["purchase"] * positive,
                    "watch_log1p": pair["watch_log1p"] * positive,
                    "mask": mask,
                }
            )
            owners.append(np.full(size, user, dtype=np.int64))
    if not parts:
        raise ValueError("no out-of-fold list holds a positive; the data is too small for listwise training")
    return RankerExamples(
        inputs={name: np.concatenate([p[name] for p in parts]) for name in parts[0]},
        labels={name: np.concatenate([p[name] for p in label_parts]) for name in label_parts[0]},
        user_index=np.concatenate(owners),
        source="lists",
        list_size=size,
    )


def _choose(click: npt.NDArray[np.bool_], size: int, rng: np.random.Generator) -> IntArray:
    """Positions kept in a training list: the first ``size`` candidates, in EASE order.

    Labels never decide what is kept: keeping every positive but only some negatives would tell
    the ranker that items EASE ranks low are positives far more often than they are, and it would
    learn to distrust EASE. The head is where the top ten are decided.
    """
    return np.arange(min(len(click), size), dtype=np.int64)


__all__ = ["oof_list_examples", "recent_histories", "split_positives_as_rows"]
