"""The training loop: inner steps, outer rounds, checkpoints, reports, state for late joiners.

class TrainingNode (trainer.py): enroll, join, catch up, train outer rounds, close
class OuterState, InFlight (outer.py): global params, the outer step and the staleness rule of the overlapped loop
inner_phase, evaluate (inner.py): the inner AdamW steps on local batches; held-out loss
class InnerSchedule (schedule.py): the inner learning rate at each of the run's inner steps (warmup, cosine)
class Checkpoint (checkpoint.py): checkpoint.safetensors after every round, --resume; atomic_write, save_round_params
class RoundOutcome, RoundReport (report.py): how a round ended; the report.jsonl line (REPORT_FILE, append_report)
class TrainerPrivacy, compression_bound (privacy.py): DP at the run's level (record or user) and its budget
class DPSGDStep, RecordSampler, RecordAccountant (dpsgd.py): record-level DP-SGD on Poisson samples of text windows
class ConfigMismatchError, refuse_mismatched (admission.py): a peer of the run with another config is refused
class StateSharer, wait_for_peer_ahead (state_sharing.py): late joiners (and resyncs) download the state from peers
class ContributionLedger (ledger.py): each round's signed receipt (a group's, or a sharded trainer's steps), the summary
    in the DHT at most every 10 receipts / 60 s
class LineageMerger, LineageServer (lineage.py): a group's members that arrive with different global params merge them
"""
