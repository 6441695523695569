"""While the model loads, /health answers 503 "loading" and model routes answer 503 with
Retry-After; a load that fails keeps them 503 ("failed") and stops the CLI's server. No engine
is involved: the loader is held at its start."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

import proxy.services
from proxy.app import create_app
from proxy.services import Services
from proxy.settings import ServeSettings


@pytest.fixture
def held_loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    release = threading.Event()

    def build_runtime(settings: ServeSettings, metrics: object, **_: object) -> object:
        release.wait(10)
        raise proxy.services.LoadError("no such model: /nowhere")

    monkeypatch.setattr(proxy.services, "build_runtime", build_runtime)
    yield release
    release.set()


def test_loading_then_failed(held_loader: threading.Event, tmp_path) -> None:
    settings = ServeSettings(no_disk=True, disk_dir=tmp_path)
    failed = threading.Event()
    services = Services.create(settings)
    services.on_load_failed = failed.set
    with TestClient(create_app(settings, services)) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert health.headers["Retry-After"]
        resp = client.post(
            "/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "model_loading" and resp.headers["Retry-After"]
        assert client.get("/dashboard").status_code == 200  # the page itself never needs the model
        assert client.get("/metrics").status_code == 200

        held_loader.set()
        assert failed.wait(5)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "/nowhere" not in health.text  # the details go to the log, not to the world
        assert client.post("/v1/completions", json={"model": "demo", "prompt": "hi"}).json()["error"][
            "code"
        ] == ("model_failed")
