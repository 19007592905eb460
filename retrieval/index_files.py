"""The on-disk layout of a saved index directory; the one place that names its files.

```
<dir>/metadata.json     IndexMetadata; written last, so a directory without it is incomplete
<dir>/item_ids.parquet  one string column ``item_id``, row = position
<dir>/embeddings.npy    exact index only: float32 (size, dim)
<dir>/scann/            ScaNN index only: the searcher's own serialisation (relative paths)
```

Directories are local: the model registry copies bundles between its pyarrow filesystem and a
local directory, because ScaNN reads and writes only local files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.item_index import IndexKind, IndexMetadata

METADATA_FILE: Final = "metadata.json"
IDS_FILE: Final = "item_ids.parquet"
EMBEDDINGS_FILE: Final = "embeddings.npy"
SCANN_DIR: Final = "scann"

_IDS_SCHEMA: Final = pa.schema([pa.field("item_id", pa.string(), nullable=False)])


class IndexFormatError(ValueError):
    """Raised when a directory does not hold a complete index of the expected kind."""


def write_ids(directory: str | os.PathLike[str], ids: Sequence[str]) -> None:
    """Write item ids in position order.

    Args:
        directory: Index directory (created if missing).
        ids: Item ids by position.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    table = pa.table([pa.array(list(ids), type=pa.string())], schema=_IDS_SCHEMA)
    pq.write_table(table, path / IDS_FILE)


def read_ids(directory: str | os.PathLike[str]) -> list[str]:
    """Read item ids in position order.

    Args:
        directory: Index directory.

    Returns:
        Item ids by position.
    """
    table = pq.read_table(Path(directory) / IDS_FILE, schema=_IDS_SCHEMA)
    ids: list[str] = table.column("item_id").to_pylist()
    return ids


def write_metadata(directory: str | os.PathLike[str], metadata: IndexMetadata) -> None:
    """Write the metadata file; call it after every other file is in place.

    Args:
        directory: Index directory.
        metadata: What to write.
    """
    path = Path(directory) / METADATA_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(metadata.model_dump_json(indent=2) + "\n", encoding="utf-8")
    # A reader sees either no metadata or a whole one, never a half-written file.
    tmp.replace(path)


def read_metadata(directory: str | os.PathLike[str], kind: IndexKind | None = None) -> IndexMetadata:
    """Read and validate the metadata file.

    Args:
        directory: Index directory.
        kind: Expected kind; ``None`` accepts any.

    Returns:
        The metadata.

    Raises:
        IndexFormatError: The file is missing, or names another kind.
    """
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise IndexFormatError(f"{directory} holds no {METADATA_FILE}: not an index, or an incomplete save")
    metadata = IndexMetadata.model_validate_json(path.read_text(encoding="utf-8"))
    if kind is not None and metadata.kind != kind:
        raise IndexFormatError(f"{directory} holds a {metadata.kind} index, not {kind}")
    return metadata
