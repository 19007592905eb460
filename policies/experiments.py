"""Experiment configuration and deterministic user assignment (seed section 15).

Traffic is split in **layers**. Each layer hashes a user, with the layer's salt, into one of
:data:`BUCKETS` buckets and hands ranges of buckets to experiments, so experiments of one layer
never share a user (mutually exclusive) while a user's bucket in one layer says nothing about
their bucket in another (orthogonal: layers with distinct salts hash independently). Inside an
experiment a second hash, with the experiment's own salt, picks the arm, so resizing an
experiment's bucket range never moves a user who stays in it from one arm to another.

Assignment is a pure function of the user id, the salts and the configuration: the same user
always lands in the same arm (sticky) on every replica, with no state to look up. Hashes are
BLAKE2b keyed with the salt; Python's ``hash`` is salted per process and would not be sticky.

The whole configuration is one :class:`ExperimentSet` value, validated as a whole and serialised
to JSON (for a Redis key or a file); :class:`ExperimentRegistry` changes it by replacing it, so
a reader holding a snapshot never sees a half-applied change.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.types import ParamValue

BUCKETS: Final = 10_000
"""Hash buckets per layer: traffic is allocated in steps of 0.01 %."""

SHARE_TOLERANCE: Final = 1e-6
"""How far the arms' traffic shares may sum from 1 (decimal shares such as 0.1 do not add exactly)."""

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")]
"""An experiment, layer, arm, source or task name: 1-64 of ``a-z 0-9 _ -``, as used in metrics and logs."""

Salt = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-.:]{1,64}$")]
"""A hash salt: at most 64 characters, the longest key BLAKE2b takes."""


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Instant = Annotated[datetime, AfterValidator(_aware)]
"""A timestamp; naive values are taken as UTC."""


def bucket(salt: str, user_id: str) -> int:
    """The bucket a user falls in under a salt.

    Args:
        salt: The layer's or experiment's salt (at most 64 bytes as UTF-8).
        user_id: The user.

    Returns:
        An integer in ``[0, BUCKETS)``, the same on every machine and in every process.
    """
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=salt.encode()).digest()
    # 2**64 is so much larger than BUCKETS that the modulo bias (under 1e-15) is irrelevant.
    return int.from_bytes(digest, "big") % BUCKETS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ExperimentStatus(StrEnum):
    """Whether an experiment assigns users."""

    RUNNING = "running"
    """Assigns users while the current time is within ``[start, end)``."""
    STOPPED = "stopped"
    """Assigns nobody; its users get the default behaviour of their layer."""


class ArmOverrides(_Strict):
    """What an arm changes in serving; ``None`` leaves the production default in place."""

    bundle_version: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    """Model bundle (registry version or alias) that scores this arm's requests."""
    exploration_share: Annotated[float, Field(ge=0, lt=1)] | None = None
    """Share of list slots given to exploration items (seed section 14 suggests 0.1); below 1, so
    the ranked items keep a positive propensity."""
    diversity_strength: Annotated[float, Field(ge=0, le=1)] | None = None
    """Weight of the diversity re-ranker: 0 ranks by relevance alone, 1 by diversity alone."""
    sources: tuple[Name, ...] | None = None
    """Candidate sources to run, by stage name; the surface's full set when ``None``."""
    ranker_weights: dict[Name, float] | None = None
    """Weights of the ranker's task heads in the final score, by task (``{"click": 1, "like": 0.5}``)."""

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one source (leave it unset for the default set)")
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:
            raise ValueError(f"repeats {repeated}")
        return value

    @field_validator("ranker_weights")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must weight at least one task (leave it unset for the default weights)")
        bad = sorted(task for task, weight in value.items() if not math.isfinite(weight))
        if bad:
            raise ValueError(f"weights of {bad} are not finite")
        return value

    def overridden(self) -> frozenset[str]:
        """Names of the fields this arm sets."""
        return frozenset(name for name in type(self).model_fields if getattr(self, name) is not None)

    def as_params(self) -> dict[str, ParamValue]:
        """The overrides as flat request parameters (``RequestContext.params``).

        Sources become one comma-separated string and each ranker weight its own
        ``ranker_weight.<task>`` entry, because request parameters hold scalars only.

        Returns:
            One entry per field set; nothing for fields left unset.
        """
        params: dict[str, ParamValue] = {}
        if self.bundle_version is not None:
            params["bundle_version"] = self.bundle_version
        if self.exploration_share is not None:
            params["exploration_share"] = self.exploration_share
        if self.diversity_strength is not None:
            params["diversity_strength"] = self.diversity_strength
        if self.sources is not None:
            params["sources"] = ",".join(self.sources)
        if self.ranker_weights is not None:
            params.update({f"ranker_weight.{task}": w for task, w in sorted(self.ranker_weights.items())})
        return params


class Arm(_Strict):
    """One variant of an experiment."""

    name: Name
    """Arm name as logged in ``impressions.arm`` (``control``, ``treatment``, ...)."""
    share: Annotated[float, Field(gt=0, le=1)]
    """Share of the experiment's users in this arm; the arms' shares sum to 1."""
    overrides: ArmOverrides = Field(default_factory=ArmOverrides)
    """What this arm changes; the control arm usually changes nothing."""


class ExperimentConfig(_Strict):
    """An experiment: its arms, its layer and when it assigns users."""

    id: Name
    """Experiment id as logged in ``impressions.experiment_id``."""
    salt: Salt
    """Salt of the arm hash; a new salt reshuffles users between arms (e.g. for a clean re-run)."""
    layer: Name
    """Layer whose buckets this experiment receives (see :class:`Layer`)."""
    status: ExperimentStatus = ExperimentStatus.STOPPED
    """Whether the experiment assigns users; a new experiment stays stopped until started."""
    start: Instant | None = None
    """First instant users are assigned (inclusive); no lower bound when ``None``."""
    end: Instant | None = None
    """Instant assignment ends (exclusive); no upper bound when ``None``."""
    arms: Annotated[tuple[Arm, ...], Field(min_length=2, max_length=26)]
    """The arms, in bucket order; their shares sum to 1 within :data:`SHARE_TOLERANCE`."""
    control: Name | None = None
    """Name of the control arm, the baseline of every comparison; the first arm when ``None``."""
    description: Annotated[str, StringConstraints(max_length=1_000)] = ""
    """What the experiment tests and what would make it ship."""

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: tuple[Arm, ...]) -> tuple[Arm, ...]:
        names = [arm.name for arm in arms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"arm names must be unique; repeated: {repeated}")
        total = math.fsum(arm.share for arm in arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"arm shares sum to {total:.6g}, not 1 (tolerance {SHARE_TOLERANCE:g})")
        edges = _arm_edges(arms)
        empty = [arm.name for arm, lo, hi in zip(arms, edges[:-1], edges[1:], strict=True) if hi <= lo]
        if empty:
            raise ValueError(f"arms {empty} are too small to receive a bucket (1/{BUCKETS} of traffic)")
        return arms

    @field_validator("control")
    @classmethod
    def _control(cls, value: str | None, info: ValidationInfo) -> str | None:
        arms = info.data.get("arms")
        if value is not None and arms is not None and value not in {arm.name for arm in arms}:
            raise ValueError(f"{value!r} is not one of the arms")
        return value

    @field_validator("end")
    @classmethod
    def _after_start(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("start")
        if value is not None and start is not None and value <= start:
            raise ValueError("must be after start")
        return value

    @property
    def control_arm(self) -> Arm:
        """The arm every other arm is compared with."""
        name = self.control if self.control is not None else self.arms[0].name
        return next(arm for arm in self.arms if arm.name == name)

    @property
    def shares(self) -> dict[str, float]:
        """Configured traffic share of each arm, by name."""
        return {arm.name: arm.share for arm in self.arms}

    def overridden(self) -> frozenset[str]:
        """Names of the override fields any arm sets."""
        return frozenset().union(*(arm.overrides.overridden() for arm in self.arms))

    def is_active(self, now: datetime) -> bool:
        """Whether the experiment assigns users at ``now``.

        Args:
            now: The instant of the request (timezone-aware).

        Returns:
            True when running and ``start <= now < end`` (open bounds when unset).
        """
        if self.status is not ExperimentStatus.RUNNING:
            return False
        now = _aware(now)
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)

    def arm_for(self, arm_bucket: int) -> Arm:
        """The arm owning a bucket of the experiment's arm hash.

        Args:
            arm_bucket: ``bucket(self.salt, user_id)``.

        Returns:
            The arm whose share covers that bucket.
        """
        edges = _arm_edges(self.arms)
        for arm, hi in zip(self.arms, edges[1:], strict=True):
            if arm_bucket < hi:
                return arm
        raise ValueError(f"bucket {arm_bucket} is outside [0, {BUCKETS})")


def _arm_edges(arms: Sequence[Arm]) -> list[int]:
    """Bucket boundaries of the arms: arm ``k`` owns ``[edges[k], edges[k + 1])``."""
    edges = [0]
    running = 0.0
    for arm in arms[:-1]:
        running += arm.share
        edges.append(min(BUCKETS, round(running * BUCKETS)))
    # The last arm ends at BUCKETS whatever rounding did, so every bucket has an owner.
    edges.append(BUCKETS)
    return edges


class Allocation(_Strict):
    """A range of a layer's buckets given to one experiment."""

    experiment_id: Name
    """The experiment receiving the buckets."""
    start_bucket: Annotated[int, Field(ge=0, lt=BUCKETS)]
    """First bucket of the range (inclusive)."""
    end_bucket: Annotated[int, Field(gt=0, le=BUCKETS)]
    """End of the range (exclusive); the experiment gets ``(end - start) / BUCKETS`` of the traffic."""

    @model_validator(mode="after")
    def _ordered(self) -> Allocation:
        if self.end_bucket <= self.start_bucket:
            raise ValueError("end_bucket: must be greater than start_bucket")
        return self

    @property
    def traffic_share(self) -> float:
        """Share of all users this range holds."""
        return (self.end_bucket - self.start_bucket) / BUCKETS

    def holds(self, layer_bucket: int) -> bool:
        """Whether a layer bucket falls in this range."""
        return self.start_bucket <= layer_bucket < self.end_bucket


class Layer(_Strict):
    """A slice of the parameter space whose experiments split users between them."""

    name: Name
    """Layer name (``ranking``, ``retrieval``, ``ui``)."""
    salt: Salt
    """Salt of the layer hash; distinct from every other salt, which is what makes layers orthogonal."""
    allocations: tuple[Allocation, ...] = ()
    """Bucket ranges given to experiments; ranges never overlap, buckets left over get no experiment."""

    @field_validator("allocations")
    @classmethod
    def _disjoint(cls, allocations: tuple[Allocation, ...]) -> tuple[Allocation, ...]:
        ids = [a.experiment_id for a in allocations]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"experiments {repeated} hold more than one range")
        ordered = sorted(allocations, key=lambda a: a.start_bucket)
        for left, right in itertools.pairwise(ordered):
            if right.start_bucket < left.end_bucket:
                raise ValueError(
                    f"ranges of {left.experiment_id!r} [{left.start_bucket}, {left.end_bucket}) and "
                    f"{right.experiment_id!r} [{right.start_bucket}, {right.end_bucket}) overlap"
                )
        return allocations

    def allocation_of(self, layer_bucket: int) -> Allocation | None:
        """The range a layer bucket falls in, if any experiment holds it."""
        return next((a for a in self.allocations if a.holds(layer_bucket)), None)

    def free_buckets(self) -> int:
        """Buckets no experiment holds."""
        return BUCKETS - sum(a.end_bucket - a.start_bucket for a in self.allocations)


class Assignment(_Strict):
    """Where one user landed in one experiment."""

    experiment_id: Name
    """The experiment."""
    layer: Name
    """The experiment's layer."""
    arm: Name
    """The arm the user is in."""
    overrides: ArmOverrides
    """What that arm changes in serving."""


class ExperimentSet(_Strict):
    """Every layer and experiment, validated together; the value stored in Redis or a file."""

    version: Annotated[int, Field(ge=0)] = 0
    """Incremented by every change, so replicas can tell a newer configuration from theirs."""
    layers: tuple[Layer, ...] = ()
    """The layers, in the order assignments are listed."""
    experiments: tuple[ExperimentConfig, ...] = ()
    """Every experiment, running or not."""

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSet:
        layer_names = [layer.name for layer in self.layers]
        repeated = sorted({n for n in layer_names if layer_names.count(n) > 1})
        if repeated:
            raise ValueError(f"layers: names {repeated} are used twice")
        ids = [e.id for e in self.experiments]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"experiments: ids {repeated} are used twice")
        salts = [layer.salt for layer in self.layers] + [e.salt for e in self.experiments]
        repeated = sorted({s for s in salts if salts.count(s) > 1})
        if repeated:
            # Two hashes with one salt are the same hash: the split of one would decide the other.
            raise ValueError(f"salt: {repeated} are used by more than one layer or experiment")
        by_id = {e.id: e for e in self.experiments}
        for e in self.experiments:
            if e.layer not in layer_names:
                raise ValueError(f"layer: experiment {e.id!r} names unknown layer {e.layer!r}")
        for layer in self.layers:
            for allocation in layer.allocations:
                owner = by_id.get(allocation.experiment_id)
                if owner is None:
                    raise ValueError(
                        f"allocations: layer {layer.name!r} gives buckets to unknown experiment "
                        f"{allocation.experiment_id!r}"
                    )
                if owner.layer != layer.name:
                    raise ValueError(
                        f"allocations: layer {layer.name!r} gives buckets to {owner.id!r}, "
                        f"which belongs to layer {owner.layer!r}"
                    )
        self._check_parameter_ownership()
        return self

    def _check_parameter_ownership(self) -> None:
        # Orthogonal layers may both apply to one request; each parameter must then have one owner.
        owner: dict[str, str] = {}
        for e in self.experiments:
            if e.status is not ExperimentStatus.RUNNING:
                continue
            for field_name in sorted(e.overridden()):
                previous = owner.setdefault(field_name, e.layer)
                if previous != e.layer:
                    raise ValueError(
                        f"overrides: {field_name!r} is set by running experiments of layers "
                        f"{previous!r} and {e.layer!r}; a parameter belongs to one layer"
                    )

    @cached_property
    def _by_id(self) -> dict[str, ExperimentConfig]:
        # Built once per (immutable) set: assignment runs on every request.
        return {e.id: e for e in self.experiments}

    def experiment(self, experiment_id: str) -> ExperimentConfig:
        """An experiment by id.

        Raises:
            KeyError: No experiment has that id.
        """
        try:
            return self._by_id[experiment_id]
        except KeyError:
            raise KeyError(f"no experiment {experiment_id!r}") from None

    def layer(self, name: str) -> Layer:
        """A layer by name.

        Raises:
            KeyError: No layer has that name.
        """
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}")

    def allocation(self, experiment_id: str) -> Allocation | None:
        """The bucket range of an experiment, or ``None`` when it holds none."""
        e = self.experiment(experiment_id)
        return next((a for a in self.layer(e.layer).allocations if a.experiment_id == experiment_id), None)


def assign(user_id: str, experiments: ExperimentSet, *, now: datetime | None = None) -> list[Assignment]:
    """The arms a user is in, at most one per layer.

    Args:
        user_id: The user.
        experiments: The configuration.
        now: Instant of the request; the current time when omitted.

    Returns:
        One assignment per layer whose bucket for this user is held by an active experiment, in
        layer order. Empty when no experiment applies.
    """
    at = datetime.now(UTC) if now is None else _aware(now)
    out: list[Assignment] = []
    for layer in experiments.layers:
        allocation = layer.allocation_of(bucket(layer.salt, user_id))
        if allocation is None:
            continue
        experiment = experiments.experiment(allocation.experiment_id)
        if not experiment.is_active(at):
            continue
        arm = experiment.arm_for(bucket(experiment.salt, user_id))
        out.append(
            Assignment(experiment_id=experiment.id, layer=layer.name, arm=arm.name, overrides=arm.overrides)
        )
    return out


def merge_overrides(assignments: Iterable[Assignment]) -> ArmOverrides:
    """The overrides of several assignments as one.

    Args:
        assignments: A user's assignments (see :func:`assign`).

    Returns:
        Every field set by some assignment.

    Raises:
        ValueError: Two assignments set the same field; :class:`ExperimentSet` refuses such
            configurations, so this only happens with hand-built assignments.
    """
    merged: dict[str, object] = {}
    for a in assignments:
        for field_name in a.overrides.overridden():
            if field_name in merged:
                raise ValueError(f"{field_name!r} is set by more than one experiment")
            merged[field_name] = getattr(a.overrides, field_name)
    return ArmOverrides.model_validate(merged)


class ExperimentRegistry:
    """The current :class:`ExperimentSet` and the operations that change it.

    Every change validates a whole new set and then swaps it in, so :attr:`snapshot` is always a
    consistent configuration and a failed change leaves the registry as it was.

    Example:
        >>> registry = ExperimentRegistry()
        >>> registry.add_layer(Layer(name="ranking", salt="ranking-2026"))
        >>> registry.register(
        ...     ExperimentConfig(
        ...         id="ranker_v7",
        ...         salt="ranker-v7",
        ...         layer="ranking",
        ...         arms=(
        ...             Arm(name="control", share=0.5),
        ...             Arm(name="treatment", share=0.5, overrides=ArmOverrides(bundle_version="v7")),
        ...         ),
        ...     ),
        ...     buckets=(0, BUCKETS // 10),
        ... )
        >>> _ = registry.start("ranker_v7")
        >>> [a.arm for a in registry.assign("u42")]  # [] or ['control'] or ['treatment']
    """

    def __init__(self, snapshot: ExperimentSet | None = None) -> None:
        """Hold a configuration.

        Args:
            snapshot: The starting configuration; empty when omitted.
        """
        self._snapshot = snapshot if snapshot is not None else ExperimentSet()

    @property
    def snapshot(self) -> ExperimentSet:
        """The current configuration."""
        return self._snapshot

    def get(self, experiment_id: str) -> ExperimentConfig:
        """An experiment by id.

        Raises:
            KeyError: No experiment has that id.
        """
        return self._snapshot.experiment(experiment_id)

    def assign(self, user_id: str, *, now: datetime | None = None) -> list[Assignment]:
        """:func:`assign` against the current configuration."""
        return assign(user_id, self._snapshot, now=now)

    def add_layer(self, layer: Layer) -> None:
        """Add a layer.

        Raises:
            pydantic.ValidationError: The name or salt is taken.
        """
        current = self._snapshot
        self._replace(layers=(*current.layers, layer))

    def register(self, config: ExperimentConfig, *, buckets: tuple[int, int] | None = None) -> None:
        """Add an experiment, optionally giving it a bucket range of its layer.

        Args:
            config: The experiment; usually stopped, so nothing changes until :meth:`start`.
            buckets: ``(start_bucket, end_bucket)`` of its layer to hold.

        Raises:
            pydantic.ValidationError: The id or salt is taken, the layer is unknown, the range
                overlaps another experiment's, or a running experiment of another layer already
                sets one of its override fields.
        """
        current = self._snapshot
        layers = current.layers
        if buckets is not None:
            layers = self._with_allocation(
                layers,
                config.layer,
                Allocation(experiment_id=config.id, start_bucket=buckets[0], end_bucket=buckets[1]),
            )
        self._replace(layers=layers, experiments=(*current.experiments, config))

    def allocate(self, experiment_id: str, start_bucket: int, end_bucket: int) -> None:
        """Give an experiment a bucket range of its layer, replacing the range it had.

        Users who stay inside the experiment keep their arm, since arms come from the experiment's
        own hash; users moved in or out change experiment.

        Raises:
            KeyError: No such experiment.
            pydantic.ValidationError: The range overlaps another experiment's.
        """
        config = self.get(experiment_id)
        allocation = Allocation(experiment_id=experiment_id, start_bucket=start_bucket, end_bucket=end_bucket)
        self._replace(layers=self._with_allocation(self._snapshot.layers, config.layer, allocation))

    def release(self, experiment_id: str) -> None:
        """Take an experiment's buckets back so another experiment can use them.

        Raises:
            KeyError: No such experiment.
        """
        config = self.get(experiment_id)
        self._replace(layers=self._with_allocation(self._snapshot.layers, config.layer, None, experiment_id))

    def start(self, experiment_id: str, *, now: datetime | None = None) -> ExperimentConfig:
        """Start assigning users to an experiment.

        Args:
            experiment_id: The experiment.
            now: Start instant recorded when the config has none; the current time when omitted.

        Returns:
            The updated config.

        Raises:
            KeyError: No such experiment.
            pydantic.ValidationError: Running it would make two layers set the same parameter.
        """
        config = self.get(experiment_id)
        at = datetime.now(UTC) if now is None else _aware(now)
        updated = _updated(
            config,
            status=ExperimentStatus.RUNNING,
            start=config.start if config.start is not None else at,
            # A restart after a stop reopens the schedule the stop closed.
            end=config.end if config.end is not None and config.end > at else None,
        )
        return self._put(updated)

    def stop(self, experiment_id: str, *, now: datetime | None = None) -> ExperimentConfig:
        """Stop an experiment: from now on it assigns nobody.

        Its bucket range is kept, so a restart brings back the same users; :meth:`release` frees it.

        Args:
            experiment_id: The experiment.
            now: Stop instant recorded as ``end``; the current time when omitted.

        Returns:
            The updated config.

        Raises:
            KeyError: No such experiment.
        """
        config = self.get(experiment_id)
        at = datetime.now(UTC) if now is None else _aware(now)
        end = config.end
        if config.start is None or config.start < at:
            end = at if end is None else min(end, at)
        updated = _updated(config, status=ExperimentStatus.STOPPED, end=end)
        return self._put(updated)

    def to_json(self) -> str:
        """The configuration as JSON (a Redis value or a file's content)."""
        return self._snapshot.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> ExperimentRegistry:
        """A registry holding a configuration read from JSON.

        Raises:
            pydantic.ValidationError: The JSON is not a valid :class:`ExperimentSet`.
        """
        return cls(ExperimentSet.model_validate_json(text))

    def save(self, path: str | Path) -> Path:
        """Write the configuration to a local file, replacing it in one step."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(self.to_json())
        temporary.replace(target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> ExperimentRegistry:
        """Read a configuration written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())

    # -- internals --------------------------------------------------------------------------

    def _put(self, config: ExperimentConfig) -> ExperimentConfig:
        experiments = tuple(config if e.id == config.id else e for e in self._snapshot.experiments)
        self._replace(experiments=experiments)
        return config

    @staticmethod
    def _with_allocation(
        layers: tuple[Layer, ...],
        layer_name: str,
        allocation: Allocation | None,
        experiment_id: str | None = None,
    ) -> tuple[Layer, ...]:
        drop = allocation.experiment_id if allocation is not None else experiment_id
        if layer_name not in {layer.name for layer in layers}:
            raise KeyError(f"no layer {layer_name!r}")
        out = []
        for layer in layers:
            if layer.name == layer_name:
                kept = tuple(a for a in layer.allocations if a.experiment_id != drop)
                added = (allocation,) if allocation is not None else ()
                layer = Layer(name=layer.name, salt=layer.salt, allocations=(*kept, *added))
            out.append(layer)
        return tuple(out)

    def _replace(
        self,
        *,
        layers: tuple[Layer, ...] | None = None,
        experiments: tuple[ExperimentConfig, ...] | None = None,
    ) -> None:
        current = self._snapshot
        self._snapshot = ExperimentSet(
            version=current.version + 1,
            layers=current.layers if layers is None else layers,
            experiments=current.experiments if experiments is None else experiments,
        )


def _updated(config: ExperimentConfig, **changes: object) -> ExperimentConfig:
    """A copy of a config with some fields changed, validated again (``model_copy`` would not)."""
    return ExperimentConfig.model_validate({**config.model_dump(), **changes})
