"""Pipeline parallelism: a model cut into consecutive stages along the mesh's ``pp`` axis.

    cut.py        which blocks go to which stage (by parameters, by measured time, or given)
    schedules.py  GPipe and 1F1B as lists of actions (no communication in them)
    p2p.py        activations and their gradients between neighbouring stages
    stage.py      one stage: forward/backward of a micro-batch, the schedule runner, the trace
    trace.py      Chrome/Perfetto trace, PNG timeline, measured vs theoretical bubble
"""

from plait.parallel.pipeline.cut import StageModule, blocks_of, cut_points
from plait.parallel.pipeline.schedules import SCHEDULES, bubble_fraction
from plait.parallel.pipeline.stage import PipelineStage

__all__ = ["SCHEDULES", "PipelineStage", "StageModule", "blocks_of", "bubble_fraction", "cut_points"]
