"""The fault suite's traffic harness: steady traffic over real HTTP while something breaks.

:class:`TrafficDriver` sends recommendation requests and event batches at a fixed, modest rate to
the running Serve application and records every answer: the status (or the connection error),
the ``fallback`` a recommendation was served with, and every event id acknowledged with ``202``.
After the fault and the recovery, :meth:`TrafficDriver.finish` waits for the write path to settle
and checks that every acknowledged event reached the lake (once, after dedupe by ``event_id``) and
was folded once into the online counters, and that nothing refused was stored.

Clients retry what is safe to retry: a recommendation request is idempotent, and an event batch
is re-sent with the same event ids, which every consumer de-duplicates. A request answered only
on a retry is recorded with the first attempt's outcome, so a scenario can say where retries are
acceptable (a request in flight on a replica that was killed) and where none may happen.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.lake import Lake
from core.schema import EntityType
from core.settings import Settings
from features.online_store import OnlineFeatureStore
from features.redis_store import RedisStore
from tests.integration.test_redis_outage import DurableRedis

APP = "rayrec-faults"
ADMIN_TOKEN = "fault-suite-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

RECOMMEND_PERIOD_S = 0.1
"""One recommendation request every 100 ms per reader thread."""
READERS = 2
EVENT_PERIOD_S = 0.2
"""One event call every 200 ms: a batch of ``BATCH_SIZE``, every fourth call a single event."""
BATCH_SIZE = 4
SCENARIO_ITEMS = 12
"""Items (and as many users) of a scenario's events; ids of their own, so counters are exact."""
RETRIES = 5
RETRY_WAIT_S = 0.3
TIMEOUT_S = 30.0
EVENT_TYPES = ("view", "click", "like", "view", "share")
RECOMMEND_ROUTE = "/api/recommendations"


def until(predicate: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")


@dataclass
class FaultApp:
    """The running application of the fault suite and what it was built from."""

    url: str
    home: Path
    settings: Settings
    store: RedisStore
    redis: DurableRedis
    version: str
    users: list[str]
    reports: Path

    def get(self, path: str, **params: Any) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=TIMEOUT_S) as client:
            return client.get(path, params=params)

    def recommend(self, user: str, limit: int = 20) -> dict[str, Any]:
        response = self.get(RECOMMEND_ROUTE, userId=user, limit=limit)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def admin_status(self) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, timeout=TIMEOUT_S) as client:
            response = client.get("/api/admin/serving", headers=ADMIN)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        """Wait until a request is served by the full pipeline (no fallback, the model's version)."""

        def normal() -> bool:
            try:
                response = self.get(RECOMMEND_ROUTE, userId=self.users[0], limit=20)
            except httpx.HTTPError:
                return False
            if response.status_code != 200:
                return False
            body = response.json()
            return body["fallback"] is None and body["modelVersion"] == self.version

        until(normal, timeout_s, "full service")

    def set_fault(self, deployment: str, fault: str | None, delay_ms: float = 500.0) -> None:
        """Switch a model deployment's failure drill (its ``user_config``), as an operator does."""
        from deployments.reload import update_user_configs, wait_running

        update_user_configs(APP, {deployment: {"fault": fault, "fault_delay_ms": delay_ms}})
        wait_running(APP, timeout_s=120)


# --- replicas -------------------------------------------------------------------------------------


def running_replicas(deployment: str) -> dict[str, str]:
    """Actor id -> actor name of the deployment's running replicas, from the Serve controller."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client()
    assert client is not None, "Serve is not running"
    details = ServeInstanceDetails.model_validate(client.get_serve_details())
    app = details.applications[APP]
    return {
        str(r.actor_id): str(r.actor_name)
        for r in app.deployments[deployment].replicas
        if str(getattr(r.state, "value", r.state)) == "RUNNING" and r.actor_id and r.actor_name
    }


def kill_replica(deployment: str) -> str:
    """``ray.kill`` one running replica of a deployment (no restart: Serve must replace it).

    Returns:
        The killed replica's actor id.
    """
    import ray

    # Right after a config change (a rollback, say) a replica is reconfiguring for a moment.
    replicas: dict[str, str] = until(
        lambda: running_replicas(deployment), 60, f"a running replica of {deployment}"
    )
    actor_id, name = sorted(replicas.items())[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return actor_id


def wait_replaced(deployment: str, killed: str, replicas: int, timeout_s: float = 120.0) -> None:
    """Wait until the deployment runs ``replicas`` replicas again, none of them the killed one."""
    from deployments.reload import wait_running

    def replaced() -> bool:
        running = running_replicas(deployment)
        return killed not in running and len(running) == replicas

    until(replaced, timeout_s, f"Serve replacing the killed {deployment} replica")
    wait_running(APP, timeout_s=timeout_s)


def consumer_actor(app: FaultApp, role: str) -> Any:
    """The ``stream-processor-<partition>`` or ``lake-writer`` actor the stream workers replica started."""
    import ray

    # Named after the Redis namespace; looked up across Ray namespaces, as the replica that
    # created it runs in the one Serve gives it.
    name = f"{app.settings.namespace}-{role}"
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
    assert len(found) == 1, f"{name}: {found}"
    return ray.get_actor(name, namespace=found[0]["namespace"])


# --- traffic ----------------------------------------------------------------------------------------


@dataclass
class Call:
    """One request and what became of it.

    Attributes:
        flow: ``recommend`` or ``events``.
        sent_s: When it was first sent, seconds since the driver started.
        outcome: The final status code as text, or the error's class name.
        first: The first attempt's outcome when it needed a retry, else None.
        fallback: The answer's ``fallback`` (recommendations answered 200), ``none`` for none.
        during_outage: Sent or answered while the scenario declared the store down.
        retry_window: Sent or answered while the scenario allowed retries (a replica it killed
            had requests in flight).
    """

    flow: str
    sent_s: float
    outcome: str
    first: str | None = None
    fallback: str | None = None
    during_outage: bool = False
    retry_window: bool = False
    version: str | None = None


@dataclass
class Report:
    """A scenario's report line."""

    scenario: str
    requests_sent: int
    errors: int
    retried: int
    fallbacks: dict[str, int]
    statuses: dict[str, int]
    events_accepted: int
    events_refused: int
    events_found_lake: int
    events_found_online: int
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)


class TrafficDriver:
    """Steady traffic against the application while a scenario breaks something.

    Args:
        app: The application.
        scenario: Short name; prefixes the scenario's event, user and item ids.
    """

    def __init__(self, app: FaultApp, scenario: str) -> None:
        self.app = app
        self.scenario = scenario
        self.calls: list[Call] = []
        self.accepted: dict[str, str] = {}
        """Event id -> item id of every event acknowledged with 202."""
        self.refused: dict[str, str] = {}
        """Event id -> item id of every event answered 503 (and never acknowledged)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outage = threading.Event()
        self._retry_window = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()
        self._next_event = 0

    # -- running --

    def __enter__(self) -> TrafficDriver:
        self._started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._readers, args=(n,), daemon=True, name=f"reader-{n}")
            for n in range(READERS)
        ]
        self._threads.append(threading.Thread(target=self._writer, daemon=True, name="writer"))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * TIMEOUT_S)
        assert not any(t.is_alive() for t in self._threads), "a traffic thread did not stop"

    @contextmanager
    def outage(self) -> Iterator[None]:
        """Calls sent or answered inside this block are allowed the store-down answers."""
        self._outage.set()
        try:
            yield
        finally:
            self._outage.clear()

    @contextmanager
    def retries_tolerated(self) -> Iterator[None]:
        """Calls sent or answered inside this block may need a retry (their replica was killed)."""
        self._retry_window.set()
        try:
            yield
        finally:
            self._retry_window.clear()

    def wait_calls(self, n: int, flow: str = "recommend", timeout_s: float = 60.0) -> None:
        """Wait until ``n`` more calls of ``flow`` have been answered."""
        start = self.count(flow)
        until(lambda: self.count(flow) >= start + n, timeout_s, f"{n} more {flow} calls")

    def count(self, flow: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.flow == flow)

    def recent(self, flow: str, n: int) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.flow == flow][-n:]

    def _now(self) -> float:
        return time.monotonic() - self._started

    def _paced(self, period_s: float, offset_s: float, step: Callable[[httpx.Client, int], None]) -> None:
        next_at = time.monotonic() + offset_s
        n = 0
        with httpx.Client(base_url=self.app.url, timeout=TIMEOUT_S) as client:
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                    continue
                step(client, n)
                n += 1
                # Open loop would pile up calls behind a replica being replaced; a paced closed
                # loop keeps the rate modest and the traffic steady once answers are quick again.
                next_at = max(next_at + period_s, time.monotonic())

    def _send(
        self, client: httpx.Client, request: httpx.Request, retry_503: bool | Callable[[], bool]
    ) -> tuple[str, Any, str | None]:
        """Send with retries on connection errors and 5xx; returns (outcome, body, first failure).

        ``retry_503`` says whether a 503 is retried too; a callable decides when the 503 arrives.
        """
        first: str | None = None
        outcome = "unsent"
        body: Any = None
        for attempt in range(RETRIES + 1):
            try:
                response = client.send(request)
            except httpx.HTTPError as exc:
                outcome, body = type(exc).__name__, None
            else:
                outcome = str(response.status_code)
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                retried = retry_503() if callable(retry_503) else retry_503
                if response.status_code < 500 or (response.status_code == 503 and not retried):
                    return outcome, body, first
            if first is None:
                first = outcome
            if attempt < RETRIES and not self._stop.is_set():
                time.sleep(RETRY_WAIT_S)
        return outcome, body, first

    def _record(self, call: Call) -> None:
        call.during_outage = call.during_outage or self._outage.is_set()
        call.retry_window = call.retry_window or self._retry_window.is_set()
        with self._lock:
            self.calls.append(call)

    def _readers(self, reader: int) -> None:
        users = self.app.users

        def step(client: httpx.Client, n: int) -> None:
            user = users[(n * READERS + reader) % len(users)]
            outage, window = self._outage.is_set(), self._retry_window.is_set()
            sent = self._now()
            request = client.build_request("GET", RECOMMEND_ROUTE, params={"userId": user, "limit": 20})
            outcome, body, first = self._send(client, request, retry_503=True)
            fallback = version = None
            if outcome == "200" and isinstance(body, dict):
                fallback, version = body["fallback"] or "none", body["modelVersion"]
            self._record(Call("recommend", sent, outcome, first, fallback, outage, window, version))

        self._paced(RECOMMEND_PERIOD_S, reader * RECOMMEND_PERIOD_S / READERS, step)

    def _event(self) -> dict[str, Any]:
        n = self._next_event
        self._next_event += 1
        return {
            "eventId": f"{self.scenario}-ev-{n}",
            "userId": f"{self.scenario}-user-{n % SCENARIO_ITEMS}",
            "itemId": f"{self.scenario}-item-{(n * 5) % SCENARIO_ITEMS}",
            "eventType": EVENT_TYPES[n % len(EVENT_TYPES)],
            "context": {"surface": "home", "device": "mobile"},
        }

    def _post_events(self, client: httpx.Client, events: list[dict[str, Any]], single: bool) -> None:
        outage, window = self._outage.is_set(), self._retry_window.is_set()
        sent = self._now()
        if single:
            request = client.build_request("POST", "/api/events", json=events[0])
        else:
            request = client.build_request("POST", "/api/events/batch", json={"events": events})
        # A 503 is the answer while the store is down, and is then final; while a killed replica
        # is being replaced it can also come from the load balancer, and a client resends (the
        # event ids make the resend idempotent), so it counts as a retry in that window.
        outcome, body, first = self._send(
            client, request, retry_503=lambda: self._retry_window.is_set() and not self._outage.is_set()
        )
        items = {e["eventId"]: e["itemId"] for e in events}
        if outcome == "202":
            acked = [body["eventId"]] if single else list(body["eventIds"])
            assert sorted(acked) == sorted(items), (acked, items)
            with self._lock:
                self.accepted.update(items)
        elif outcome == "503":
            with self._lock:
                self.refused.update(items)
        self._record(Call("events", sent, outcome, first, None, outage, window))

    def _writer(self) -> None:
        def step(client: httpx.Client, n: int) -> None:
            single = n % 4 == 3
            with self._lock:
                events = [self._event() for _ in range(1 if single else BATCH_SIZE)]
            self._post_events(client, events, single)

        self._paced(EVENT_PERIOD_S, EVENT_PERIOD_S / 2, step)

    def burst(self, batches: int, size: int) -> None:
        """Send ``batches`` batches of ``size`` events back to back (from the calling thread)."""
        with httpx.Client(base_url=self.app.url, timeout=TIMEOUT_S) as client:
            for _ in range(batches):
                with self._lock:
                    events = [self._event() for _ in range(size)]
                self._post_events(client, events, single=False)

    # -- checking --

    def errors(self) -> list[Call]:
        """Calls whose answer the rules do not allow.

        Recommendations must answer 200; event calls 202, or 503 while the store is down. A call
        that needed a retry is an error unless it was in flight when the scenario killed the
        replica serving it.
        """
        bad = []
        for call in self.calls:
            allowed = {"200"} if call.flow == "recommend" else {"202"}
            if call.flow == "events" and call.during_outage:
                allowed.add("503")
            if call.outcome not in allowed or (call.first is not None and not call.retry_window):
                bad.append(call)
        return bad

    def _found(self, timeout_s: float) -> tuple[set[str], dict[str, int]]:
        """Wait until the lake and the online counters hold what was accepted; return what they hold."""
        prefix = f"{self.scenario}-ev-"
        lake = Lake(str(self.app.home))
        online = OnlineFeatureStore(self.app.store)
        expected = Counter(self.accepted.values())
        items = sorted({f"{self.scenario}-item-{k}" for k in range(SCENARIO_ITEMS)})
        state: dict[str, Any] = {"lake": set(), "online": {}}

        def settled() -> bool:
            try:
                return check()
            except Exception as exc:  # a pooled connection from before a Redis restart
                state["error"] = f"{type(exc).__name__}: {exc}"
                return False

        def check() -> bool:
            ids = lake.read("events", columns=["event_id"]).column("event_id").to_pylist()
            state["lake"] = {i for i in ids if i.startswith(prefix)}
            records = online.get_serving(EntityType.ITEM, items)
            state["online"] = {
                item: int((record or {}).get("item_engagement:event_count_total", 0))
                for item, record in zip(items, records, strict=True)
            }
            counted = {item: n for item, n in state["online"].items() if n}
            return state["lake"] >= set(self.accepted) and counted == dict(expected)

        with contextlib.suppress(AssertionError):  # the assertions of finish() say what differs
            until(settled, timeout_s, "the write path settling")
        lake_ids: set[str] = state["lake"]
        counters: dict[str, int] = state["online"]
        return lake_ids, counters

    def finish(self, *, settle_s: float = 90.0, **notes: Any) -> Report:
        """Stop the traffic, wait for the write path, write the report and check it.

        Args:
            settle_s: How long the lake writer and the stream processor get to catch up.
            **notes: Scenario facts for the report.

        Returns:
            The report (already checked).
        """
        self.stop()
        started = time.monotonic()
        lake_ids, counters = self._found(settle_s)
        expected = Counter(self.accepted.values())
        folded = {item: n for item, n in counters.items() if n}
        found_online = sum(min(folded.get(item, 0), n) for item, n in expected.items())
        lake_lines = (
            Lake(str(self.app.home)).read("events", columns=["event_id"]).column("event_id").to_pylist()
        )
        duplicates = sum(n - 1 for i, n in Counter(lake_lines).items() if i in lake_ids and n > 1)
        report = Report(
            scenario=self.scenario,
            requests_sent=len(self.calls),
            errors=len(self.errors()),
            retried=sum(1 for c in self.calls if c.first is not None),
            fallbacks=dict(Counter(c.fallback for c in self.calls if c.fallback is not None)),
            statuses=dict(Counter(f"{c.flow}:{c.outcome}" for c in self.calls)),
            events_accepted=len(self.accepted),
            events_refused=len(self.refused),
            events_found_lake=len(lake_ids & set(self.accepted)),
            events_found_online=found_online,
            seconds=round(self._now(), 1),
            notes={
                **notes,
                "settle_s": round(time.monotonic() - started, 1),
                "lake_rows_rewritten": duplicates,
            },
        )
        self.app.reports.mkdir(parents=True, exist_ok=True)
        path = self.app.reports / f"{self.scenario}.json"
        path.write_text(json.dumps(asdict(report), indent=2))
        print(f"\nfault-report {json.dumps(asdict(report), separators=(',', ':'))}  ({path})")

        bad = self.errors()
        assert not bad, f"{len(bad)} calls answered against the rules, e.g. {bad[:5]}"
        assert self.count("recommend") > 0 and self.accepted, "no traffic was recorded"
        assert report.events_found_lake == report.events_accepted, sorted(set(self.accepted) - lake_ids)[:10]
        assert not lake_ids - set(self.accepted), (
            f"events never acknowledged were stored: {sorted(lake_ids - set(self.accepted))[:10]}"
        )
        assert folded == dict(expected), (
            f"online counters {folded} != acknowledged events per item {dict(expected)}"
        )
        assert report.events_found_online == report.events_accepted
        return report
