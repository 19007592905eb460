"""Deploying the Serve application from its config, and changing a running app's models live.

The application is deployed declaratively (what ``serve deploy ray_config.yaml`` does, through the
Serve controller's ``apply_config``), because only then does Serve treat a change of a
deployment's ``user_config`` as a lightweight update: the replicas are reconfigured in place, the
ingress and the stream workers are not restarted, and nothing stops serving. An application
started with ``serve.run(build_app(...))`` gets a new random code version on every redeploy, so
every replica of every deployment would be replaced instead.

:func:`apply_bundle` is the hot swap: it resolves an alias (or version) in the model registry and
writes the explicit version into the ``user_config`` of the model deployments, so every replica
(including ones autoscaling starts later) loads the same release, then waits until they serve it.
A bundle that fails to load is reported here, while the replicas keep serving the previous one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve._private.client import ServeControllerClient
from ray.serve.context import _get_global_client
from ray.serve.schema import (
    ApplicationStatus,
    ServeApplicationSchema,
    ServeDeploySchema,
    ServeInstanceDetails,
)

from core.settings import Settings
from deployments.wire import NO_MODEL
from training.registry import ModelRegistry

MODEL_DEPLOYMENTS: Final = ("retrieval", "ranker")
"""Deployments whose ``user_config`` names a model bundle."""

INGRESS: Final = "ingress"
"""The deployment that holds the models with ``model_placement: ingress``."""

DEFAULT_CONFIG_PATH: Final = Path(__file__).resolve().parent.parent / "ray_config.yaml"
"""The Serve config shipped with the code."""

_POLL_S = 0.25


class ReloadError(RuntimeError):
    """The application could not be deployed or reconfigured as asked."""


class BundleLoadError(ReloadError):
    """A model deployment could not load the bundle; it keeps serving the previous one.

    Attributes:
        deployment: The deployment that refused it.
        version: The bundle version.
    """

    def __init__(self, deployment: str, version: str, detail: str) -> None:
        super().__init__(
            f"{deployment} could not load bundle {version} and keeps its previous model: {detail}"
        )
        self.deployment = deployment
        self.version = version


def serve_config(
    app_name: str,
    args: Mapping[str, Any],
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    route_prefix: str = "/",
    base: str | Path = DEFAULT_CONFIG_PATH,
    user_configs: Mapping[str, Mapping[str, Any]] | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Serve config of one application, from the shipped ``ray_config.yaml``.

    Args:
        app_name: Name of the application.
        args: Its ``args`` (``deployments.app.AppArgs`` fields).
        host: HTTP host of the proxies.
        port: HTTP port of the proxies.
        route_prefix: Route prefix of the application.
        base: The config file to start from (its first application is the template).
        user_configs: ``user_config`` per deployment, replacing the file's.
        env_vars: Environment of the application's replicas (e.g. ``RAYREC_ADMIN_TOKEN``).

    Returns:
        A config for :func:`deploy` (and valid for ``serve deploy``).
    """
    raw = yaml.safe_load(Path(base).read_text(encoding="utf-8"))
    app = dict(raw["applications"][0])
    app.update(name=app_name, route_prefix=route_prefix, args=dict(args))
    deployments = [dict(d) for d in app.get("deployments", [])]
    if args.get("model_placement") == INGRESS:
        deployments = _models_in_ingress(deployments)
    for name, user_config in (user_configs or {}).items():
        entry = next((d for d in deployments if d["name"] == name), None)
        if entry is None:
            entry = {"name": name}
            deployments.append(entry)
        entry["user_config"] = dict(user_config)
    app["deployments"] = deployments
    if env_vars:
        runtime_env = dict(app.get("runtime_env") or {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env_vars}
        app["runtime_env"] = runtime_env
    config = {key: value for key, value in raw.items() if key != "applications"}
    config["http_options"] = {**(raw.get("http_options") or {}), "host": host, "port": port}
    config["applications"] = [app]
    return config


def _models_in_ingress(deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The file's deployments for ``model_placement: ingress``.

    The model deployments go; their ``user_config`` (the bundle, the drills) goes to the ingress,
    unless the file gives the ingress one of its own.
    """
    models = [d for d in deployments if d["name"] in MODEL_DEPLOYMENTS]
    kept = [d for d in deployments if d["name"] not in MODEL_DEPLOYMENTS]
    user_config = next((d["user_config"] for d in models if d.get("user_config")), {"bundle": "production"})
    for entry in kept:
        if entry["name"] == INGRESS:
            entry.setdefault("user_config", dict(user_config))
    return kept


def model_deployments(app_name: str) -> tuple[str, ...]:
    """The deployments of a running application whose ``user_config`` names its bundle."""
    return _holders(deployed_config(app_name))


def _holders(config: ServeApplicationSchema) -> tuple[str, ...]:
    args = config.args or {}
    return (INGRESS,) if args.get("model_placement") == INGRESS else MODEL_DEPLOYMENTS


def _client() -> ServeControllerClient:
    client = _get_global_client()
    if client is None:
        raise ReloadError("Serve is not running on this Ray cluster")
    return client


def _details() -> ServeInstanceDetails:
    return ServeInstanceDetails.model_validate(_client().get_serve_details())


def _declarative_apps(details: ServeInstanceDetails) -> dict[str, dict[str, Any]]:
    return {
        name: app.deployed_app_config.model_dump(exclude_unset=True)
        for name, app in details.applications.items()
        if app.deployed_app_config is not None
    }


def _apply(details: ServeInstanceDetails, apps: Sequence[Mapping[str, Any]]) -> None:
    # apply_config replaces the whole declarative state: every declarative app goes in again.
    config: dict[str, Any] = {"applications": [dict(a) for a in apps]}
    if details.proxy_location is not None:
        config["proxy_location"] = details.proxy_location
    if details.http_options is not None:
        config["http_options"] = details.http_options.model_dump(exclude_unset=True)
    _client().deploy_apps(ServeDeploySchema.model_validate(config))


def deploy(config: Mapping[str, Any], *, timeout_s: float = 600.0) -> None:
    """Start Serve if needed and deploy the config's applications declaratively; wait until running.

    Other applications deployed from a config stay as they are.

    Args:
        config: A Serve config (``ray_config.yaml`` shape; :func:`serve_config` makes one).
        timeout_s: How long to wait for the applications to run.

    Raises:
        ReloadError: An application failed to deploy or did not run in time.
    """
    schema = ServeDeploySchema.model_validate(dict(config))
    serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
    )
    details = _details()
    apps = _declarative_apps(details)
    for app in schema.applications:
        apps[app.name] = app.model_dump(exclude_unset=True)
    _apply(details, list(apps.values()))
    for app in schema.applications:
        wait_running(app.name, timeout_s=timeout_s)


def wait_running(app_name: str, *, timeout_s: float = 600.0) -> None:
    """Wait until an application is ``RUNNING``.

    Raises:
        ReloadError: It failed to deploy, or is not running after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = "" if app is None else ApplicationStatus(app.status).value
        if status == ApplicationStatus.RUNNING.value:
            return
        if status == ApplicationStatus.DEPLOY_FAILED.value:
            raise ReloadError(f"application {app_name!r} failed to deploy: {app.message if app else ''}")
        time.sleep(_POLL_S)
    raise ReloadError(f"application {app_name!r} is not running after {timeout_s:.0f} s (status {status!r})")


def deployed_config(app_name: str) -> ServeApplicationSchema:
    """The config a running application was deployed with.

    Raises:
        ReloadError: The application is not running, or was not deployed from a config.
    """
    app = _details().applications.get(app_name)
    if app is None:
        raise ReloadError(f"no Serve application {app_name!r} is running")
    if app.deployed_app_config is None:
        raise ReloadError(
            f"application {app_name!r} was deployed with serve.run, not from a config; its models cannot be "
            "swapped in place. Deploy it with `rayrec serve` or `serve deploy ray_config.yaml`."
        )
    return app.deployed_app_config


def update_user_configs(app_name: str, changes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge changes into deployments' ``user_config`` and apply them (an in-place reconfigure).

    Also the operator switch of the failure drills:
    ``update_user_configs("rayrec", {"ranker": {"fault": "raise"}})``, then ``{"fault": None}``.

    Args:
        app_name: The application.
        changes: Per deployment, the keys to set (a None value is kept as null).

    Returns:
        The resulting ``user_config`` per changed deployment.

    Raises:
        ReloadError: The application is not running or was not deployed from a config.
    """
    deployed_config(app_name)
    details = _details()
    apps = _declarative_apps(details)
    app = apps[app_name]
    deployments = [dict(d) for d in app.get("deployments", [])]
    result: dict[str, dict[str, Any]] = {}
    for name, change in changes.items():
        entry = next((d for d in deployments if d["name"] == name), None)
        if entry is None:
            entry = {"name": name}
            deployments.append(entry)
        entry["user_config"] = {**(entry.get("user_config") or {}), **change}
        result[name] = entry["user_config"]
    app["deployments"] = deployments
    _apply(details, list(apps.values()))
    return result


def model_statuses(app_name: str, deployment: str, *, calls: int) -> list[dict[str, Any]]:
    """``model_status`` answered by a deployment's replicas over ``calls`` calls (routing spreads them)."""
    handle = serve.get_deployment_handle(deployment, app_name)
    responses = [handle.model_status.remote() for _ in range(calls)]
    return [dict(r.result(timeout_s=30)) for r in responses]


def _running_replicas(app_name: str, deployment: str) -> int:
    app = _details().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 1
    replicas = app.deployments[deployment].replicas
    return max(1, sum(1 for r in replicas if str(getattr(r.state, "value", r.state)) == "RUNNING"))


def _served_version(app_name: str, deployment: str) -> str | None:
    """The bundle version a deployment's replicas agree on serving, or None (none, or mixed)."""
    statuses = model_statuses(app_name, deployment, calls=3 * _running_replicas(app_name, deployment))
    versions = {str(s.get("version")) for s in statuses}
    if len(versions) != 1 or NO_MODEL in versions:
        return None
    return versions.pop()


def wait_for_bundle(app_name: str, version: str, *, timeout_s: float = 300.0) -> None:
    """Wait until every replica of the model deployments (:func:`model_deployments`) serves ``version``.

    Raises:
        BundleLoadError: A replica failed to load it (it keeps serving its previous bundle).
        ReloadError: Not every replica serves it after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(model_deployments(app_name))
    while pending and time.monotonic() < deadline:
        deployment = pending[0]
        # Several calls per replica, so the router's random choice reaches each of them.
        statuses = model_statuses(app_name, deployment, calls=3 * _running_replicas(app_name, deployment))
        for status in statuses:
            if status.get("target") == version and status.get("error") and not status.get("loading"):
                raise BundleLoadError(deployment, version, str(status["error"]))
        if all(s.get("version") == version and not s.get("loading") for s in statuses):
            pending.pop(0)
        else:
            time.sleep(_POLL_S)
    if pending:
        raise ReloadError(f"{', '.join(pending)} not serving bundle {version} after {timeout_s:.0f} s")


def apply_bundle(
    app_name: str, alias: str = "production", *, home: str | None = None, timeout_s: float = 300.0
) -> str:
    """Make a running application serve the bundle an alias (or version) names, without downtime.

    Call it after ``rayrec models promote`` or ``rollback``: the alias is resolved now, the
    explicit version goes into the ``user_config`` of ``retrieval`` and ``ranker`` (of the
    ingress with ``model_placement: ingress``), each replica loads it beside the model it serves
    and swaps when ready.

    Args:
        app_name: The Serve application (``rayrec`` in ``ray_config.yaml``).
        alias: Alias or version in the model registry.
        home: Data home of the registry; the application's ``args.home``, else ``$RAYREC_HOME``.
        timeout_s: How long to wait for every replica to serve the version.

    Returns:
        The version now served.

    Raises:
        training.registry.RegistryError: The alias or version is unknown.
        BundleLoadError: A replica could not load the bundle; the previous one keeps serving and
            the ``user_config`` is put back to name it.
        ReloadError: The application is not running, not config-deployed, or too slow to load.
    """
    config = deployed_config(app_name)
    args = dict(config.args or {})
    registry_home = home or args.get("home") or Settings.from_env().home
    version = ModelRegistry(str(registry_home)).resolve(alias)
    holders = _holders(config)
    previous = {d.name: dict(d.user_config or {}) for d in config.deployments if d.name in holders}
    # The previous config may name an alias that now points at the new bundle (promote, then
    # apply), so putting it back must name the version the replicas actually serve.
    served = {name: _served_version(app_name, name) for name in previous}
    update_user_configs(app_name, {name: {"bundle": version} for name in holders})
    try:
        wait_for_bundle(app_name, version, timeout_s=timeout_s)
    except BundleLoadError:
        # The replicas still serve the previous bundle; the config must say so too, or replicas
        # started later (autoscaling, a node lost) would try the broken one.
        if previous:
            update_user_configs(
                app_name,
                {
                    name: {**user_config, "bundle": served[name] or user_config.get("bundle")}
                    for name, user_config in previous.items()
                },
            )
        raise
    return version
