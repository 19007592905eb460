"""The values that travel along the request path: context, candidates, features, filter results.

These types are plain Python (no pydantic) because thousands of them are built per request; the
boundary (HTTP, config) is validated elsewhere before any of them is made. Feature references
are ``view:feature`` strings, the same names the feature definitions use.
"""

from __future__ import annotations

import numbers
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final, TypeAlias, cast

FEATURE_REF_RE: Final = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")
"""A feature reference: ``view:feature``, both parts snake_case."""

FeatureValue: TypeAlias = bool | int | float | str | tuple[float, ...] | tuple[str, ...]
"""What a feature holds once stored in a ``FeatureMap``: a scalar, a vector or a list of labels."""

FeatureInput: TypeAlias = FeatureValue | Sequence[float] | Sequence[str] | None
"""What a ``FeatureMap`` accepts; lists become tuples and ``None`` means the feature is absent."""

ParamValue: TypeAlias = bool | int | float | str
"""A per-request override value (``RequestContext.params``)."""


class FeatureRefError(ValueError):
    """Raised for a feature reference that is not ``view:feature``."""


class FeatureTypeError(TypeError):
    """Raised when a feature holds a value of another type than the one asked for."""

    def __init__(self, ref: str, expected: str, value: object) -> None:
        super().__init__(f"feature {ref!r} holds {type(value).__name__} {value!r}, not {expected}")
        self.ref = ref


_VALID_REFS: set[str] = set()
_VALID_REFS_MAX: Final = 4096


def validate_feature_ref(ref: str) -> str:
    """Check that ``ref`` is a ``view:feature`` reference.

    Args:
        ref: The reference to check.

    Returns:
        ``ref`` unchanged.

    Raises:
        FeatureRefError: ``ref`` does not match ``^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$``.
    """
    if type(ref) is str and ref in _VALID_REFS:
        return ref
    if not isinstance(ref, str) or FEATURE_REF_RE.match(ref) is None:
        raise FeatureRefError(
            f"feature reference {ref!r} is not 'view:feature' (snake_case, e.g. 'item:ctr_7d')"
        )
    # References are a few dozen names fixed in code and config, checked hundreds of thousands
    # of times a second on the request path; the cap only guards against unbounded inputs.
    if len(_VALID_REFS) < _VALID_REFS_MAX:
        _VALID_REFS.add(ref)
    return ref


def _is_number(value: object) -> bool:
    # bool is an int subclass, but a flag read as a number is almost always a wiring mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _normalize(ref: str, value: FeatureInput) -> FeatureValue:
    kind = type(value)
    if kind is float or kind is str or kind is int or kind is bool:
        return cast(FeatureValue, value)
    if kind is tuple or kind is list:
        # Embeddings and tag lists arrive here by the hundred per request: checking exact types
        # first skips the abstract-class checks below, which cost far more per element.
        items = cast(Sequence[object], value)
        if all(type(item) is float for item in items):
            return cast(tuple[float, ...], items if kind is tuple else tuple(items))
        if all(type(item) is str for item in items):
            return cast(tuple[str, ...], items if kind is tuple else tuple(items))
    if isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Sequence):
        items = tuple(value)
        if all(isinstance(item, str) for item in items):
            return cast(tuple[str, ...], items)
        if all(_is_number(item) for item in items):
            return tuple(float(cast(float, item)) for item in items)
    raise FeatureTypeError(ref, "bool, int, float, str or a sequence of floats or of strings", value)


class FeatureMap(Mapping[str, FeatureValue]):
    """An immutable mapping of ``view:feature`` references to typed values.

    Keys are validated on construction, values normalised (lists become tuples, numpy-like
    scalars become ``int``/``float``); ``None`` values are dropped, so an absent feature and a
    null one read the same. Reading a missing feature with a malformed reference raises, so a
    typo cannot pass for a missing value.

    Example:
        >>> fm = FeatureMap({"item:ctr_7d": 0.12, "item:tags": ["a", "b"]})
        >>> fm.get_float("item:ctr_7d", 0.0)
        0.12
        >>> fm.with_values({"item:ctr_7d": 0.2}).get_float("item:ctr_7d", 0.0)
        0.2
    """

    __slots__ = ("_values",)

    _values: dict[str, FeatureValue]

    def __init__(self, values: Mapping[str, FeatureInput] | None = None) -> None:
        self._values = {
            validate_feature_ref(ref): _normalize(ref, value)
            for ref, value in (values or {}).items()
            if value is not None
        }

    @classmethod
    def _trusted(cls, values: dict[str, FeatureValue]) -> FeatureMap:
        # Skips re-validation when both halves were already validated.
        out = cls.__new__(cls)
        out._values = values
        return out

    def __getitem__(self, ref: str) -> FeatureValue:
        return self._values[ref]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, ref: object) -> bool:
        return ref in self._values

    def get(self, ref: str, default: FeatureValue | None = None) -> FeatureValue | None:  # type: ignore[override]
        """The value of ``ref``, or ``default`` when absent (no reference check, as ``Mapping.get``)."""
        # Mapping.get goes through __getitem__ and a KeyError per miss; filters call this for
        # every candidate.
        return self._values.get(ref, default)

    def __hash__(self) -> int:
        return hash(frozenset(self._values.items()))

    def __repr__(self) -> str:
        return f"FeatureMap({self._values!r})"

    def with_values(self, values: Mapping[str, FeatureInput]) -> FeatureMap:
        """A copy with ``values`` added; they win over values already present.

        Args:
            values: Features to add or replace.

        Returns:
            A new map; this one is unchanged.
        """
        if not values:
            return self
        return FeatureMap._trusted({**self._values, **FeatureMap(values)._values})

    def union(self, other: FeatureMap) -> FeatureMap:
        """A copy with ``other``'s features added; they win over values already present.

        Cheaper than :meth:`with_values` on the hot path: both maps were validated when they were
        built, so nothing is checked again.

        Args:
            other: Features to add or replace.

        Returns:
            A new map, or one of the two when the other is empty; neither is changed.
        """
        # The dicts' own truth values: ``not other`` would call __len__ in Python, twice per
        # candidate and stage.
        if not other._values:
            return self
        if not self._values:
            return other
        return FeatureMap._trusted({**self._values, **other._values})

    def _lookup(self, ref: str) -> FeatureValue | None:
        value = self._values.get(ref)
        if value is None:
            validate_feature_ref(ref)
        return value

    def get_float(self, ref: str, default: float) -> float:
        """The feature as a float (ints are widened), or ``default`` when absent.

        Args:
            ref: A ``view:feature`` reference.
            default: Returned when the feature is absent.

        Returns:
            The value.

        Raises:
            FeatureRefError: ``ref`` is malformed.
            FeatureTypeError: The feature is present but not a number.
        """
        value = self._values.get(ref)
        if type(value) is float:
            return value
        if type(value) is int:
            return float(value)
        if value is None:
            validate_feature_ref(ref)
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FeatureTypeError(ref, "float", value)
        return float(value)

    def get_int(self, ref: str, default: int) -> int:
        """The feature as an int, or ``default`` when absent.

        Args:
            ref: A ``view:feature`` reference.
            default: Returned when the feature is absent.

        Returns:
            The value.

        Raises:
            FeatureRefError: ``ref`` is malformed.
            FeatureTypeError: The feature is present but not an int.
        """
        value = self._values.get(ref)
        if type(value) is int:
            return value
        if value is None:
            validate_feature_ref(ref)
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise FeatureTypeError(ref, "int", value)
        return value

    def get_bool(self, ref: str, default: bool) -> bool:
        """The feature as a bool, or ``default`` when absent.

        Args:
            ref: A ``view:feature`` reference.
            default: Returned when the feature is absent.

        Returns:
            The value.

        Raises:
            FeatureRefError: ``ref`` is malformed.
            FeatureTypeError: The feature is present but not a bool.
        """
        value = self._lookup(ref)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise FeatureTypeError(ref, "bool", value)
        return value

    def get_str(self, ref: str, default: str) -> str:
        """The feature as a string, or ``default`` when absent.

        Args:
            ref: A ``view:feature`` reference.
            default: Returned when the feature is absent.

        Returns:
            The value.

        Raises:
            FeatureRefError: ``ref`` is malformed.
            FeatureTypeError: The feature is present but not a string.
        """
        value = self._values.get(ref)
        if type(value) is str:
            return value
        if value is None:
            validate_feature_ref(ref)
            return default
        if not isinstance(value, str):
            raise FeatureTypeError(ref, "str", value)
        return value

    def get_vector(self, ref: str, default: tuple[float, ...]) -> tuple[float, ...]:
        """The feature as a tuple of floats (an embedding), or ``default`` when absent.

        Args:
            ref: A ``view:feature`` reference.
            default: Returned when the feature is absent.

        Returns:
            The value.

        Raises:
            FeatureRefError: ``ref`` is malformed.
            FeatureTypeError: The feature is present but not a sequence of numbers.
        """
        value = self._lookup(ref)
        if value is None:
            return default
        # Normalisation made every tuple homogeneous, so the first element tells its type.
        if not isinstance(value, tuple) or (value and not isinstance(value[0], float)):
            raise FeatureTypeError(ref, "tuple[float, ...]", value)
        return cast(tuple[float, ...], value)

    def get_strings(self, ref: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """The feature as a tuple of strings (tags, ids), or ``default`` when absent.

        Args:
            ref: A ``view:feature`` reference.
            default: Returned when the feature is absent.

        Returns:
            The value.

        Raises:
            FeatureRefError: ``ref`` is malformed.
            FeatureTypeError: The feature is present but not a sequence of strings.
        """
        value = self._lookup(ref)
        if value is None:
            return default
        if not isinstance(value, tuple) or (value and not isinstance(value[0], str)):
            raise FeatureTypeError(ref, "tuple[str, ...]", value)
        return cast(tuple[str, ...], value)


EMPTY_FEATURES: Final = FeatureMap()
"""The shared empty map (maps are immutable, so one instance serves every default)."""


def monotonic_deadline(budget_ms: float) -> float:
    """The ``time.monotonic()`` instant ``budget_ms`` from now, for ``RequestContext.deadline``.

    Args:
        budget_ms: Time the request may still take, in milliseconds.

    Returns:
        An absolute deadline on the monotonic clock, in seconds.
    """
    return time.monotonic() + budget_ms / 1000.0


def _empty_params() -> Mapping[str, ParamValue]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestContext:
    """Everything known about one recommendation request, fixed before any stage runs.

    Built once by the ingress and shared read-only by every stage, so no stage can change what
    another sees.

    Attributes:
        request_id: Id of this request; joins the served list to later events.
        user_id: The user asking.
        surface: Surface name (``home``, ``similar``, ...); selects the pipeline.
        limit: How many items to return (at least 1).
        now: Wall-clock time of the request, timezone-aware; stages use it instead of reading
            the clock so one request sees one instant.
        deadline: Absolute ``time.monotonic()`` instant by which the answer is due.
        device: Device class of the client, when known.
        region: Region of the user or request, when known.
        language: Preferred language (BCP 47), when known.
        item_id: Seed item of item-to-item surfaces (``similar``).
        experiment_id: Experiment the request was assigned in, if any.
        arm: Arm of ``experiment_id`` the request was assigned to.
        user_features: The user's features, read once per request.
        exclude_seen: Whether items the user already consumed are filtered out.
        personalization: False when the user opted out; only non-personalised sources may run.
        params: Per-request overrides (experiment parameters); read-only.
    """

    request_id: str
    user_id: str
    surface: str
    limit: int
    now: datetime
    deadline: float
    device: str | None = None
    region: str | None = None
    language: str | None = None
    item_id: str | None = None
    experiment_id: str | None = None
    arm: str | None = None
    user_features: FeatureMap = EMPTY_FEATURES
    exclude_seen: bool = True
    personalization: bool = True
    params: Mapping[str, ParamValue] = field(default_factory=_empty_params)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if self.now.tzinfo is None or self.now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        # A copy behind a read-only proxy: the caller's dict may change after the context is built.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def remaining_ms(self, clock: Callable[[], float] = time.monotonic) -> float:
        """Milliseconds left before ``deadline``; never negative.

        Args:
            clock: The monotonic clock the deadline was taken on.

        Returns:
            The time left, 0.0 once the deadline has passed.
        """
        return max(0.0, (self.deadline - clock()) * 1000.0)


@dataclass(slots=True)
class Candidate:
    """One item on its way through a pipeline.

    Mutable on purpose: hydrators attach features and scorers set ``score`` without copying the
    list at every stage.

    Attributes:
        item_id: The item.
        sources: Every candidate source that produced it, in the order they were merged.
        retrieval_score: The best score any source gave it; comparable only roughly across
            sources, used for the retrieval order when no ranker score exists.
        score: The latest ranking score (pre-score, then model score).
        features: Item and user-item features attached by hydrators.
        reason: Why it is recommended, shown to the user (``"Because you watched X"``).
        propensity: Probability the serving policy had of showing it at its position.
    """

    item_id: str
    sources: list[str] = field(default_factory=list)
    retrieval_score: float = 0.0
    score: float = 0.0
    features: FeatureMap = EMPTY_FEATURES
    reason: str | None = None
    propensity: float = 1.0

    def merge(self, other: Candidate) -> None:
        """Fold another retrieval of the same item into this one, in place.

        Sources are unioned (order of first appearance kept), the higher retrieval score is
        kept, features are unioned with this candidate's values winning, and this candidate's
        reason is kept unless it has none.

        Args:
            other: A candidate with the same ``item_id``.

        Raises:
            ValueError: ``other`` is another item.
        """
        if other.item_id != self.item_id:
            raise ValueError(f"cannot merge candidate {other.item_id!r} into {self.item_id!r}")
        for source in other.sources:
            if source not in self.sources:
                self.sources.append(source)
        self.retrieval_score = max(self.retrieval_score, other.retrieval_score)
        if other.features:
            self.features = FeatureMap._trusted({**other.features._values, **self.features._values})
        if self.reason is None:
            self.reason = other.reason

    def copy(self) -> Candidate:
        """A copy that shares nothing mutable with this candidate (features are immutable).

        Returns:
            The copy.
        """
        # Slot by slot rather than through __init__: the runner copies every candidate before
        # each scorer, hundreds per request, and this is a third of the cost.
        out = object.__new__(Candidate)
        out.item_id = self.item_id
        out.sources = self.sources.copy()
        out.retrieval_score = self.retrieval_score
        out.score = self.score
        out.features = self.features
        out.reason = self.reason
        out.propensity = self.propensity
        return out


@dataclass(frozen=True, slots=True)
class FilterResult:
    """What a filter kept and what it removed; together they are exactly its input.

    Attributes:
        kept: Candidates that pass, in input order.
        removed: Candidates taken out, counted in metrics under the filter's name.
    """

    kept: list[Candidate]
    removed: list[Candidate]

    @classmethod
    def partition(cls, cands: Iterable[Candidate], keep: Callable[[Candidate], bool]) -> FilterResult:
        """Split ``cands`` by a predicate, keeping input order on both sides.

        Args:
            cands: The filter's input.
            keep: True for a candidate that passes.

        Returns:
            The split.
        """
        kept: list[Candidate] = []
        removed: list[Candidate] = []
        for cand in cands:
            (kept if keep(cand) else removed).append(cand)
        return cls(kept=kept, removed=removed)
