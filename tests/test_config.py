"""Configuration loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pd.config import DHTConfig, load_config
from p2pd.errors import InvalidAddress, UsageError
from p2pd.wire import Address


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path).dht == DHTConfig()
    (tmp_path / "config.toml").write_text(
        '[node]\nlisten = "127.0.0.1:5000"\nbootstrap = ["127.0.0.2:4747"]\n'
        "republish_interval = 600\n[dht]\nalpha = 5\nrpc_timeout = 3\n"
    )
    config = load_config(tmp_path)
    assert config.listen == Address("127.0.0.1", 5000)
    assert config.bootstrap == (Address("127.0.0.2", 4747),)
    assert config.republish_interval == 600.0
    assert config.dht.alpha == 5 and config.dht.rpc_timeout == 3.0


@pytest.mark.parametrize(
    "text",
    [
        "[node]\nlisten = 5\n",
        "[node]\nnonsense = 1\n",
        "[dht]\nalpha = 'three'\n",
        "[other]\n",
        "not toml at all [",
    ],
)
def test_bad_config_is_a_clear_usage_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises((UsageError, InvalidAddress)):
        load_config(tmp_path)


def test_republish_min_is_a_node_setting_within_bounds(tmp_path: Path) -> None:
    """How soon a changed record is republished: 10 s unless set; below 1 s or above
    the hourly republish is a clear error."""
    assert load_config(tmp_path).republish_min == 10.0
    (tmp_path / "config.toml").write_text("[node]\nrepublish_min = 1.5\n")
    assert load_config(tmp_path).republish_min == 1.5
    for bad in ("republish_min = 0.5", "republish_min = 4000", "republish_min = 'soon'",
                "republish_min = 20\nrepublish_interval = 15"):  # fmt: skip
        (tmp_path / "config.toml").write_text(f"[node]\n{bad}\n")
        with pytest.raises(UsageError, match="republish_min"):
            load_config(tmp_path)


def test_dialback_wait_is_a_dht_setting_within_bounds(tmp_path: Path) -> None:
    """How long a dial-back round waits for nonces: 5 s unless set; below 0.5 s, above
    60 s or not a number is a clear error."""
    assert load_config(tmp_path).dht.dialback_wait == 5.0
    (tmp_path / "config.toml").write_text("[dht]\ndialback_wait = 1.5\n")
    assert load_config(tmp_path).dht.dialback_wait == 1.5
    for bad in ("0.2", "0", "-1", "61", "'soon'"):
        (tmp_path / "config.toml").write_text(f"[dht]\ndialback_wait = {bad}\n")
        with pytest.raises(UsageError, match="dialback_wait"):
            load_config(tmp_path)


def test_quic_section_of_the_config_file(tmp_path: Path) -> None:
    """The QUIC budgets of docs/SECURITY.md ("QUIC budgets") are settings."""
    (tmp_path / "config.toml").write_text(
        "[quic]\nmax_connections_per_address = 4\nretry_after_half_open = 8\nreserved_share = 0.5\n"
    )
    quic = load_config(tmp_path).quic
    assert (quic.max_connections_per_address, quic.retry_after_half_open) == (4, 8)
    assert quic.reserved_share == 0.5 and quic.max_connections == 1024
    for bad in ("reserved_share = 1.5", "max_connections = 0", "volume = 3", "idle_timeout = 'x'"):
        (tmp_path / "config.toml").write_text(f"[quic]\n{bad}\n")
        with pytest.raises(UsageError):
            load_config(tmp_path)


def test_lan_section_of_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[lan]\nmode = "contacts"\ninterfaces = ["198.51.100.11"]\nttl = 150\n'
    )
    config = load_config(tmp_path)
    assert config.lan.mode == "contacts"
    assert config.lan.interfaces == ("198.51.100.11",)
    assert config.lan.ttl == 150
    for bad in ('mode = "loud"', 'interfaces = "198.51.100.11"', "ttl = 5", "volume = 3"):
        (tmp_path / "config.toml").write_text(f"[lan]\n{bad}\n")
        with pytest.raises(UsageError):
            load_config(tmp_path)


def test_calls_section_of_the_config_file(tmp_path: Path) -> None:
    assert load_config(tmp_path).calls.allow_from == "everyone"
    (tmp_path / "config.toml").write_text('[calls]\nfrom = "contacts"\n')
    assert load_config(tmp_path).calls.allow_from == "contacts"
    for bad in ('[calls]\nfrom = "friends"\n', "[calls]\nring = 3\n"):
        (tmp_path / "config.toml").write_text(bad)
        with pytest.raises(UsageError, match="contacts"):
            load_config(tmp_path)


def test_nat_section_turns_port_mapping_off(tmp_path: Path) -> None:
    """``[nat] port_mapping`` (issue 13, item 9): on by default; a daemon on loopback,
    or with --advertise, never asks a gateway."""
    from p2pd.daemon import wants_port_mapping

    config = load_config(tmp_path)
    assert config.nat.port_mapping is True
    assert wants_port_mapping(config, Address("::", 4747))
    assert wants_port_mapping(config, Address("10.1.0.11", 4747))
    assert not wants_port_mapping(config, Address("127.0.0.1", 4747))
    assert not wants_port_mapping(config, Address("::1", 4747))
    (tmp_path / "config.toml").write_text("[nat]\nport_mapping = false\n")
    config = load_config(tmp_path)
    assert config.nat.port_mapping is False
    assert not wants_port_mapping(config, Address("::", 4747))
    for bad in ('port_mapping = "yes"', "port_mapping = 1", "upnp = true"):
        (tmp_path / "config.toml").write_text(f"[nat]\n{bad}\n")
        with pytest.raises(UsageError):
            load_config(tmp_path)
