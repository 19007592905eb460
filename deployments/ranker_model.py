"""The ranker deployment's serving state and its batched scoring.

:func:`score_batch` scores the candidates of several requests in one forward pass: the user tower
embeds every request's user at once, the feature builder of the release (the same code training
used) builds the inputs of every (user, candidate) pair, the multi-task model predicts every head,
and each request's surface weights combine the heads into its scores.

When the release carries an EASE model, each candidate's EASE score and rank are computed from the
request's positive history (the same history the ``collaborative`` source read), as offline.

Candidates the release's catalog does not hold (created after training) cannot be featurised;
they get the median score of their request's known candidates, a neutral place from which the
freshness and exploration policies can still lift them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from deployments.wire import RankReply, RankRequest
from training.collaborative import CollaborativeModel, candidate_features
from training.encoding import MAX_INTERESTS
from training.ranker import RankerServing
from training.release import Release
from training.two_tower import TwoTowerServing


@dataclass(frozen=True, eq=False)
class RankerModel:
    """One release's ranking state.

    Attributes:
        version: Bundle version.
        two_tower: The user tower (user embeddings are a ranker input).
        ranker: The multi-task ranker with its feature builder.
        row_of: Catalog row of each item id the release knows.
        collaborative: The release's EASE model, if it has one.
    """

    version: str
    two_tower: TwoTowerServing
    ranker: RankerServing
    row_of: dict[str, int]
    collaborative: CollaborativeModel | None = None

    @classmethod
    def build(cls, release: Release) -> RankerModel | None:
        """The ranking state of a release, or None for a retrieval-only release."""
        if release.ranker is None:
            return None
        ids = release.items.item_ids.tolist()
        return cls(
            release.version,
            release.two_tower,
            release.ranker,
            {str(i): n for n, i in enumerate(ids)},
            release.collaborative,
        )


def score_batch(model: RankerModel, requests: Sequence[RankRequest]) -> list[RankReply]:
    """Score several requests' candidates in one pass (see the module docstring).

    Args:
        model: The ranking state.
        requests: The requests, each with its candidates and head weights.

    Returns:
        One reply per request, in order.
    """
    started = time.perf_counter()
    builder = model.ranker.builder
    vocab = builder.vocabularies
    users = model.two_tower.user_embeddings(
        [r.user_id for r in requests], [list(r.history) for r in requests], [r.profile for r in requests]
    )
    histories = model.two_tower.encode_history([list(r.history) for r in requests])
    rows_per_request = [
        np.array([model.row_of.get(i, -1) for i in r.item_ids], dtype=np.int64) for r in requests
    ]
    known_per_request = [rows >= 0 for rows in rows_per_request]
    owner = np.concatenate(
        [np.full(int(k.sum()), n, dtype=np.int64) for n, k in enumerate(known_per_request)]
    )
    rows = np.concatenate([rows[k] for rows, k in zip(rows_per_request, known_per_request, strict=True)])
    predictions: dict[str, NDArray[np.float32]] = {}
    cf_score: NDArray[np.float32] | None = None
    cf_rank: NDArray[np.float32] | None = None
    if len(rows) and model.collaborative is not None:
        history_rows = [
            np.array([model.row_of.get(i, -1) for i in r.history], dtype=np.int64) for r in requests
        ]
        cf_scores = model.collaborative.scores(history_rows)
        cf_score = np.zeros(len(rows), dtype=np.float32)
        cf_rank = np.zeros(len(rows), dtype=np.float32)
        for n in range(len(requests)):
            mine = owner == n
            if mine.any():
                cf_score[mine], cf_rank[mine] = candidate_features(cf_scores[n], rows[mine])
    if len(rows):
        regions = [vocab.region.index(r.profile.get("region")) for r in requests]
        languages = [vocab.language.index(r.profile.get("language")) for r in requests]
        interests = np.zeros((len(requests), MAX_INTERESTS), dtype=np.int64)
        for n, request in enumerate(requests):
            wanted = request.interests[:MAX_INTERESTS]
            interests[n, : len(wanted)] = [vocab.category.index(name) for name in wanted]
        inputs = builder.build(
            users[owner],
            histories[owner],
            rows,
            # Looked up once per request, then spread to its candidates.
            np.array([vocab.surface.index(r.surface) for r in requests], dtype=np.int64)[owner],
            np.array([vocab.device.index(r.device) for r in requests], dtype=np.int64)[owner],
            np.array([r.hour + 1 for r in requests], dtype=np.int64)[owner],
            cf_score,
            cf_rank,
            interests[owner],
            np.asarray(regions, dtype=np.int64)[owner],
            np.asarray(languages, dtype=np.int64)[owner],
        )
        predictions = model.ranker.predict(inputs)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    replies: list[RankReply] = []
    offset = 0
    for request, request_rows, known in zip(requests, rows_per_request, known_per_request, strict=True):
        n_known = int(known.sum())
        click, like, purchase, watch = request.head_weights
        part = slice(offset, offset + n_known)
        offset += n_known
        scores = np.zeros(len(request_rows), dtype=np.float32)
        if n_known:
            combined = (
                click * predictions["click"][part]
                + like * predictions["like"][part]
                + purchase * predictions["purchase"][part]
                + watch * model.ranker.relative_watch(predictions["watch_time"][part])
            )
            scores[known] = combined
            scores[~known] = float(np.median(combined))
        embeddings: dict[str, tuple[float, ...]] = {}
        if request.embed_top_n > 0 and n_known:
            known_positions = np.flatnonzero(known)
            best = known_positions[np.argsort(-scores[known_positions], kind="stable")[: request.embed_top_n]]
            vectors = builder.item_embeddings[request_rows[best]]
            embeddings = {
                request.item_ids[p]: tuple(vector.tolist()) for p, vector in zip(best, vectors, strict=True)
            }
        replies.append(
            RankReply(
                model_version=model.version,
                scores=[float(s) for s in scores],
                unknown=len(request_rows) - n_known,
                embeddings=embeddings,
                elapsed_ms=elapsed_ms,
                batch_size=len(requests),
            )
        )
    return replies
