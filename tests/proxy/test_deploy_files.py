"""docker-compose.yml and the Dockerfile agree with the settings (Docker itself cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_ports_and_healthchecks() -> None:
    compose = _compose()
    assert set(compose["services"]) == {"kvproxy", "redis"}
    kv, rd = compose["services"]["kvproxy"], compose["services"]["redis"]
    env = kv["environment"]
    container_port = env["KVPROXY_PORT"]
    assert any(str(p).endswith(f":{container_port}") for p in kv["ports"])
    assert env["KVPROXY_HOST"] == "0.0.0.0"
    assert "healthcheck" in kv and "healthcheck" in rd
    assert f":{container_port}/health" in " ".join(kv["healthcheck"]["test"])
    assert kv["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env["KVPROXY_REDIS_URL"].startswith("redis://redis:")
    command = rd["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in command
    volume = env["KVPROXY_DISK_DIR"].rsplit("/", 1)[0]
    assert any(str(v).endswith(":" + volume) for v in kv["volumes"])
    assert set(compose["volumes"]) == {v.split(":")[0] for v in kv["volumes"]}


def test_compose_env_vars_are_settings_and_valid(monkeypatch) -> None:
    env = _compose()["services"]["kvproxy"]["environment"]
    names = {f"KVPROXY_{name.upper()}" for name in ServeSettings.model_fields}
    assert set(env) <= names, set(env) - names
    for key in list(ServeSettings.model_fields):
        monkeypatch.delenv(f"KVPROXY_{key.upper()}", raising=False)
    for key, value in env.items():
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))  # compose's default syntax
        if value:
            monkeypatch.setenv(key, value)
    settings = ServeSettings()  # every value parses
    assert settings.port == 8000 and settings.redis_url == "redis://redis:6379/0"


def test_dockerfile_env_vars_are_settings() -> None:
    text = (ROOT / "Dockerfile").read_text()
    names = {f"KVPROXY_{name.upper()}" for name in ServeSettings.model_fields} | {"KVPROXY_CACHE_DIR"}
    used = set(re.findall(r"KVPROXY_[A-Z_]+", text))
    assert used <= names, used - names
    assert "ARG TORCH_INDEX_URL" in text and 'ENTRYPOINT ["kvproxy"]' in text
    assert "EXPOSE 8000" in text
