"""The Redis key layout: every key name the platform uses is built here and nowhere else.

Every key starts with ``f"{namespace}:"`` so several deployments or test runs can share one
server and :meth:`RedisKeys.pattern` finds all of one namespace's keys.

Layout rule: a key is either ``{namespace}:{kind}:{fixed}`` (one key per namespace) or
``{namespace}:{kind}:{id}`` (one key per entity), with ``kind`` a fixed token without ``:`` and
the entity id always last. Ids may themselves contain ``:``; because no per-entity kind is ever
used for a fixed key and the id is the tail, two different (kind, id) pairs can never build the
same key.
"""

from __future__ import annotations

import re

from core.schema import EntityType

_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")


def _entity(kind: str, entity_id: str) -> str:
    if not entity_id:
        raise ValueError(f"an empty id cannot name a {kind} key")
    return entity_id


class RedisKeys:
    """Builds the namespaced Redis key names.

    Args:
        namespace: The prefix of every key: 1-32 characters of ``a-z``, ``0-9``, ``_`` or ``-``
            (the rule of ``Settings.namespace``), so it never holds ``:`` or glob characters.

    Raises:
        ValueError: The namespace breaks that rule.
    """

    def __init__(self, namespace: str) -> None:
        if not _NAMESPACE_RE.match(namespace):
            raise ValueError(
                f"namespace {namespace!r} must be 1-32 characters of a-z, 0-9, '_' or '-', "
                "starting with a letter or digit"
            )
        self.namespace = namespace
        self._p = f"{namespace}:"

    def __repr__(self) -> str:
        return f"RedisKeys({self.namespace!r})"

    def pattern(self) -> str:
        """A ``SCAN MATCH`` pattern covering every key of this namespace, and only those."""
        return f"{self._p}*"

    # Catalog: items, users, social graph.

    def item(self, item_id: str) -> str:
        """STRING: the packed JSON record of one item (the fields of ``core.schema.Item``)."""
        return f"{self._p}item:{_entity('item', item_id)}"

    def user(self, user_id: str) -> str:
        """STRING: the packed JSON record of one user (the fields of ``core.schema.UserProfile``)."""
        return f"{self._p}user:{_entity('user', user_id)}"

    def items_all(self) -> str:
        """SET of every item id in the catalog, removed items included."""
        return f"{self._p}items:all"

    def items_active(self) -> str:
        """SET of the ids of the items that may be served (status ``active``)."""
        return f"{self._p}items:active"

    def items_version(self) -> str:
        """STRING (integer): bumped by every write of item records (``features.catalog.CatalogStore``).

        A replica that indexes the catalog reads it first and rebuilds only when it moved.
        """
        return f"{self._p}items:version"

    def users_all(self) -> str:
        """SET of every user id in the catalog (erased users are taken out)."""
        return f"{self._p}users:all"

    def creator_items(self, creator_id: str) -> str:
        """SET of the ids of one creator's active items."""
        return f"{self._p}creator-items:{_entity('creator', creator_id)}"

    def following(self, user_id: str) -> str:
        """SET of the ids this user follows."""
        return f"{self._p}following:{_entity('user', user_id)}"

    def followers(self, user_id: str) -> str:
        """SET of the ids of the users who follow this user."""
        return f"{self._p}followers:{_entity('user', user_id)}"

    def edge_count(self) -> str:
        """STRING (integer): how many active follow edges exist, kept by the catalog writer."""
        return f"{self._p}edges:count"

    # Streams.

    def stream_events(self) -> str:
        """STREAM of accepted behaviour events, read by the stream processor and the lake writer."""
        return f"{self._p}stream:events"

    def stream_impressions(self) -> str:
        """STREAM of served recommendation lists (the recommendation log)."""
        return f"{self._p}stream:impressions"

    def stream_catalog(self, table: str) -> str:
        """STREAM of API catalog changes to one change-log table (items, users, edges), for the lake."""
        return f"{self._p}stream:catalog:{_entity('table', table)}"

    # Exclusions and privacy: read on every request.

    def exclusions(self, user_id: str) -> str:
        """SET of item ids this user hid, marked not interested or reported."""
        return f"{self._p}excluded:{_entity('user', user_id)}"

    def blocked_creators(self, user_id: str) -> str:
        """SET of creator ids this user blocked."""
        return f"{self._p}blocked-creators:{_entity('user', user_id)}"

    def removed_items(self) -> str:
        """SET of item ids taken down from the catalog (status ``removed``)."""
        return f"{self._p}global:removed-items"

    def blocked_items(self) -> str:
        """SET of item ids blocked for everyone by an operator (safety, legal)."""
        return f"{self._p}global:blocked-items"

    def blocked_creators_global(self) -> str:
        """SET of creator ids blocked for everyone by an operator."""
        return f"{self._p}global:blocked-creators"

    def erased_users(self) -> str:
        """SET of erased user ids: tombstones that keep late events of those users out."""
        return f"{self._p}global:erased-users"

    # Idempotency.

    def processed_events(self, partition: str, bucket: int) -> str:
        """SET of the ids of events already applied to a feature partition, for one minute of event time.

        ``bucket`` is :func:`features.online_store.marker_bucket` of the events' time. Many small
        sets with a TTL, one per partition (see :mod:`features.partitions`) and minute, rather
        than one set: they expire instead of growing without bound.
        """
        if bucket < 0:
            raise ValueError(f"a processed-marker bucket is never negative, not {bucket}")
        return f"{self.processed_prefix(partition)}{bucket}"

    def processed_prefix(self, partition: str) -> str:
        """What :meth:`processed_events` puts before the bucket (the sets of a whole batch)."""
        return f"{self._p}processed:{_entity('partition', partition)}:"

    # Serving.

    def last_list(self, surface: str, user_id: str) -> str:
        """STRING: JSON of the list last served to a user on a surface, the fallback of a failed request."""
        if not surface or ":" in surface:
            raise ValueError(f"surface {surface!r} must be non-empty and hold no ':'")
        return f"{self._p}last-list:{surface}:{_entity('user', user_id)}"

    def experiments(self) -> str:
        """STRING: JSON of the whole experiment configuration (``policies.experiments.ExperimentSet``)."""
        return f"{self._p}experiments"

    # Features.

    def features(self, entity_type: EntityType | str, entity_id: str) -> str:
        """STRING: the packed JSON serving record of one entity's features, read with ``MGET``."""
        kind = EntityType(entity_type).value
        return f"{self._p}features:{kind}:{_entity(kind, entity_id)}"

    def feature_state(self, entity_type: EntityType | str, entity_id: str) -> str:
        """STRING: the mutable feature state (counters, lists) the stream processor updates.

        Its layout is :mod:`features.online_store`'s. (States were hashes under
        ``feature-state:``; those keys are no longer read and expire with their TTL.)
        """
        kind = EntityType(entity_type).value
        return f"{self._p}state:{kind}:{_entity(kind, entity_id)}"

    def features_prefix(self, entity_type: EntityType | str) -> str:
        """What :meth:`features` puts before the (non-empty) entity id.

        For the stream processor, which names two keys per entity of every batch: concatenating
        onto a prefix costs a fraction of a call that converts the entity type each time.
        """
        return f"{self._p}features:{EntityType(entity_type).value}:"

    def feature_state_prefix(self, entity_type: EntityType | str) -> str:
        """What :meth:`feature_state` puts before the (non-empty) entity id (see :meth:`features_prefix`)."""
        return f"{self._p}state:{EntityType(entity_type).value}:"

    # Trending (see features.trending for the landmark epochs).

    def trending_global(self, epoch: int) -> str:
        """ZSET: forward-decayed trending score per item id over all events, for one landmark epoch."""
        return f"{self._p}trending-global:{self._epoch(epoch)}"

    def trending_region(self, region: str, epoch: int) -> str:
        """ZSET: forward-decayed trending score per item id in one region, for one landmark epoch."""
        return f"{self._p}trending-region:{self._epoch(epoch)}:{_entity('region', region)}"

    def trending_category(self, category: str, epoch: int) -> str:
        """ZSET: forward-decayed trending score per item id in one category, for one landmark epoch."""
        return f"{self._p}trending-category:{self._epoch(epoch)}:{_entity('category', category)}"

    def stream_dead_letters(self) -> str:
        """STREAM of entries no consumer could decode: the original fields plus ``group`` and ``error``."""
        return f"{self._p}stream:dead-letters"

    @staticmethod
    def _epoch(epoch: int) -> str:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"a trending epoch is a non-negative int, not {epoch!r}")
        return str(epoch)

    # Rate limits (see features.rate_limiter).

    def rate_limit_events(self, client_id: str) -> str:
        """HASH: one client's event token bucket (``tokens``, ``at_s``), expiring once it is full again.

        ``client_id`` is ``key:<digest>`` or ``addr:<address>``: never an API key itself, since key
        names show in ``SCAN`` and ``MONITOR`` output.
        """
        return f"{self._p}rate-limit-events:{_entity('client', client_id)}"
