"""Side-by-side comparison of models evaluated on one split, as a text table and as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import pyarrow.fs as pafs

from training.evaluation.splits import resolve_location

DEFAULT_COLUMNS: Final[tuple[str, ...]] = (
    "Recall@10",
    "NDCG@10",
    "MRR@10",
    "Hit@10",
    "P@10",
    "Recall@20",
    "NDCG@20",
    "Coverage@20",
)
"""Metrics shown by default, in order; every metric of a row is still kept in the JSON."""


@dataclass
class ComparisonReport:
    """Metrics of several models on the same split and part, one row per model.

    Attributes:
        split_metadata: The split's metadata (protocol, seed, cut-offs, sizes), kept with the numbers
            so they are never read without knowing how they were measured.
        part: The part the metrics were computed on (``"valid"`` or ``"test"``).
        columns: Metrics shown by :meth:`render`.
        rows: Model name -> metrics, in insertion order.
    """

    split_metadata: dict[str, Any]
    part: str = "test"
    columns: tuple[str, ...] = DEFAULT_COLUMNS
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, model: str, metrics: Mapping[str, float]) -> None:
        """Add one model's metrics.

        Args:
            model: Name shown in the first column.
            metrics: Metric name -> value, e.g. the result of
                :func:`~training.evaluation.metrics.evaluate_scores`.

        Raises:
            ValueError: A row for ``model`` exists already.
        """
        if model in self.rows:
            raise ValueError(f"the report already has a row for {model!r}")
        self.rows[model] = {name: float(value) for name, value in metrics.items()}

    def render(self, digits: int = 4) -> str:
        """The report as an aligned text table under a one-line description of the split.

        Args:
            digits: Decimals shown per value.

        Returns:
            The table; a metric a model lacks is shown as ``-``.
        """
        header = ["model", *self.columns]
        body = [
            [model, *(_format(metrics.get(column), digits) for column in self.columns)]
            for model, metrics in self.rows.items()
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest]).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join(
            [describe_split(self.split_metadata, self.part), line(header), rule, *map(line, body)]
        )

    def __str__(self) -> str:
        return self.render()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the split metadata, the part, the columns and every row."""
        return {
            "split": self.split_metadata,
            "part": self.part,
            "columns": list(self.columns),
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonReport:
        """Rebuild a report from :meth:`to_dict` output."""
        return cls(
            split_metadata=dict(data["split"]),
            part=str(data["part"]),
            columns=tuple(data["columns"]),
            rows={str(m): {str(k): float(v) for k, v in r.items()} for m, r in data["rows"].items()},
        )

    def to_json(self, path: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        """Write :meth:`to_dict` as JSON.

        Args:
            path: A local file path, or a pyarrow filesystem URI (``s3://bucket/report.json``).
            filesystem: A filesystem to use instead of resolving ``path``.
        """
        fs, location = resolve_location(path, filesystem)
        parent = location.rpartition("/")[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(location) as out:
            out.write(json.dumps(self.to_dict(), indent=2, sort_keys=False).encode())

    @classmethod
    def from_json(cls, path: str, *, filesystem: pafs.FileSystem | None = None) -> ComparisonReport:
        """Read a report written by :meth:`to_json`."""
        fs, location = resolve_location(path, filesystem)
        with fs.open_input_stream(location) as stream:
            return cls.from_dict(json.loads(stream.read().decode()))


def describe_split(metadata: Mapping[str, Any], part: str = "test") -> str:
    """One line saying how a split was made, for the head of a table or a log line.

    Args:
        metadata: A split's metadata.
        part: The part the numbers were computed on.

    Returns:
        E.g. ``"split: published (seed 42) | 943 users x 1682 items | test: 9,412 interactions of 937
        users"``.
    """
    protocol = metadata.get("protocol", "unknown")
    how = f"split: {protocol}"
    if metadata.get("seed") is not None:
        how += f" (seed {metadata['seed']})"
    cutoffs = metadata.get("cutoffs")
    if cutoffs:
        how += f" (valid from {cutoffs['valid_start']}, test from {cutoffs['test_start']})"
    pieces = [how]
    sizes = metadata.get("sizes")
    if sizes:
        pieces.append(f"{sizes['users']} users x {sizes['items']} items")
        pieces.append(f"{part}: {sizes[part]:,} interactions of {sizes[f'{part}_users']:,} users")
    return " | ".join(pieces)


def _format(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"
