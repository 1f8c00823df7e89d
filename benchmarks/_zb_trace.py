
import torch, torch.distributed as dist, torch.nn.functional as F, time
from benchmarks.pipeline import my_stage_module, BATCH
from plait.parallel.pipeline import PipelineStage
from plait.testing import World
def run(schedule, m):
    module = my_stage_module(); rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 784, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    stage = PipelineStage(module, rank, 2, dist.group.WORLD, loss_fn=F.cross_entropy)
    for _ in range(6):
        dist.barrier(); stage.step(x, y, m, schedule)
    return [(k, i, round(a*1e3, 1), round(b*1e3, 1)) for k, i, a, b in stage.trace]
if __name__ == '__main__':
  with World(2) as w:
    for sched in ("zbh1",):
        for r, t in enumerate(w.run(run, sched, 4)):
            print(sched, r, t)
