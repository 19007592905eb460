"""How an experiment arm's overrides become the surface a request runs.

An arm changes serving only through values a surface already has: its source set, the exploration
share, the MMR trade-off and the ranker's head weights. :func:`arm_surface` applies an arm's
:class:`~policies.experiments.ArmOverrides` to a :class:`~policies.surfaces.SurfaceConfig` and
returns the variant, which is built into a pipeline like any surface (and cached per arm by the
service), so the stages themselves never look at experiments.

``bundle_version`` is not served: the ranker and retrieval deployments serve one bundle each, so
an arm cannot pick another one per request. :func:`unservable_overrides` refuses it when an
experiment is created, together with sources and ranker tasks no surface knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from policies.experiments import ArmOverrides, ExperimentConfig
from policies.surfaces import RankerWeights, SurfaceConfig

RANKER_TASKS = frozenset(RankerWeights.model_fields)
"""The ranker heads an arm may weight."""


@dataclass(frozen=True, slots=True)
class ArmSurface:
    """A surface as an arm serves it.

    Attributes:
        config: The surface with the arm's overrides applied.
        applied: Each override applied, by field, as a readable value.
        ignored: Each override left out on this surface, by field, with why.
    """

    config: SurfaceConfig
    applied: dict[str, str]
    ignored: dict[str, str]


def arm_surface(config: SurfaceConfig, overrides: ArmOverrides) -> ArmSurface:
    """The surface ``config`` with an arm's overrides applied.

    Sources the surface does not have are ignored; when the arm names none of the surface's
    sources, the surface keeps its whole set, since a surface cannot run without sources.
    Ranker weights replace the surface's weights of the tasks they name and keep the others.
    ``diversity_strength`` ``s`` becomes the MMR trade-off ``1 - s`` (1 ranks by relevance alone).

    Args:
        config: The surface.
        overrides: The merged overrides of a request's arms.

    Returns:
        The variant and what was applied or ignored.

    Raises:
        pydantic.ValidationError: The variant is not a valid surface (an unknown ranker task, or
            weights that are all zero); :func:`unservable_overrides` refuses those up front.
    """
    applied: dict[str, str] = {}
    ignored: dict[str, str] = {}
    update: dict[str, object] = {}
    params: dict[str, object] = {}
    if overrides.sources is not None:
        wanted = set(overrides.sources)
        kept = tuple(s for s in config.sources if s.name in wanted)
        if kept:
            update["sources"] = kept
            applied["sources"] = ",".join(s.name for s in kept)
        else:
            ignored["sources"] = f"none of {sorted(wanted)} is a source of surface {config.name!r}"
    if overrides.exploration_share is not None:
        params["exploration_share"] = overrides.exploration_share
        applied["exploration_share"] = str(overrides.exploration_share)
    if overrides.diversity_strength is not None:
        params["diversity_lambda"] = 1.0 - overrides.diversity_strength
        applied["diversity_strength"] = str(overrides.diversity_strength)
    if overrides.ranker_weights is not None:
        weights = {**config.ranker_weights.model_dump(), **overrides.ranker_weights}
        update["ranker_weights"] = RankerWeights.model_validate(weights)
        applied["ranker_weights"] = ",".join(f"{t}={w}" for t, w in sorted(overrides.ranker_weights.items()))
    if overrides.bundle_version is not None:
        ignored["bundle_version"] = "a replica serves one bundle; per-arm bundles are not served"
    if params:
        update["policy_params"] = config.policy_params.model_validate(
            {**config.policy_params.model_dump(), **params}
        )
    if not update:
        return ArmSurface(config, applied, ignored)
    variant = SurfaceConfig.model_validate({**config.model_dump(), **update})
    return ArmSurface(variant, applied, ignored)


def unservable_overrides(
    experiment: ExperimentConfig, surfaces: Mapping[str, SurfaceConfig]
) -> list[tuple[tuple[str | int, ...], str]]:
    """The overrides of an experiment that serving cannot apply.

    Args:
        experiment: The experiment to create.
        surfaces: The surfaces served.

    Returns:
        ``(location, message)`` per refused field, the location relative to the experiment
        (``("arms", 1, "overrides", "sources")``); empty when every override can be served.
    """
    known_sources = _source_names(surfaces.values())
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for n, arm in enumerate(experiment.arms):
        where: tuple[str | int, ...] = ("arms", n, "overrides")
        o = arm.overrides
        if o.bundle_version is not None:
            problems.append(
                (
                    (*where, "bundle_version"),
                    "per-arm model bundles are not served (each model deployment serves one bundle); "
                    "compare bundles by promoting one at a time",
                )
            )
        if o.sources is not None:
            unknown = sorted(set(o.sources) - known_sources)
            if unknown:
                problems.append(
                    ((*where, "sources"), f"unknown sources {unknown}; known: {sorted(known_sources)}")
                )
        if o.ranker_weights is not None:
            unknown = sorted(set(o.ranker_weights) - RANKER_TASKS)
            if unknown:
                problems.append(
                    ((*where, "ranker_weights"), f"unknown tasks {unknown}; known: {sorted(RANKER_TASKS)}")
                )
            elif any(w < 0 for w in o.ranker_weights.values()):
                problems.append(((*where, "ranker_weights"), "weights must not be negative"))
            else:
                for config in surfaces.values():
                    try:
                        arm_surface(config, ArmOverrides(ranker_weights=o.ranker_weights))
                    except ValidationError as exc:
                        detail = exc.errors()[0]["msg"]
                        problems.append(((*where, "ranker_weights"), f"on surface {config.name!r}: {detail}"))
                        break
    return problems


def _source_names(surfaces: Iterable[SurfaceConfig]) -> frozenset[str]:
    return frozenset(s.name for config in surfaces for s in config.sources)
