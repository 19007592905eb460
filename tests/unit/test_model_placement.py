"""``--model-placement auto`` picks the models' placement by the size of the cluster."""

from __future__ import annotations

import pytest

from cluster.cli import build_parser
from deployments.commands import SMALL_NODE_CPUS, resolve_model_placement, serve_options


@pytest.mark.parametrize("cpus", [1.0, 2.0, SMALL_NODE_CPUS])
def test_auto_puts_the_models_in_the_ingress_on_a_small_cluster(cpus: float) -> None:
    assert resolve_model_placement("auto", cpus) == "ingress"


@pytest.mark.parametrize("cpus", [SMALL_NODE_CPUS + 1, 16.0])
def test_auto_keeps_the_model_deployments_on_a_larger_cluster(cpus: float) -> None:
    assert resolve_model_placement("auto", cpus) == "deployments"


@pytest.mark.parametrize("placement", ["deployments", "ingress"])
def test_an_explicit_placement_is_kept_whatever_the_cluster(placement: str) -> None:
    assert resolve_model_placement(placement, 1.0) == placement
    assert resolve_model_placement(placement, 64.0) == placement


def test_an_unknown_placement_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'ranker'"):
        resolve_model_placement("ranker", 2.0)


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_serve_and_demo_default_to_auto(command: str) -> None:
    args = build_parser().parse_args([command])
    assert serve_options(args)["model_placement"] == "auto"
    chosen = build_parser().parse_args([command, "--model-placement", "deployments"])
    assert serve_options(chosen)["model_placement"] == "deployments"
