"""Process-group plumbing shared by the distributed loss, the data reader and the trainer."""
from .slots import split_slots

__all__ = ["split_slots"]
