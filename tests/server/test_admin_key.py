"""The first-run admin key (server/admin_key.py): generated once into a 0600 file beside the
store's data directory (or TESSERA_ADMIN_KEY_FILE), reused afterwards, never overwritten;
a configured TESSERA_ADMIN_KEY wins and touches no file. The whole first run over a real
``tessera serve`` is in test_cli.py."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from tessera.server.admin_key import AdminKeyError, ensure_admin_key, key_file, load_or_create
from tests.live import HermeticServerSettings, HermeticSettings, HermeticStoreSettings


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: the file's mode comes from os.open's 0600 alone."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_once_with_mode_600_then_reused(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "new" / "dir" / "admin.key"
    key, created = load_or_create(path)
    assert created and key.startswith("tsa_") and len(key) >= 40
    assert key.isascii() and key.strip() == key
    assert path.read_text() == key + "\n"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert load_or_create(path) == (key, False)
    assert load_or_create(tmp_path / "other.key")[0] != key  # random, not derived


def test_an_existing_key_is_never_overwritten(tmp_path: Path, open_umask: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "admin.key"
    path.write_text("  my-own-key\n")
    path.chmod(0o600)
    assert load_or_create(path) == ("my-own-key", False)
    assert path.read_text() == "  my-own-key\n"
    path.chmod(0o644)  # still used, with a warning
    with caplog.at_level(logging.WARNING, logger="tessera.admin_key"):
        assert load_or_create(path) == ("my-own-key", False)
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text


@pytest.mark.parametrize("content", ["", "\n\n", "two words\n"])
def test_a_file_without_a_key_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "admin.key"
    path.write_text(content)
    with pytest.raises(AdminKeyError, match=r"holds no key.*delete it"):
        load_or_create(path)
    assert path.read_text() == content


def test_an_unusable_path_says_what_to_set(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(AdminKeyError, match="TESSERA_ADMIN_KEY, or TESSERA_ADMIN_KEY_FILE"):
        load_or_create(tmp_path / "file" / "admin.key")  # its parent is a file


def test_where_the_key_lives(tmp_path: Path) -> None:
    data_dir = tmp_path / "tessera" / "redis"
    assert key_file(data_dir, {}) == tmp_path / "tessera" / "admin.key"
    assert key_file(data_dir, {"TESSERA_ADMIN_KEY_FILE": ""}) == tmp_path / "tessera" / \
        "admin.key"
    assert key_file(data_dir, {"TESSERA_ADMIN_KEY_FILE": str(tmp_path / "k")}) == \
        tmp_path / "k"
    assert key_file(data_dir, {"TESSERA_ADMIN_KEY_FILE": "~/k"}) == Path.home() / "k"


def settings(data_dir: Path, admin_key: str | None = None) -> HermeticServerSettings:
    return HermeticServerSettings(
        admin_key=admin_key, engine=HermeticSettings(),
        store=HermeticStoreSettings(data_dir=data_dir))


def test_ensure_admin_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "redis"
    configured = settings(data_dir, "chosen")
    assert ensure_admin_key(configured, {}, url="http://127.0.0.1:8000") is configured
    assert not (tmp_path / "admin.key").exists()  # a configured key touches no file

    with caplog.at_level(logging.INFO, logger="tessera.admin_key"):
        first = ensure_admin_key(settings(data_dir), {}, url="http://127.0.0.1:8000")
    assert isinstance(first.admin_key, SecretStr)
    key = first.admin_key.get_secret_value()
    assert (tmp_path / "admin.key").read_text().strip() == key
    assert first.store.data_dir == data_dir  # everything else kept
    # printed once, with the command to run next (the default URL needs no TESSERA_URL)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"Create a tenant with:  TESSERA_ADMIN_KEY={key} tessera create-tenant acme" in \
        record.getMessage()
    caplog.clear()

    with caplog.at_level(logging.INFO, logger="tessera.admin_key"):
        again = ensure_admin_key(settings(data_dir), {}, url="http://10.0.0.5:9000")
    assert again.admin_key is not None and again.admin_key.get_secret_value() == key
    assert key not in caplog.text and "admin key from" in caplog.text

    elsewhere = tmp_path / "secrets" / "tessera.key"
    with caplog.at_level(logging.INFO, logger="tessera.admin_key"):
        other = ensure_admin_key(settings(data_dir), {"TESSERA_ADMIN_KEY_FILE": str(elsewhere)},
                                 url="http://10.0.0.5:9000")
    assert other.admin_key is not None
    assert elsewhere.read_text().strip() == other.admin_key.get_secret_value() != key
    assert "TESSERA_URL=http://10.0.0.5:9000 TESSERA_ADMIN_KEY=" in caplog.text
