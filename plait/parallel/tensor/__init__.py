"""Tensor parallelism (Megatron style) on the mesh's ``tp`` axis.

    comm.py    the four communication ops as autograd Functions (and a byte counter)
    layers.py  column- and row-parallel linears, vocab-parallel embedding and cross-entropy
    plan.py    convert a model in place from a plan: module-name pattern -> style
"""

from plait.parallel.tensor.comm import CommCounter
from plait.parallel.tensor.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                          vocab_parallel_cross_entropy)
from plait.parallel.tensor.plan import STYLES, parallelize

__all__ = ["STYLES", "ColumnParallelLinear", "CommCounter", "RowParallelLinear", "VocabParallelEmbedding",
           "parallelize", "vocab_parallel_cross_entropy"]
