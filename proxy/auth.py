"""API keys: the `--api-keys` file, Bearer authentication and the caller's tenant.

File format, one key per line: ``KEY TENANT [admin]``; ``#`` starts a comment. Keys are compared
in constant time (``hmac.compare_digest`` over SHA-256 digests, so neither a key's content nor its
length leaks through timing). With no keys configured every caller is the admin of tenant
``default``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import AuthenticationFailed, PermissionDenied

DEFAULT_TENANT = "default"


class ApiKeyFileError(ValueError):
    """The keys file is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool


OPEN_ACCESS = Principal(tenant=DEFAULT_TENANT, admin=True)


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyTable:
    """The configured keys; ``authenticate`` maps an Authorization header to a Principal."""

    def __init__(self, entries: dict[str, Principal]) -> None:
        self._entries = [_Entry(_digest(key), p) for key, p in entries.items()]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_file(cls, path: Path) -> KeyTable:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyFileError(
                f"{path}: cannot read the API keys file ({exc.__class__.__name__})"
            ) from None
        return cls(parse_key_lines(text, source=str(path)))

    def lookup(self, key: str) -> Principal | None:
        given = _digest(key)
        found: Principal | None = None
        # Compare against every entry, no early exit: the time taken says nothing about which
        # key (if any) matched.
        for entry in self._entries:
            if hmac.compare_digest(given, entry.digest):
                found = entry.principal
        return found

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The caller of a request with these headers: ``Authorization: Bearer KEY`` (OpenAI) or
        ``x-api-key: KEY`` (Anthropic); the ``x-api-key`` wins when both are sent."""
        if api_key is not None:
            key = api_key.strip()
        elif not authorization:
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
            )
        else:
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise AuthenticationFailed("Malformed Authorization header: use 'Bearer <key>'.")
            key = key.strip()
        principal = self.lookup(key) if key else None
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal


def parse_key_lines(text: str, *, source: str = "api keys") -> dict[str, Principal]:
    entries: dict[str, Principal] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        where = f"{source}:{lineno}"
        if len(words) not in (2, 3):
            raise ApiKeyFileError(f"{where}: expected 'KEY TENANT [admin]', got {len(words)} words")
        key, tenant = words[0], words[1]
        if len(words) == 3 and words[2] != "admin":
            raise ApiKeyFileError(f"{where}: the third word must be 'admin'")
        if len(key) < 8:
            raise ApiKeyFileError(f"{where}: key too short (at least 8 characters)")
        if key in entries:
            raise ApiKeyFileError(f"{where}: duplicate key")
        entries[key] = Principal(tenant=tenant, admin=len(words) == 3)
    if not entries:
        raise ApiKeyFileError(f"{source}: no keys found")
    return entries


def require_admin(principal: Principal) -> Principal:
    if not principal.admin:
        raise PermissionDenied("This route needs an admin API key.")
    return principal
