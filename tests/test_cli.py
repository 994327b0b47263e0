"""The `zen-node` command line: its public flags, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import psutil
import pytest
from helpers import LOCALHOST_MADDR, ZEN_NODE

import node.cli
from dht import NodeIdentity
from node.cli import build_parser, config_from_args, main
from node.config import ConfigError

# The public interface: removing or renaming a flag breaks users' scripts. Adding one means
# adding it here on purpose.
EXPECTED_FLAGS = {
    "join": [
        "--allow-low-memory", "--announce-maddrs", "--auto-relay", "--client-mode", "--config", "--data",
        "--device", "--display-name", "--epsilon-budget", "--help", "--host-maddrs", "--identity", "--initial-peers",
        "--log-level",
        "--metrics-port", "--min-peers", "--no-relay", "--resume", "--rounds", "--run-id", "--save-round-params",
        "--workdir",
    ],
    "status": [
        "--announce-maddrs", "--auto-relay", "--client-mode", "--config", "--help", "--host-maddrs",
        "--initial-peers", "--json", "--log-level", "--no-relay", "--run-id",
    ],
    "serve": [
        "--announce-maddrs", "--auto-relay", "--client-mode", "--config", "--device", "--help", "--host-maddrs",
        "--identity", "--initial-peers", "--log-level", "--max-memory", "--metrics-port", "--no-relay", "--run-id",
        "--stages",
    ],
    "demo": [
        "--aggregation", "--help", "--inner-steps", "--log-level", "--peers", "--privacy-epsilon", "--rounds",
        "--summary-json", "--workdir",
    ],
    "export": ["--config", "--display-name", "--help", "--log-level", "--out", "--workdir"],
    "generate": ["--help", "--log-level", "--max-new-tokens", "--model", "--prompt", "--seed"],
    "ledger": [
        "--announce-maddrs", "--auto-relay", "--client-mode", "--config", "--csv", "--help", "--host-maddrs",
        "--initial-peers", "--json", "--log-level", "--no-relay", "--receipts", "--run-id",
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
    return subprocess.run([*ZEN_NODE, *args], capture_output=True, text=True, timeout=timeout, env=env)


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
                     "--host-maddrs", LOCALHOST_MADDR, "--run-id", "t")  # fmt: skip

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
                     "--host-maddrs", LOCALHOST_MADDR, "--device", "cpu", *extra)  # fmt: skip

    # Assert
    _assert_one_line_error(result, *needles)
    assert "p2pd" not in " ".join(p.name() for p in psutil.Process().children(recursive=True))


def _assert_one_line_in_process(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zen-node: error:"), stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["join"], "no data", id="join-without-data"),
        pytest.param(["join", "--data", "{tmp}/missing.txt"], "missing.txt", id="join-missing-data"),
        pytest.param(["join", "--data", "{data}", "--rounds", "-1"], "node.rounds", id="join-bad-rounds"),
        pytest.param(["join", "--data", "{data}", "--client-mode"], "client_mode", id="join-client-mode"),
        pytest.param(["serve", "--config", "{sharded}", "--stages", "3"], "stage 3 does not exist", id="serve-stage"),
        pytest.param(["serve", "--config", "{sharded}", "--max-memory", "lots"], "--max-memory", id="serve-memory"),
        pytest.param(["serve"], "not sharded", id="serve-unsharded"),
    ],
)
def test_bad_argument_creates_no_identity_folder(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    """A command that fails on its config or arguments fails before it creates the identity folder."""
    # Prepare
    sharded = tmp_path / "sharded.toml"
    sharded.write_text("[run]\nrun_id = 'no-folder'\n[run.sharding]\nstages = 1\n")
    argv = [a.format(tmp=tmp_path, data=data_file, sharded=sharded) for a in args]
    identity = tmp_path / "id"

    # Execute
    code = main([*argv, "--identity", str(identity), "--host-maddrs", LOCALHOST_MADDR])

    # Assert
    _assert_one_line_in_process(code, capsys.readouterr().err, needle)
    assert not identity.exists()


@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("boom"), KeyError("boom")])
def test_internal_error_prints_a_traceback_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    """An exception that is not a user error is a bug: its traceback is shown, the exit status is 1."""

    # Prepare
    def broken(_args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setitem(node.cli.COMMANDS, "status", broken)

    # Execute
    code = main(["status"])

    # Assert
    stderr = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in stderr
    assert f"{type(error).__name__}: " in stderr and "boom" in stderr


def test_config_error_is_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ConfigError raised anywhere in a command prints one line and exits 2."""

    # Prepare
    def misconfigured(_args: argparse.Namespace) -> int:
        raise ConfigError("train.inner_steps must be >= 1, got 0")

    monkeypatch.setitem(node.cli.COMMANDS, "status", misconfigured)

    # Execute
    code = main(["status"])

    # Assert
    _assert_one_line_in_process(code, capsys.readouterr().err, "train.inner_steps")


def test_serve_section_maps_onto_serve_config_and_flags_override_it(tmp_path: Path) -> None:
    """`[serve]` in the config file fills ServeConfig; --max-memory and --stages win over it."""
    # Prepare
    config = tmp_path / "node.toml"
    config.write_text("[serve]\nmax_memory = '2GB'\nstages = [1]\nmax_batch = 64\n")
    parser = build_parser()

    # Execute
    from_file = config_from_args(parser.parse_args(["serve", "--config", str(config)])).serve
    overridden = config_from_args(
        parser.parse_args(["serve", "--config", str(config), "--max-memory", "512MB", "--stages", "0"])
    ).serve

    # Assert
    assert (from_file.max_memory, from_file.stages, from_file.max_batch) == (2 * 1024**3, (1,), 64)
    assert (overridden.max_memory, overridden.stages, overridden.max_batch) == (512 * 1024**2, (0,), 64)


def test_status_accepts_client_mode_under_secure_aggregation() -> None:
    """`status` always dials out only, so --client-mode is not refused as it is for a secure trainer."""
    # Prepare
    args = build_parser().parse_args(["status", "--client-mode"])

    # Execute
    config = config_from_args(args)

    # Assert
    assert config.run.aggregation.mode == "secure"
