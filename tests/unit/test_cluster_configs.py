"""The Serve config, the cluster definitions and the local launcher agree with the code.

No Ray runtime is started: ``build_app`` only binds the graph, and the cluster files are checked
against Ray's own schemas (``ServeDeploySchema``, ``ray/autoscaler/ray-schema.json``).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from cluster.cli import build_parser, main
from cluster.kuberay import ManifestError, embed_serve_config, embedded_serve_config
from cluster.local_cluster import (
    NODE_IP,
    ClusterState,
    LocalClusterError,
    LocalClusterSpec,
    NodeRecord,
    _names_temp_dir,
    cluster_processes,
    default_state_file,
    head_command,
    worker_command,
)
from core.settings import Settings
from deployments.app import build_app
from deployments.commands import SERVE_ENVIRONMENT
from deployments.config import (
    DEPLOYMENTS,
    AutoscalingOptions,
    DeploymentOptions,
    ServeConfigError,
    bound_deployments,
    check_serve_config,
    check_serve_mapping,
    code_options,
    render_serve_config,
    validate_serve_config,
)

ROOT = Path(__file__).resolve().parents[2]
RAY_CONFIG = ROOT / "ray_config.yaml"
CONFIGS = ROOT / "cluster" / "configs"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
GPU_FAMILIES = ("p", "g", "inf", "trn", "dl")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _write_config(tmp_path: Path, mutate: Any) -> Path:
    raw = _load(RAY_CONFIG)
    mutate(raw)
    path = tmp_path / "ray_config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _deployment(raw: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in raw["applications"][0]["deployments"] if d["name"] == name)
    return found


# --- the committed Serve config and the code ------------------------------------------------


def test_committed_serve_config_validates_and_fits_two_cpus() -> None:
    schema, reports = check_serve_config(RAY_CONFIG)
    assert isinstance(schema, ServeDeploySchema)
    assert [app.import_path for app in schema.applications] == ["deployments.app:build_app"]
    (report,) = reports
    assert {line.name for line in report.cpu} == set(DEPLOYMENTS)
    assert report.cpus_start <= 2


def test_committed_serve_config_lists_every_deployment_render_keeps_its_values() -> None:
    committed = {d["name"]: d for d in _load(RAY_CONFIG)["applications"][0]["deployments"]}
    assert sorted(committed) == sorted(DEPLOYMENTS), (
        "ray_config.yaml must list every deployment of the graph: run `rayrec config render --write`"
    )
    rendered = yaml.safe_load(render_serve_config(RAY_CONFIG))
    by_name = {d["name"]: d for d in rendered["applications"][0]["deployments"]}
    for name, given in committed.items():
        for key, value in given.items():
            assert by_name[name][key] == value, f"render changed {name}.{key}"


def test_registry_lists_exactly_the_deployments_build_app_binds() -> None:
    bound = bound_deployments(build_app({}))
    assert bound[0].name == "ingress", "the ingress comes first"
    assert {d.name: d.func_or_class for d in bound} == {
        name: spec.deployment.func_or_class for name, spec in DEPLOYMENTS.items()
    }


def test_user_config_model_exactly_where_reconfigure_exists() -> None:
    for name, spec in DEPLOYMENTS.items():
        has_reconfigure = hasattr(spec.deployment.func_or_class, "reconfigure")
        assert has_reconfigure == (spec.user_config_model is not None), name


def test_stream_workers_count_the_actors_they_start() -> None:
    bound = {d.name: d for d in bound_deployments(build_app({}))}
    assert DEPLOYMENTS["stream_workers"].actor_cpus(bound["stream_workers"]) == pytest.approx(
        3 * 0.15
    )  # two partitions and the lake writer
    assert DEPLOYMENTS["ingress"].actor_cpus(bound["ingress"]) == 0


def test_autoscaling_defaults_are_rays() -> None:
    # A config block replaces the code's autoscaling config and Ray fills the gaps: the model's
    # defaults must be Ray's or the CPU check would reason about the wrong replica counts.
    ray_defaults = AutoscalingConfig()
    for name, field in AutoscalingOptions.model_fields.items():
        assert field.default == getattr(ray_defaults, name), name


def test_code_options_fit_the_strict_model() -> None:
    for deployment in bound_deployments(build_app({})):
        DeploymentOptions.model_validate(code_options(deployment))


# --- what the check refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda raw: _deployment(raw, "ingress").update(autoscaling_confg={}), "autoscaling_confg"),
        (
            lambda raw: raw["applications"][0]["deployments"].append({"name": "reranker"}),
            "'reranker' is not in the graph",
        ),
        (
            lambda raw: _deployment(raw, "ingress").update(ray_actor_options={"memory": 10**9}),
            "num_cpus",
        ),
        (lambda raw: _deployment(raw, "ingress")["autoscaling_config"].update(min_replicas=4), "2-CPU node"),
        (lambda raw: raw["applications"][0].update(args={"home_dir": "/x"}), "args.home_dir"),
        (lambda raw: _deployment(raw, "stream_workers").update(user_config={"k": 1}), "takes no user_config"),
        (
            lambda raw: _deployment(raw, "ingress").update(user_config={"bundle": "production"}),
            "only with model_placement: ingress",
        ),
        (
            lambda raw: raw["applications"][0].update(args={"model_placement": "ingress"}),
            "'retrieval' is not in the graph",
        ),
        (lambda raw: _models_in_ingress(raw, {"bundle": "production", "k": 1}), "ingress.user_config.k"),
        (lambda raw: raw["applications"][0].update(args={"model_placement": "ranker"}), "model_placement"),
        (lambda raw: raw["applications"][0].update(import_path="x:y"), "import_path"),
        (lambda raw: _deployment(raw, "ingress").update(num_replicas=2), "num_replicas"),
        (
            lambda raw: raw["applications"][0]["deployments"].append(_deployment(raw, "ingress")),
            "listed twice",
        ),
        (lambda raw: raw.update(proxy_location="Everywhere"), "ray schema"),
        (
            lambda raw: _deployment(raw, "ingress")["autoscaling_config"].update(look_back_period_s=5),
            "look_back_period_s",
        ),
        (
            lambda raw: raw["applications"][0].update(runtime_env={"env_vars": {"RAYREC_ADMIN_TOKEN": "x"}}),
            "is a secret",
        ),
        (
            lambda raw: raw["applications"][0].update(
                runtime_env={"env_vars": {"RAYREC_REDIS_URL": "rediss://:pw@cache:6379/0"}}
            ),
            "password",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")
def test_check_refuses(tmp_path: Path, mutate: Any, expected: str) -> None:
    with pytest.raises(ServeConfigError, match=expected):
        validate_serve_config(_write_config(tmp_path, mutate))


def _models_in_ingress(raw: dict[str, Any], user_config: dict[str, Any]) -> None:
    app = raw["applications"][0]
    app["args"] = {"model_placement": "ingress"}
    app["deployments"] = [d for d in app["deployments"] if d["name"] not in ("retrieval", "ranker")]
    _deployment(raw, "ingress")["user_config"] = user_config


def test_models_in_the_ingress_check_and_fit(tmp_path: Path) -> None:
    path = _write_config(tmp_path, lambda raw: _models_in_ingress(raw, {"bundle": "production"}))
    _, (report,) = check_serve_config(path)
    assert {line.name for line in report.cpu} == {"ingress", "stream_workers"}
    _, (committed,) = check_serve_config(RAY_CONFIG)
    assert report.cpus_start < committed.cpus_start


def test_serve_config_moves_the_models_user_config_to_the_ingress() -> None:
    from deployments.reload import serve_config

    config = serve_config("app", {"model_placement": "ingress"})
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert sorted(deployments) == ["ingress", "stream_workers"]
    assert deployments["ingress"]["user_config"] == _deployment(_load(RAY_CONFIG), "retrieval")["user_config"]
    separate = serve_config("app", {})
    assert "user_config" not in {d["name"]: d for d in separate["applications"][0]["deployments"]}["ingress"]
    bound = {d.name for d in bound_deployments(build_app({"model_placement": "ingress"}))}
    assert bound == {"ingress", "stream_workers"}


def test_fit_check_can_be_skipped_for_bigger_nodes(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path, lambda raw: _deployment(raw, "ingress")["autoscaling_config"].update(min_replicas=4)
    )
    _, (report,) = check_serve_config(path, node_cpus=None)
    _, (committed,) = check_serve_config(RAY_CONFIG)
    ingress = _deployment(yaml.safe_load(RAY_CONFIG.read_text()), "ingress")
    added = 4 - ingress["autoscaling_config"]["min_replicas"]
    assert added > 0
    assert report.cpus_start == pytest.approx(
        committed.cpus_start + added * ingress["ray_actor_options"]["num_cpus"]
    )


def test_render_adds_missing_deployments_and_keeps_overrides(tmp_path: Path) -> None:
    def drop_stream_workers(raw: dict[str, Any]) -> None:
        raw["applications"][0]["deployments"] = [_deployment(raw, "ingress")]

    path = _write_config(tmp_path, drop_stream_workers)
    rendered = yaml.safe_load(render_serve_config(path))
    deployments = {d["name"]: d for d in rendered["applications"][0]["deployments"]}
    assert deployments["stream_workers"]["ray_actor_options"] == {"num_cpus": 0.05}
    assert deployments["ingress"]["autoscaling_config"]["max_replicas"] == 4
    code_only = yaml.safe_load(render_serve_config(path, code_only=True))
    assert "autoscaling_config" not in code_only["applications"][0]["deployments"][0]


def test_config_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(RAY_CONFIG)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = _write_config(tmp_path, lambda raw: _deployment(raw, "ingress").update(replicas=2))
    assert main(["config", "check", str(bad)]) == 1
    assert "replicas" in capsys.readouterr().err
    assert main(["config", "render", str(RAY_CONFIG)]) == 0
    assert (
        yaml.safe_load(capsys.readouterr().out)["applications"][0]["import_path"]
        == "deployments.app:build_app"
    )
    manifest = str(CONFIGS / "kuberay-rayservice.yaml")
    assert main(["config", "kuberay", str(RAY_CONFIG), "--manifest", manifest, "--check"]) == 0


# --- cluster launcher (ray up) -------------------------------------------------------------


def test_aws_launcher_config_matches_rays_schema() -> None:
    config = _load(CONFIGS / "aws-cluster.yaml")
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert sum(t.get("max_workers", 0) for t in node_types.values()) <= config["max_workers"]
    for name, node_type in node_types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert not instance.startswith(GPU_FAMILIES), f"{name}: {instance} is a GPU instance"
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", 0) or name == "head"


def test_aws_launcher_installs_the_project_and_keeps_secrets_out() -> None:
    text = (CONFIGS / "aws-cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["file_mounts"] == {"/home/ray/rayrec": "."}
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-e /home/ray/rayrec" in setup
    assert "RAYREC_HOME=s3://" in setup
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert command == "ray stop" or command.lstrip().startswith("ulimit -n 65536; . ~/rayrec.env &&")
    commands = yaml.safe_dump(config)  # without the comments, which name the secrets on purpose
    for secret in ("RAYREC_REDIS_URL=", "RAYREC_ADMIN_TOKEN=", "RAY_AUTH_TOKEN=", "rediss://"):
        assert secret not in commands, f"{secret} belongs in SSM, not in the cluster file"


def test_ray_schema_check_catches_mistakes() -> None:
    config = _load(CONFIGS / "aws-cluster.yaml")
    config["available_node_types"]["head"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))


# --- KubeRay ----------------------------------------------------------------------------------


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = group["template"]["spec"]["containers"]
    return containers


def _groups(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


def test_rayservice_carries_the_committed_serve_config() -> None:
    manifest = _load(CONFIGS / "kuberay-rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    check_serve_mapping(serve_config, "serveConfigV2")
    assert serve_config["applications"] == _load(RAY_CONFIG)["applications"], (
        "serveConfigV2 and ray_config.yaml must deploy the same application with the same options"
    )


def test_rayservice_embeds_ray_config_verbatim() -> None:
    text = (CONFIGS / "kuberay-rayservice.yaml").read_text()
    assert embed_serve_config(text, RAY_CONFIG.read_text()) == text, (
        "serveConfigV2 is out of step with ray_config.yaml: run `rayrec config kuberay --write`"
    )


def test_embedding_replaces_only_the_block() -> None:
    manifest = (
        "# keep me\nspec:\n  serveConfigV2: |\n    applications: []\n\n"
        "  rayClusterConfig:  # and me\n    rayVersion: '1'\n"
    )
    serve_config = "# header, left out\nproxy_location: HeadOnly\n\napplications:\n  - name: a\n"
    result = embed_serve_config(manifest, serve_config)
    assert result.startswith("# keep me\n") and "  rayClusterConfig:  # and me\n" in result
    assert "header" not in result
    assert embedded_serve_config(result) == {"proxy_location": "HeadOnly", "applications": [{"name": "a"}]}
    with pytest.raises(ManifestError):
        embed_serve_config("spec: {}\n", serve_config)


def test_rayservice_cluster_gets_settings_from_env_and_secret() -> None:
    manifest = _load(CONFIGS / "kuberay-rayservice.yaml")
    cluster_spec = manifest["spec"]["rayClusterConfig"]
    assert cluster_spec["rayVersion"] == ray.__version__
    images = set()
    for group in _groups(cluster_spec):
        for container in _containers(group):
            images.add(container["image"])
            env = {item["name"]: item.get("value") for item in container["env"]}
            assert env["RAYREC_HOME"].startswith("s3://")
            assert "RAYREC_REDIS_URL" not in env, "the Redis URL holds a password: it comes from the Secret"
            assert {"secretRef": {"name": "rayrec-secrets"}} in container["envFrom"]
            # Serve's proxy and controller read these at start: they must be on the node.
            assert {name: env.get(name) for name in SERVE_ENVIRONMENT} == SERVE_ENVIRONMENT
            assert container["resources"]["requests"] == container["resources"]["limits"]
    assert len(images) == 1, "head and workers must run the same image"


def test_aws_nodes_start_ray_with_the_serve_environment() -> None:
    setup = "\n".join(_load(CONFIGS / "aws-cluster.yaml")["setup_commands"])
    for name, value in SERVE_ENVIRONMENT.items():
        assert f"'export {name}={value}'" in setup


def test_rayjob_runs_rayrec_train_with_a_valid_runtime_env() -> None:
    manifest = _load(CONFIGS / "kuberay-rayjob-train.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    assert manifest["metadata"].get("name") or manifest["metadata"].get("generateName")
    spec = manifest["spec"]
    for key in ("entrypoint", "runtimeEnvYAML", "rayClusterSpec", "shutdownAfterJobFinishes"):
        assert key in spec, key
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["rayrec", "train"]
    # The entrypoint must parse with the CLI the image ships (a renamed flag would fail here).
    assert build_parser().parse_args(argv[1:]).command == "train"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert set(runtime_env) == {"env_vars"}, "code ships in the image, not in a working_dir"
    assert runtime_env["env_vars"]["RAYREC_HOME"].startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == ray.__version__
    for group in _groups(cluster_spec):
        assert _containers(group)[0]["image"]
    assert all(group["groupName"] for group in cluster_spec["workerGroupSpecs"])


def test_kuberay_images_match() -> None:
    service = _load(CONFIGS / "kuberay-rayservice.yaml")["spec"]["rayClusterConfig"]
    job = _load(CONFIGS / "kuberay-rayjob-train.yaml")["spec"]["rayClusterSpec"]
    images = {_containers(group)[0]["image"] for spec in (service, job) for group in _groups(spec)}
    assert len(images) == 1
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-cpu" in dockerfile


# --- the local multi-node launcher (no process started) ---------------------------------------


def test_commands_are_scoped_to_this_cluster() -> None:
    spec = LocalClusterSpec(workers=2, head_cpus=1, worker_cpus=2)
    ports = {"gcs": 41001, "dashboard": 41002, "client": 41003, "head_agent": 41004}
    head = head_command(spec, "/tmp/rrc-x", ports)
    assert head[1:3] == ["start", "--head"]
    flags = (
        "--port=41001",
        "--dashboard-port=41002",
        "--ray-client-server-port=41003",
        "--temp-dir=/tmp/rrc-x",
    )
    assert set(flags) <= set(head)
    assert f"--node-ip-address={NODE_IP}" in head and "--dashboard-host=127.0.0.1" in head
    worker = worker_command(spec, "/tmp/rrc-x", f"{NODE_IP}:41001", 2, 41005)
    assert f"--address={NODE_IP}:41001" in worker and "--num-cpus=2" in worker
    assert '--resources={"node_worker_2": 1}' in worker
    assert "stop" not in head + worker


def test_only_flags_naming_the_temp_dir_mark_a_process() -> None:
    assert _names_temp_dir(["raylet", "--temp_dir=/tmp/rrc-a"], "/tmp/rrc-a")
    assert _names_temp_dir(["gcs", "--log_dir=/tmp/rrc-a/run/logs"], "/tmp/rrc-a")
    assert not _names_temp_dir(["ls", "/tmp/rrc-a"], "/tmp/rrc-a")
    assert not _names_temp_dir(["raylet", "--temp_dir=/tmp/rrc-ab"], "/tmp/rrc-a")
    assert cluster_processes("/tmp/rrc-does-not-exist") == set()


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = ClusterState(
        temp_dir=str(tmp_path / "ray"),
        gcs_address=f"{NODE_IP}:6380",
        dashboard_url="http://127.0.0.1:8266",
        client_port=10002,
        nodes=[NodeRecord(role="head", resource="node_head", num_cpus=1)],
        pids=[1, 2],
        started_at=0.0,
        spec=LocalClusterSpec(),
    )
    path = tmp_path / "cluster" / "local-cluster.json"
    state.save(path)
    assert ClusterState.load(path) == state
    assert state.client_env()["RAY_AUTH_TOKEN_PATH"].startswith(state.temp_dir)
    with pytest.raises(LocalClusterError):
        ClusterState.load(tmp_path / "missing.json")


def test_state_file_lives_under_a_local_home() -> None:
    assert default_state_file(Settings.from_env({}, home="/srv/rayrec")) == Path(
        "/srv/rayrec/cluster/local-cluster.json"
    )
    with pytest.raises(LocalClusterError, match="--state-dir"):
        default_state_file(Settings.from_env({}, home="s3://bucket/rayrec"))
