"""`kvproxy route` options: flags, their environment variables (the ones shared with `serve` keep
`serve`'s names; a bare REDIS_URL configures nothing) and clear errors for bad values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.cli import build_parser, main
from proxy.route.settings import RouteSettings


def test_environment_names_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPROXY_ROUTE_REPLICA", "http://a:8000, http://b:8000/")
    monkeypatch.setenv("KVPROXY_REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:1/0")
    monkeypatch.setenv("KVPROXY_ROUTE_RESTORE_WEIGHT", "0.5")
    settings = RouteSettings()
    assert settings.replica == ["http://a:8000", "http://b:8000"]
    assert settings.redis_url == "redis://cache:6379/0"
    assert settings.weights().restore_weight == 0.5
    # A flag beats the environment.
    args = build_parser().parse_args(["route", "--replica", "http://c:1", "--restore-weight", "0.1"])
    given = {name: getattr(args, name) for name in RouteSettings.model_fields if hasattr(args, name)}
    flagged = RouteSettings(**given)
    assert flagged.replica == ["http://c:1"] and flagged.restore_weight == 0.1
    assert flagged.redis_url == "redis://cache:6379/0"


def test_bad_values_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match="not an http"):
        RouteSettings(replica=["ftp://x"])
    with pytest.raises(ValidationError, match="redis://"):
        RouteSettings(replica=["http://a:1"], redis_url="http://a")
    assert main(["route"]) == 2
    assert "give at least one --replica URL" in capsys.readouterr().err
