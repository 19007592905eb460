from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from training.registry import (
    ALIASES,
    MANIFEST,
    Bundle,
    BundleError,
    DataSnapshot,
    ModelRegistry,
    RegistryError,
    format_version,
)

WHEN = datetime(2026, 11, 25, 21, 0, 42, tzinfo=UTC)


def make_source(tmp_path: Path, name: str = "src", payload: bytes = b"weights") -> Path:
    source = tmp_path / name
    (source / "index").mkdir(parents=True)
    (source / "two_tower.pt").write_bytes(payload)
    (source / "index" / "part-0.bin").write_bytes(b"\x00\x01\x02")
    (source / "vocabularies.json").write_text(json.dumps({"item": ["a", "b"]}))
    return source


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(str(tmp_path / "home"))


def test_format_version() -> None:
    assert format_version(7, WHEN) == "v0007-20261125T2100Z"
    assert format_version(12345, WHEN) == "v12345-20261125T2100Z"
    with pytest.raises(AssertionError, match="start at 1"):
        format_version(0, WHEN)


def test_register_writes_bundle_and_manifest(registry: ModelRegistry, tmp_path: Path) -> None:
    info = registry.register(
        make_source(tmp_path),
        config={"lr": 0.01},
        metrics={"recall@20": 0.25},
        data=DataSnapshot(lake_files_sha256="ab" * 32, row_counts={"events": 10}),
        feature_set=["item:ctr_7d"],
        now=WHEN,
    )
    assert info.version == "v0001-20261125T2100Z"
    assert info.aliases == ()
    bundle_dir = Path(registry.root) / "bundles" / info.version
    assert (bundle_dir / MANIFEST).is_file()
    manifest = registry.show(info.version)
    assert manifest.config == {"lr": 0.01}
    assert manifest.metrics == {"recall@20": 0.25}
    assert manifest.data.row_counts == {"events": 10}
    assert manifest.feature_set == ["item:ctr_7d"]
    assert set(manifest.files) == {"two_tower.pt", "index/part-0.bin", "vocabularies.json"}
    assert manifest.files["two_tower.pt"].size_bytes == len(b"weights")
    # Nothing hidden is left behind by a successful registration.
    assert [p.name for p in (Path(registry.root) / "bundles").iterdir()] == [info.version]


def test_versions_increase_and_list_is_ordered(registry: ModelRegistry, tmp_path: Path) -> None:
    first = registry.register(make_source(tmp_path, "a"), now=WHEN)
    second = registry.register(make_source(tmp_path, "b"), now=WHEN)
    assert first.version.startswith("v0001-")
    assert second.version.startswith("v0002-")
    assert [b.version for b in registry.list()] == [first.version, second.version]
    assert registry.latest() == second.version


def test_register_refuses_bad_sources(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not a directory"):
        registry.register(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no files"):
        registry.register(tmp_path / "empty")
    source = make_source(tmp_path)
    (source / MANIFEST).write_text("{}")
    with pytest.raises(RegistryError, match="already holds"):
        registry.register(source)
    assert registry.list() == []


def test_load_bundle_verifies_checksums(registry: ModelRegistry, tmp_path: Path) -> None:
    info = registry.register(make_source(tmp_path), now=WHEN)
    bundle = registry.load_bundle(info.version)
    assert isinstance(bundle, Bundle)
    assert bundle.path("two_tower.pt").read_bytes() == b"weights"
    assert bundle.path("index").is_dir()
    assert bundle.has("index") and not bundle.has("ranker.pt")
    with pytest.raises(BundleError, match="no file"):
        bundle.path("ranker.pt")

    (bundle.root / "two_tower.pt").write_bytes(b"weightz")
    with pytest.raises(BundleError, match="checksum"):
        registry.load_bundle(info.version)
    (bundle.root / "two_tower.pt").write_bytes(b"short")
    with pytest.raises(BundleError, match="bytes"):
        registry.load_bundle(info.version)
    (bundle.root / "two_tower.pt").unlink()
    with pytest.raises(BundleError, match="missing"):
        registry.load_bundle(info.version)


def test_broken_manifest_raises_and_is_skipped_in_list(registry: ModelRegistry, tmp_path: Path) -> None:
    good = registry.register(make_source(tmp_path, "a"), now=WHEN)
    bad = registry.register(make_source(tmp_path, "b"), now=WHEN)
    (Path(registry.root) / "bundles" / bad.version / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="malformed"):
        registry.load_bundle(bad.version)
    with pytest.raises(BundleError):
        registry.promote(bad.version)
    assert [b.version for b in registry.list()] == [good.version]


def test_promote_resolve_and_rollback(registry: ModelRegistry, tmp_path: Path) -> None:
    v1 = registry.register(make_source(tmp_path, "a"), now=WHEN).version
    v2 = registry.register(make_source(tmp_path, "b"), now=WHEN).version
    with pytest.raises(RegistryError, match="no alias"):
        registry.resolve("production")

    assert registry.promote(v1) == v1
    assert registry.promote(v2, "candidate") == v2
    assert registry.resolve("production") == v1
    assert registry.aliases() == {"candidate": v2, "production": v1}
    # Promoting an alias promotes what it points at.
    assert registry.promote("candidate", "production") == v2
    assert registry.resolve("production") == v2
    assert [e.version for e in registry.alias_history("production")] == [v1, v2]
    assert {b.version: b.aliases for b in registry.list()} == {v1: (), v2: ("candidate", "production")}
    # Re-promoting the current version does not grow the history.
    registry.promote(v2)
    assert len(registry.alias_history("production")) == 2

    assert registry.rollback("production") == v1
    assert registry.resolve("production") == v1
    assert registry.load_bundle("production").version == v1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("production")
    with pytest.raises(RegistryError, match="no alias"):
        registry.rollback("staging")
    # The alias file is rewritten through a temporary that never stays behind.
    assert sorted(p.name for p in Path(registry.root).iterdir()) == [ALIASES, "bundles"]


def test_unknown_versions_and_bad_alias_names(registry: ModelRegistry, tmp_path: Path) -> None:
    v1 = registry.register(make_source(tmp_path), now=WHEN).version
    with pytest.raises(RegistryError, match="no bundle"):
        registry.resolve("v0099-20261125T2100Z")
    with pytest.raises(RegistryError, match="not a bundle version"):
        registry.manifest("latest")
    with pytest.raises(RegistryError, match="must match"):
        registry.promote(v1, "Prod uction")
    with pytest.raises(RegistryError, match="must match"):
        registry.promote(v1, "v0001-20261125T2100Z")


def test_hidden_staging_directories_are_ignored(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.register(make_source(tmp_path), now=WHEN)
    stale = Path(registry.root) / "bundles" / ".staging-dead"
    stale.mkdir()
    (stale / "two_tower.pt").write_bytes(b"half")
    assert len(registry.list()) == 1
    assert registry.register(make_source(tmp_path, "b"), now=WHEN).version.startswith("v0002-")


def test_remote_filesystem_downloads_and_verifies(tmp_path: Path) -> None:
    # A SubTreeFileSystem stands in for an object store: not a LocalFileSystem, so bundles are
    # copied into the cache directory before they are verified.
    (tmp_path / "bucket").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    registry = ModelRegistry("home", filesystem=fs, cache_dir=str(tmp_path / "cache"))
    info = registry.register(make_source(tmp_path), now=WHEN)
    assert (tmp_path / "bucket" / "home" / "artifacts" / "bundles" / info.version / MANIFEST).is_file()
    bundle = registry.load_bundle(info.version)
    assert bundle.root == tmp_path / "cache" / info.version
    assert bundle.path("index/part-0.bin").read_bytes() == b"\x00\x01\x02"
    registry.promote(info.version)
    assert registry.resolve("production") == info.version
