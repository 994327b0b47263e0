"""Merging pseudo-gradients with a group of peers, behind one interface.

class Aggregator, AggregationResult, AggregationError (base.py): the interface every round mode uses
    (prepare_round on the main thread, aggregate in the background, cohort_id, residual)
class PlainAggregator, AveragerAggregator (plain.py): hivemind's float all-reduce (for comparison)
class SecureAggregator, ring_bound (secure.py): the masked all-reduce of node/secagg
class HierarchicalAggregator, ParameterPartition (hierarchy.py): cohort/global/local parameters, importance weights;
    places itself in its cohort in prepare_round
make_aggregator (factory.py): the aggregator the run's mode names
"""
