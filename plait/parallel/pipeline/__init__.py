"""Pipeline parallelism: a model cut into consecutive stages along the mesh's ``pp`` axis.

    cut.py        which blocks go to which stage (by parameters, by measured time, or given)
    schedules.py  GPipe, 1F1B and ZB-H1 as lists of actions (no communication in them)
    p2p.py        activations and their gradients between neighbouring stages
    split.py      a backward in two passes, the input's gradient and the weights' (ZB-H1)
    stage.py      one stage: forward/backward of a micro-batch, the schedule runner, the trace
    trace.py      Chrome/Perfetto trace, PNG timeline, measured, ideal and theoretical bubble
"""

from typing import TYPE_CHECKING

from plait._lazy import lazy

_NAMES = {"StageModule": "plait.parallel.pipeline.cut", "blocks_of": "plait.parallel.pipeline.cut",
          "cut_points": "plait.parallel.pipeline.cut", "SCHEDULES": "plait.parallel.pipeline.schedules",
          "bubble_fraction": "plait.parallel.pipeline.schedules", "PipelineStage": "plait.parallel.pipeline.stage"}
# Lazy, so that the config's check of a schedule's name (schedules.py, plain Python) does not
# import the stage, its links and the split backward into the launcher before any worker starts.
__getattr__, __dir__ = lazy(__name__, _NAMES)
__all__ = sorted(_NAMES)

if TYPE_CHECKING:
    from plait.parallel.pipeline.cut import StageModule, blocks_of, cut_points
    from plait.parallel.pipeline.schedules import SCHEDULES, bubble_fraction
    from plait.parallel.pipeline.stage import PipelineStage
