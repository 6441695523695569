"""docker-compose.yml and the Dockerfile agree with the settings (Docker itself cannot run here).

The default `docker compose up` is kvproxy + one Redis; the `scale-out` profile adds a
three-master Redis Cluster, two replicas on it and the router in front of them. Every container
environment is parsed by the settings class of the command it runs, as compose would hand it over.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.route.settings import RouteSettings
from proxy.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "scale-out"
DEFAULT_SERVICES = {"kvproxy", "redis"}
CLUSTER_NODES = ["redis-node-1", "redis-node-2", "redis-node-3"]
CLUSTER_INIT = "redis-cluster-init"
REPLICAS = ["kvproxy-1", "kvproxy-2"]
ROUTER = "kvproxy-router"
KEYS_SECRET = "kvproxy_keys"
ADMIN_KEY = "sk-admin-compose-test"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _interpolate(value: Any, host_env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` against ``host_env`` (the shell that runs it)."""
    env = host_env or {}

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(:-([^}]*))?\}", one, str(value))


def _profiles(service: dict) -> list[str]:
    return list(service.get("profiles") or [])


def _named_volumes(service: dict) -> set[str]:
    return {str(v).split(":")[0] for v in service.get("volumes", []) if not str(v).startswith((".", "/"))}


def _healthcheck_url(service: dict) -> str:
    found = re.search(r"https?://[^'\"]+", " ".join(service["healthcheck"]["test"]))
    assert found, service["healthcheck"]
    return found.group(0)


def _serve_env_names() -> set[str]:
    return {f"KVPROXY_{name.upper()}" for name in ServeSettings.model_fields}


def _route_env_names() -> set[str]:
    names = set()
    for name, field in RouteSettings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.choices[0] if alias is not None else f"KVPROXY_ROUTE_{name.upper()}")  # type: ignore[union-attr]
    return names


def _use_env(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, Any], host_env: dict[str, str] | None = None
) -> dict[str, str]:
    """Only this container environment (interpolated, empty values left out) in os.environ."""
    for key in list(os.environ):
        if key.startswith("KVPROXY_"):
            monkeypatch.delenv(key)
    given = {key: _interpolate(value, host_env) for key, value in env.items()}
    for key, value in given.items():
        if value:
            monkeypatch.setenv(key, value)
    return given


def _secret_path(service: dict, env_value: str) -> None:
    """``env_value`` is where compose mounts a secret this service lists."""
    assert env_value.startswith("/run/secrets/")
    assert env_value.removeprefix("/run/secrets/") in service.get("secrets", [])


def test_compose_services_ports_and_healthchecks() -> None:
    compose = _compose()
    services = compose["services"]
    assert {name for name, s in services.items() if not _profiles(s)} == DEFAULT_SERVICES
    kv, rd = services["kvproxy"], services["redis"]
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
    used = set().union(*(_named_volumes(s) for s in services.values()))
    assert set(compose["volumes"]) == used


def test_compose_env_vars_are_settings_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _compose()["services"]["kvproxy"]["environment"]
    names = _serve_env_names()
    assert set(env) <= names, set(env) - names
    _use_env(monkeypatch, env)
    settings = ServeSettings()  # every value parses
    assert settings.port == 8000 and settings.redis_url == "redis://redis:6379/0"


def test_dockerfile_env_vars_are_settings() -> None:
    text = (ROOT / "Dockerfile").read_text()
    names = _serve_env_names() | {"KVPROXY_CACHE_DIR"}
    used = set(re.findall(r"KVPROXY_[A-Z_]+", text))
    assert used <= names, used - names
    assert "ARG TORCH_INDEX_URL" in text and 'ENTRYPOINT ["kvproxy"]' in text
    assert "EXPOSE 8000" in text


# ---- profile scale-out ----------------------------------------------------------------------


def test_the_scale_out_profile_leaves_the_default_up_alone() -> None:
    services = _compose()["services"]
    scale_out = {name for name, s in services.items() if PROFILE in _profiles(s)}
    assert scale_out == {*CLUSTER_NODES, CLUSTER_INIT, *REPLICAS, ROUTER}
    assert scale_out | DEFAULT_SERVICES == set(services)
    for name in scale_out:
        assert _profiles(services[name]) == [PROFILE], name
    # A plain `docker compose up` starts nothing of the profile, not even as a dependency.
    for name in DEFAULT_SERVICES:
        assert not set(services[name].get("depends_on", {})) & scale_out, name
        assert "secrets" not in services[name]
    # Only the router is published, on another port than the single-node server.
    published = {name for name in scale_out if services[name].get("ports")}
    assert published == {ROUTER}


def test_the_cluster_nodes_announce_their_names_and_the_init_waits_for_them() -> None:
    services = _compose()["services"]
    for name in CLUSTER_NODES:
        node = services[name]
        command = [str(c) for c in node["command"]]
        arg = dict(itertools.pairwise(command))  # a flag -> its value
        assert node["image"].startswith("redis:7")
        assert command[0] == "redis-server" and arg["--port"] == "6379"
        assert arg["--cluster-enabled"] == "yes"
        # Clients on the compose network follow MOVED redirects to a name they can resolve.
        assert arg["--cluster-announce-hostname"] == name
        assert arg["--cluster-preferred-endpoint-type"] == "hostname"
        assert arg["--maxmemory-policy"] == "allkeys-lru" and "--maxmemory" in command
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    init = services[CLUSTER_INIT]
    assert init["image"] == services[CLUSTER_NODES[0]]["image"]
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in CLUSTER_NODES}
    assert str(init.get("restart")) == "no"
    script = " ".join(str(c) for c in init["command"])
    create = re.search(r"redis-cli --cluster create ([^\n]+)", script)
    assert create, script
    args = create.group(1).split()
    assert args[:3] == [f"{name}:6379" for name in CLUSTER_NODES]
    assert args[args.index("--cluster-replicas") + 1] == "0" and "--cluster-yes" in args
    # Idempotent: a cluster already formed (the nodes keep nodes.conf over a restart) is left as is.
    assert script.index("cluster_state:ok") < script.index("--cluster create")
    assert "$" not in script.replace("$$", "")  # compose would interpolate a bare $


def test_the_replicas_run_on_the_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compose = _compose()
    services = compose["services"]
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{ADMIN_KEY} ops admin\n")
    assert KEYS_SECRET in compose["secrets"] and compose["secrets"][KEYS_SECRET]["file"]
    volumes = []
    for name in REPLICAS:
        replica = services[name]
        env = replica["environment"]
        assert set(env) <= _serve_env_names(), set(env) - _serve_env_names()
        assert replica["image"] == services["kvproxy"]["image"] and "build" in replica
        assert "command" not in replica  # the image's default: `kvproxy serve`
        _secret_path(replica, env["KVPROXY_API_KEYS"])
        given = _use_env(monkeypatch, env)
        monkeypatch.setenv("KVPROXY_API_KEYS", str(keys))  # the secret's mount, here
        settings = ServeSettings()
        assert settings.host == "0.0.0.0" and settings.redis_cluster is True
        node = urlsplit(settings.redis_url or "")
        assert node.hostname in CLUSTER_NODES and node.port == 6379 and node.path in ("", "/0")
        assert _healthcheck_url(replica) == f"http://127.0.0.1:{settings.port}/health"
        assert replica["depends_on"] == {CLUSTER_INIT: {"condition": "service_completed_successfully"}}
        assert given["KVPROXY_DISK_DIR"].startswith("/data/")
        volumes.append(_named_volumes(replica))
    assert len(volumes[0] | volumes[1]) == 2  # a disk tier each
    # The same cache settings on both (the router refuses a replica whose block size differs).
    first, second = (services[n]["environment"] for n in REPLICAS)
    assert first == second


def test_the_router_reaches_every_replica(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    services = _compose()["services"]
    router = services[ROUTER]
    env = router["environment"]
    assert set(env) <= _route_env_names(), set(env) - _route_env_names()
    # `route` goes to the image's entrypoint, `kvproxy`.
    assert 'ENTRYPOINT ["kvproxy"]' in (ROOT / "Dockerfile").read_text()
    assert router["command"] == ["route"]
    assert router["image"] == services["kvproxy"]["image"]
    _secret_path(router, env["KVPROXY_API_KEYS"])
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{ADMIN_KEY} ops admin\n")
    _use_env(monkeypatch, env, host_env={"KVPROXY_ADMIN_KEY": ADMIN_KEY})
    monkeypatch.setenv("KVPROXY_API_KEYS", str(keys))
    settings = RouteSettings()
    assert settings.host == "0.0.0.0"
    assert settings.replica_api_key == ADMIN_KEY
    replica_env = services[REPLICAS[0]]["environment"]
    assert settings.replica == [f"http://{name}:{replica_env['KVPROXY_PORT']}" for name in REPLICAS]
    # The replicas' Redis, prefix and keys: the router hashes and reads events as they write them.
    assert settings.redis_url == replica_env["KVPROXY_REDIS_URL"]
    assert settings.redis_cluster is True
    assert settings.redis_prefix == replica_env["KVPROXY_REDIS_PREFIX"]
    assert env["KVPROXY_API_KEYS"] == replica_env["KVPROXY_API_KEYS"]
    assert settings.store_timeout_ms == int(replica_env["KVPROXY_STORE_TIMEOUT_MS"])
    assert [_interpolate(p) for p in router["ports"]] == [f"8080:{settings.port}"]
    assert settings.port == 8080
    assert _healthcheck_url(router) == f"http://127.0.0.1:{settings.port}/health"
    assert router["depends_on"] == {name: {"condition": "service_healthy"} for name in REPLICAS}
    # Without KVPROXY_ADMIN_KEY in the shell the key is empty: the router says so at start.
    _use_env(monkeypatch, env)
    monkeypatch.setenv("KVPROXY_API_KEYS", str(keys))
    assert not RouteSettings().replica_api_key
