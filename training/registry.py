"""The model registry: versioned release bundles and movable aliases under ``<home>/artifacts/``.

Layout::

    <home>/artifacts/
        bundles/<version>/          one release: model files + manifest.json
        bundles/.staging-<uuid>/    a bundle being written (hidden; never listed)
        aliases.json                alias -> current version, with the history rollback walks back

A version is ``v<NNNN>-<YYYYMMDDTHHMMZ>``: a sequence number that orders releases, and the UTC
minute of registration for people reading a listing. A bundle becomes visible in one step: its files
are written into a hidden staging directory, the manifest (with a SHA-256 of every file) is written
last, and the directory is renamed into place. Aliases are rewritten whole into a temporary file that
is renamed over ``aliases.json``, so a reader sees either the old or the new mapping.

Everything goes through a pyarrow filesystem, as the lake does, so ``RAYREC_HOME=s3://…`` works; on
object stores a rename is a copy, so the guarantee there is "complete or hidden" rather than atomic.
Two processes promoting at the same instant race (the last rename wins); promotion is an operator
action, so this is accepted rather than locked.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST: Final = "manifest.json"
ALIASES: Final = "aliases.json"
FORMAT_VERSION: Final = 1
"""Bumped when the bundle layout changes in a way old readers cannot follow."""

VERSION_RE: Final = re.compile(r"^v(\d{4,})-(\d{8}T\d{4}Z)$")
ALIAS_RE: Final = re.compile(r"^[a-z][a-z0-9_\-]{0,31}$")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_CHUNK_BYTES = 1 << 20


class RegistryError(ValueError):
    """Raised for an unknown version or alias, or an operation the registry state does not allow."""


class BundleError(RuntimeError):
    """Raised when a bundle is incomplete or its files do not match the manifest's checksums."""


class FileEntry(BaseModel):
    """One file of a bundle as recorded in its manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """Hex SHA-256 of the file's bytes."""
    size_bytes: Annotated[int, Field(ge=0)]
    """Size of the file; checked before hashing so a truncated file fails fast."""


class DataSnapshot(BaseModel):
    """Which lake data a bundle was trained on, so a result can be traced and reproduced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lake_files_sha256: str = ""
    """SHA-256 over the sorted list of visible lake files read (paths, one per line)."""
    file_counts: dict[str, int] = Field(default_factory=dict)
    """Visible Parquet files per lake table at training time."""
    row_counts: dict[str, int] = Field(default_factory=dict)
    """Rows per table or derived set (e.g. ``events``, ``positives``) the run used."""
    description: str = ""
    """Free text: the data source (``synthetic-7``, ``movielens-ml-100k``) and split protocol."""


class BundleManifest(BaseModel):
    """``manifest.json``: what a bundle holds, how it was made and how well it did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    """Layout version of the bundle (see :data:`FORMAT_VERSION`)."""
    version: str
    """The bundle's version, equal to its directory name."""
    created_at: datetime
    """UTC time of registration."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The full training configuration, as JSON."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    """Evaluation results (flat numbers and nested tables), as JSON."""
    data: DataSnapshot = Field(default_factory=DataSnapshot)
    """The lake data the run read."""
    feature_set: list[str] = Field(default_factory=list)
    """``view:feature`` references the models consume, in the order they were trained with."""
    files: dict[str, FileEntry] = Field(default_factory=dict)
    """Every file of the bundle by relative POSIX path, except this manifest."""


class AliasEvent(BaseModel):
    """One assignment of an alias to a version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    at: datetime


class AliasState(BaseModel):
    """An alias with its assignment history, oldest first; the last entry is current."""

    model_config = ConfigDict(extra="forbid")

    history: list[AliasEvent] = Field(default_factory=list)

    @property
    def current(self) -> str | None:
        """The version the alias points at now, or ``None`` once rolled back past its first entry."""
        return self.history[-1].version if self.history else None


class AliasFile(BaseModel):
    """``aliases.json``."""

    model_config = ConfigDict(extra="forbid")

    aliases: dict[str, AliasState] = Field(default_factory=dict)


@dataclass(frozen=True)
class BundleInfo:
    """A registered bundle as listed.

    Attributes:
        version: The bundle's version.
        created_at: UTC time of registration.
        uri: Where the bundle lives (local path or URI).
        aliases: Aliases currently pointing at it, sorted.
        metrics: The manifest's metrics.
    """

    version: str
    created_at: datetime
    uri: str
    aliases: tuple[str, ...]
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class Bundle:
    """A bundle whose files are on the local disk and match the manifest.

    Attributes:
        version: The bundle's version.
        manifest: Its manifest.
        root: Local directory holding the files (the bundle itself for a local registry, else a
            verified download).
    """

    version: str
    manifest: BundleManifest
    root: Path

    def path(self, name: str) -> Path:
        """Local path of a file or directory of the bundle.

        Args:
            name: Relative path within the bundle (a file, or a directory prefix such as ``index``).

        Returns:
            The path.

        Raises:
            BundleError: Nothing of that name is in the manifest.
        """
        prefix = name.rstrip("/") + "/"
        if name not in self.manifest.files and not any(f.startswith(prefix) for f in self.manifest.files):
            known = sorted(self.manifest.files)
            raise BundleError(f"bundle {self.version} has no file {name!r}; it has {known}")
        return self.root / name

    def has(self, name: str) -> bool:
        """Whether the bundle holds a file, or a directory with files, of that name."""
        prefix = name.rstrip("/") + "/"
        return name in self.manifest.files or any(f.startswith(prefix) for f in self.manifest.files)


def format_version(sequence: int, when: datetime) -> str:
    """The version string of the ``sequence``-th bundle registered at ``when``.

    Args:
        sequence: Sequence number, 1 or more.
        when: Registration time; converted to UTC and truncated to the minute.

    Returns:
        ``v<NNNN>-<YYYYMMDDTHHMMZ>``.
    """
    assert sequence >= 1, f"sequence numbers start at 1, got {sequence}"
    utc = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    return f"v{sequence:04d}-{utc:%Y%m%dT%H%M}Z"


def _sequence(version: str) -> int:
    match = VERSION_RE.match(version)
    if match is None:
        raise RegistryError(f"{version!r} is not a bundle version (v<NNNN>-<YYYYMMDDTHHMMZ>)")
    return int(match.group(1))


def _sha256_stream(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _local_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path


class ModelRegistry:
    """Versioned release bundles and aliases of one data home.

    Attributes:
        home: The data home as given.
        filesystem: The pyarrow filesystem the registry lives on.
        root: The ``artifacts`` directory within :attr:`filesystem`.
    """

    def __init__(
        self, home: str, *, filesystem: pafs.FileSystem | None = None, cache_dir: str | None = None
    ) -> None:
        """Open (lazily; nothing is created until the first write) the registry under ``home``.

        Args:
            home: A local path or a pyarrow filesystem URI, as for :class:`core.lake.Lake`.
            filesystem: A filesystem to use instead of resolving ``home``; ``home`` is then a path
                within it.
            cache_dir: Local directory remote bundles are downloaded into by :meth:`load_bundle`;
                a fresh temporary directory per load when omitted.
        """
        self.home = home
        if filesystem is not None:
            self.filesystem: pafs.FileSystem = filesystem
            base = home
        elif _URI_RE.match(home):
            self.filesystem, base = pafs.FileSystem.from_uri(home)
        else:
            self.filesystem = pafs.LocalFileSystem()
            base = home
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            base = Path(os.path.abspath(os.path.expanduser(base))).as_posix()
        base = base.rstrip("/")
        self.root: str = f"{base}/artifacts" if base else "artifacts"
        self._cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"ModelRegistry({self.home!r})"

    @property
    def _is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def _bundle_dir(self, version: str) -> str:
        return f"{self.root}/bundles/{version}"

    def _exists(self, path: str) -> bool:
        return bool(self.filesystem.get_file_info(path).type != pafs.FileType.NotFound)

    # -- writing -----------------------------------------------------------------------------

    def register(
        self,
        source_dir: str | os.PathLike[str],
        *,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        data: DataSnapshot | None = None,
        feature_set: builtins.list[str] | None = None,
        now: datetime | None = None,
    ) -> BundleInfo:
        """Register the files of a local directory as a new bundle.

        Args:
            source_dir: Local directory whose files (recursively) make the bundle. It must not
                contain a ``manifest.json``: the registry writes that.
            config: Training configuration to record (JSON-serialisable).
            metrics: Evaluation results to record (JSON-serialisable).
            data: The lake snapshot the run read.
            feature_set: Feature references the models consume.
            now: Registration time; the current UTC time when omitted (tests pin it).

        Returns:
            The new bundle.

        Raises:
            RegistryError: ``source_dir`` is not a directory, is empty, or holds a manifest.
        """
        source = Path(source_dir)
        if not source.is_dir():
            raise RegistryError(f"{source} is not a directory")
        files = {p.relative_to(source).as_posix(): p for p in _local_files(source)}
        if not files:
            raise RegistryError(f"{source} holds no files; a bundle needs at least one")
        if MANIFEST in files:
            raise RegistryError(f"{source} already holds a {MANIFEST}; the registry writes it")
        entries = {}
        for name, path in files.items():
            with path.open("rb") as handle:
                entries[name] = FileEntry(sha256=_sha256_stream(handle), size_bytes=path.stat().st_size)
        when = (now or datetime.now(UTC)).astimezone(UTC)

        bundles = f"{self.root}/bundles"
        staging = f"{bundles}/.staging-{uuid.uuid4().hex}"
        self.filesystem.create_dir(staging, recursive=True)
        try:
            pafs.copy_files(
                source.as_posix(),
                staging,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.filesystem,
            )
            # The sequence number is taken as late as possible and the rename retried, so two
            # concurrent registrations end up with different versions rather than one lost bundle.
            for _ in range(20):
                version = format_version(self._next_sequence(), when)
                manifest = BundleManifest(
                    version=version,
                    created_at=when,
                    config=dict(config or {}),
                    metrics=dict(metrics or {}),
                    data=data or DataSnapshot(),
                    feature_set=list(feature_set or []),
                    files=entries,
                )
                self._write_bytes(f"{staging}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())
                target = self._bundle_dir(version)
                if self._exists(target):
                    continue
                try:
                    self.filesystem.move(staging, target)
                except OSError:
                    if self._exists(target):
                        continue
                    raise
                return self._info(manifest, self._aliases_by_version())
            raise RegistryError("could not find a free version after 20 attempts")
        except BaseException:
            with contextlib.suppress(OSError):
                self.filesystem.delete_dir(staging)
            raise

    def _next_sequence(self) -> int:
        versions = self._versions()
        return (_sequence(versions[-1]) + 1) if versions else 1

    def _write_bytes(self, path: str, payload: bytes) -> None:
        with self.filesystem.open_output_stream(path) as sink:
            sink.write(payload)

    def _write_atomic(self, path: str, payload: bytes) -> None:
        directory, _, name = path.rpartition("/")
        self.filesystem.create_dir(directory, recursive=True)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            self._write_bytes(temporary, payload)
            self.filesystem.move(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(temporary)
            raise

    # -- reading -----------------------------------------------------------------------------

    def _versions(self) -> builtins.list[str]:
        selector = pafs.FileSelector(f"{self.root}/bundles", recursive=False, allow_not_found=True)
        found = []
        for info in self.filesystem.get_file_info(selector):
            if info.type == pafs.FileType.Directory and VERSION_RE.match(info.base_name):
                found.append(info.base_name)
        return sorted(found, key=_sequence)

    def manifest(self, version: str) -> BundleManifest:
        """The manifest of a bundle.

        Args:
            version: A bundle version (not an alias; see :meth:`resolve`).

        Returns:
            The parsed manifest.

        Raises:
            RegistryError: No bundle has that version.
            BundleError: The manifest is missing or malformed.
        """
        _sequence(version)
        directory = self._bundle_dir(version)
        if not self._exists(directory):
            raise RegistryError(f"no bundle {version!r} in {self.root}")
        try:
            with self.filesystem.open_input_stream(f"{directory}/{MANIFEST}") as stream:
                raw = stream.read()
        except (FileNotFoundError, OSError) as exc:
            raise BundleError(f"bundle {version} has no readable {MANIFEST}: {exc}") from exc
        try:
            manifest = BundleManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise BundleError(f"bundle {version} has a malformed {MANIFEST}: {exc}") from exc
        if manifest.version != version:
            raise BundleError(f"bundle directory {version} holds the manifest of {manifest.version}")
        return manifest

    def list(self) -> builtins.list[BundleInfo]:
        """Every registered bundle, oldest first; bundles with a broken manifest are skipped."""
        by_version = self._aliases_by_version()
        infos = []
        for version in self._versions():
            try:
                infos.append(self._info(self.manifest(version), by_version))
            except BundleError:
                continue
        return infos

    def show(self, alias_or_version: str) -> BundleManifest:
        """The manifest of a bundle given by version or alias."""
        return self.manifest(self.resolve(alias_or_version))

    def latest(self) -> str | None:
        """The most recently registered version, or ``None`` for an empty registry."""
        versions = self._versions()
        return versions[-1] if versions else None

    def _info(self, manifest: BundleManifest, by_version: Mapping[str, builtins.list[str]]) -> BundleInfo:
        directory = self._bundle_dir(manifest.version)
        uri = directory if self._is_local else f"{self.filesystem.type_name}://{directory}"
        return BundleInfo(
            version=manifest.version,
            created_at=manifest.created_at,
            uri=uri,
            aliases=tuple(sorted(by_version.get(manifest.version, []))),
            metrics=manifest.metrics,
        )

    def load_bundle(self, alias_or_version: str) -> Bundle:
        """Fetch a bundle to local disk and verify every file against the manifest.

        Args:
            alias_or_version: A version or an alias.

        Returns:
            The verified bundle.

        Raises:
            RegistryError: The version or alias is unknown.
            BundleError: The manifest is broken, or a file is missing, has another size, or has
                another checksum than recorded.
        """
        version = self.resolve(alias_or_version)
        manifest = self.manifest(version)
        directory = self._bundle_dir(version)
        if self._is_local:
            root = Path(directory)
        else:
            cache = self._cache_dir or tempfile.mkdtemp(prefix="rayrec-bundle-")
            base = Path(cache)
            root = base / version
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            pafs.copy_files(
                directory,
                root.as_posix(),
                source_filesystem=self.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        for name, entry in manifest.files.items():
            path = root / name
            if not path.is_file():
                raise BundleError(f"bundle {version} is missing {name}")
            size = path.stat().st_size
            if size != entry.size_bytes:
                raise BundleError(
                    f"bundle {version}: {name} is {size} bytes, the manifest says {entry.size_bytes}"
                )
            with path.open("rb") as handle:
                digest = _sha256_stream(handle)
            if digest != entry.sha256:
                raise BundleError(
                    f"bundle {version}: {name} has checksum {digest}, the manifest says {entry.sha256}"
                )
        return Bundle(version=version, manifest=manifest, root=root)

    # -- aliases -----------------------------------------------------------------------------

    def _read_aliases(self) -> AliasFile:
        path = f"{self.root}/{ALIASES}"
        try:
            with self.filesystem.open_input_stream(path) as stream:
                raw = stream.read()
        except FileNotFoundError:
            return AliasFile()
        try:
            return AliasFile.model_validate_json(raw)
        except ValidationError as exc:
            raise RegistryError(f"{path} is malformed: {exc}") from exc

    def _write_aliases(self, aliases: AliasFile) -> None:
        self._write_atomic(f"{self.root}/{ALIASES}", aliases.model_dump_json(indent=2).encode())

    def _aliases_by_version(self) -> dict[str, builtins.list[str]]:
        by_version: dict[str, builtins.list[str]] = {}
        for name, state in self._read_aliases().aliases.items():
            if state.current is not None:
                by_version.setdefault(state.current, []).append(name)
        return by_version

    def aliases(self) -> dict[str, str]:
        """Each alias and the version it points at now (aliases rolled back to nothing are left out)."""
        return {
            name: state.current
            for name, state in sorted(self._read_aliases().aliases.items())
            if state.current is not None
        }

    def alias_history(self, alias: str) -> builtins.list[AliasEvent]:
        """The assignments of an alias, oldest first; the last one is current."""
        return list(self._read_aliases().aliases.get(alias, AliasState()).history)

    def resolve(self, alias_or_version: str) -> str:
        """The version an alias points at, or the version itself when it exists.

        Args:
            alias_or_version: ``production``, ``candidate``, … or ``v0007-20261125T2100Z``.

        Returns:
            The version.

        Raises:
            RegistryError: No such alias or bundle.
        """
        if VERSION_RE.match(alias_or_version):
            if not self._exists(self._bundle_dir(alias_or_version)):
                raise RegistryError(f"no bundle {alias_or_version!r} in {self.root}")
            return alias_or_version
        current = self.aliases().get(alias_or_version)
        if current is None:
            known = ", ".join(self.aliases()) or "none"
            raise RegistryError(f"no alias or version {alias_or_version!r} (aliases: {known})")
        return current

    def promote(self, version: str, alias: str = "production", *, now: datetime | None = None) -> str:
        """Point an alias at a bundle, remembering where it pointed before.

        Args:
            version: A version, or another alias whose current version is taken
                (``promote("candidate")`` makes the candidate production).
            alias: The alias to move.
            now: Time recorded in the history; the current UTC time when omitted.

        Returns:
            The version the alias now points at.

        Raises:
            RegistryError: Unknown version, or the alias name is not ``[a-z][a-z0-9_-]*``.
            BundleError: The bundle's manifest is broken (a broken bundle is never promoted).
        """
        if not ALIAS_RE.match(alias) or VERSION_RE.match(alias):
            raise RegistryError(f"alias {alias!r} must match {ALIAS_RE.pattern} and not look like a version")
        resolved = self.resolve(version)
        self.manifest(resolved)
        aliases = self._read_aliases()
        state = aliases.aliases.setdefault(alias, AliasState())
        if state.current != resolved:
            state.history.append(AliasEvent(version=resolved, at=(now or datetime.now(UTC)).astimezone(UTC)))
            self._write_aliases(aliases)
        return resolved

    def rollback(self, alias: str = "production") -> str:
        """Move an alias back to the version it pointed at before its last promotion.

        Args:
            alias: The alias.

        Returns:
            The version the alias points at after the rollback.

        Raises:
            RegistryError: The alias is unknown or has no earlier version to go back to.
        """
        aliases = self._read_aliases()
        state = aliases.aliases.get(alias)
        if state is None or not state.history:
            raise RegistryError(f"no alias {alias!r} to roll back")
        if len(state.history) < 2:
            raise RegistryError(f"alias {alias!r} has no earlier version than {state.current}")
        state.history.pop()
        self._write_aliases(aliases)
        current = state.current
        assert current is not None, "a history of two or more entries keeps one after a pop"
        return current
