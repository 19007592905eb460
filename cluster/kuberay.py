"""Keeps the KubeRay ``RayService`` manifest's ``serveConfigV2`` equal to ``ray_config.yaml``.

The manifest embeds the Serve config as a YAML block scalar. Rewriting the manifest through a
YAML library would drop its comments, so the block is replaced as text: everything indented
under ``serveConfigV2: |`` is swapped for the Serve config (its leading comment lines, which talk
about ``serve deploy``, left out), and the result is parsed back to prove it carries the same
configuration.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BLOCK_START = re.compile(r"^(?P<indent> *)serveConfigV2: *\|[-+]? *$")


class ManifestError(ValueError):
    """The manifest has no ``serveConfigV2`` block scalar, or the result does not round-trip."""


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _serve_body(serve_config_text: str) -> list[str]:
    lines = serve_config_text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return lines[start:]


def embed_serve_config(manifest_text: str, serve_config_text: str) -> str:
    """The manifest with its ``serveConfigV2`` replaced by the given Serve config.

    Args:
        manifest_text: The ``RayService`` manifest.
        serve_config_text: The Serve config (``ray_config.yaml``).

    Returns:
        The new manifest text; everything outside the block is unchanged.

    Raises:
        ManifestError: No ``serveConfigV2: |`` line, or the result does not parse back to the
            Serve config.
    """
    lines = manifest_text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if _BLOCK_START.match(line.rstrip("\n"))), None)
    if header is None:
        raise ManifestError("no `serveConfigV2: |` block in the manifest")
    indent = _indent_of(lines[header]) + 2
    end = header + 1
    while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) >= indent):
        end += 1
    # Blank lines closing the block belong to what follows it.
    while end > header + 1 and not lines[end - 1].strip():
        end -= 1
    block = [(" " * indent + line) if line.strip() else "\n" for line in _serve_body(serve_config_text)]
    while block and block[-1] == "\n":
        block.pop()
    if block and not block[-1].endswith("\n"):
        block[-1] += "\n"
    result = "".join(lines[: header + 1] + block + lines[end:])
    if embedded_serve_config(result) != yaml.safe_load(serve_config_text):
        raise ManifestError("the rewritten manifest does not carry the Serve config")
    return result


def embedded_serve_config(manifest_text: str) -> Any:
    """The parsed ``spec.serveConfigV2`` of a ``RayService`` manifest.

    Raises:
        ManifestError: The manifest has no ``spec.serveConfigV2`` string.
    """
    manifest = yaml.safe_load(manifest_text)
    try:
        embedded = manifest["spec"]["serveConfigV2"]
    except (KeyError, TypeError) as exc:
        raise ManifestError("the manifest has no spec.serveConfigV2") from exc
    if not isinstance(embedded, str):
        raise ManifestError("spec.serveConfigV2 must be a YAML string (a `|` block)")
    return yaml.safe_load(embedded)
