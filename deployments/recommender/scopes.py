"""Per-request state shared by the remote stage adapters of one pipeline run.

The runner hands every stage the same frozen ``RequestContext``; stages that share one remote
call (the model-backed sources share one hop to the retrieval deployment) or report what answered
(the model version) meet here, under the request id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from deployments.wire import RetrievalReply


@dataclass(slots=True)
class RequestScope:
    """What the remote stages of one request share and report.

    Attributes:
        retrieval: The request's one call to the retrieval deployment, once started.
        retrieval_version: Bundle version the retrieval deployment answered with.
        ranker_version: Bundle version the ranker scored with.
        hop_ms: Round trip of each remote call, by deployment.
    """

    retrieval: asyncio.Future[RetrievalReply] | None = None
    retrieval_version: str | None = None
    ranker_version: str | None = None
    hop_ms: dict[str, float] = field(default_factory=dict)


class RequestScopes:
    """Open scopes by request id; a scope lives from the start of a run to its end."""

    def __init__(self) -> None:
        self._scopes: dict[str, RequestScope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    def open(self, request_id: str) -> RequestScope:
        """Start the scope of a request."""
        scope = RequestScope()
        self._scopes[request_id] = scope
        return scope

    def get(self, request_id: str) -> RequestScope | None:
        """The scope of a running request, or None outside a service run (tests, tools)."""
        return self._scopes.get(request_id)

    def close(self, request_id: str) -> RequestScope | None:
        """End a request's scope; a remote call still in flight is cancelled."""
        scope = self._scopes.pop(request_id, None)
        if scope is not None and scope.retrieval is not None and not scope.retrieval.done():
            scope.retrieval.cancel()
        return scope
