"""torchrun plumbing for the trainer: the process-group helpers of :mod:`fastclip.distributed`
under the names the trainer uses (``agree`` is :func:`fastclip.distributed.rank0_decisions`)."""
from ..distributed.process import DistInfo, barrier, gather_objects, init_distributed, shutdown
from ..distributed.process import rank0_decisions as agree

__all__ = ["DistInfo", "init_distributed", "agree", "gather_objects", "barrier", "shutdown"]
