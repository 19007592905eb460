"""The online store's connection: pooled sync and asyncio Redis clients plus batch helpers.

One :class:`RedisStore` per process. The sync client serves writers, jobs and the CLI; the asyncio
client, on its own pool, serves the request path. Both decode replies to ``str``. The hiredis
parser is used whenever the ``hiredis`` package is installed (``redis[hiredis]``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
import redis
import redis.asyncio as aredis
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.settings import Settings
from features.keys import RedisKeys

# OSError covers socket failures that surface before redis-py wraps them.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class StoreUnavailable(RuntimeError):
    """Redis could not be reached or did not answer in time; the message names the URL."""


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, safe to print.

    Args:
        url: A ``redis://``, ``rediss://`` or ``unix://`` URL.

    Returns:
        The same URL without the secret.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _pack(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


Unpack = Callable[[str | bytes | None], dict[str, Any] | None]
"""Decodes one value of an ``MGET`` into a mapping (``None``: the key is missing)."""


def _unpack(raw: str | bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object in Redis, found {type(value).__name__}")
    return value


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _HiredisPacking:
    """Packs commands with hiredis, as redis-py's sync client does and its asyncio client does not.

    The request path sends commands of hundreds of arguments (``SMISMEMBER`` and ``MGET`` over a
    request's candidates); packing them argument by argument in Python cost about a millisecond
    per request. The packing is redis-py's own (its sync client's serializer).
    """

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        """The command in the Redis protocol, as one buffer."""
        # The serializer's own first step, then hiredis straight away: the serializer also walks
        # every argument in Python to turn buffers into bytes, which hiredis needs only for a
        # bytearray (it refuses one, and the serializer then converts it).
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            packed: list[bytes] = self._serializer.pack(*args)
            return packed


def _hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` packing its commands with hiredis."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})


def _packed_eval(
    script: str, num_keys: int, keys_and_args: Sequence[str | bytes | int | float]
) -> list[bytes]:
    """``EVAL`` of a script, packed by hiredis in one call (see :meth:`RedisStore.eval_many`)."""
    # Any: hiredis' stub types its argument as a one-element tuple.
    command: tuple[Any, ...] = ("EVAL", script, num_keys, *keys_and_args)
    return [hiredis.pack_command(command)]


class PendingReply:
    """The reply to a command sent with :meth:`RedisStore.send_eval`, read once.

    Args:
        pool: The pool the connection goes back to.
        conn: The connection the command went out on.
    """

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: Any, conn: Any) -> None:
        self._pool = pool
        self._conn: Any = conn

    def result(self) -> Any:
        """Wait for the reply and return it, decoded as the client decodes replies.

        Raises:
            redis.RedisError: The reply could not be read, or is an error; whether the command
                ran is then unknown (callers use :meth:`RedisStore.guard`).
            RuntimeError: The reply was read or dropped already.
        """
        conn = self._take()
        try:
            return conn.read_response()
        except redis.ResponseError:
            raise  # a whole reply was read: the connection is in step
        except BaseException:
            conn.disconnect()  # a reply may still come: nobody else may read it
            raise
        finally:
            self._pool.release(conn)

    def drop(self) -> None:
        """Give the connection back without the reply; it is closed, so no later reader gets it."""
        conn = self._take()
        conn.disconnect()
        self._pool.release(conn)

    def _take(self) -> Any:
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("the reply was read or dropped already")
        return conn


def send_packed(client: redis.Redis, packed: list[bytes]) -> PendingReply:
    """Send a packed command on a connection of ``client``'s pool without waiting for its reply.

    The connection stays checked out of the pool until :meth:`PendingReply.result` or
    :meth:`PendingReply.drop`.

    Raises:
        redis.RedisError: The command could not be sent.
    """
    pool = client.connection_pool
    conn: Any = pool.get_connection()
    try:
        # Resending is safe: a command cut short never reached Redis whole, so it did not run.
        conn.retry.call_with_retry(lambda: conn.send_packed_command(packed), lambda _error: conn.disconnect())
    except BaseException:
        pool.release(conn)
        raise
    return PendingReply(pool, conn)


def send_command(client: redis.Redis, *args: str | bytes | int | float) -> PendingReply:
    """Send one command on a connection of ``client``'s pool without waiting for its reply.

    Redis runs it as soon as it has it; :meth:`PendingReply.result` collects the reply, as raw
    as the connection parses it (no redis-py response callback applies).

    Raises:
        redis.RedisError: The command could not be sent.
    """
    # Any: hiredis' stub types its argument as a one-element tuple.
    command: tuple[Any, ...] = args
    return send_packed(client, [hiredis.pack_command(command)])


class RedisStore:
    """Pooled access to the online store of one namespace.

    Args:
        url: Redis URL (``redis://host:port/db``, ``rediss://…`` or ``unix://…``).
        namespace: Prefix of every key; see :class:`features.keys.RedisKeys`.
        pool_size: Maximum connections of each pool (sync and asyncio).
        timeout_s: Socket connect and read timeout, and how long a caller waits for a free
            pooled connection before giving up.

    Attributes:
        url: The URL, as given.
        keys: The key builder of this namespace.
        client: Sync client on the sync pool.
        aclient: asyncio client on its own pool, for the serving path.
    """

    def __init__(self, url: str, namespace: str, *, pool_size: int = 64, timeout_s: float = 2.0) -> None:
        self.url = url
        self.keys = RedisKeys(namespace)
        options: dict[str, Any] = {
            "max_connections": pool_size,
            "timeout": timeout_s,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "decode_responses": True,
        }
        # Blocking pools make a burst wait briefly for a free connection instead of failing with
        # "too many connections" the moment the pool is exhausted.
        self.pool: redis.ConnectionPool = redis.BlockingConnectionPool.from_url(url, **options)
        self.apool: aredis.ConnectionPool = aredis.BlockingConnectionPool.from_url(url, **options)
        self.apool.connection_class = _hiredis_packing(self.apool.connection_class)
        self.client: redis.Redis = redis.Redis(connection_pool=self.pool)
        self.aclient: aredis.Redis = aredis.Redis(connection_pool=self.apool)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStore:
        """A store configured from the process settings.

        Args:
            settings: Validated settings (URL, namespace, pool size, timeout).

        Returns:
            A store; nothing is connected until the first call.
        """
        return cls(
            settings.redis_url,
            settings.namespace,
            pool_size=settings.redis_pool_size,
            timeout_s=settings.redis_timeout_s,
        )

    def __repr__(self) -> str:
        return f"RedisStore({redact_url(self.url)!r}, namespace={self.keys.namespace!r})"

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"Redis at {redact_url(self.url)} is unavailable: {exc}")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn connection and timeout errors raised inside the block into :class:`StoreUnavailable`.

        Raises:
            StoreUnavailable: Redis could not be reached or did not answer in time.
        """
        try:
            yield
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    def ping(self) -> None:
        """Check that Redis answers.

        Raises:
            StoreUnavailable: It does not.
        """
        with self.guard():
            self.client.ping()

    async def aping(self) -> None:
        """Check that Redis answers on the asyncio pool.

        Raises:
            StoreUnavailable: It does not.
        """
        try:
            await self.aclient.ping()
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    def eval_many(self, script: str, num_keys: int, *keys_and_args: str | bytes | int | float) -> Any:
        """``EVAL`` of a script with many arguments on the sync client.

        redis-py checks and converts every argument of a command in Python before hiredis packs
        them, which for the stream processor's commit (some 30 arguments per event) cost a tenth
        of its CPU. Here hiredis packs the command in one call; the connection, its retries
        and the reply are handled as ``client.eval`` handles them.

        Args:
            script: The Lua source.
            num_keys: How many of ``keys_and_args`` are keys.
            *keys_and_args: The keys, then the other arguments (str, bytes, int or float).

        Returns:
            The script's reply, decoded as the client decodes replies.

        Raises:
            redis.RedisError: As ``client.eval`` raises (callers use :meth:`guard`).
        """
        packed = _packed_eval(script, num_keys, keys_and_args)
        pool = self.pool
        conn: Any = pool.get_connection()

        def call() -> Any:
            conn.send_packed_command(packed)
            return conn.read_response()

        try:
            return conn.retry.call_with_retry(call, lambda _error: conn.disconnect())
        finally:
            pool.release(conn)

    def send_eval(
        self, script: str, num_keys: int, *keys_and_args: str | bytes | int | float
    ) -> PendingReply:
        """Send an :meth:`eval_many` command without waiting for its reply.

        Redis runs the script as soon as it has it; the caller does other work (on other
        connections of the pool) and collects the reply with :meth:`PendingReply.result`. The
        connection stays checked out of the pool until then.

        Args:
            script: The Lua source.
            num_keys: How many of ``keys_and_args`` are keys.
            *keys_and_args: The keys, then the other arguments (str, bytes, int or float).

        Returns:
            The reply to come.

        Raises:
            redis.RedisError: The command could not be sent (callers use :meth:`guard`).
        """
        return send_packed(self.client, _packed_eval(script, num_keys, keys_and_args))

    def mget_json(
        self, keys: Sequence[str], *, chunk: int = 1000, unpack: Unpack = _unpack
    ) -> list[dict[str, Any] | None]:
        """Read packed JSON records, in one round trip.

        Args:
            keys: Full key names (from :attr:`keys`).
            chunk: Keys per ``MGET``; more keys become several ``MGET`` in one pipeline.
            unpack: Decodes one stored value (``None`` for a missing key); JSON objects by
                default, see :func:`features.serving_record.loads` for serving records.

        Returns:
            One decoded object per key, in order; ``None`` where the key is missing.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        if not keys:
            return []
        with self.guard():
            if len(keys) <= chunk:
                raw: list[str | bytes | None] = self.client.mget(keys)
            else:
                pipe = self.client.pipeline(transaction=False)
                for part in _chunks(keys, chunk):
                    pipe.mget(part)
                raw = [value for reply in pipe.execute() for value in reply]
        return [unpack(value) for value in raw]

    async def amget_json(
        self, keys: Sequence[str], *, chunk: int = 1000, unpack: Unpack = _unpack
    ) -> list[dict[str, Any] | None]:
        """Async :meth:`mget_json` on the asyncio pool, for the request path.

        Args:
            keys: Full key names.
            chunk: Keys per ``MGET``.
            unpack: Decodes one stored value, as for :meth:`mget_json`.

        Returns:
            One decoded object per key, in order; ``None`` where the key is missing.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        if not keys:
            return []
        try:
            if len(keys) <= chunk:
                raw: list[str | bytes | None] = await self.aclient.mget(keys)
            else:
                pipe = self.aclient.pipeline(transaction=False)
                for part in _chunks(keys, chunk):
                    pipe.mget(part)
                raw = [value for reply in await pipe.execute() for value in reply]
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        return [unpack(value) for value in raw]

    def mset_json(self, mapping: Mapping[str, Mapping[str, Any]], *, chunk: int = 1000) -> None:
        """Write packed JSON records with pipelined ``MSET`` of ``chunk`` keys each.

        Args:
            mapping: Full key name to a JSON-serialisable object (datetimes become ISO strings).
            chunk: Keys per ``MSET``.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        if not mapping:
            return
        packed = [(key, _pack(value)) for key, value in mapping.items()]
        with self.guard():
            pipe = self.client.pipeline(transaction=False)
            for part in _chunks(packed, chunk):
                pipe.mset(dict(part))
            pipe.execute()

    def sadd_many(self, members: Mapping[str, Iterable[str]], *, chunk: int = 1000) -> int:
        """Add members to several sets in one pipeline.

        Args:
            members: Full set key to the members to add; empty iterables are skipped.
            chunk: Members per ``SADD``.

        Returns:
            How many members were new.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        with self.guard():
            pipe = self.client.pipeline(transaction=False)
            queued = 0
            for key, values in members.items():
                for part in _chunks(list(values), chunk):
                    pipe.sadd(key, *part)
                    queued += 1
            if not queued:
                return 0
            return sum(int(n) for n in pipe.execute())

    def smembers_many(self, keys: Sequence[str]) -> list[set[str]]:
        """Read several sets in one pipeline.

        Args:
            keys: Full set keys.

        Returns:
            The members of each set, in order; an empty set where the key is missing.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        if not keys:
            return []
        with self.guard():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.smembers(key)
            return [set(reply) for reply in pipe.execute()]

    def delete_namespace(self, *, batch: int = 1000) -> int:
        """Delete every key of this namespace (``SCAN`` + ``UNLINK`` in batches).

        Keys of other namespaces on the same server are left alone.

        Args:
            batch: Keys per ``SCAN`` step and per ``UNLINK``.

        Returns:
            How many keys were deleted.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        deleted = 0
        pending: list[str] = []
        with self.guard():
            for key in self.client.scan_iter(match=self.keys.pattern(), count=batch):
                pending.append(key)
                if len(pending) >= batch:
                    deleted += int(self.client.unlink(*pending))
                    pending.clear()
            if pending:
                deleted += int(self.client.unlink(*pending))
        return deleted

    def close(self) -> None:
        """Close the sync pool's connections (the asyncio pool is closed by :meth:`aclose`)."""
        self.client.close()
        self.pool.disconnect()

    async def aclose(self) -> None:
        """Close both pools; call from the event loop that used :attr:`aclient`."""
        await self.aclient.aclose()
        await self.apool.disconnect()
        self.close()
