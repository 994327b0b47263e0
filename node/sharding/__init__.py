"""Pipeline stages: the model cut across peers, hosted by ``zen-node serve``.

class Stage, LocalParts (stages.py): the cut of the GPT into stages; choose_stages: block selection
class StageRequest, StageReply (messages.py): the msgpack wire format of stage calls; check_hidden_states,
    check_gradients: a request's tensors against the stage
P2PLoop (node/runtime.py), call_stage (rpc.py): the unary P2P calls both sides use
sign_step, check_step_proof (proofs.py): a trainer's signature over a step's gradients, which
    replicas check before they apply a replicated step
compare_weights, weights_digest (agreement.py): trainers compare the weights digests of a stage's
    replicas at one version and history; a minority is banned like a failed spot-check
class HostedStage (hosted.py): a served stage's weights, optimizer, exactly-once bookkeeping, anchor,
    and the averaging gate (refuse trainer calls, drain commits, hold replicated steps)
class ForwardBatcher (batching.py): one stage's forward calls that arrive together, run as one pass
class StageServer (server.py): ``zen-node serve``, hosting stages with forward/backward RPCs
join_stage, StageJoin (joining.py): a server taking a stage downloads its state from a listed replica
    whose offer passes the join checks (version, shapes, Adam moments, reach, the replicas' vote)
class StageAverager, StageHost (averaging.py): periodic rounds that leave a stage's replicas
    bit-identical; StageHost is what they need from their server (StageServer implements it)
class RemoteStages (client.py): a trainer's stage calls: server choice, failover, spot-checks, bans
class StepPipeline (pipeline.py): one step's micro-batches through the stages, then the commits
per_example_backward, clipped_sum (clipped.py): a stage's share of a DP-SGD step (per-example gradients,
    their clipped and noised sum)
class ShardedDPSGD (private.py): record-level DP-SGD with one clip over the trainer's parts and the stages
class ShardedTrainer (sharding/trainer.py): a trainer whose middle blocks live on stage servers
catch_up, join_cohort (catchup.py): a late joiner takes the trainers' parts, a cohort mover its new cohort's
save_stage_weights, load_stage_weights (snapshot.py): the stages' blocks a stopping trainer saves for export
"""
