from __future__ import annotations

import pytest

from core.settings import Settings, SettingsError


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url.startswith("redis://")
    assert settings.namespace == "rayrec"
    assert settings.admin_token_value() is None


def test_reads_environment_and_overrides() -> None:
    env = {
        "RAYREC_REDIS_URL": "redis://10.0.0.5:6380/2",
        "RAYREC_HOME": "s3://bucket/rayrec",
        "RAYREC_NAMESPACE": "prod",
        "RAYREC_ADMIN_TOKEN": "s3cret",
        "RAYREC_CLIENT_API_KEYS": "a, b,,c",
        "RAYREC_PROCESSED_TTL_S": "7200",
        "RAYREC_UNRELATED_KNOB": "ignored",
    }
    settings = Settings.from_env(env, namespace="staging")
    assert settings.home == "s3://bucket/rayrec"
    assert settings.namespace == "staging"
    assert settings.admin_token_value() == "s3cret"
    assert settings.client_api_keys == ("a", "b", "c")
    assert settings.processed_ttl_s == 7200
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"RAYREC_REDIS_URL": "http://x"}, "RAYREC_REDIS_URL"),
        ({"RAYREC_NAMESPACE": "Bad Namespace"}, "RAYREC_NAMESPACE"),
        ({"RAYREC_REDIS_POOL_SIZE": "0"}, "RAYREC_REDIS_POOL_SIZE"),
        ({"RAYREC_HOME": ""}, "RAYREC_HOME"),
        ({"RAYREC_PROCESSED_TTL_S": "5"}, "RAYREC_PROCESSED_TTL_S"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)
