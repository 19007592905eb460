"""A multi-node Ray cluster on this machine: one head and worker raylets, started with ``ray start``.

What a one-process ``ray.init()`` cannot show: work placed across nodes, Serve replicas spread
over raylets, ``serve deploy`` and ``ray job submit`` through the dashboard, a raylet dying.

Every node shares one temporary directory that belongs to this cluster alone, so the address
file Ray writes (``ray_current_cluster``) never redirects another ``ray.init()`` on the machine,
and teardown can find exactly the processes this cluster started. ``ray stop`` is never used: it
kills every Ray process of the machine, including other people's clusters. Teardown kills the
processes whose command line names this cluster's temporary directory, and their descendants
(workers rename themselves ``ray::…``, so they are found through their raylet), by process id.
Process discovery reads ``/proc``, so teardown works on Linux only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.settings import Settings
from deployments.commands import SERVE_ENVIRONMENT

LOOPBACK = "127.0.0.1"
NODE_IP = "127.0.0.2"
STATE_FILE_NAME = "local-cluster.json"
_PROC = Path("/proc")
_TERM_GRACE_S = 3.0


class LocalClusterError(RuntimeError):
    """The cluster could not be started, reached or stopped."""


class LocalClusterSpec(BaseModel):
    """What to start."""

    model_config = ConfigDict(extra="forbid")

    workers: Annotated[int, Field(ge=0, le=8)] = 1
    """Worker raylets besides the head."""
    head_cpus: Annotated[int, Field(ge=0)] = 1
    """Logical CPUs the head offers to tasks and replicas."""
    worker_cpus: Annotated[int, Field(ge=1)] = 1
    """Logical CPUs each worker raylet offers."""
    object_store_mb: Annotated[int, Field(ge=80)] = 200
    """Object store per node, in MiB; small, because every node shares this machine's memory."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment of every Ray process (e.g. Serve's metric push intervals)."""
    startup_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """How long to wait for every node to register as alive."""
    auth: Literal["token", "disabled"] = "token"
    """Ray token authentication. ``token`` gives the cluster its own token (in its temporary
    directory), so it neither depends on nor changes ``~/.ray/auth_token``, which other Ray
    instances on the machine use."""


class NodeRecord(BaseModel):
    """One node as started."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["head", "worker"]
    """Head or worker raylet."""
    resource: str
    """Custom resource (amount 1) that only this node offers, to place work on it."""
    num_cpus: int
    """Logical CPUs of the node."""


class ClusterState(BaseModel):
    """A running local cluster, as written to the state file."""

    model_config = ConfigDict(extra="forbid")

    temp_dir: str
    """Ray's temporary directory for every node of this cluster (logs, sockets, runtime files)."""
    gcs_address: str
    """``host:port`` of the head's GCS: ``ray.init(address=…)``."""
    dashboard_url: str
    """Dashboard, job and Serve REST API: ``ray job submit --address``, ``serve deploy -a``."""
    client_port: int
    """Ray Client server port of the head (``ray://127.0.0.1:<port>``)."""
    nodes: list[NodeRecord]
    """Head first, then workers."""
    pids: list[int]
    """Processes seen right after start (teardown also finds those started later)."""
    started_at: float
    """Unix time of the start."""
    spec: LocalClusterSpec
    """What was asked for."""

    @property
    def auth_token_path(self) -> Path:
        """Where this cluster's token lives (``spec.auth == "token"``)."""
        return Path(self.temp_dir) / "auth_token"

    def client_env(self) -> dict[str, str]:
        """Environment a client process (``ray job submit``, ``serve deploy``) needs to connect."""
        if self.spec.auth == "disabled":
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.auth_token_path)}

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard's REST API."""
        if self.spec.auth == "disabled":
            return {}
        return {"Authorization": f"Bearer {self.auth_token_path.read_text().strip()}"}

    def save(self, path: Path) -> None:
        """Write the state file atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(self.model_dump_json(indent=2))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        """Read a state file.

        Raises:
            LocalClusterError: There is no state file, or it does not parse.
        """
        if not path.exists():
            raise LocalClusterError(f"no local cluster recorded at {path}")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise LocalClusterError(f"{path} is not a cluster state file: {exc}") from exc


def default_state_file(settings: Settings) -> Path:
    """``$RAYREC_HOME/cluster/local-cluster.json``.

    Raises:
        LocalClusterError: The data home is a remote URI; a local cluster's state is local.
    """
    if "://" in settings.home:
        raise LocalClusterError(
            f"RAYREC_HOME is {settings.home}; give --state-dir for the local cluster's state file"
        )
    return Path(settings.home) / "cluster" / STATE_FILE_NAME


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise LocalClusterError("the `ray` command is not installed in this environment")
    return found


def head_command(spec: LocalClusterSpec, temp_dir: str, ports: Mapping[str, int]) -> list[str]:
    """The ``ray start --head`` command line.

    Every port is chosen here, on the loopback interface: Ray's fixed defaults (6379, 8265,
    10001, 52365) would collide with other Ray instances on the machine.
    """
    return [
        _ray_executable(),
        "start",
        "--head",
        f"--node-ip-address={NODE_IP}",
        f"--port={ports['gcs']}",
        f"--num-cpus={spec.head_cpus}",
        f"--resources={json.dumps({'node_head': 1})}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['head_agent']}",
        f"--ray-client-server-port={ports['client']}",
        f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


def worker_command(
    spec: LocalClusterSpec, temp_dir: str, gcs_address: str, index: int, agent_port: int
) -> list[str]:
    """The ``ray start --address`` command line of worker raylet ``index`` (from 1)."""
    return [
        _ray_executable(),
        "start",
        f"--address={gcs_address}",
        f"--node-ip-address={NODE_IP}",
        f"--num-cpus={spec.worker_cpus}",
        f"--resources={json.dumps({worker_resource(index): 1})}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


def worker_resource(index: int) -> str:
    """The custom resource that only worker raylet ``index`` (from 1) offers."""
    return f"node_worker_{index}"


def _environment(state: ClusterState) -> dict[str, str]:
    env = dict(os.environ)
    # An inherited address or token would tie the new processes to another cluster.
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for name, value in SERVE_ENVIRONMENT.items():
        env.setdefault(name, value)
    env.update(state.client_env())
    env.update(state.spec.env)
    return env


def _write_token(path: Path) -> None:
    # Written before any process starts, readable by this user only.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))


def _run(command: list[str], env: Mapping[str, str], timeout_s: float) -> None:
    try:
        result = subprocess.run(
            command, env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LocalClusterError(f"`{' '.join(command[:3])}` did not finish in {timeout_s:g} s") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise LocalClusterError(f"`{' '.join(command[:3])}` failed:\n" + "\n".join(tail))


def start_local_cluster(spec: LocalClusterSpec, state_file: Path | None = None) -> ClusterState:
    """Start a head and ``spec.workers`` worker raylets and wait until all are alive.

    Args:
        spec: What to start.
        state_file: Where to record the cluster (for ``rayrec cluster status|down``); None keeps
            it in memory only (tests and benchmarks hold the returned state).

    Returns:
        The running cluster.

    Raises:
        LocalClusterError: A cluster is already recorded at ``state_file`` and alive, or a node
            did not start; whatever did start has been stopped again.
    """
    if state_file is not None and state_file.exists():
        previous = ClusterState.load(state_file)
        if cluster_processes(previous.temp_dir):
            raise LocalClusterError(
                f"a local cluster is already running ({previous.dashboard_url}); "
                "stop it first with `rayrec cluster down`"
            )
        # Its processes are gone (a reboot, a kill): only the directory is left to clear.
        shutil.rmtree(previous.temp_dir, ignore_errors=True)
    # Short, because Ray's Unix socket paths live under it and those are capped at 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rrc-", dir="/tmp")
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "head_agent")}
    gcs_address = f"{NODE_IP}:{ports['gcs']}"
    state = ClusterState(
        temp_dir=temp_dir,
        gcs_address=gcs_address,
        dashboard_url=f"http://{LOOPBACK}:{ports['dashboard']}",
        client_port=ports["client"],
        nodes=[NodeRecord(role="head", resource="node_head", num_cpus=spec.head_cpus)],
        pids=[],
        started_at=time.time(),
        spec=spec,
    )
    if spec.auth == "token":
        _write_token(state.auth_token_path)
    env = _environment(state)
    try:
        _run(head_command(spec, temp_dir, ports), env, spec.startup_timeout_s)
        for index in range(1, spec.workers + 1):
            _run(worker_command(spec, temp_dir, gcs_address, index, free_port()), env, spec.startup_timeout_s)
            node = NodeRecord(role="worker", resource=worker_resource(index), num_cpus=spec.worker_cpus)
            state.nodes.append(node)
        wait_for_nodes(state, timeout_s=spec.startup_timeout_s)
    except BaseException:
        stop_local_cluster(state)
        raise
    state.pids = sorted(cluster_processes(temp_dir))
    if state_file is not None:
        state.save(state_file)
    return state


def alive_nodes(state: ClusterState) -> list[dict[str, Any]]:
    """The cluster's alive nodes, from the state API of its dashboard.

    Returns:
        One mapping per node with ``node_id``, ``is_head_node`` and ``resources_total``.

    Raises:
        LocalClusterError: The dashboard does not answer.
    """
    # The REST endpoint of the state API, called directly: Ray's client would read the token
    # and address from this process's environment, which may belong to another cluster.
    query = urllib.parse.urlencode(
        {"limit": "1000", "filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"}
    )
    try:
        body = dashboard_get(state, f"/api/v0/nodes?{query}")
        rows = body["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LocalClusterError(f"the dashboard at {state.dashboard_url} does not answer: {exc}") from exc
    return [
        {"node_id": n["node_id"], "is_head_node": n["is_head_node"], "resources_total": n["resources_total"]}
        for n in rows
    ]


def dashboard_get(state: ClusterState, path: str, timeout_s: float = 10.0) -> Any:
    """GET a JSON document from the cluster's dashboard REST API (state, jobs, Serve).

    Raises:
        OSError: The dashboard does not answer or answers with an error status.
        ValueError: The answer is not JSON.
    """
    request = urllib.request.Request(state.dashboard_url + path, headers=state.auth_headers())
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_for_nodes(state: ClusterState, timeout_s: float) -> list[dict[str, Any]]:
    """Block until every recorded node is alive.

    Raises:
        LocalClusterError: Not all nodes are alive within ``timeout_s``.
    """
    wanted = {node.resource for node in state.nodes}
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            nodes = alive_nodes(state)
        except LocalClusterError as exc:
            last_error = str(exc)
        else:
            present = {name for node in nodes for name in node["resources_total"] if name in wanted}
            if present == wanted:
                return nodes
            last_error = f"alive: {sorted(present)}, expected: {sorted(wanted)}"
        time.sleep(0.5)
    raise LocalClusterError(f"nodes not alive after {timeout_s:g} s ({last_error})")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent(pid: int) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (2nd field) may hold spaces and parentheses; fields after its last ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1])


def _names_temp_dir(argv: list[str], temp_dir: str) -> bool:
    # Only ``--flag=<path>`` tokens count: a shell whose command line merely mentions the
    # directory is not a Ray process and must survive teardown.
    prefix = temp_dir.rstrip("/")
    for token in argv:
        if not token.startswith("-") or "=" not in token:
            continue
        value = token.split("=", 1)[1]
        if value == prefix or value.startswith(prefix + "/"):
            return True
    return False


def cluster_processes(temp_dir: str) -> set[int]:
    """Process ids of this cluster: this user's processes started with its temp dir, and descendants.

    Args:
        temp_dir: The cluster's temporary directory.

    Returns:
        Live process ids (never this process).
    """
    if not _PROC.is_dir():
        raise LocalClusterError("finding a local cluster's processes needs /proc (Linux)")
    me = os.getpid()
    uid = os.getuid()
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue  # this cluster's processes all run as the user who started it
        except OSError:
            continue
        pid = int(entry.name)
        parent = _parent(pid)
        if parent is not None:
            parents[pid] = parent
        if _names_temp_dir(_cmdline(pid), temp_dir):
            roots.add(pid)
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    found.discard(me)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; only its parent's wait is missing.
    try:
        return (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_local_cluster(state: ClusterState, *, remove_temp_dir: bool = True) -> list[int]:
    """Stop every process of this cluster, and only those, by process id.

    SIGTERM first so raylets can tell their workers; SIGKILL whatever is left after a grace
    period. Workers started after :func:`start_local_cluster` are found as descendants.

    Args:
        state: The cluster.
        remove_temp_dir: Also delete its temporary directory (logs included).

    Returns:
        The process ids that were signalled.
    """
    targets = cluster_processes(state.temp_dir)
    for pid in targets:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _TERM_GRACE_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in targets):
        time.sleep(0.2)
    # Processes forked while the others were stopping are caught by a second look.
    leftovers = {pid for pid in targets if _alive(pid)} | cluster_processes(state.temp_dir)
    for pid in leftovers:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if remove_temp_dir:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    return sorted(targets | leftovers)


@contextmanager
def local_cluster(spec: LocalClusterSpec | None = None) -> Iterator[ClusterState]:
    """Start a cluster for the block and stop it afterwards, whatever happens inside.

    Args:
        spec: What to start; one head and one worker raylet of 1 CPU each by default.

    Yields:
        The running cluster.
    """
    state = start_local_cluster(spec or LocalClusterSpec())
    try:
        yield state
    finally:
        stop_local_cluster(state)
