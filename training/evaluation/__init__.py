"""Offline evaluation: interactions and splits, full-ranking metrics, baselines, comparison reports.

Typical use::

    interactions = Interactions.from_events(events)
    split = published_split(interactions, seed=42)
    report = ComparisonReport(split.metadata)
    for model in (MostPop(), ItemKNN(), EASE()):
        report.add(model.name, evaluate_scores(model.fit(split.train).score, split))
    print(report.render())
"""

from training.evaluation.baselines import EASE, ItemKNN, MostPop, Recommender, TooManyItemsError, item_gram
from training.evaluation.metrics import (
    RANKING_METRICS,
    ScoreFn,
    auc,
    evaluate_scores,
    evaluate_topk,
    metric_key,
    top_k,
)
from training.evaluation.report import DEFAULT_COLUMNS, ComparisonReport, describe_split
from training.evaluation.splits import (
    POSITIVE_EVENT_TYPES,
    Interactions,
    PositiveRule,
    Split,
    published_split,
    temporal_split,
)

__all__ = [
    "DEFAULT_COLUMNS",
    "EASE",
    "POSITIVE_EVENT_TYPES",
    "RANKING_METRICS",
    "ComparisonReport",
    "Interactions",
    "ItemKNN",
    "MostPop",
    "PositiveRule",
    "Recommender",
    "ScoreFn",
    "Split",
    "TooManyItemsError",
    "auc",
    "describe_split",
    "evaluate_scores",
    "evaluate_topk",
    "item_gram",
    "metric_key",
    "published_split",
    "temporal_split",
    "top_k",
]
