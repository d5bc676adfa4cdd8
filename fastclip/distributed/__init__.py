"""Process-group plumbing shared by the distributed losses, the data reader and the trainer.

* :mod:`~fastclip.distributed.group`: ranks within a group, the rows each rank holds
  (:class:`Layout`), where a group's small collectives run, which devices its backend moves;
* :mod:`~fastclip.distributed.agreement`: the protocol by which every rank validates its inputs and
  the ranks agree before any data moves (one small all-reduce; an error raises on every rank);
* :mod:`~fastclip.distributed.collectives`: moving row blocks (uneven sizes, gloo included), an
  all-gather whose backward returns gradients to their owners, scalar all-reduces;
* :mod:`~fastclip.distributed.slots`: which share of a data stream a reader takes;
* :mod:`~fastclip.distributed.process`: joining the group torchrun describes, and the collectives of
  a training loop (rank 0's decisions, gathering objects, barriers).

Importing this package does not initialise anything.
"""
from .agreement import AgreementField, DistributedInputError, agree_inputs
from .collectives import BlockReducer, GatherWithGrad, all_gather_with_grad, all_reduce_scalars, gather_blocks
from .group import Layout, backend_name, check_group_device, collective_device, global_rank, group_rank_and_size
from .process import DistInfo, barrier, gather_objects, init_distributed, rank0_decisions, shutdown
from .slots import split_slots

__all__ = ["AgreementField", "DistributedInputError", "agree_inputs", "BlockReducer", "GatherWithGrad",
           "all_gather_with_grad", "all_reduce_scalars", "gather_blocks", "Layout", "backend_name",
           "check_group_device", "collective_device", "global_rank", "group_rank_and_size", "DistInfo", "barrier",
           "gather_objects", "init_distributed", "rank0_decisions", "shutdown", "split_slots"]
