"""``zen-bootstrap`` as an operator runs it: real processes on 127.0.0.1, no mocks.

Most tests start the command as a subprocess and read what it prints: the ready block on stdout
(multiaddrs, health URL, ``ready``) and log lines on stderr; two pin the in-process pieces
(the join/leave bookkeeping and the HTTP endpoint) directly. Reader threads collect both streams;
tests wait on a line to appear (a condition variable, with a bounded timeout), never on sleeps.
Every process started here is killed, with its children, when its test (or module) ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hivemind
import psutil
import pytest
from helpers import LOCALHOST_MADDR, REPO_ROOT

from bootstrap import HealthServer, SwarmMonitor
from bootstrap.cli import build_parser
from dht import NodeIdentity, PeerRecord, SwarmConfig, publish_record, start_dht

RUN_ID = "test-run"
START_TIMEOUT = 60.0  # seconds a process may take to print its ready block (p2pd waits up to 15 s)
EVENT_TIMEOUT = 30.0  # seconds for a logged event (join, leave, record) to show up
EXIT_TIMEOUT = 30.0  # seconds a stopped process may take to exit
CLI_FLAGS = {
    "-h",
    "--help",
    "--host-maddrs",
    "--announce-maddrs",
    "--initial-peers",
    "--identity",
    "--http-host",
    "--http-port",
    "--run-id",
    "--poll-period",
    "--force-reachability",
    "--startup-timeout",
    "--log-level",
}


@dataclass
class Ready:
    """What ``zen-bootstrap`` printed on stdout once it served."""

    peer_id: str
    maddrs: list[str]
    health_url: str
    join_command: str


class _Stream:
    """All lines of one pipe so far, and a condition to wait for a line on."""

    def __init__(self, pipe: object) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: object) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        """Return the first line matching ``predicate``, or None if the pipe closed or time ran out."""

        def found() -> str | None:
            return next((line for line in self.lines if predicate(line)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self.closed, timeout)
            return found()

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class BootstrapProcess:
    """A ``zen-bootstrap`` subprocess with its stdout and stderr collected line by line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bootstrap.cli", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so a test can signal it like a terminal does
        )
        self.stdout = _Stream(self.proc.stdout)
        self.stderr = _Stream(self.proc.stderr)
        self.descendants: list[psutil.Process] = []  # as seen once ready (p2pd, the DHT process, ...)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Ready:
        """Parse the ready block; fail with the process's stderr if it never comes."""
        if self.stdout.wait_for(lambda line: line == "ready", timeout) is None:
            self.stderr.wait_for(lambda _: False, timeout=5)  # let the reader catch up, for the message
            code = self.proc.poll()
            pytest.fail(f"zen-bootstrap printed no ready block (exit code {code}); stderr:\n{self.stderr.text()}")
        self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
        lines = self.stdout.lines
        fields = dict(line.split(": ", 1) for line in lines if not line.startswith("/") and ": " in line)
        return Ready(
            peer_id=fields["peer_id"],
            maddrs=[line for line in lines if line.startswith("/")],
            health_url=fields["health"],
            join_command=fields["join"],
        )

    def wait_log(self, text: str, timeout: float = EVENT_TIMEOUT) -> str:
        """Return the first stderr line containing ``text``; fail if none comes in time."""
        line = self.stderr.wait_for(lambda line: text in line, timeout)
        if line is None:
            pytest.fail(f"no log line with {text!r}; stderr:\n{self.stderr.text()}")
        return line

    def finish(self, timeout: float = EXIT_TIMEOUT) -> tuple[int, str]:
        """Wait for the process to exit; return its exit code and its whole stderr."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stderr.wait_for(lambda _: False, timeout=1)
            pytest.fail(f"zen-bootstrap did not exit within {timeout} s; stderr:\n{self.stderr.text()}")
        # Until the reader has seen the end of the pipe (a grandchild holding it, such as torch's
        # shared-memory manager, may keep it open a moment after the process itself exits).
        self.stderr.wait_for(lambda _: False, timeout)
        return code, self.stderr.text()

    def kill_tree(self) -> None:
        """Kill the process and every descendant, including those orphaned by its exit (idempotent)."""
        family: list[psutil.Process] = []
        if self.proc.poll() is None:  # not reaped yet, so the pid is still ours
            try:
                family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        family += [p for p in self.descendants if p not in family]  # psutil refuses to kill a reused pid
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., BootstrapProcess]]:
    """Return ``start(*args)``: a ``zen-bootstrap`` subprocess, killed with its children at teardown."""
    started: list[BootstrapProcess] = []

    def start(*args: str) -> BootstrapProcess:
        process = BootstrapProcess(list(args))
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill_tree()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BootstrapProcess, Ready]]:
    """One bootstrap peer on 127.0.0.1 that watches RUN_ID, shared by the tests that only look at it."""
    identity = tmp_path_factory.mktemp("running") / "bootstrap.id"
    args = [
        "--host-maddrs", LOCALHOST_MADDR, "--http-port", "0", "--identity", str(identity),
        "--run-id", RUN_ID, "--poll-period", "0.5",
    ]  # fmt: skip
    process = BootstrapProcess(args)
    try:
        yield process, process.wait_ready()
    finally:
        process.kill_tree()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _tcp_port(maddr: str) -> str:
    parts = maddr.split("/")
    return parts[parts.index("tcp") + 1]


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _p2pd_using(identity: Path) -> list[psutil.Process]:
    """The live p2pd daemons started with the key in ``identity``."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "p2pd" and any(str(identity) in arg for arg in process.info["cmdline"] or []):
            found.append(process)
    return _alive(found)


def _assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("zen-bootstrap: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_cli_flags_are_the_reviewed_set_and_each_help_has_an_example() -> None:
    """The flags are a deliberate surface, and every flag's help shows an example value."""
    # Prepare
    parser = build_parser()

    # Execute
    actions = [action for action in parser._actions if action.option_strings]

    # Assert
    assert {flag for action in actions for flag in action.option_strings} == CLI_FLAGS
    for action in actions:
        if action.dest != "help":
            assert "e.g." in (action.help or ""), action.option_strings


def test_monitor_diffs_views_and_counts_distinct_peers_seen() -> None:
    """Joins and leaves are the differences between two views; peers_seen counts every PeerID ever connected."""
    # Prepare
    monitor = SwarmMonitor(run_ids=[RUN_ID])

    # Execute
    first = monitor.update_connected({"A": ["/ip4/127.0.0.1/tcp/1"], "B": []})
    second = monitor.update_connected({"B": [], "C": []})
    records = monitor.update_records(RUN_ID, ["B"])
    view = monitor.view()

    # Assert
    assert first == ({"A", "B"}, set())
    assert second == ({"C"}, {"A"})
    assert records == ({"B"}, set())
    assert view.connected == {"B", "C"} and view.seen == 3 and view.records == {RUN_ID: {"B"}}


def test_health_server_answers_503_until_the_snapshot_is_ready() -> None:
    """/healthz is 503 while the peer starts, then 200 with the snapshot; the socket closes on stop."""
    # Prepare
    snapshot: dict[str, object] | None = None
    server = HealthServer("127.0.0.1", 0, lambda: snapshot).start()
    try:
        # Execute
        starting = _get(server.url)
        snapshot = {"peer_id": "12D3KooWexample"}
        ready = _get(server.url)
    finally:
        server.stop()

    # Assert
    assert starting[0] == 503
    assert ready == (200, {"peer_id": "12D3KooWexample"})
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=5)


def test_help_runs_from_the_console_script() -> None:
    """``zen-bootstrap --help`` (the installed script) exits 0 and documents the identity folder."""
    # Prepare
    script = Path(sys.executable).with_name("zen-bootstrap")

    # Execute
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=START_TIMEOUT)

    # Assert
    assert result.returncode == 0, result.stderr
    assert "--host-maddrs" in result.stdout and "--identity" in result.stdout
    assert "FOLDER" in result.stdout


def test_ready_block_lists_full_maddrs_and_a_join_command(running: tuple[BootstrapProcess, Ready]) -> None:
    """Stdout names the PeerID, full multiaddrs ending in /p2p/<PeerID>, and a ready-to-paste join line."""
    # Prepare
    _, ready = running

    # Assert
    assert ready.peer_id.startswith("12D3KooW")
    assert ready.maddrs and all(m.startswith("/ip4/127.0.0.1/tcp/") for m in ready.maddrs)
    assert all(m.endswith(f"/p2p/{ready.peer_id}") for m in ready.maddrs)
    assert ready.join_command.startswith("zen-node join --initial-peers /")
    assert ready.join_command.split()[-1] in ready.maddrs
    assert ready.health_url.startswith("http://127.0.0.1:") and ready.health_url.endswith("/healthz")


def test_healthz_reports_identity_peers_and_addresses(running: tuple[BootstrapProcess, Ready]) -> None:
    """GET /healthz answers 200 with the PeerID, uptime, peer counts and multiaddrs as JSON."""
    # Prepare
    _, ready = running

    # Execute
    status, body = _get(ready.health_url)

    # Assert
    assert status == 200
    assert body["peer_id"] == ready.peer_id
    assert body["maddrs"] == ready.maddrs
    assert isinstance(body["uptime_seconds"], float) and body["uptime_seconds"] >= 0
    assert isinstance(body["peers_seen"], int) and isinstance(body["peers_connected"], int)
    assert 0 <= body["peers_connected"] <= body["peers_seen"]
    assert body["run_records"].keys() == {RUN_ID}


def test_unknown_path_is_404(running: tuple[BootstrapProcess, Ready]) -> None:
    """A path the peer does not serve (beside /healthz, the dashboard, /api/swarm, /metrics) is a JSON 404."""
    # Prepare
    _, ready = running

    # Execute
    status, body = _get(ready.health_url.replace("/healthz", "/no-such-page"))

    # Assert
    assert status == 404
    assert "error" in body


def test_logs_a_peer_that_joins_and_leaves(
    running: tuple[BootstrapProcess, Ready], spawn: Callable[..., BootstrapProcess], tmp_path: Path
) -> None:
    """A second peer joining through the printed address is logged, counted in /healthz, then seen leaving."""
    # Prepare
    bootstrap, ready = running
    other = spawn(
        "--host-maddrs", LOCALHOST_MADDR, "--http-port", "0", "--identity", str(tmp_path / "other.id"),
        "--initial-peers", ready.join_command.split()[-1],
    )  # fmt: skip
    other_ready = other.wait_ready()

    # Execute
    bootstrap.wait_log(f"peer joined: {other_ready.peer_id}")
    _, body = _get(ready.health_url)
    other.proc.send_signal(signal.SIGTERM)
    code = other.proc.wait(timeout=EXIT_TIMEOUT)

    # Assert
    assert body["peers_connected"] >= 1 and body["peers_seen"] >= 1
    assert code == 0
    bootstrap.wait_log(f"peer left: {other_ready.peer_id}")


def test_logs_a_run_record_that_appears_and_expires(
    running: tuple[BootstrapProcess, Ready],
    identity_factory: Callable[[str | None], NodeIdentity],
    record_factory: Callable[..., PeerRecord],
) -> None:
    """With --run-id, a signed peer record published in that run is logged, then logged again when it expires."""
    # Prepare
    bootstrap, ready = running
    identity = identity_factory(None)
    config = SwarmConfig(host_maddrs=[LOCALHOST_MADDR], initial_peers=[ready.maddrs[0]])
    node: hivemind.DHT = start_dht(config, identity, run_ids=[RUN_ID])
    try:
        # Execute
        envelope = record_factory(identity).sign(identity)
        assert publish_record(node, RUN_ID, envelope, ttl=3.0)
        appeared = bootstrap.wait_log(f"run {RUN_ID}: record appeared for {identity.peer_id}")
        gone = bootstrap.wait_log(f"run {RUN_ID}: record gone for {identity.peer_id}")
    finally:
        node.shutdown()

    # Assert
    assert appeared and gone


def test_taken_dht_port_is_a_one_line_error(
    running: tuple[BootstrapProcess, Ready], spawn: Callable[..., BootstrapProcess], tmp_path: Path
) -> None:
    """Listening on a port another bootstrap peer holds fails with exit 2 (no silent SO_REUSEPORT sharing)."""
    # Prepare
    _, ready = running
    port = _tcp_port(ready.maddrs[0])

    # Execute
    process = spawn(
        "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--http-port", "0",
        "--identity", str(tmp_path / "b.id"), "--log-level", "WARNING",
    )  # fmt: skip
    code, stderr = process.finish(timeout=START_TIMEOUT)

    # Assert
    _assert_one_line_error(code, stderr, "in use", port)


def test_taken_http_port_is_a_one_line_error(
    running: tuple[BootstrapProcess, Ready], spawn: Callable[..., BootstrapProcess], tmp_path: Path
) -> None:
    """A health port that is in use fails with exit 2, naming the port, and leaves no p2pd behind."""
    # Prepare
    _, ready = running
    http_port = ready.health_url.split(":")[2].split("/")[0]

    # Execute
    process = spawn(
        "--host-maddrs", LOCALHOST_MADDR, "--http-port", http_port,
        "--identity", str(tmp_path / "b.id"), "--log-level", "WARNING",
    )  # fmt: skip
    code, stderr = process.finish(timeout=START_TIMEOUT)

    # Assert
    _assert_one_line_error(code, stderr, http_port, "free port")
    assert _p2pd_using(tmp_path / "b.id") == []


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--host-maddrs", "/ip4/127.0.0.1/tcpx/0", "--host-maddrs"),
        ("--initial-peers", "/ip4/127.0.0.1/tcp/31337", "/p2p/"),
    ],
)
def test_malformed_multiaddr_is_a_one_line_error(
    spawn: Callable[..., BootstrapProcess], tmp_path: Path, flag: str, value: str, needle: str
) -> None:
    """A malformed or incomplete multiaddr ends the command at once: exit 2, one line, no traceback."""
    # Prepare
    args = ["--http-port", "0", "--identity", str(tmp_path / "b.id"), flag, value]
    if flag != "--host-maddrs":
        args += ["--host-maddrs", LOCALHOST_MADDR]

    # Execute
    code, stderr = spawn(*args).finish(timeout=START_TIMEOUT)

    # Assert
    _assert_one_line_error(code, stderr, value, needle)
    assert not (tmp_path / "b.id").exists()  # rejected before anything was written


def test_corrupt_identity_is_a_one_line_error_and_left_untouched(
    spawn: Callable[..., BootstrapProcess], tmp_path: Path
) -> None:
    """A corrupt p2p.key ends the command with exit 2 naming the file, and the file is not rewritten."""
    # Prepare
    folder = tmp_path / "bootstrap.id"
    folder.mkdir()
    key = folder / "p2p.key"
    key.write_bytes(b"definitely not a libp2p key")
    key.chmod(0o600)

    # Execute
    process = spawn("--host-maddrs", LOCALHOST_MADDR, "--http-port", "0", "--identity", str(folder))
    code, stderr = process.finish(timeout=START_TIMEOUT)

    # Assert
    _assert_one_line_error(code, stderr, str(key), "corrupt")
    assert key.read_bytes() == b"definitely not a libp2p key"


def test_restart_with_the_same_identity_keeps_the_peer_id(
    spawn: Callable[..., BootstrapProcess], tmp_path: Path
) -> None:
    """Two runs on one identity folder print the same PeerID (so the handed-out addresses stay valid)."""
    # Prepare
    args = ("--host-maddrs", LOCALHOST_MADDR, "--http-port", "0", "--identity", str(tmp_path / "bootstrap.id"))
    first = spawn(*args)
    first_ready = first.wait_ready()
    key_bytes = (tmp_path / "bootstrap.id" / "p2p.key").read_bytes()
    first.proc.send_signal(signal.SIGTERM)
    code, stderr = first.finish()
    assert code == 0, stderr

    # Execute
    second_ready = spawn(*args).wait_ready()

    # Assert
    assert second_ready.peer_id == first_ready.peer_id
    assert (tmp_path / "bootstrap.id" / "p2p.key").read_bytes() == key_bytes


@pytest.mark.parametrize(
    "signum, to_group",
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-to-process", "SIGINT-to-group"],  # docker stop; Ctrl-C in a terminal
)
def test_signal_stops_cleanly_and_leaves_no_child_process(
    spawn: Callable[..., BootstrapProcess], tmp_path: Path, signum: signal.Signals, to_group: bool
) -> None:
    """A stop signal, to the process or its whole group: exit 0 in bounded time, every descendant gone."""
    # Prepare
    process = spawn("--host-maddrs", LOCALHOST_MADDR, "--http-port", "0", "--identity", str(tmp_path / "b.id"))
    process.wait_ready()
    descendants = process.descendants
    assert any(p.name() == "p2pd" for p in descendants), "hivemind's p2pd should run under zen-bootstrap"

    # Execute
    if to_group:
        os.killpg(process.proc.pid, signum)
    else:
        process.proc.send_signal(signum)
    code, stderr = process.finish()
    psutil.wait_procs(descendants, timeout=EXIT_TIMEOUT)

    # Assert
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "stopping" in stderr and "bootstrap peer stopped" in stderr
    assert _alive(descendants) == []


def test_a_dht_process_that_hangs_is_killed_and_the_bootstrap_still_exits(
    spawn: Callable[..., BootstrapProcess], tmp_path: Path
) -> None:
    """A DHT process that never answers SIGTERM (stopped here with SIGSTOP) is killed, not waited on forever."""
    # Prepare
    process = spawn("--host-maddrs", LOCALHOST_MADDR, "--http-port", "0", "--identity", str(tmp_path / "b.id"))
    process.wait_ready()
    descendants = process.descendants
    main = psutil.Process(process.proc.pid)
    (dht_process,) = [p for p in main.children() if p.cmdline() == main.cmdline()]  # forked: the same command
    dht_process.send_signal(signal.SIGSTOP)

    # Execute
    process.proc.send_signal(signal.SIGTERM)
    code, stderr = process.finish()
    psutil.wait_procs(descendants, timeout=EXIT_TIMEOUT)

    # Assert
    assert code == 0, stderr
    assert f"the DHT process (pid {dht_process.pid}) did not stop after SIGTERM; killing it" in stderr
    assert _alive(descendants) == []
