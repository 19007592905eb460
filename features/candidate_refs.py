"""References of the features the serving path attaches to candidates and reads from the request.

The views of :mod:`features.definitions` are computed from events; the ones here are not. They
are catalog fields copied onto candidates by the hydrators (``item:*``), per-request safety state
read by the filters (``serving:*``), provenance set by candidate sources (``retrieval:*``,
``sponsored:*``), marks set by re-ranking policies (``rerank:*``) and profile fields the ingress
puts into ``RequestContext.user_features`` (``user_profile:*``). Every stage names them through
these constants, so a rename is one edit.
"""

from __future__ import annotations

from typing import Final

# Catalog fields (hydrators, from the item's catalog record).

ITEM_CATEGORY: Final = "item:category"
"""str: the item's catalog category."""

ITEM_TAGS: Final = "item:tags"
"""tuple[str, ...]: the item's tags."""

ITEM_CREATOR_ID: Final = "item:creator_id"
"""str: who made the item."""

ITEM_TYPE: Final = "item:item_type"
"""str: ``video``, ``product``, ..."""

ITEM_TITLE: Final = "item:title"
"""str: display title, when the catalog has one."""

ITEM_CREATED_AT_S: Final = "item:created_at_s"
"""float: when the item entered the catalog, epoch seconds."""

ITEM_REGION: Final = "item:region"
"""str: region the item belongs to (``metadata.region``), when it has one."""

ITEM_LANGUAGE: Final = "item:language"
"""str: language of the item (``metadata.language``), when it has one."""

ITEM_EMBEDDING: Final = "item:embedding"
"""tuple[float, ...]: the item tower's embedding, attached by the model-serving half when loaded."""

# Serving state (ServingStateHydrator, fetched fresh on every request; read by the filters).

SERVING_REMOVED: Final = "serving:removed"
"""bool: the item was taken down, or the catalog does not know it."""

SERVING_BLOCKED_ITEM: Final = "serving:blocked_item"
"""bool: an operator blocked the item for everyone."""

SERVING_BLOCKED_CREATOR: Final = "serving:blocked_creator"
"""bool: an operator blocked the item's creator for everyone."""

SERVING_USER_BLOCKED_CREATOR: Final = "serving:user_blocked_creator"
"""bool: the requesting user blocked the item's creator."""

SERVING_EXCLUDED: Final = "serving:excluded"
"""bool: the requesting user hid the item, marked it not interested or reported it."""

# Provenance (candidate sources).

RETRIEVAL_SEED_ITEM_ID: Final = "retrieval:seed_item_id"
"""str: the item of the user's history (or the page's item) that led a source to this candidate."""

SPONSORED_CAMPAIGN_ID: Final = "sponsored:campaign_id"
"""str: the campaign that sponsors the candidate; its presence marks a sponsored candidate."""

SPONSORED_BID: Final = "sponsored:bid"
"""float: the campaign's bid per impression, used to order sponsored candidates."""

# Re-ranking marks (policies).

RERANK_EXPLORATION: Final = "rerank:exploration"
"""bool: the item fills an exploration slot."""

RERANK_FRESHNESS_BOOST: Final = "rerank:freshness_boost"
"""float: what the freshness policy added to the item's score."""

# Profile (the ingress, from the user's profile record).

USER_INTERESTS: Final = "user_profile:interests"
"""tuple[str, ...]: onboarding interests (categories or tags), strongest first."""

USER_REGION: Final = "user_profile:region"
"""str: the profile's region, used when the request carries none."""

USER_LANGUAGE: Final = "user_profile:language"
"""str: the profile's language, used when the request carries none."""

USER_AGE_GROUP: Final = "user_profile:age_group"
"""str: the profile's age group (``unknown`` when not given); an input of the user tower."""

INTERESTS_PARAM: Final = "interests"
"""Key of ``RequestContext.params``: comma-separated interests that override the profile's."""
