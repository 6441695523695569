"""Shared fixtures: real Redis servers (tests/support/redis_fixtures.py) and tiny models built
in code (tests/support/model_fixtures.py)."""

pytest_plugins = ["tests.support.redis_fixtures", "tests.support.model_fixtures"]
