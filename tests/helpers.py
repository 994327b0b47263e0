"""What the node tests share besides fixtures: one node subprocess, one run-config writer, one wait.

Test modules import it as ``from helpers import ...``, the way they import ``secagg_harness``:
``tests/`` has no ``__init__.py``, so pytest puts the folder on ``sys.path`` (rootdir conftest mode).
Fixtures live in ``conftest.py``, never in a test module another one imports.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from node.demo import stop_process
from node.training.checkpoint import round_params_path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCALHOST_MADDR = "/ip4/127.0.0.1/tcp/0"  # listen on loopback, port chosen by the OS
ZEN_NODE = [sys.executable, "-m", "node.cli"]  # the `zen-node` console script, run by this interpreter
STOP_SECONDS = 20.0  # how long a stopped node gets to exit after SIGTERM before SIGKILL
POLL_SECONDS = 0.2  # how often wait_until looks again
T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    detail: Callable[[], str] | None = None,
    interval: float = POLL_SECONDS,
) -> T:
    """Call ``condition`` until it returns something truthy and return that; fail the test after ``timeout`` s.

    ``what`` names the awaited event in the failure message, e.g. ``"round 2 on the first node"``;
    ``detail``, if given, adds what it returns then (say a node's last log lines).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}" + (f":\n{detail()}" if detail else ""))
        time.sleep(interval)


# The tables every run config starts from; write_run_config merges a caller's overrides over them.
RUN_DEFAULTS: dict[str, dict[str, object]] = {
    "model": {"d_model": 32, "context": 32},
    "train": {"inner_steps": 8, "batch_size": 8},
    "aggregation": {"min_group_size": 3, "matchmaking_time": 2.0, "timeout": 20.0},
}


@functools.cache
def domain_texts() -> dict[str, bytes]:
    """Real text of three domains from what every machine running the project has (benchmarks/domain_corpora.py):
    ``drama``, ``docs`` (the Python language reference), ``legal`` (installed packages' licences)."""
    spec = importlib.util.spec_from_file_location("domain_corpora", REPO_ROOT / "benchmarks" / "domain_corpora.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.domain_texts()  # type: ignore[no-any-return]


def write_run_config(path: Path, run_id: str = "t", **tables: dict[str, object] | None) -> Path:
    """Write a small CPU run's TOML to ``path`` and return ``path``.

    ``[run]`` holds ``run_id`` and ``min_memory_gb = 0.0``, then come ``RUN_DEFAULTS``' tables. Each keyword
    names a table under ``[run]`` (``model``, ``train``, ``aggregation``, ``compression``, ``privacy``,
    ``cohorts``, ``sharding``, ...) or, for ``node``, the node's own ``[node]`` table. Its dict is merged over
    the defaults (a table without defaults is added); ``None`` leaves the table out. For example::

        write_run_config(tmp_path / "run.toml", train={"inner_steps": 4}, aggregation={"timeout": 30.0})
    """
    merged: dict[str, dict[str, object]] = {name: dict(values) for name, values in RUN_DEFAULTS.items()}
    for name, values in tables.items():
        if values is None:
            merged.pop(name, None)
        else:
            merged[name] = {**merged.get(name, {}), **values}
    lines = ["[run]", f"run_id = {_toml_value(run_id)}", "min_memory_gb = 0.0"]
    for name, values in merged.items():
        lines.append(f"[{name}]" if name == "node" else f"[run.{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. model={"hf": {"model_type": "llama", ...}}
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


class NodeProcess:
    """A `zen-node` subprocess in its own folder ``root/name``: keys in ``id/``, output in ``node.log``.

    It listens on 127.0.0.1 (port 0) and logs at INFO. ``command="join"`` (the default) also trains on
    ``data`` (written to ``data.txt``) with its workdir in ``work/`` and every round's global params saved;
    ``command="serve"`` hosts stages and takes no data. ``extra`` flags come last, so they override.
    ``program`` runs in place of `zen-node` (a deviating node: ``tests/deviant_node.py``).
    """

    def __init__(
        self,
        root: Path,
        name: str,
        config: Path,
        maddr: str | None,
        data: bytes | None,
        *extra: str,
        command: str = "join",
        program: list[str] | None = None,
    ) -> None:
        self.folder = root / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.peer_id = ""  # for a test that reads it from the log (a serve node prints it)
        args = [command, "--config", str(config), "--host-maddrs", LOCALHOST_MADDR]
        args += ["--identity", str(self.folder / "id"), "--log-level", "INFO"]
        if maddr:
            args += ["--initial-peers", maddr]
        if data is not None:
            (self.folder / "data.txt").write_bytes(data)
            args += ["--data", str(self.folder / "data.txt")]
        if command == "join":
            args += ["--workdir", str(self.folder / "work"), "--save-round-params"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(self.folder / "node.log", "w")
        self.process = subprocess.Popen(
            [*(program or ZEN_NODE), *args, *extra],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @classmethod
    def on_slices(
        cls, root: Path, config: Path, maddr: str, corpus: bytes, count: int, *extra: str, size: int = 20_000
    ) -> list[NodeProcess]:
        """``count`` joined nodes n0, n1, ... each on its own contiguous ``size``-byte slice of ``corpus``."""
        return [cls(root, f"n{i}", config, maddr, corpus[i * size : (i + 1) * size], *extra) for i in range(count)]

    def reports(self, name: str = "report.jsonl") -> list[dict]:
        """The rows of the node's ``work/report.jsonl`` so far (one per round; ``name``: another file of rows)."""
        path = self.folder / "work" / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def steps(self) -> list[dict]:
        """A sharded trainer's rows of ``work/steps.jsonl`` so far (one per step)."""
        return self.reports("steps.jsonl")

    def params(self, round_no: int) -> Path:
        """Where the node saved round ``round_no``'s global params."""
        return round_params_path(self.folder / "work", round_no)

    def output(self) -> str:
        """Everything the node printed so far (stdout and stderr)."""
        if not self.log.closed:
            self.log.flush()
        return (self.folder / "node.log").read_text()

    def tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the output, for failure messages."""
        return self.output()[-chars:]

    def wait(self, timeout: float) -> int:
        """The node's exit code; fail the test with its output if it runs past ``timeout`` s."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.folder.name} did not exit in {timeout}s:\n{self.tail()}")

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fail with the output if the node exits or time runs out."""

        def matched() -> re.Match[str] | bool | None:
            return pattern.search(self.output()) or self.process.poll() is not None

        found = wait_until(matched, timeout, f"{self.folder.name} to print {pattern.pattern!r}", detail=self.tail)
        # on exit, look once more: it may have printed the line just before it exited
        match = found if isinstance(found, re.Match) else pattern.search(self.output())
        if match is None:
            pytest.fail(f"{self.folder.name} exited before printing {pattern.pattern!r}:\n{self.tail()}")
        return match

    def crash(self) -> None:
        """SIGKILL the node and its children (its p2pd and DHT process): a machine that vanished."""
        family = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for member in family:
            member.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=10)

    def stop(self) -> None:
        """End the node (SIGTERM, then SIGKILL if it lingers) and close its log; safe to call twice."""
        stop_process(self.process, timeout=STOP_SECONDS)
        self.log.close()
