"""Attacks by a trainer on its group (issue 15): the honest members' held-out loss against an honest run.

Real processes on 127.0.0.1: a `zen-bootstrap` and ``--peers`` `zen-node join` trainers, each on its own
contiguous slice of ``--data`` (tinyshakespeare by default: text nobody chose for these attacks), one of
which deviates (``tests/deviant_node.py``, shared with the tests). Each row trains ``--rounds`` rounds with
the attacker, and the same run with that peer honest; groups are the whole swarm (``min_group_size`` =
``--peers``) and match every ``group_rounds`` = 2 rounds::

    python benchmarks/integrity_swarm.py --json

Rows:

- ``weight_poisoning``: the deviant sends ``+-clip_bound`` in every coordinate (``poison-mean``), the most a
  member can pull the mean inside the bounds every member checks; the honest members' loss gate stands
  between it and the model.
- ``stealth_poisoning``: the deviant sends ``-3`` times its own update (``flip-update``): inside the gate's norm
  ratio, and a mean of it with enough honest updates still lowers the loss, so neither the loss nor the norm
  check rejects it; the opt-in own-update check (``--gate-own-tolerance 0.03``) does.
- ``value_range_poisoning``: the deviant forges the weight word of its masked vector (``forge-weight``), so
  every sum it is in is out of range and every member refuses the round; masking hides who did it.
- ``poisoned_lineage``: the deviant shifts its global parameters by 0.5 after round 1 (``fork-lineage``) and
  serves that state to the lineage merge (node/training/lineage.py); the median stands between it and the model.
- ``poisoned_donor``: the deviant trains honestly but offers late joiners tampered parameters at a huge round
  with the top priority (``poison-donor``); a fresh trainer on trainer 0's data joins once the others are
  halfway (they train 8 rounds more, so donors stay), loads the swarm's state and stops. Its row compares
  the held-out loss of what it loaded with trainer 0's at the same round (the same held-out batches); the
  verified download (node/training/state_sharing.py) stands between the donor and the joiner.

Row fields: ``attack``, ``loss_vs_honest`` (the honest members' mean final held-out loss, each on its own
held-out split, over the same members' in the honest run), ``detected`` (``details`` says by what),
``honest_banned`` (null: trainers ban nobody), ``seconds`` (the attacked run), ``details``, ``error``.
``--without-attacker`` also trains the honest members alone, without the attacker's node and its data, and adds
``loss_vs_honest_without_attacker``: a defence that leaves the attacker out can do no better than that run, so
it splits ``loss_vs_honest`` into the attacker's data lost and what the attack still costs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the deviant node and the process helper live with the tests

from helpers import NodeProcess, wait_until, write_run_config  # noqa: E402

from node.demo import start_bootstrap, stop_process  # noqa: E402

DEVIANT = [sys.executable, str(ROOT / "tests" / "deviant_node.py")]
ATTACKS = {
    "weight_poisoning": "poison-mean",
    "stealth_poisoning": "flip-update",
    "value_range_poisoning": "forge-weight",
    "poisoned_lineage": "fork-lineage",
    "poisoned_donor": "poison-donor",
}
DETECTION = {  # what an honest member's log says when it caught the attack
    "weight_poisoning": "rejected the group's mean",
    "stealth_poisoning": "rejected the group's mean",
    "value_range_poisoning": "weight sum",  # every member refuses the sum (bounds.py); nobody is named
    "poisoned_lineage": "merged 2 lineages",
    "poisoned_donor": "refused the state of donor",
}
LATE_JOINER = {"poisoned_donor"}  # rows whose victim is a trainer that joins halfway
LATE_EXTRA_ROUNDS = 8  # rounds the others train beyond --rounds in those rows, so donors outlive the download


def run_swarm(
    root: Path, args: argparse.Namespace, corpus: bytes, deviation: str | None, late: bool = False, peers: int = 0
) -> list[NodeProcess]:
    """``--peers`` trainers (or ``peers``; the last one deviating, if ``deviation``) for ``--rounds`` rounds, and
    with ``late`` one more that joins once trainer 0 is halfway (last in the list); returns them done."""
    root.mkdir(parents=True)
    peers = peers or args.peers
    size = min(args.min_group_size or args.peers, peers)
    aggregation = {"matchmaking_time": 1.0, "min_group_size": size, "group_rounds": 2, "timeout": 60.0}
    if args.gate_tolerance is not None:
        aggregation["gate_tolerance"] = args.gate_tolerance
    if args.gate_norm_ratio is not None:
        aggregation["gate_norm_ratio"] = args.gate_norm_ratio
    if args.gate_own_tolerance is not None:
        aggregation["gate_own_tolerance"] = args.gate_own_tolerance
    privacy = {"enabled": True, "target_epsilon": args.epsilon, "planned_rounds": args.rounds} if args.epsilon else None
    config = write_run_config(root / "run.toml", run_id="integrity", aggregation=aggregation, privacy=privacy)
    rounds = args.rounds + (LATE_EXTRA_ROUNDS if late else 0)
    flags = ("--rounds", str(rounds), "--min-peers", str(peers))
    share = args.bytes_per_peer  # trainer i holds slice i
    with open(root / "bootstrap.log", "w") as log:
        bootstrap, maddr = start_bootstrap(root, log)
        nodes: list[NodeProcess] = []
        try:
            for i in range(peers):
                program = [*DEVIANT, deviation] if deviation and i == peers - 1 else None
                data = corpus[i * share : (i + 1) * share]
                nodes.append(NodeProcess(root, f"n{i}", config, maddr, data, *flags, program=program))
            if late:  # trainer 0's data, so its held-out batches; it stops once it has loaded the state
                wait_until(lambda: len(nodes[0].reports()) > args.rounds // 2, args.timeout, "trainer 0 to be halfway")
                nodes.append(NodeProcess(root, "joiner", config, maddr, corpus[:share], "--rounds", "1"))
            # the deviant may never finish: once left out of the groups (node/secagg/suspicion.py) it finds none
            waited = [node for i, node in enumerate(nodes) if not deviation or i != peers - 1]
            codes = [node.wait(timeout=args.timeout) for node in waited]
            if any(codes):
                raise RuntimeError(f"a trainer failed (exit codes {codes}); see {root}/n*/node.log")
        finally:
            for node in nodes:
                node.stop()
            stop_process(bootstrap)
    return nodes


def final_losses(nodes: list[NodeProcess]) -> list[float]:
    return [node.reports()[-1]["eval_loss"] for node in nodes]


def loss_rises(nodes: list[NodeProcess]) -> list[float]:
    """Each group round's held-out loss over the round before's, minus 1, for every node: what the loss gate
    compares (global parameters move only at the outer step)."""
    rises = []
    for node in nodes:
        reports = node.reports()
        for before, after in itertools.pairwise(reports):
            if after["mode"] in ("group", "rejected") and before["eval_loss"] > 0:
                rises.append(round(after["eval_loss"] / before["eval_loss"] - 1, 4))
    return rises


def named_attacker(attacker: NodeProcess, members: list[NodeProcess]) -> int:
    """How many ``members`` named the attacker's PeerID a suspect in their logs (node/secagg/suspicion.py)."""
    joined = re.search(r"joined run \S+ as (\S+) at round", attacker.output())
    if joined is None:
        return 0
    return sum(f"{joined.group(1)} was in" in m.output() and "naming it a suspect" in m.output() for m in members)


def attack_row(
    name: str, root: Path, args: argparse.Namespace, corpus: bytes, honest: list[float], floor: list[float] | None
) -> dict[str, Any]:
    """One attack's row against the honest run's final losses ``honest`` (a late joiner's row runs its own), and
    ``floor``: the honest members' in a run without the attacker's node (``--without-attacker``), if any."""
    row: dict[str, Any] = {"attack": name, "loss_vs_honest": None, "detected": None, "honest_banned": None}
    started = time.monotonic()
    try:
        late = name in LATE_JOINER
        nodes = run_swarm(root / name, args, corpus, ATTACKS[name], late=late)
        members = nodes[-1:] if late else nodes[:-1]  # the victims: the joiner, or the honest members
        losses = final_losses(members)
        caught = [DETECTION[name] in node.output() for node in members]
        digests = {node.reports()[-1]["state_digest"] for node in members}  # the honest ones (the deviant: left out)
        if late:  # trainer 0's loss at the round the joiner loaded (the same held-out batches)
            loaded = members[0].reports()[-1]
            at_round = [r["eval_loss"] for r in nodes[0].reports() if r["round"] == loaded["round"]][-1:]
            honest = at_round or [nodes[0].reports()[-1]["eval_loss"]]  # a round no honest trainer reached: its last
            digests = {
                loaded["state_digest"],
                *(r["state_digest"] for r in nodes[0].reports() if r["round"] == loaded["round"]),
            }
        else:
            honest = honest[:-1]
        row["loss_vs_honest"] = round(sum(losses) / sum(honest), 4)
        if floor and not late:  # what the attacker's data was worth to them, and what the rest cost
            row["loss_vs_honest_without_attacker"] = round(sum(losses) / sum(floor), 4)
        row["detected"] = all(caught)
        row["details"] = {
            "honest_final_losses": [round(x, 4) for x in losses],
            "honest_run_final_losses": [round(x, 4) for x in honest],
            "members_that_caught_it": sum(caught),
            "caught_by": DETECTION[name],
            "one_digest_at_the_end": len(digests) == 1,
            "modes_of_member_0": [r["mode"] for r in members[0].reports()],
            "members_that_named_it": named_attacker(nodes[-1], members),
            "loss_rises_of_member_0": loss_rises(members[:1]),
        }
    except Exception as e:  # a row that fails says why; the other rows still run
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.monotonic() - started, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--bytes-per-peer", type=int, default=40_000)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    parser.add_argument(
        "--gate-tolerance", type=float, default=None, help="aggregation.gate_tolerance (default: the run's)"
    )
    parser.add_argument(
        "--gate-norm-ratio", type=float, default=None, help="aggregation.gate_norm_ratio (default: the run's)"
    )
    parser.add_argument(
        "--gate-own-tolerance", type=float, default=None, help="aggregation.gate_own_tolerance (default: the run's)"
    )
    parser.add_argument(
        "--min-group-size",
        type=int,
        default=0,
        help="aggregation.min_group_size (0: --peers, one group of all); e.g. 3 lets a slot split (suspicion.py)",
    )
    parser.add_argument(
        "--without-attacker",
        action="store_true",
        help="also run the honest members without the attacker's node: loss_vs_honest_without_attacker per row",
    )
    parser.add_argument("--epsilon", type=float, default=0.0, help="record-level DP at this epsilon (0: no DP)")
    parser.add_argument("--workdir", default=None, help="keep the runs' folders here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    path = Path(args.data)
    if not path.is_file():
        parser.error(f"--data {path} is not a file; pass a text file, e.g. --data ../shared/data/tinyshakespeare.txt")
    names = [name for name in args.attacks.split(",") if name]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    if args.peers < 3:
        parser.error("--peers must be >= 3 (a secure group)")
    if args.without_attacker and args.peers < 4:
        parser.error("--without-attacker needs --peers >= 4: the members alone must still make a secure group of 3")
    corpus = path.read_bytes()[: (args.peers + 1) * args.bytes_per_peer]
    with tempfile.TemporaryDirectory(prefix="zen-integrity-") as folder:
        root = Path(args.workdir or folder)
        started = time.monotonic()
        nodes = run_swarm(root / "honest", args, corpus, None)
        honest = final_losses(nodes)
        rises = loss_rises(nodes)
        summary = {
            "honest_run": {
                "final_losses": [round(x, 4) for x in honest],
                "largest_loss_rise": max(rises, default=None),  # the most an honest mean raised a member's loss
                "seconds": round(time.monotonic() - started, 1),
            }
        }
        floor = None
        if args.without_attacker:  # the members alone: a defence that leaves the attacker out can reach this
            floor = final_losses(run_swarm(root / "without-attacker", args, corpus, None, peers=args.peers - 1))
            summary["honest_run_without_attacker"] = {"final_losses": [round(x, 4) for x in floor]}
        rows = [attack_row(name, root, args, corpus, honest, floor) for name in names]
    settings = {
        "peers": args.peers,
        "min_group_size": args.min_group_size or args.peers,
        "rounds": args.rounds,
        "data": path.name,
        "gate_tolerance": args.gate_tolerance,
        "gate_norm_ratio": args.gate_norm_ratio,
        "gate_own_tolerance": args.gate_own_tolerance,
    }
    settings["epsilon"] = args.epsilon or None
    result = {**settings, **summary, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in rows:
            print(
                f"{row['attack']:>18}: loss_vs_honest {row['loss_vs_honest']} detected {row['detected']} "
                f"({row['seconds']} s){'  ' + row['error'] if 'error' in row else ''}"
            )
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
