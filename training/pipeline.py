"""The offline pipeline: lake, Ray Data, two-tower, index, item-item, ranker, evaluation, registry.

:func:`run_training` runs every stage in order and times each:

1. ``data``: :func:`training.datasets.build_training_data` (clean events, split, positives).
2. ``two_tower``: Ray Train fit with per-epoch validation recall.
3. ``index``: item embeddings for the whole catalog (new items from content), the ANN index
   (exact below ``retrieval.exact_max_items`` under ``auto``), its recall measured on real user
   embeddings against exact search.
4. ``item_item``: top-K similar items per item (co-occurrence over the training positives).
5. ``collaborative``: EASE over the catalog rows from the split's training positives
   (:mod:`training.collaborative`), when the catalog has at most 10,000 items.
6. ``ranker``: with EASE and no logged impressions, listwise on out-of-fold candidate lists
   (:mod:`training.listwise`); otherwise pointwise on impressions or sampled negatives; Ray Train
   fit, AUC per head.
7. ``evaluation``: on the configured part of the split (``test`` unless choosing
   hyper-parameters), side by side: the two-tower alone, ``two_stage`` (the candidates of
   :mod:`training.candidates`, ``candidates_k`` per user, re-ranked by the ranker), and the
   MostPop, ItemKNN and EASE baselines; plus candidate recall and a paired bootstrap of the
   NDCG@10 difference between two_stage and EASE over users.
8. ``register``: the release bundle, its manifest (config, metrics, data snapshot, feature set,
   checksums) and, if configured, an alias (``candidate`` by default; never ``production``).

Evaluation goes through the request-time path (:meth:`TwoTowerServing.user_embeddings` from ids
and raw profiles, the index's ``search``, :meth:`CollaborativeModel.scores` and
:meth:`RankerServing.score`), so the offline numbers measure what serving would do.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.lake import Lake
from core.settings import Settings
from retrieval import AnnConfig, ExactIndex, ItemSimilarityTable, ScannIndex, build_item_index, measure_recall
from training.candidates import merge_candidates
from training.collaborative import MAX_ITEMS, CollaborativeModel, candidate_features
from training.config import CollaborativeConfig, EvalConfig, RetrievalConfig, TrainConfig
from training.datasets import TrainingData, build_training_data
from training.evaluation import EASE, ComparisonReport, ItemKNN, MostPop, TooManyItemsError, evaluate_scores
from training.evaluation.bootstrap import paired_bootstrap, per_user_ndcg
from training.evaluation.metrics import evaluate_topk, top_k
from training.listwise import oof_list_examples, recent_histories, split_positives_as_rows
from training.ranker import RankerFeatureBuilder, RankerServing, RankerSizes, watch_scale_of
from training.registry import BundleInfo, ModelRegistry
from training.release import EVALUATION, FEATURE_SET_NAMES, Release, similarity_lookup
from training.train_ranker import (
    RankerJob,
    build_ranker_examples,
    fit_ranker,
    item_statistics,
    watch_loss_weight,
)
from training.train_two_tower import TwoTowerJob, ValidationSet, fit_two_tower, positives_to_arrays
from training.two_tower import TwoTowerServing, TwoTowerSizes

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

_EVAL_CHUNK = 512
"""Users whose candidates are generated together in the two-stage evaluation (bounds memory)."""

_POSITIVE_COLUMNS = (
    "user_index",
    "user_bucket",
    "history",
    "age_group",
    "region",
    "language",
    "item_index",
    "ts_us",
    "surface",
    "device",
)


def connect_ray(*, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Join the Ray cluster this process belongs to, or start a local one.

    Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) ``ray.init()`` attaches to the cluster;
    ``num_cpus`` is only passed when a local instance is started, since a cluster's resources are
    not the driver's to declare.

    Args:
        num_cpus: CPUs of a locally started instance (all cores when ``None``).
        quiet: Turn Ray Data's progress bars off.

    Returns:
        Whether this call started (or attached) Ray; ``False`` when it was already initialised.
    """
    import os

    import ray

    # Ray already up keeps the runtime_env it was started with (the demo's carries Serve's).
    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    if quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    return started


@dataclass
class TrainingRun:
    """The outcome of :func:`run_training`.

    Attributes:
        release: The trained serving objects.
        report: The evaluation table (test part).
        metrics: Everything recorded in the manifest's ``metrics``.
        timings_s: Wall time of each stage.
        bundle: The registered bundle, or ``None`` when registration was off.
    """

    release: Release
    report: ComparisonReport
    metrics: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    bundle: BundleInfo | None = None


class _Stages:
    """Times named stages and reports their start and end through ``log``."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.timings: dict[str, float] = {}
        self._log = log

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._log(f"[{name}] ...")
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 2)
        self._log(f"[{name}] done in {self.timings[name]:.1f} s")


def storage_path_for(home: str) -> str:
    """Where Ray Train and Ray Tune keep run state for a data home (``<home>/ray_runs``)."""
    return f"{home.rstrip('/')}/ray_runs" if "://" in home else str(Path(home).absolute() / "ray_runs")


def build_index(
    embeddings: FloatArray, ids: list[str], config: RetrievalConfig, queries: FloatArray | None
) -> tuple[ExactIndex | ScannIndex, float]:
    """The item index chosen by ``config.index``, and its recall@100 against exact search.

    Args:
        embeddings: Item embeddings, row ``p`` is ``ids[p]``.
        ids: Item ids.
        config: Index choice.
        queries: Real user embeddings to measure recall on (sampled from items when ``None``).

    Returns:
        ``(index, recall)``; recall is 1.0 for an exact index.
    """
    n_items, dim = embeddings.shape
    if config.index == "exact":
        threshold = n_items + 1
    elif config.index == "scann":
        threshold = 0
    else:
        threshold = config.exact_max_items
    ann = AnnConfig.from_catalog_size(n_items, dim, exact_below_items=threshold)
    index = build_item_index(embeddings, ids, ann, sample_queries=queries)
    if isinstance(index, ExactIndex):
        return index, 1.0
    sample = queries if queries is not None and len(queries) else embeddings[: config.recall_queries]
    recall = measure_recall(
        index, ExactIndex(embeddings, ids), sample[: config.recall_queries], k=min(100, n_items)
    )
    return index, recall


def _user_embeddings(release: Release, data: TrainingData, user_ids: list[str]) -> FloatArray:
    """Users of the lake embedded through the request-time path (ids, history ids, raw profile)."""
    out = np.zeros((len(user_ids), release.two_tower.dim), dtype=np.float32)
    for start in range(0, len(user_ids), 4096):
        chunk = user_ids[start : start + 4096]
        out[start : start + len(chunk)] = release.two_tower.user_embeddings(
            chunk, data.history_ids(chunk), data.profiles(chunk)
        )
    return out


def evaluate_release(
    release: Release | None,
    data: TrainingData,
    config: EvalConfig,
    retrieval: RetrievalConfig,
    collaborative: CollaborativeConfig | None = None,
) -> tuple[ComparisonReport, dict[str, Any]]:
    """Evaluate a release and the baselines on a held-out part of the data's split.

    Args:
        release: The models to evaluate; ``None`` evaluates the baselines alone.
        data: Training data whose split is evaluated (users' histories are taken from it).
        config: Cut-offs, baselines, surface, part, bootstrap.
        retrieval: ``candidates_k`` of the two-stage evaluation.
        collaborative: Two-tower share of the candidates and EASE's history length.

    Returns:
        The comparison table and extra figures (candidate recall, the paired bootstrap of
        two_stage against EASE).
    """
    split = data.split
    cf_config = collaborative or CollaborativeConfig()
    report = ComparisonReport(split.metadata, part=config.part)
    extra: dict[str, Any] = {}
    per_user: npt.NDArray[np.float64] | None = None
    users: IntArray | None = None
    if release is not None:
        extra, per_user, users = _evaluate_models(release, data, config, retrieval, cf_config, report)

    baselines = {"most_pop": MostPop, "item_knn": ItemKNN, "ease": EASE}
    for name in config.baselines:
        try:
            model = baselines[name]().fit(split.train)
        except TooManyItemsError as exc:
            logger.warning("baseline %s skipped: %s", name, exc)
            continue
        report.add(name, evaluate_scores(model.score, split, config.ks, part=config.part))
        if name == "ease" and per_user is not None and users is not None and config.bootstrap_samples:
            _, lists = top_k(model.score, split, 10, part=config.part)
            ease_per_user = per_user_ndcg(lists, split, users, 10, config.part)
            difference = paired_bootstrap(per_user, ease_per_user, samples=config.bootstrap_samples)
            extra["two_stage_minus_ease_ndcg@10"] = difference.to_dict()
    if release is not None and release.collaborative is not None:
        # The release's own EASE (its λ chosen on validation) alone: what two_stage starts from.
        score_fn = _collaborative_scorer(release, data, cf_config)
        report.add("ease_release", evaluate_scores(score_fn, split, config.ks, part=config.part))
        if per_user is not None and users is not None and config.bootstrap_samples:
            _, lists = top_k(score_fn, split, 10, part=config.part)
            own = per_user_ndcg(lists, split, users, 10, config.part)
            difference = paired_bootstrap(per_user, own, samples=config.bootstrap_samples)
            extra["two_stage_minus_ease_release_ndcg@10"] = difference.to_dict()
    return report, extra


def _collaborative_scorer(
    release: Release, data: TrainingData, cf_config: CollaborativeConfig
) -> Callable[[IntArray], FloatArray]:
    """Dense scores over the split's items from the release's EASE and the users' training positives."""
    assert release.collaborative is not None
    cf = release.collaborative
    split = data.split
    train = split.train
    split_rows = release.items.positions(split.train.item_ids.tolist())

    def score(batch: IntArray) -> FloatArray:
        histories = recent_histories(
            train.user_index, split_rows[train.item_index], train.ts_us, batch, cf_config.history_length
        )
        full = cf.scores(histories)
        out = np.where(split_rows[None, :] >= 0, full[:, np.maximum(split_rows, 0)], -1e9)
        return np.where(np.isfinite(out), out, -1e9).astype(np.float32)

    return score


def _evaluate_models(
    release: Release,
    data: TrainingData,
    config: EvalConfig,
    retrieval: RetrievalConfig,
    cf_config: CollaborativeConfig,
    report: ComparisonReport,
) -> tuple[dict[str, Any], npt.NDArray[np.float64] | None, IntArray | None]:
    split = data.split
    extra: dict[str, Any] = {}
    split_users = split.train.user_ids.tolist()
    users = _user_embeddings(release, data, split_users)
    rows = release.items.positions(split.train.item_ids.tolist())
    in_catalog = rows >= 0
    items = np.where(in_catalog[:, None], release.item_embeddings[np.maximum(rows, 0)], 0.0)

    def two_tower_scores(batch: IntArray) -> FloatArray:
        scores = users[batch] @ items.T
        # Items the release does not hold cannot be recommended; -1e9 keeps them last without NaN.
        return np.where(in_catalog[None, :], scores, -1e9).astype(np.float32)

    report.add("two_tower", evaluate_scores(two_tower_scores, split, config.ks, part=config.part))
    if not (config.two_stage and release.ranker is not None):
        return extra, None, None
    outcome = _two_stage(release, data, users, config, retrieval.candidates_k, cf_config)
    report.add("two_stage", outcome.metrics)
    extra[f"candidate_recall@{retrieval.candidates_k}"] = outcome.candidate_recall
    extra["candidate_sources"] = outcome.sources
    return extra, outcome.per_user_ndcg, outcome.users


@dataclass
class _TwoStage:
    metrics: dict[str, float]
    candidate_recall: float
    per_user_ndcg: npt.NDArray[np.float64]
    users: IntArray
    sources: dict[str, float]


def _two_stage(
    release: Release,
    data: TrainingData,
    users: FloatArray,
    config: EvalConfig,
    candidates_k: int,
    cf_config: CollaborativeConfig,
) -> _TwoStage:
    """Candidates (two-tower top and EASE, :mod:`training.candidates`) re-ranked by the ranker."""
    assert release.ranker is not None, "two-stage evaluation needs a ranker"
    split = data.split
    part = config.part
    test_users = split.part(part).active_users()
    known = split.known_before(part)
    split_rows = release.items.positions(split.train.item_ids.tolist())
    n_items = len(release.items)
    # Rank over the split's items only, as the dense evaluation does.
    allowed_rows = np.zeros(n_items, dtype=bool)
    allowed_rows[split_rows[split_rows >= 0]] = True
    split_item_of_row = np.full(n_items, -1, dtype=np.int64)
    split_item_of_row[split_rows[split_rows >= 0]] = np.flatnonzero(split_rows >= 0)

    cf = release.collaborative
    train = split.train
    tt_k = cf_config.two_tower_k if cf is not None else candidates_k
    allowed_index = np.zeros(release.index.size, dtype=bool)
    index_rows = [release.index.position_of(str(i)) for i in release.items.item_ids[allowed_rows].tolist()]
    allowed_index[np.asarray([p for p in index_rows if p is not None], dtype=np.int64)] = True
    catalog_row_of_index = release.items.positions(list(release.index.ids))
    histories_tt = release.two_tower.encode_history(
        data.history_ids(split.train.user_ids[test_users].tolist())
    )
    interests = data.user_interests(split.train.user_ids[test_users].tolist())
    profiles = data.user_inputs(split.train.user_ids[test_users].tolist())
    k_max = max(config.ks)
    ranked = np.full((len(test_users), k_max), -1, dtype=np.int64)
    targets = split.part(part).dense_rows(test_users, np.bool_)
    found = 0
    by_source = {"two_tower_ann": 0, "collaborative": 0, "both": 0}
    for begin in range(0, len(test_users), _EVAL_CHUNK):
        chunk = np.arange(begin, min(begin + _EVAL_CHUNK, len(test_users)))
        known_rows, known_items = known.coordinates(test_users[chunk])
        mapped = split_rows[known_items]
        excluded = np.zeros((len(chunk), n_items), dtype=bool)
        excluded[known_rows[mapped >= 0], mapped[mapped >= 0]] = True
        excluded |= ~allowed_rows[None, :]
        # Two-tower candidates from the release's index, as serving retrieves them.
        exclude_ids = [
            set(release.items.item_ids[np.flatnonzero(row & allowed_rows)].tolist()) for row in excluded
        ]
        positions, _ = release.index.search(
            users[test_users[chunk]], tt_k, exclude=exclude_ids, allowed=allowed_index
        )
        tt_rows = np.where(positions >= 0, catalog_row_of_index[np.maximum(positions, 0)], -1)
        cf_scores: FloatArray | None = None
        masked_cf: FloatArray | None = None
        if cf is not None:
            # EASE reads the user's training positives, the same history the EASE baseline reads.
            histories = recent_histories(
                train.user_index,
                split_rows[train.item_index],
                train.ts_us,
                test_users[chunk],
                cf_config.history_length,
            )
            cf_scores = cf.scores(histories)
            masked_cf = cf_scores.copy()
            masked_cf[excluded] = -np.inf
        lists = merge_candidates(tt_rows, masked_cf, candidates_k)
        for b, u in enumerate(chunk.tolist()):
            valid = lists.rows[b] >= 0
            candidates = lists.rows[b][valid]
            if len(candidates) == 0:
                continue
            split_items = split_item_of_row[candidates]
            hits = targets[u, split_items]
            found += int(hits.sum())
            tt_flag, cf_flag = lists.from_two_tower[b][valid], lists.from_collaborative[b][valid]
            by_source["two_tower_ann"] += int((hits & tt_flag & ~cf_flag).sum())
            by_source["collaborative"] += int((hits & cf_flag & ~tt_flag).sum())
            by_source["both"] += int((hits & tt_flag & cf_flag).sum())
            cf_score = cf_rank = None
            if cf_scores is not None:
                cf_score, cf_rank = candidate_features(cf_scores[b], candidates)
            scores = release.ranker.score(
                users[test_users[u]],
                histories_tt[u],
                candidates,
                surface=config.surface,
                cf_score=cf_score,
                cf_rank=cf_rank,
                interests=interests[u],
                region=int(profiles["region"][u]),
                language=int(profiles["language"][u]),
            )
            best = split_items[np.argsort(-scores, kind="stable")][:k_max]
            ranked[u, : len(best)] = best
    metrics = evaluate_topk(ranked, split, config.ks, user_indices=test_users, part=part)
    total = max(int(targets.sum()), 1)
    return _TwoStage(
        metrics=metrics,
        candidate_recall=found / total,
        per_user_ndcg=per_user_ndcg(ranked, split, test_users, 10, part),
        users=test_users,
        sources={f"candidate_hits_{name}": count / total for name, count in by_source.items()},
    )


def run_training(
    config: TrainConfig,
    *,
    home: str | None = None,
    log: Callable[[str], None] = print,
    data: TrainingData | None = None,
) -> TrainingRun:
    """Train, evaluate and (optionally) register a release from the lake of ``home``.

    Ray must be initialised (see :func:`connect_ray`).

    Args:
        config: The run's configuration.
        home: Data home (lake and registry); ``RAYREC_HOME`` (or ``./var``) when omitted.
        log: Where progress lines go.
        data: Training data already built from this home's lake with ``config.data`` (Tune
            builds it once for the search and the final run); built here when omitted.

    Returns:
        The release, its evaluation and, when registered, the bundle.

    Raises:
        ValueError: The lake holds no usable events.
    """
    home = home or Settings.from_env().home
    lake = Lake(home)
    stages = _Stages(log)
    storage = storage_path_for(home)

    with stages("data"):
        if data is None:
            data = build_training_data(lake, config.data)
    log(f"  {data.row_counts}")

    with stages("two_tower"):
        validation = ValidationSet.from_training_data(
            data,
            k=config.two_tower_train.eval_k,
            max_users=config.two_tower_train.eval_max_users,
            seed=config.two_tower_train.seed,
        )
        job = TwoTowerJob(
            model=config.two_tower,
            train=config.two_tower_train,
            sizes=TwoTowerSizes.from_vocabularies(data.vocabularies),
            validation=validation,
        )
        tt = fit_two_tower(data.positives, job, storage_path=storage)
    for epoch in tt.history:
        log(f"  two-tower {_format_metrics(epoch)}")
    serving = TwoTowerServing(tt.model, data.vocabularies)

    with stages("index"):
        item_embeddings = serving.item_embeddings(data.items)
        item_ids = data.items.item_ids.tolist()
        queries = serving.user_embeddings_encoded(validation.user_inputs)
        index, index_recall = build_index(item_embeddings, item_ids, config.retrieval, queries)
    log(f"  index {type(index).__name__} over {len(item_ids)} items, recall@100 {index_recall:.3f}")

    positives = positives_to_arrays(data.positives, _POSITIVE_COLUMNS)
    with stages("item_item"):
        rows = data.items.rows_of_id_index(len(data.vocabularies.item))[positives["item_index"]]
        known = rows >= 0
        similarity = ItemSimilarityTable.from_interactions(
            positives["user_index"][known], rows[known], item_ids, config.retrieval.item_neighbours
        )
        builder = RankerFeatureBuilder(
            items=data.items,
            item_embeddings=item_embeddings,
            stats=item_statistics(data),
            similarity=similarity_lookup(data.items, similarity),
            vocabularies=data.vocabularies,
        )

    with stages("collaborative"):
        collaborative, cf_note = fit_collaborative(data, config.collaborative)
    log(f"  collaborative: {cf_note}")

    with stages("ranker"):
        listwise = (
            config.ranker.objective == "listwise"
            and collaborative is not None
            and data.snapshot.row_counts["impressions"] == 0
        )
        if listwise:
            examples = oof_list_examples(
                data, positives, serving, item_embeddings, config, surface=config.eval.surface
            )
        else:
            examples = build_ranker_examples(
                lake,
                data,
                positives,
                builder,
                serving,
                config.ranker,
                min_watch_s=config.data.min_watch_s,
            )
        train_examples, valid_examples = examples.split_by_user(seed=config.ranker.seed)
        ranker_config = config.ranker
        if not listwise and ranker_config.two_tower_inputs is None:
            # The two-tower model was fitted on the very clicks logged impressions are labelled
            # with, so on them its score and embeddings know the answer (an impression of an item
            # nobody clicked scores low because nobody clicked it); at serving they know only the
            # past. Sampled negatives are drawn against those positives, as retrieval will be.
            reads = examples.source != "impressions"
            ranker_config = ranker_config.model_copy(update={"two_tower_inputs": reads})
        ranker_job = RankerJob(
            config=ranker_config,
            sizes=RankerSizes(
                embedding_dim=serving.dim,
                surface=len(data.vocabularies.surface),
                device=len(data.vocabularies.device),
            ),
            dense=train_examples.real().inputs["dense"],
            validation=valid_examples.real(),
            list_size=examples.list_size,
            watch_weight=watch_loss_weight(train_examples.labels["watch_log1p"]),
        )
        ranked = fit_ranker(train_examples, ranker_job, storage_path=storage)
    log(f"  ranker examples: {len(examples)} ({examples.source}), positive rates {examples.positive_rates()}")
    log(f"  ranker validation {_format_metrics(ranked.validation)}")

    release = Release(
        version="unregistered",
        vocabularies=data.vocabularies,
        items=data.items,
        two_tower=serving,
        item_embeddings=item_embeddings,
        index=index,
        item_similarity=similarity,
        ranker=RankerServing(
            ranked.model,
            builder,
            config.ranker.surface_weights,
            watch_scale_of(train_examples.labels["watch_log1p"]),
        ),
        collaborative=collaborative,
    )

    with stages("evaluation"):
        report, extra = evaluate_release(release, data, config.eval, config.retrieval, config.collaborative)
    log(report.render())
    for name, value in extra.items():
        log(f"  {name}: {value}")

    metrics: dict[str, Any] = {
        "evaluation": report.to_dict(),
        "two_tower": {"history": tt.history, "seconds": round(tt.seconds, 2)},
        "index": {"kind": type(index).__name__, "items": len(item_ids), "recall_at_100": index_recall},
        "collaborative": {"shipped": collaborative is not None, "note": cf_note},
        "ranker": {
            "objective": "listwise" if listwise else "pointwise",
            "examples": len(examples),
            "source": examples.source,
            "positive_rates": examples.positive_rates(),
            "validation": ranked.validation,
            "history": ranked.history,
            "seconds": round(ranked.seconds, 2),
        },
        **extra,
        **{
            f"{config.eval.part}_{model}_{name}": value
            for model, row in report.rows.items()
            for name, value in row.items()
        },
    }

    bundle: BundleInfo | None = None
    if config.register_bundle:
        with stages("register"):
            registry = ModelRegistry(home)
            with tempfile.TemporaryDirectory(prefix="rayrec-release-") as staging:
                release.save(staging)
                report.to_json(str(Path(staging) / EVALUATION))
                metrics["timings_s"] = dict(stages.timings)
                bundle = registry.register(
                    staging,
                    config=config.model_dump(mode="json"),
                    metrics=metrics,
                    data=data.data_snapshot(config.description or f"protocol {config.data.protocol}"),
                    feature_set=list(FEATURE_SET_NAMES),
                )
            if config.promote_to is not None:
                registry.promote(bundle.version, config.promote_to)
        log(
            f"registered {bundle.version} at {bundle.uri}"
            + (f" as {config.promote_to}" if config.promote_to else "")
        )
    metrics["timings_s"] = dict(stages.timings)
    return TrainingRun(
        release=release, report=report, metrics=metrics, timings_s=stages.timings, bundle=bundle
    )


def fit_collaborative(
    data: TrainingData, config: CollaborativeConfig
) -> tuple[CollaborativeModel | None, str]:
    """EASE on all training positives of the split, over the catalog rows, when the catalog allows.

    Args:
        data: Training data.
        config: Whether, λ and the size limit.

    Returns:
        The model (or ``None``) and a note for the manifest saying what was done and why.
    """
    n_items = len(data.items)
    if not config.enabled:
        return None, "turned off (collaborative.enabled = false)"
    limit = min(config.max_items, MAX_ITEMS)
    if n_items > limit:
        return None, f"skipped: the catalog has {n_items} items, above the dense EASE limit of {limit}"
    users, rows, _ = split_positives_as_rows(data)
    model = CollaborativeModel.fit(users, rows, n_items, config.l2)
    return model, f"EASE over {n_items} items from {len(users)} training positives, l2={config.l2:g}"


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


__all__ = [
    "TrainingRun",
    "build_index",
    "connect_ray",
    "evaluate_release",
    "run_training",
    "storage_path_for",
]
