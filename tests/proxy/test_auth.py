"""The API keys file and Bearer authentication."""

from __future__ import annotations

import pytest

from proxy.auth import ApiKeyFileError, KeyTable, Principal, parse_key_lines
from proxy.errors import AuthenticationFailed


def test_parse_keys_with_comments_and_admin() -> None:
    entries = parse_key_lines("# keys\nsk-alice-123 alice admin  # the boss\n\nsk-bob-4567 bob\n")
    assert entries == {
        "sk-alice-123": Principal("alice", True),
        "sk-bob-4567": Principal("bob", False),
    }


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("sk-alice-123\n", 1),
        ("sk-alice-123 alice root\n", 1),
        ("sk-alice-123 alice\nshort bob\n", 2),
        ("sk-alice-123 alice\n# c\nsk-alice-123 bob\n", 3),
    ],
)
def test_bad_lines_name_the_line(text: str, line: int) -> None:
    with pytest.raises(ApiKeyFileError, match=f"keys.txt:{line}:"):
        parse_key_lines(text, source="keys.txt")


def test_authenticate() -> None:
    table = KeyTable(parse_key_lines("sk-alice-123 alice admin\nsk-bob-4567 bob\n"))
    assert table.authenticate("Bearer sk-bob-4567") == Principal("bob", False)
    for header in (None, "", "Bearer ", "Basic sk-bob-4567", "Bearer sk-bob-4568", "sk-bob-4567"):
        with pytest.raises(AuthenticationFailed):
            table.authenticate(header)
