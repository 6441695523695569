"""The ``kvproxy`` command: serve, route, warmup, stats, flush, pins, pin, unpin.

Serve options are generated from ``ServeSettings`` so the flags, the ``KVPROXY_*`` variables and
the settings can never disagree. Only flags the user actually gave are passed on, so a flag beats
the environment, which beats the default.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from proxy.auth import ApiKeyFileError, KeyTable
from proxy.cli_client import CliError
from proxy.settings import ServeSettings

DEFAULT_SERVER = "http://127.0.0.1:8000"

_HELP: Mapping[str, str] = MappingProxyType(
    {
        "model": "HF model id or local path (default: the offline `demo` model)",
        "served_model_name": "model id clients must send (default: --model as given); repeat it for "
        "aliases (an agent that asks for its own model names)",
        "host": "address to bind (default 127.0.0.1)",
        "port": "port to bind (default 8000)",
        "block_size": "tokens per cached block (default 64)",
        "memory_bytes": "memory tier budget, bytes or 512MiB / 4GiB (default 1GiB)",
        "no_memory_reserve": "do not fault the memory budget in at start (RSS grows with use instead)",
        "no_history_warming": "do not prefill a tool loop's next-round prefix while the client runs the tool",
        "disk_dir": "disk tier directory (default: the user cache dir, kvproxy/blocks)",
        "no_disk": "turn the disk tier off",
        "disk_bytes": "disk tier cap (default 10GiB)",
        "redis_url": "redis:// or rediss:// URL of a shared Redis tier (off by default)",
        "redis_cluster": "the Redis URL names a Redis Cluster",
        "redis_prefix": "key prefix in Redis (default kvp:v1:)",
        "redis_ttl": "seconds a Redis block lives, refreshed on hit (default: no TTL)",
        "store_timeout_ms": "bound on every Redis call (default 200)",
        "breaker_cooldown_s": "seconds before a tripped Redis breaker retries (default 10)",
        "max_queue": "requests that may wait for the model before 503 (default 64)",
        "max_context": "context limit (default: the model's own)",
        "default_max_tokens": "max_tokens when a request sets none (default 256)",
        "device": "auto, cpu or cuda",
        "dtype": "auto, float32, bfloat16 or float16",
        "api_keys": "file of `KEY TENANT [admin]` lines; turns authentication on",
        "max_batch": "requests decoding together; 1 = one at a time, bitwise reproducible "
        "(default: 32 on CPU, 128 on CUDA)",
        "max_batch_tokens": "tokens of one forward step; a longer prefill is split across steps "
        "(default: 512 on CPU, 2048 on CUDA)",
        "kv_budget_bytes": "K/V reserved by running requests; admission waits when it is full "
        "(default: 4GiB on CPU, half the free GPU memory on CUDA)",
        "max_pinned_bytes": "memory that cache breakpoints and pins may hold (default: half of "
        "--memory-bytes)",
        "max_pinned_tenant_share": "share of --max-pinned-bytes one tenant's pins may take (default 0.5)",
        "keep_billing_header": "keep Claude Code's per-request x-anthropic-billing-header system block "
        "(dropped by default: its nonce would make every prompt miss)",
    }
)

# The options offline warmup needs to reach the same stores as the server.
STORE_OPTIONS = (
    "model",
    "block_size",
    "memory_bytes",
    "disk_dir",
    "no_disk",
    "disk_bytes",
    "redis_url",
    "redis_cluster",
    "redis_prefix",
    "redis_ttl",
    "store_timeout_ms",
    "breaker_cooldown_s",
    "max_context",
    "device",
    "dtype",
)


def add_settings_options(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    # DESIGN: `--disk-dir DIR | --no-disk`; argparse refuses both at once.
    disk_group = parser.add_mutually_exclusive_group()
    for name in names:
        target = disk_group if name in ("disk_dir", "no_disk") else parser
        _add_option(target, name, ServeSettings.model_fields[name], f"KVPROXY_{name.upper()}", _HELP)


def add_route_options(parser: argparse.ArgumentParser) -> None:
    from proxy.route.settings import HELP, RouteSettings

    for name, field in RouteSettings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if alias is not None else f"KVPROXY_ROUTE_{name.upper()}"  # type: ignore[union-attr]
        _add_option(parser, name, field, str(env), HELP)


_REPEATED: Mapping[str, str] = MappingProxyType({"served_model_name": "NAME", "replica": "URL"})
"""List options, one flag per item: their metavar."""


def _add_option(target: Any, name: str, field: FieldInfo, env: str, helps: Mapping[str, str]) -> None:
    """One settings field as a flag (a bool is a switch, a list repeats); only a flag the user
    gives is passed on (``SUPPRESS``), so it beats the environment, which beats the default."""
    flag = "--" + name.replace("_", "-")
    help_text = f"{helps.get(name, '')} [env {env}]"
    if field.annotation is bool:
        target.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
    elif name in _REPEATED:
        metavar = _REPEATED[name]
        target.add_argument(
            flag, dest=name, action="append", default=argparse.SUPPRESS, metavar=metavar, help=help_text
        )
    else:
        target.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def route(args: argparse.Namespace) -> int:
    from proxy.route.prompts import ReplicaInfoError
    from proxy.route.server import run
    from proxy.route.settings import RouteSettings

    names = RouteSettings.model_fields
    settings = RouteSettings(**{name: getattr(args, name) for name in names if hasattr(args, name)})
    try:
        return run(settings)
    except ReplicaInfoError as exc:
        print(f"kvproxy route: error: {exc}", file=sys.stderr)
        return 2


def settings_from_args(args: argparse.Namespace, names: Iterable[str]) -> ServeSettings:
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return ServeSettings(**given)


def settings_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        flag = "--" + name.replace("_", "-")
        lines.append(f"{flag} (KVPROXY_{name.upper()}): {str(err['msg']).removeprefix('Value error, ')}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvproxy", description="kvproxy: an OpenAI-compatible prefix-caching server for HF causal LMs"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    add_settings_options(serve, ServeSettings.model_fields)

    route = sub.add_parser("route", help="run the cache-aware router in front of `kvproxy serve` replicas")
    add_route_options(route)

    warm = sub.add_parser("warmup", help="prefill prompts into the cache")
    warm.add_argument("files", nargs="+", metavar="FILE", help="JSONL ({prompt} / {messages}) or text")
    warm.add_argument("--server", default=None, help="go through this running server")
    warm.add_argument("--api-key", default=None, help="admin key for --server [env KVPROXY_API_KEY]")
    warm.add_argument("--tenant", default=None, help="tenant whose namespace is warmed (default: default)")
    warm.add_argument("--cache-salt", default=None, help="cache_salt to warm under")
    add_settings_options(warm, STORE_OPTIONS)

    for name, text in (("stats", "show the server's cache figures"), ("flush", "empty every tier")):
        add_server_options(sub.add_parser(name, help=text))

    pins = sub.add_parser("pins", help="list the pinned prefixes of every tenant")
    pins.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    add_server_options(pins)

    pin = sub.add_parser("pin", help="prefill prompts and keep them in memory until a TTL passes")
    pin.add_argument("files", nargs="*", metavar="FILE", help="JSONL ({prompt} / {messages}) or text")
    pin.add_argument("--prompt", default=None, metavar="TEXT", help="pin this text (as well as any FILE)")
    pin.add_argument(
        "--ttl",
        required=True,
        type=parse_duration,
        metavar="DURATION",
        help="how long each pin lasts, refreshed on every hit: seconds or 90s, 5m, 1h, 24h, 1h30m",
    )
    pin.add_argument("--tenant", default=None, help="tenant the pins belong to (default: the key's)")
    pin.add_argument("--cache-salt", default=None, help="cache_salt the prompts are cached under")
    add_server_options(pin)

    unpin = sub.add_parser("unpin", help="drop pins (their blocks stay cached, evictable again)")
    unpin.add_argument("ids", nargs="+", metavar="ID", help="a pin id as `kvproxy pins` shows it, or more")
    add_server_options(unpin)
    return parser


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"server URL (default {DEFAULT_SERVER})")
    parser.add_argument("--api-key", default=None, help="admin key [env KVPROXY_API_KEY]")


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = MappingProxyType({"s": 1, "m": 60, "h": 3600, "d": 86400})


def parse_duration(text: str) -> float:
    """``300`` / ``90s`` / ``5m`` / ``1h30m`` / ``7d`` -> seconds (argparse's ``type`` for --ttl).
    The upper bound is the server's to enforce (its 400 names it)."""
    spec = text.strip().lower()
    try:
        seconds = float(spec)
    except ValueError:
        if not spec or _DURATION_PART.sub("", spec):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration: use seconds or a number with s, m, h or d (5m, 1h30m)"
            ) from None
        seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(spec))
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return seconds


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("KVPROXY_API_KEY") or None


def quiet_library_progress() -> None:
    """transformers draws progress bars (loading weights, writing the demo model) that would
    interleave with the one-line startup summary and warmup's own progress bar; the CLI, which
    owns the process's output, turns them off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ServeSettings.model_fields)
    # Report a bad keys file (with its line) before paying for torch and the model imports.
    keys = KeyTable.from_file(settings.api_keys) if settings.api_keys else None

    log = logging.getLogger("kvproxy")
    from model_runner import host_memory

    # Before any thread starts or anything big is allocated (see model_runner/host_memory.py).
    tuning = host_memory.tune_allocator(
        0 if settings.no_memory_reserve else host_memory.reservation_bytes(settings.memory_bytes)
    )
    if not tuning.applied:
        log.debug("host allocator left as it is (%s)", tuning.reason)

    import uvicorn

    from proxy.app import SHUTDOWN_GRACE_S, create_app
    from proxy.services import Services

    quiet_library_progress()
    services = Services.create(settings, keys=keys)
    services.host_reserve_bytes = tuning.reserve_bytes
    if not settings.loopback and services.keys is None:
        log.warning(
            "binding %s with no --api-keys: anyone who can reach this port can use the "
            "model and flush the cache",
            settings.host,
        )
    log.info("loading %s ...", settings.model_name)
    app = create_app(settings, services)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
    )
    server = uvicorn.Server(config)

    def stop_serving() -> None:
        server.should_exit = True  # a server with no model is of no use: exit non-zero instead

    services.on_load_failed = stop_serving
    server.run()
    return 1 if services.state == "failed" else 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per admin request is noise here
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "route":
            return route(args)
        if args.command == "warmup":
            from proxy import cli_warmup  # the request schemas, and torch with them: warmup only

            return cli_warmup.run(args, api_key=_api_key(args))
        from proxy import cli_client

        if args.command == "stats":
            return cli_client.stats(args.server, _api_key(args))
        if args.command == "pins":
            return cli_client.pins(args.server, _api_key(args), as_json=args.json)
        if args.command == "pin":
            return cli_client.pin(
                args.server,
                _api_key(args),
                cli_client.pin_sources(args.files, args.prompt),
                ttl_s=args.ttl,
                tenant=args.tenant,
                cache_salt=args.cache_salt,
            )
        if args.command == "unpin":
            return cli_client.unpin(args.server, _api_key(args), args.ids)
        return cli_client.flush(args.server, _api_key(args))
    except ValidationError as exc:
        print(f"kvproxy: {settings_error(exc)}", file=sys.stderr)
        return 2
    except (ApiKeyFileError, CliError) as exc:
        print(f"kvproxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
