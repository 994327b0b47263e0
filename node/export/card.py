"""The model card of an exported run: what one node's workdir knows of the run, as a README.md.

A node sees the run through its own ``report.jsonl``: each round's outcome, held-out loss (on
this node's own held-out split), its own samples, the privacy it has spent, and the size of the
group it averaged with. It does not see who else trained, unless a report line names the
group's peers (a ``peers`` list, which later versions may write). So the contributors table
counts, for each PeerID the reports name (this node's own always), the group rounds observed
from this node's reports; peers that are not named are summed in one row. This is not the
signed contribution ledger: the card says so.

When the workdir holds the contribution ledger (node/ledger/: this node's signed receipts in
``ledger.jsonl``, the run's signed summaries the trainer kept in ``ledger_summaries.json``), the
contributors table is the ledger's instead: every contributor with its rounds, samples, compute
seconds and shares, as ``zen-node ledger`` lists them; claims that do not verify are marked.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from node.config import ModelConfig, RunConfig
from node.ledger.contributors import Claim, ContributorRow, claim_from_receipts, contributor_rows, read_summaries_cache
from node.ledger.receipts import read_receipts
from node.training.report import REPORT_FILE

logger = logging.getLogger(__name__)

LOSS_PLOT_FILE = "loss.png"
MAX_LOSS_ROWS = 20  # the card's loss table keeps at most this many rounds (evenly spaced, the last included)


@dataclass
class Contributor:
    """One row of the contributors table."""

    name: str  # a display name, the PeerID, or a description of unnamed peers
    peer_id: str  # "" for the unnamed-peers row
    group_rounds: int  # group rounds observed from this node's reports (peer-rounds for the unnamed row)
    samples: int | None  # only this node knows its own samples


@dataclass
class RunSummary:
    """What the model card says about a run, from a checkpoint and the workdir's report."""

    run: RunConfig
    run_hash: str
    round: int  # the checkpoint's last outer round
    parameters: int
    exported_by: str  # this node's PeerID ("" if the checkpoint does not say)
    display_name: str | None
    samples: int  # this node's samples over its reports
    losses: list[tuple[int, float]]  # (round, held-out loss) from the reports
    epsilon: float | None  # privacy this node has spent (the last report's), None without DP
    contributors: list[Contributor] = field(default_factory=list)
    ledger: list[ContributorRow] | None = None  # the ledger's contributors, when the workdir holds a ledger
    loss_plot: str | None = None  # the PNG's file name in the export, when matplotlib drew it


def read_reports(workdir: Path) -> list[dict[str, Any]]:
    """The round reports of ``workdir / report.jsonl`` (lines without a round and a loss are skipped)."""
    path = workdir / REPORT_FILE
    if not path.exists():
        return []
    reports = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning(f"{path}:{number} is not JSON; skipped")
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int) and "eval_loss" in row:
            reports.append(row)
    return reports


def contributors(reports: list[dict[str, Any]], peer_id: str, display_name: str | None) -> list[Contributor]:
    """This node's row first, then every PeerID the reports name, then one row for unnamed group peers."""
    me = peer_id or "this node"
    rounds: Counter[str] = Counter()
    unnamed = 0
    samples = 0
    for row in reports:
        samples += int(row.get("samples") or 0)
        if row.get("mode") != "group":
            continue
        listed = row.get("peers")
        named: list[str] = [str(p) for p in listed] if isinstance(listed, list) else [me]
        rounds.update(set(named) | {me})
        unnamed += max(0, int(row.get("group_size") or 0) - len(set(named) | {me}))
    table = [Contributor(display_name or me, peer_id, rounds[me], samples)]
    table += [Contributor(p, p, n, None) for p, n in sorted(rounds.items(), key=lambda x: (-x[1], x[0])) if p != me]
    if unnamed:
        table.append(Contributor("other group members (not named in this node's reports)", "", unnamed, None))
    return table


def summarize_run(
    run: RunConfig, run_hash: str, round_no: int, parameters: int, peer_id: str, workdir: Path, display_name: str | None
) -> RunSummary:
    """The card's facts: the checkpoint's (run, round, parameter count, writer) and the workdir's reports'."""
    reports = read_reports(workdir)
    losses = [(r["round"], float(r["eval_loss"])) for r in reports if _finite(r["eval_loss"])]
    epsilons = [float(r["epsilon"]) for r in reports if r.get("epsilon") is not None]
    return RunSummary(
        run=run,
        run_hash=run_hash,
        round=round_no,
        parameters=parameters,
        exported_by=peer_id,
        display_name=display_name,
        samples=sum(int(r.get("samples") or 0) for r in reports),
        losses=losses,
        epsilon=epsilons[-1] if epsilons else None,
        contributors=contributors(reports, peer_id, display_name),
        ledger=ledger_contributors(workdir, run_hash, peer_id, display_name),
    )


def ledger_contributors(
    workdir: Path, run_hash: str, peer_id: str, display_name: str | None
) -> list[ContributorRow] | None:
    """The ledger's rows: the run's summaries kept in ``workdir``, this node's own figures from its receipts
    (fresher than its last summary); None when the workdir holds no ledger."""
    kept = read_summaries_cache(workdir, run_hash)
    receipts, failed = read_receipts(workdir, run_hash)
    if not kept and not receipts and not failed:
        return None
    own: list[Claim] = []
    if receipts or failed:
        me = receipts[0].receipt.peer_id if receipts else peer_id
        name = display_name or next((c.display_name for c in kept if c.peer_id == me and c.verified), "")
        own = [replace(claim_from_receipts(me, receipts, failed), display_name=name)]
    elif display_name:
        kept = [replace(c, display_name=display_name) if c.peer_id == peer_id else c for c in kept]
    return contributor_rows(own + kept)


def plot_losses(losses: list[tuple[int, float]], path: Path, title: str) -> bool:
    """Draw the held-out loss curve to ``path`` (PNG); False when matplotlib is missing or there is no curve."""
    if len(losses) < 2:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        logger.info("matplotlib is not installed; the model card has a loss table but no plot")
        return False
    figure, axes = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([r for r, _ in losses], [loss for _, loss in losses], marker="o")
    axes.set(xlabel="outer round", ylabel="held-out loss (nats/byte)", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return True


def model_card(summary: RunSummary) -> str:
    """The README.md of an export: front matter, facts, loss, privacy, contributors, usage."""
    run = summary.run
    model = run.model
    parts = [
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        "tags:\n- zen-federation\n- federated-learning\n- byte-level\n---\n",
        f"# {run.run_id}\n",
        _description(model),
        "| | |\n|---|---|",
        f"| run id | `{run.run_id}` |",
        f"| run hash | `{summary.run_hash}` |",
        f"| outer rounds | {summary.round} |",
        f"| shape | {_shape(model)} |",
        f"| context | {model.context} {_unit(model)} |",
        f"| parameters | {summary.parameters:,} |",
        f"| aggregation | {run.aggregation.mode} |",
        f"| samples (this node's) | {summary.samples:,} sequences of {model.context} {_unit(model)} |",
        f"| exported by | {_exporter(summary)} |\n",
        *_loss_section(summary),
        *_privacy_section(summary),
        *_contributors_section(summary),
        "## Use\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")\n'
        'ids = tokenizer("Once upon", return_tensors="pt").input_ids  # == list("Once upon".encode())\n'
        "out = model.generate(ids, max_new_tokens=32, do_sample=True)\nprint(tokenizer.decode(out[0]))\n```\n",
        'or `zen-node generate --model PATH --prompt "Once upon"`. Without the tokenizer files, encode text as '
        "its UTF-8 bytes (`list(text.encode())`) and decode with `bytes(ids).decode(errors='replace')`.\n",
        "## Run config\n",
        f"```json\n{json.dumps(run.to_dict(), indent=2, sort_keys=True)}\n```\n",
    ]
    return "\n".join(parts)


def _description(model: ModelConfig) -> str:
    swarm = "trained peer-to-peer by a Zen Federation swarm (DiLoCo rounds over hivemind/libp2p)"
    if model.family != "hf":
        return (
            f"A byte-level GPT {swarm}, exported as a GPT-2 model: tokens are bytes (token id = byte value, "
            "vocabulary 256).\n"
        )
    tokens = "its own tokenizer (`tokenizer.json`)" if model.tokenizer else "bytes (token id = byte value)"
    return f"A transformers causal LM {swarm}, exported as it trained; tokens: {tokens}.\n"


def _shape(model: ModelConfig) -> str:
    if model.family != "hf":
        return f"{model.n_layer} layers, width {model.d_model}, {model.n_head} heads"
    base = f"base weights `{model.weights_digest}`" if model.weights_digest else "seeded init"
    return f"`config.json` `{model.config_digest}` ({base})"


def _unit(model: ModelConfig) -> str:
    return "tokens" if model.family == "hf" and model.tokenizer else "bytes"


def _loss_section(summary: RunSummary) -> list[str]:
    if not summary.losses:
        return ["## Held-out loss\n", "The workdir has no round reports with a held-out loss.\n"]
    losses = summary.losses
    keep = sorted({round(i * (len(losses) - 1) / (MAX_LOSS_ROWS - 1)) for i in range(MAX_LOSS_ROWS)})
    rows = [f"| {losses[i][0]} | {losses[i][1]:.4f} |" for i in keep if i < len(losses)]
    plot = [f"![held-out loss]({summary.loss_plot})\n"] if summary.loss_plot else []
    return [
        "## Held-out loss\n",
        "Mean cross-entropy (nats per byte) of the global parameters on this node's held-out split, after each "
        f"round: {losses[0][1]:.4f} at round {losses[0][0]}, {losses[-1][1]:.4f} at round {losses[-1][0]}.\n",
        *plot,
        "| round | held-out loss |\n|---:|---:|",
        *rows,
        "",
    ]


def _privacy_section(summary: RunSummary) -> list[str]:
    privacy = summary.run.privacy
    if not privacy.enabled:
        return ["## Privacy\n", "Trained without differential privacy.\n"]
    spent = "not reported" if summary.epsilon is None else f"{summary.epsilon:.4f}"
    return [
        "## Privacy\n",
        "User-level differential privacy: each node's whole contribution to a round (its pseudo-gradient) is "
        "clipped and noised inside the secure-aggregation ring.\n",
        "| | |\n|---|---|",
        f"| epsilon spent (this node, last report) | {spent} |",
        f"| delta | {privacy.delta:g} |",
        f"| target epsilon | {privacy.target_epsilon:g} |",
        f"| clip norm | {privacy.clip_norm:g} |",
        f"| noise multiplier | {privacy.noise_multiplier:g} (0: derived from the target) |\n",
    ]


def _contributors_section(summary: RunSummary) -> list[str]:
    if summary.ledger is not None:
        return _ledger_section(summary.ledger)
    rows = [
        f"| {_cell(c.name)} | {'`' + c.peer_id + '`' if c.peer_id else '-'} | {c.group_rounds} | "
        f"{'-' if c.samples is None else f'{c.samples:,}'} |"
        for c in summary.contributors
    ]
    return [
        "## Contributors\n",
        "Shares are by group rounds observed from the exporting node's own reports (`report.jsonl`), not from a "
        "signed contribution ledger: other peers are named only where a report names them, and only the "
        "exporting node's samples are known.\n",
        "| contributor | PeerID | group rounds | samples |\n|---|---|---:|---:|",
        *rows,
        "",
    ]


def _ledger_section(rows: list[ContributorRow]) -> list[str]:
    lines = []
    for row in rows:
        name = _cell(row.display_name) if row.display_name else row.peer_id
        figures = f"{_figure(row.rounds)} | {_figure(row.samples)} | {_figure(row.compute_seconds, ',.1f')}"
        shares = f"{_percent(row.share_of_samples)} | {_percent(row.share_of_rounds)}"
        verified = "yes" if row.verified else f"**no**: {_cell(row.note)}"
        lines.append(f"| {name} | `{_cell(row.peer_id)}` | {figures} | {shares} | {verified} |")
    return [
        "## Contributors\n",
        "From the signed contribution ledger: each node's receipts of the rounds it gave to a group and the "
        "signed running summaries the run's nodes published (`zen-node ledger` lists the same). Shares are of "
        "the verified contributors' samples and rounds; a claim that did not verify is marked and gets no share.\n",
        "| contributor | PeerID | rounds | samples | compute seconds | share of samples | share of rounds | verified |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *lines,
        "",
    ]


def _figure(value: float | None, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _exporter(summary: RunSummary) -> str:
    peer = f"`{summary.exported_by}`" if summary.exported_by else "this node"
    return f"{_cell(summary.display_name)} ({peer})" if summary.display_name else peer


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(text.replace("|", "/").split())


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
