"""The `zen-node` command line: its public flags, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dht import NodeIdentity
from node.cli import build_parser

# The public interface: removing or renaming a flag breaks users' scripts. Adding one means
# adding it here on purpose.
EXPECTED_FLAGS = {
    "join": [
        "--allow-low-memory", "--announce-maddrs", "--auto-relay", "--client-mode", "--config", "--data",
        "--device", "--epsilon-budget", "--help", "--host-maddrs", "--identity", "--initial-peers", "--log-level",
        "--min-peers", "--no-relay", "--resume", "--rounds", "--run-id", "--save-round-params", "--workdir",
    ],
    "status": [
        "--announce-maddrs", "--auto-relay", "--client-mode", "--config", "--help", "--host-maddrs",
        "--initial-peers", "--json", "--log-level", "--no-relay", "--run-id",
    ],
    "serve": [
        "--announce-maddrs", "--auto-relay", "--client-mode", "--config", "--device", "--help", "--host-maddrs",
        "--identity", "--initial-peers", "--log-level", "--max-memory", "--no-relay", "--run-id", "--stages",
    ],
    "demo": [
        "--aggregation", "--help", "--inner-steps", "--log-level", "--peers", "--privacy-epsilon", "--rounds",
        "--summary-json", "--workdir",
    ],
}  # fmt: skip


def _subcommand_flags(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: sorted(flag for action in sub._actions for flag in action.option_strings if flag.startswith("--"))
        for name, sub in subparsers.choices.items()
    }


def test_zen_node_flags_are_stable() -> None:
    """The subcommands and their flags are exactly the documented public surface."""
    # Execute
    flags = _subcommand_flags(build_parser())

    # Assert
    assert flags == EXPECTED_FLAGS


def test_every_flag_has_help_with_an_example() -> None:
    """Each flag's help text exists (the style guide asks for an example value)."""
    # Prepare
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))

    # Execute
    missing = [
        f"{name} {action.option_strings}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if action.option_strings and action.option_strings[0] != "-h" and not action.help
    ]

    # Assert
    assert missing == []


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("command", ["join", "status", "demo", "serve"])
def test_help_works(command: str) -> None:
    """`zen-node <command> --help` prints usage and exits 0."""
    # Execute
    result = run_cli(command, "--help")

    # Assert
    assert result.returncode == 0
    assert "usage: zen-node" in result.stdout


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("zen-node: error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in error_lines[0]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text("hello swarm " * 200)
    return path


def test_malformed_initial_peer_is_a_one_line_error(tmp_path: Path, data_file: Path) -> None:
    """A multiaddr that does not parse is named, with an example of a good one."""
    # Execute
    result = run_cli("join", "--initial-peers", "/ip4/127.0.0.1/tcp/notaport", "--data", str(data_file),
                     "--identity", str(tmp_path / "id"), "--workdir", str(tmp_path / "w"))  # fmt: skip

    # Assert
    _assert_one_line_error(result, "notaport", "/p2p/")


def test_initial_peer_without_peer_id_is_a_one_line_error(tmp_path: Path, data_file: Path) -> None:
    """An address without /p2p/<PeerID> says to copy the full address."""
    # Execute
    result = run_cli("join", "--initial-peers", "/ip4/127.0.0.1/tcp/31337", "--data", str(data_file))

    # Assert
    _assert_one_line_error(result, "/p2p/")


def test_client_mode_with_secure_aggregation_is_a_one_line_error(tmp_path: Path, data_file: Path) -> None:
    """A peer that cannot be dialled cannot reduce a part: secure mode says so and names the way out."""
    # Execute
    result = run_cli("join", "--client-mode", "--data", str(data_file), "--identity", str(tmp_path / "id"))

    # Assert
    _assert_one_line_error(result, "client_mode", "aggregation.mode = 'plain'")


def test_unreachable_bootstrap_is_a_one_line_error(tmp_path: Path, data_file: Path) -> None:
    """A bootstrap address where nobody listens fails fast with a hint."""
    # Prepare
    stranger = NodeIdentity.load_or_create(tmp_path / "stranger").peer_id

    # Execute
    result = run_cli("join", "--initial-peers", f"/ip4/127.0.0.1/tcp/1/p2p/{stranger}", "--data", str(data_file),
                     "--identity", str(tmp_path / "id"), "--workdir", str(tmp_path / "w"),
                     "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-id", "t")  # fmt: skip

    # Assert
    _assert_one_line_error(result, "cannot reach any initial peer")


def test_corrupt_identity_is_a_one_line_error_and_left_untouched(tmp_path: Path, data_file: Path) -> None:
    """A damaged key file is reported, not overwritten."""
    # Prepare
    NodeIdentity.load_or_create(tmp_path / "id")
    key = tmp_path / "id" / "p2p.key"
    key.write_bytes(b"garbage")

    # Execute
    result = run_cli("join", "--data", str(data_file), "--identity", str(tmp_path / "id"),
                     "--workdir", str(tmp_path / "w"))  # fmt: skip

    # Assert
    _assert_one_line_error(result, "p2p.key", "corrupt")
    assert key.read_bytes() == b"garbage"


@pytest.mark.parametrize("data", ["missing.txt", "empty.txt", "empty-folder"])
def test_bad_data_path_is_a_one_line_error(tmp_path: Path, data: str) -> None:
    """Missing, empty and file-less data paths are named."""
    # Prepare
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty-folder").mkdir()

    # Execute
    result = run_cli("join", "--data", str(tmp_path / data), "--identity", str(tmp_path / "id"))

    # Assert
    _assert_one_line_error(result, data)


def test_port_in_use_is_a_one_line_error(tmp_path: Path, data_file: Path) -> None:
    """Listening on a port another process holds says so and suggests port 0."""
    # Prepare
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "run.toml"
    config.write_text("[run]\nmin_memory_gb = 0.0\n")
    try:
        # Execute
        result = run_cli("join", "--data", str(data_file), "--identity", str(tmp_path / "id"),
                         "--workdir", str(tmp_path / "w"), "--config", str(config),
                         "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}")  # fmt: skip
    finally:
        holder.close()

    # Assert
    _assert_one_line_error(result, "in use")


def test_bad_config_value_names_the_field(tmp_path: Path, data_file: Path) -> None:
    """An out-of-range config value names the field and the allowed range."""
    # Prepare
    config = tmp_path / "run.toml"
    config.write_text("[run.train]\ninner_steps = 0\n")

    # Execute
    result = run_cli("join", "--config", str(config), "--data", str(data_file))

    # Assert
    _assert_one_line_error(result, "train.inner_steps")


def test_low_memory_is_refused_without_the_override(tmp_path: Path, data_file: Path) -> None:
    """A run whose minimum memory exceeds this machine's refuses to join and names the flag."""
    # Prepare
    config = tmp_path / "run.toml"
    config.write_text("[run]\nmin_memory_gb = 100000.0\n")

    # Execute
    result = run_cli("join", "--config", str(config), "--data", str(data_file), "--identity", str(tmp_path / "id"))

    # Assert
    _assert_one_line_error(result, "--allow-low-memory")


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        pytest.param(["--max-memory", "lots"], ["--max-memory 'lots'", "20GB"], id="bad-max-memory"),
        pytest.param(["--max-memory", "1KB"], ["--max-memory", "raise --max-memory"], id="max-memory-below-a-stage"),
        pytest.param([], ["not sharded", "[run.sharding]"], id="unsharded-run"),
    ],
)
def test_serve_errors_are_one_line(tmp_path: Path, extra: list[str], needles: list[str]) -> None:
    """`zen-node serve` names a bad --max-memory, one too small for a stage, and a run that is not sharded."""
    # Prepare
    config = tmp_path / "run.toml"
    stages = "[run.sharding]\nstages = 1\n" if extra else ""
    config.write_text(f"[run]\nrun_id = 'serve-errors'\n{stages}")

    # Execute
    result = run_cli("serve", "--config", str(config), "--identity", str(tmp_path / "id"),
                     "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu", *extra)  # fmt: skip

    # Assert
    _assert_one_line_error(result, *needles)
    assert "p2pd" not in " ".join(p.name() for p in psutil.Process().children(recursive=True))
