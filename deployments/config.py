"""Typed models of what ``ray_config.yaml`` may set, and the check that the file and the code agree.

Ray's own schema (``ServeDeploySchema``) accepts unknown keys silently, so a misspelt
``autoscaling_confg`` would deploy with the code's defaults and nobody would notice. The models
here forbid unknown keys and document every option an operator may turn; the validator then
checks the file against the deployment graph that ``build_app`` really binds.

How Serve applies the file (Ray 2.60, ``override_deployment_info``), which the checks mirror:

- each option given for a deployment replaces the code's value as a whole: a
  ``ray_actor_options`` block without ``num_cpus`` gives the replica 1 CPU, not the code's value;
  an ``autoscaling_config`` block takes Ray's defaults for every field it leaves out;
- an option left out keeps the value in the ``@serve.deployment`` decorator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray.serve import Application
from ray.serve.deployment import Deployment, deployment_to_schema
from ray.serve.schema import ServeDeploySchema

from deployments.bundle_slot import ModelUserConfig
from deployments.ingress import Ingress
from deployments.ranker import Ranker
from deployments.reload import MODEL_DEPLOYMENTS
from deployments.retrieval import Retrieval
from deployments.stream_workers import StreamWorkers
from features.partitions import PARTITIONS

IMPORT_PATH = "deployments.app:build_app"
"""The ``import_path`` of every application this project deploys."""

NODE_CPUS = 2.0
"""CPUs of the smallest node the default config must fit on (the development machine)."""

_METRICS_INTERVAL_S = 10.0
"""Serve's (deprecated, still checked) ``metrics_interval_s`` default."""

_SECRET_VARIABLES = frozenset({"RAYREC_ADMIN_TOKEN", "RAYREC_CLIENT_API_KEYS", "RAY_AUTH_TOKEN"})
"""Variables that must never be written into a Serve config."""

_SERVE_DEFAULT_NUM_CPUS = 1.0
"""What Serve reserves per replica when ``ray_actor_options`` carries no ``num_cpus``."""


class ServeConfigError(ValueError):
    """The Serve config does not parse or does not agree with the code.

    Attributes:
        problems: One line per problem, each naming the application and deployment.
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


class RuntimeEnvOptions(BaseModel):
    """The part of a Ray ``runtime_env`` this project uses in its Serve config.

    Code reaches the replicas with the installed package (the cluster image or ``pip install``),
    never through ``working_dir``, so only environment variables may be set here.
    """

    model_config = ConfigDict(extra="forbid")

    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment of every process of the application; non-secret ``RAYREC_*`` settings go here.

    Secrets are refused: a Serve config is committed and shown by ``serve status``, so tokens
    and passwords come from the nodes' own environment (SSM, a Kubernetes Secret)."""

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, env_vars: dict[str, str]) -> dict[str, str]:
        for name, value in env_vars.items():
            if name in _SECRET_VARIABLES:
                raise ValueError(f"{name} is a secret: set it in the nodes' environment, not here")
            if name == "RAYREC_REDIS_URL" and urlsplit(value).password:
                raise ValueError("RAYREC_REDIS_URL carries a password: set it in the nodes' environment")
        return env_vars


class ActorOptions(BaseModel):
    """Resources of each replica actor (Serve's ``ray_actor_options``)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: Annotated[float, Field(ge=0)]
    """Logical CPUs reserved per replica; fractions pack several replicas on one core.

    Required: Serve replaces the code's ``ray_actor_options`` as a whole, so leaving it out would
    silently reserve 1 CPU per replica."""
    num_gpus: Annotated[float, Field(ge=0)] | None = None
    """GPUs per replica; the clusters defined in ``cluster/configs`` have none."""
    memory: Annotated[int, Field(ge=0)] | None = None
    """Heap memory reserved per replica, in bytes (a scheduling hint, not a limit)."""
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    """Custom resources per replica, e.g. ``{"node_worker_1": 0.01}`` to pin replicas to a node."""
    runtime_env: RuntimeEnvOptions | None = None
    """Per-deployment environment, merged over the application's."""


class AutoscalingOptions(BaseModel):
    """How Serve scales one deployment's replicas (Serve's ``autoscaling_config``).

    Defaults are Ray's own, because a block in the config replaces the code's autoscaling
    config as a whole and Ray fills every missing field with these values.
    """

    model_config = ConfigDict(extra="forbid")

    min_replicas: Annotated[int, Field(ge=0)] = 1
    """Replicas kept when idle; 0 allows scale to zero (cold starts on the next request)."""
    initial_replicas: Annotated[int, Field(ge=0)] | None = None
    """Replicas started on deploy; ``min_replicas`` when unset."""
    max_replicas: Annotated[int, Field(ge=1)] = 1
    """Upper bound; the cluster must have room for this many replicas or they stay pending."""
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 2.0
    """Requests running or queued per replica that the autoscaler steers towards."""
    upscale_delay_s: Annotated[float, Field(ge=0)] = 30.0
    """How long demand must stay above target before replicas are added."""
    downscale_delay_s: Annotated[float, Field(ge=0)] = 600.0
    """How long demand must stay below target before replicas are removed."""
    look_back_period_s: Annotated[float, Field(gt=_METRICS_INTERVAL_S)] = 30.0
    """Window over which ongoing requests are averaged; longer than Serve's 10 s metrics
    interval, which Ray 2.60 warns about and announces it will refuse."""
    upscaling_factor: Annotated[float, Field(gt=0)] | None = None
    """Multiplier damping (<1) or amplifying (>1) each upscaling decision."""
    downscaling_factor: Annotated[float, Field(gt=0)] | None = None
    """Multiplier damping (<1) or amplifying (>1) each downscaling decision."""

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def start_replicas(self) -> int:
        """Replicas running right after a deploy."""
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas


class DeploymentOptions(BaseModel):
    """One entry of an application's ``deployments:`` list.

    Every field but ``name`` is optional: unset keeps the value in the code's decorator.
    """

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    """The deployment's name in the graph (``DEPLOYMENTS`` lists them)."""
    num_replicas: Annotated[int, Field(ge=1)] | None = None
    """Fixed replica count; mutually exclusive with ``autoscaling_config``."""
    max_ongoing_requests: Annotated[int, Field(ge=1)] | None = None
    """Requests in flight per replica before callers queue."""
    max_queued_requests: Annotated[int, Field(ge=-1)] | None = None
    """Requests queued per caller before it answers 503; -1 is unbounded."""
    ray_actor_options: ActorOptions | None = None
    """Resources per replica; see :class:`ActorOptions`."""
    autoscaling_config: AutoscalingOptions | None = None
    """Replica autoscaling; see :class:`AutoscalingOptions`."""
    user_config: dict[str, Any] | None = None
    """Live settings passed to the replica's ``reconfigure`` without a restart; checked against
    the deployment's own model (``DeploymentSpec.user_config_model``)."""
    health_check_period_s: Annotated[float, Field(gt=0)] | None = None
    """Seconds between health checks of each replica."""
    health_check_timeout_s: Annotated[float, Field(gt=0)] | None = None
    """Seconds a health check may take before the replica is replaced."""
    graceful_shutdown_timeout_s: Annotated[float, Field(ge=0)] | None = None
    """Seconds a stopping replica may spend draining in-flight requests."""
    max_replicas_per_node: Annotated[int, Field(ge=1)] | None = None
    """Spreads replicas: at most this many of this deployment on one node."""

    @model_validator(mode="after")
    def _check_replicas(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("num_replicas and autoscaling_config are mutually exclusive")
        return self

    def given(self) -> dict[str, Any]:
        """The options written in the file, as Serve receives them."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class ApplicationOptions(BaseModel):
    """One entry of ``applications:`` (the keys this project uses; Ray validates their values)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    """Application name, as in ``serve status``."""
    route_prefix: str | None = "/"
    """HTTP path prefix of the ingress."""
    import_path: str
    """Always :data:`IMPORT_PATH`."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Arguments of ``build_app``, validated as ``deployments.app.AppArgs``."""
    runtime_env: RuntimeEnvOptions = Field(default_factory=RuntimeEnvOptions)
    """Environment of every process of the application."""
    deployments: list[DeploymentOptions] = Field(default_factory=list)
    """Per-deployment overrides of the code's options."""
    logging_config: dict[str, Any] | None = None
    """Serve's logging options (format, level, access log); validated by Ray."""


class ServeConfigFile(BaseModel):
    """The whole file; the top-level blocks besides ``applications`` are validated by Ray."""

    model_config = ConfigDict(extra="forbid")

    proxy_location: str = "EveryNode"
    """Where HTTP proxies run: ``EveryNode``, ``HeadOnly`` or ``Disabled``."""
    http_options: dict[str, Any] = Field(default_factory=dict)
    """Host and port of the proxies (Ray's ``HTTPOptionsSchema``)."""
    grpc_options: dict[str, Any] | None = None
    """gRPC proxy options; unused by this project."""
    logging_config: dict[str, Any] | None = None
    """Cluster-wide Serve logging options."""
    target_capacity: Annotated[float, Field(ge=0, le=100)] | None = None
    """Percentage of replicas to run, for staged rollouts."""
    applications: list[ApplicationOptions]
    """The applications; this project deploys one."""


@dataclass(frozen=True)
class DeploymentSpec:
    """What the checks need to know about one deployment of the graph.

    Attributes:
        deployment: The ``@serve.deployment`` object.
        user_config_model: Model of its ``user_config`` (it then has ``reconfigure``), or None.
        actor_cpus: CPUs reserved per replica by actors the replica starts, given the bound
            deployment (with its init arguments); these count against the node like the replica.
    """

    deployment: Deployment
    user_config_model: type[BaseModel] | None = None
    actor_cpus: Callable[[Deployment], float] = lambda _: 0.0

    @property
    def name(self) -> str:
        """The deployment's name."""
        name: str = self.deployment.name
        return name


def _init_kwargs(bound: Deployment) -> dict[str, Any]:
    # Ray annotates ``init_kwargs`` as a tuple; it holds the keyword arguments given to ``bind``.
    return dict(cast(Mapping[str, Any], bound.init_kwargs))


def _stream_worker_actor_cpus(bound: Deployment) -> float:
    """Each partition's stream processor and the lake writer reserve ``actor_num_cpus``."""
    signature = inspect.signature(cast(type, bound.func_or_class))
    arguments = signature.bind(*bound.init_args, **_init_kwargs(bound))
    arguments.apply_defaults()
    return (len(PARTITIONS) + 1) * float(arguments.arguments["actor_num_cpus"])


def _deployment(decorated: object) -> Deployment:
    # ``@serve.deployment`` turns the class into a Deployment at run time; type checkers still
    # see the class, so the conversion is checked here instead of silenced.
    if not isinstance(decorated, Deployment):
        raise TypeError(f"{decorated!r} is not a @serve.deployment")
    return decorated


DEPLOYMENTS: Mapping[str, DeploymentSpec] = {
    spec.name: spec
    for spec in (
        # Only with model_placement: ingress, where it holds the models (checked per application).
        DeploymentSpec(_deployment(Ingress), user_config_model=ModelUserConfig),
        DeploymentSpec(_deployment(StreamWorkers), actor_cpus=_stream_worker_actor_cpus),
        DeploymentSpec(_deployment(Retrieval), user_config_model=ModelUserConfig),
        DeploymentSpec(_deployment(Ranker), user_config_model=ModelUserConfig),
    )
}
"""Every deployment ``build_app`` binds, by name; a unit test keeps the two in step."""


def bound_deployments(app: Application) -> list[Deployment]:
    """The deployments of a bound application, ingress first, each once.

    Serve exposes no public walk of a bound graph; ``Application._bound_deployment`` is the one
    attribute read here (``serve build`` reads it too), and the rest uses public properties.

    Args:
        app: What ``build_app`` returned.

    Returns:
        The bound deployments, each with its init arguments.
    """
    found: dict[str, Deployment] = {}

    def visit(value: Any) -> None:
        if isinstance(value, Application):
            deployment = value._bound_deployment
            if deployment.name not in found:
                found[deployment.name] = deployment
                visit([*deployment.init_args, *_init_kwargs(deployment).values()])
        elif isinstance(value, list | tuple | set):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(app)
    return list(found.values())


def code_options(deployment: Deployment) -> dict[str, Any]:
    """The options a deployment's decorator sets, in Serve-config form (as ``serve build``).

    An autoscaling config is reduced to the fields :class:`AutoscalingOptions` knows; values equal
    to Ray's defaults are dropped, since Ray dumps every field of it.
    """
    options: dict[str, Any] = deployment_to_schema(deployment).model_dump(exclude_unset=True)
    autoscaling = options.get("autoscaling_config")
    if autoscaling is not None:
        defaults = AutoscalingOptions()
        options["autoscaling_config"] = {
            key: value
            for key, value in dict(autoscaling).items()
            if key in AutoscalingOptions.model_fields and value != getattr(defaults, key)
        }
    return options


@dataclass(frozen=True)
class CpuLine:
    """CPUs one deployment reserves.

    Attributes:
        name: Deployment name.
        replicas_start: Replicas right after deploy.
        replicas_max: Replicas at full scale.
        cpus_per_replica: Replica CPUs plus those of actors it starts.
    """

    name: str
    replicas_start: int
    replicas_max: int
    cpus_per_replica: float

    @property
    def cpus_start(self) -> float:
        """CPUs reserved right after deploy."""
        return self.replicas_start * self.cpus_per_replica

    @property
    def cpus_max(self) -> float:
        """CPUs reserved at full scale."""
        return self.replicas_max * self.cpus_per_replica


def _effective(name: str, given: DeploymentOptions | None, bound: Deployment) -> CpuLine:
    code = code_options(bound)
    options = {**code, **(given.given() if given else {})}
    autoscaling = options.get("autoscaling_config")
    if autoscaling is not None:
        scaling = AutoscalingOptions.model_validate(autoscaling)
        start, maximum = scaling.start_replicas(), scaling.max_replicas
    else:
        start = maximum = int(options.get("num_replicas") or 1)
    actor_options = options.get("ray_actor_options") or {}
    num_cpus = actor_options.get("num_cpus")
    replica_cpus = _SERVE_DEFAULT_NUM_CPUS if num_cpus is None else float(num_cpus)
    return CpuLine(name, start, maximum, replica_cpus + DEPLOYMENTS[name].actor_cpus(bound))


@dataclass(frozen=True)
class ApplicationReport:
    """What the check found for one application.

    Attributes:
        name: Application name.
        cpu: CPUs per deployment of the graph.
        overrides: ``deployment.option`` paths the file sets over the code's values.
    """

    name: str
    cpu: list[CpuLine]
    overrides: list[str]

    @property
    def cpus_start(self) -> float:
        """CPUs reserved right after deploy."""
        return sum(line.cpus_start for line in self.cpu)

    @property
    def cpus_max(self) -> float:
        """CPUs reserved when every deployment is at its maximum."""
        return sum(line.cpus_max for line in self.cpu)


def _load(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ServeConfigError(str(path), [f"cannot read: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ServeConfigError(str(path), ["the file is not a YAML mapping"])
    return raw


def _errors(exc: ValidationError, prefix: str) -> list[str]:
    return [
        f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}".replace(": :", ":")
        for err in exc.errors()
    ]


def check_serve_config(
    path: str | Path, *, node_cpus: float | None = NODE_CPUS
) -> tuple[ServeDeploySchema, list[ApplicationReport]]:
    """Validate a Serve config file against Ray's schema, the strict models and the code.

    Args:
        path: The YAML file (``ray_config.yaml`` or a copy).
        node_cpus: CPUs the application must fit in right after deploy; None skips the check
            (for configs meant for larger clusters).

    Returns:
        Ray's parsed config and one report per application.

    Raises:
        ServeConfigError: Every problem found, each naming where it is.
    """
    path = Path(path)
    return check_serve_mapping(_load(path), str(path), node_cpus=node_cpus)


def check_serve_mapping(
    raw: Mapping[str, Any], label: str, *, node_cpus: float | None = NODE_CPUS
) -> tuple[ServeDeploySchema, list[ApplicationReport]]:
    """:func:`check_serve_config` on an already parsed config (e.g. a KubeRay ``serveConfigV2``).

    Args:
        raw: The parsed YAML.
        label: Where it came from, for messages.
        node_cpus: As in :func:`check_serve_config`.

    Returns:
        Ray's parsed config and one report per application.

    Raises:
        ServeConfigError: Every problem found.
    """
    from deployments.app import AppArgs, build_app

    problems: list[str] = []
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ServeConfigError(label, _errors(exc, "ray schema: ")) from exc
    try:
        parsed = ServeConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ServeConfigError(label, _errors(exc, "")) from exc

    reports: list[ApplicationReport] = []
    for app in parsed.applications:
        where = f"application '{app.name}'"
        if app.import_path != IMPORT_PATH:
            problems.append(f"{where}: import_path must be {IMPORT_PATH}, not {app.import_path}")
            continue
        try:
            args = AppArgs.model_validate(app.args)
        except ValidationError as exc:
            problems.extend(_errors(exc, f"{where}: args."))
            continue
        graph = {d.name: d for d in bound_deployments(build_app(app.args))}
        in_ingress = args.model_placement == "ingress"
        expected = {n for n in DEPLOYMENTS if not (in_ingress and n in MODEL_DEPLOYMENTS)}
        if set(graph) != expected:
            problems.append(f"{where}: build_app binds {sorted(graph)}, expected {sorted(expected)}")
            continue
        given: dict[str, DeploymentOptions] = {}
        for options in app.deployments:
            name = options.name
            if name not in graph:
                problems.append(f"{where}: deployment '{name}' is not in the graph (has: {sorted(graph)})")
                continue
            if name in given:
                problems.append(f"{where}: deployment '{name}' is listed twice")
                continue
            given[name] = options
            problems.extend(_check_user_config(where, options, models_in_ingress=in_ingress))
        cpu = [_effective(name, given.get(name), bound) for name, bound in graph.items()]
        report = ApplicationReport(app.name, cpu, _overrides(graph, given))
        if node_cpus is not None and report.cpus_start > node_cpus + 1e-9:
            detail = ", ".join(f"{c.name} {c.replicas_start}x{c.cpus_per_replica:g}" for c in cpu)
            problems.append(
                f"{where}: needs {report.cpus_start:g} CPUs after deploy ({detail}), "
                f"more than a {node_cpus:g}-CPU node"
            )
        reports.append(report)
    if problems:
        raise ServeConfigError(label, problems)
    return schema, reports


def validate_serve_config(path: str | Path, *, node_cpus: float | None = NODE_CPUS) -> ServeDeploySchema:
    """Validate a Serve config (see :func:`check_serve_config`) and return Ray's parse of it.

    Raises:
        ServeConfigError: Every problem found.
    """
    schema, _ = check_serve_config(path, node_cpus=node_cpus)
    return schema


def _check_user_config(where: str, options: DeploymentOptions, *, models_in_ingress: bool) -> list[str]:
    if options.user_config is None:
        return []
    if options.name == "ingress" and not models_in_ingress:
        return [f"{where}: deployment 'ingress' takes a user_config only with model_placement: ingress"]
    model = DEPLOYMENTS[options.name].user_config_model
    if model is None:
        return [f"{where}: deployment '{options.name}' takes no user_config (it has no reconfigure)"]
    try:
        model.model_validate(options.user_config)
    except ValidationError as exc:
        return _errors(exc, f"{where}: {options.name}.user_config.")
    return []


def _overrides(graph: Mapping[str, Deployment], given: Mapping[str, DeploymentOptions]) -> list[str]:
    changed: list[str] = []
    for name, options in given.items():
        code = code_options(graph[name])
        for key, value in options.given().items():
            if key != "name" and code.get(key) != value:
                changed.append(f"{name}.{key}")
    return changed


def render_serve_config(path: str | Path, *, code_only: bool = False) -> str:
    """The file with its ``deployments:`` regenerated from the code (like ``serve build``).

    Every deployment of the graph is listed in graph order with the options its decorator sets;
    the file's own values are laid over them unless ``code_only``, so an operator's overrides
    survive and a deployment added in code appears. Comments above the first key are kept.

    Args:
        path: The config to regenerate.
        code_only: Drop the file's per-deployment values and write the code's alone.

    Returns:
        The new YAML text (validated before it is returned).

    Raises:
        ServeConfigError: The file, or the result, does not validate.
    """
    from deployments.app import build_app

    path = Path(path)
    text = path.read_text()
    raw = _load(path)
    try:
        parsed = ServeConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ServeConfigError(str(path), _errors(exc, "")) from exc
    for app_raw, app in zip(raw["applications"], parsed.applications, strict=True):
        given = {d.name: d.given() for d in app.deployments}
        rendered: list[dict[str, Any]] = []
        for bound in bound_deployments(build_app(app.args)):
            options = code_options(bound)
            if not code_only:
                options.update(given.get(bound.name, {}))
            if options.get("autoscaling_config") is not None:
                options.pop("num_replicas", None)
            # Normalise through the strict model so the output is what the checks accept.
            rendered.append(_tidy(DeploymentOptions.model_validate(options).given()))
        app_raw["deployments"] = rendered
    check_serve_mapping(raw, f"{path} (rendered)", node_cpus=None)
    header = "".join(_leading_comments(text))
    # One block per top-level key, separated by a blank line, as the file is written by hand.
    blocks = [
        yaml.dump({key: value}, Dumper=_IndentedDumper, sort_keys=False, default_flow_style=False, width=100)
        for key, value in raw.items()
    ]
    return header + "\n".join(blocks)


class _IndentedDumper(yaml.SafeDumper):
    """Indents list items under their key, the style ``ray_config.yaml`` is written in."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _tidy(value: Any) -> Any:
    """Whole-number floats back to ints, so ``64`` is not rewritten as ``64.0``."""
    if isinstance(value, dict):
        return {key: _tidy(item) for key, item in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _leading_comments(text: str) -> Iterator[str]:
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            return
        yield line
