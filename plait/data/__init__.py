"""Data partitioning across data-parallel ranks and the shipped datasets."""

from plait.data.partition import SCHEMES, PartitionSampler

__all__ = ["SCHEMES", "PartitionSampler"]
