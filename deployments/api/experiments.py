"""Admin routes of the experiment configuration: list, create, start and stop experiments.

The configuration is one Redis value (:mod:`features.experiment_store`); every change is a
read-modify-write under ``WATCH``, so two admins changing it at once cannot lose each other's
change. Serving replicas re-read it every ``serving.experiments_refresh_s`` (1 s by default).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path
from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError, model_validator

from core.schema import Model
from deployments.api.auth import Admin, services
from deployments.api.errors import ErrorBody
from deployments.api.services import ApiServices
from deployments.recommender.arms import unservable_overrides
from features.experiment_store import ExperimentConflict, aload_experiments, aupdate_experiments
from policies.experiments import (
    BUCKETS,
    ExperimentConfig,
    ExperimentRegistry,
    ExperimentSet,
    Layer,
    Salt,
)
from policies.surfaces import SurfaceConfig, default_surface_configs

Services = Annotated[ApiServices, Depends(services)]
ExperimentIdPath = Annotated[
    str, Path(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$", description="The experiment id.")
]

admin = APIRouter(
    prefix="/api/admin/experiments",
    tags=["experiments"],
    dependencies=[Admin],
    responses={
        404: {"model": ErrorBody, "description": "No experiment has that id."},
        409: {
            "model": ErrorBody,
            "description": "The change conflicts with the configuration: a duplicate id or salt, an "
            "overlapping bucket range, or a parameter another layer's running experiment sets.",
        },
        422: {"model": ErrorBody, "description": "The experiment was refused; `fields` names each field."},
    },
)


class BucketRange(Model):
    """A range of the layer's buckets, ``[start, end)`` out of 10,000."""

    start: Annotated[int, Field(ge=0, lt=BUCKETS)]
    end: Annotated[int, Field(gt=0, le=BUCKETS)]

    @model_validator(mode="after")
    def _ordered(self) -> BucketRange:
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self


class NewExperiment(Model):
    """An experiment to create, stopped until started."""

    experiment: ExperimentConfig
    """The experiment (id, salt, layer, arms with shares and overrides, optional schedule)."""
    layer_salt: Salt | None = None
    """Salt of its layer when the layer does not exist yet (``<layer>-layer`` when omitted)."""
    buckets: BucketRange | None = None
    """The layer buckets it receives; without them it holds none and assigns nobody."""


def _conflict(exc: ValidationError) -> HTTPException:
    detail = "; ".join(str(e["msg"]) for e in exc.errors())
    return HTTPException(409, detail)


async def _update(svc: ApiServices, change: Callable[[ExperimentRegistry], None]) -> ExperimentSet:
    try:
        registry, _ = await aupdate_experiments(svc.store, change)
    except ExperimentConflict as exc:
        raise HTTPException(409, f"the configuration kept changing; retry ({exc})") from None
    return registry.snapshot


def _served_surfaces(svc: ApiServices) -> dict[str, SurfaceConfig]:
    if svc.recommendations is not None:
        return svc.recommendations.surfaces
    return dict(default_surface_configs())


def _view(snapshot: ExperimentSet, now: datetime) -> dict[str, Any]:
    experiments = []
    for e in snapshot.experiments:
        allocation = snapshot.allocation(e.id)
        experiments.append(
            {
                **e.model_dump(mode="json"),
                "active": e.is_active(now) and allocation is not None,
                "buckets": None
                if allocation is None
                else {"start": allocation.start_bucket, "end": allocation.end_bucket},
                "trafficShare": 0.0 if allocation is None else allocation.traffic_share,
            }
        )
    return {
        "version": snapshot.version,
        "layers": [layer.model_dump(mode="json") for layer in snapshot.layers],
        "experiments": experiments,
    }


@admin.get("")
async def list_experiments(svc: Services) -> dict[str, Any]:
    """Every layer and experiment with its status, bucket range and whether it assigns users now."""
    registry = await aload_experiments(svc.store)
    return _view(registry.snapshot, datetime.now(UTC))


@admin.post("", status_code=201)
async def create_experiment(body: NewExperiment, svc: Services) -> dict[str, Any]:
    """Create an experiment (and its layer when new); it assigns nobody until started."""
    config = body.experiment
    problems = unservable_overrides(config, _served_surfaces(svc))
    if problems:
        raise RequestValidationError(
            [
                {"loc": ("body", "experiment", *loc), "msg": msg, "type": "value_error", "input": None}
                for loc, msg in problems
            ]
        )

    def change(registry: ExperimentRegistry) -> None:
        snapshot = registry.snapshot
        if any(e.id == config.id for e in snapshot.experiments):
            raise HTTPException(409, f"an experiment with id {config.id!r} already exists")
        try:
            if config.layer not in {layer.name for layer in snapshot.layers}:
                registry.add_layer(Layer(name=config.layer, salt=body.layer_salt or f"{config.layer}-layer"))
            buckets = None if body.buckets is None else (body.buckets.start, body.buckets.end)
            registry.register(config, buckets=buckets)
        except ValidationError as exc:
            raise _conflict(exc) from None

    return _view(await _update(svc, change), datetime.now(UTC))


async def _transition(svc: ApiServices, experiment_id: str, *, start: bool) -> dict[str, Any]:
    def change(registry: ExperimentRegistry) -> None:
        try:
            if start:
                registry.start(experiment_id)
            else:
                registry.stop(experiment_id)
        except KeyError:
            raise HTTPException(404, f"no experiment {experiment_id!r}") from None
        except ValidationError as exc:
            raise _conflict(exc) from None

    return _view(await _update(svc, change), datetime.now(UTC))


@admin.post("/{experiment_id}/start")
async def start_experiment(experiment_id: ExperimentIdPath, svc: Services) -> dict[str, Any]:
    """Start assigning users to an experiment (replicas apply it within a refresh period)."""
    return await _transition(svc, experiment_id, start=True)


@admin.post("/{experiment_id}/stop")
async def stop_experiment(experiment_id: ExperimentIdPath, svc: Services) -> dict[str, Any]:
    """Stop an experiment: its users get the default behaviour; its bucket range is kept."""
    return await _transition(svc, experiment_id, start=False)
