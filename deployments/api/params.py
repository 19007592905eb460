"""Path parameters shared by the routes, validated like the ids of the data model."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from core.schema import MAX_ID_LEN

_ID_PATTERN = r"^[A-Za-z0-9_\-:.@+=]+$"

ItemIdPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN, pattern=_ID_PATTERN)]
UserIdPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN, pattern=_ID_PATTERN)]
CreatorIdPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN, pattern=_ID_PATTERN)]
