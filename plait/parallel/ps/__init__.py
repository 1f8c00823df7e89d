"""Parameter server: workers push gradients to servers that own the parameters (sync, async, ssp).

    layout = PSLayout.build(model, servers=1)            # ranks 0..S-1 serve, the rest train
    if dist.get_rank() in layout.servers:
        stats = ParameterServer(model, lambda ps: torch.optim.SGD(ps, lr=0.1), layout, mode="ssp",
                                staleness=2).serve()
    else:
        worker = PSWorker(model, layout)
        ...                                              # backward, then worker.push(loss)
        worker.close()
"""

from plait.parallel.ps.layout import MODES, SCHEMES, PSLayout
from plait.parallel.ps.server import ParameterServer, ServerStats
from plait.parallel.ps.worker import LossNotFinite, PSWorker, ServerStopped, StopRun, WorkerDropped

__all__ = ["MODES", "SCHEMES", "LossNotFinite", "PSLayout", "PSWorker", "ParameterServer", "ServerStats",
           "ServerStopped", "StopRun", "WorkerDropped"]
