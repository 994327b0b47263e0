"""The training loop: inner steps, outer rounds, checkpoints, reports, state for late joiners.

class TrainingNode (trainer.py): enroll, join, catch up, train outer rounds, checkpoint
class StateSharer (state_sharing.py): late joiners download the current state from peers
"""
