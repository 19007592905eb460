"""Candidate sources: each produces candidates for a request under its own budget.

Every source implements :class:`core.stages.CandidateSource`. Sources backed by Redis read through
:class:`features.redis_store.RedisStore` or :class:`features.online_store.OnlineFeatureStore`;
the model-backed ones take their index or table as a constructor argument, so they run in-process
in tests and inside a Serve replica alike. Each module holds one source.
"""
