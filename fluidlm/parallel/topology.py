"""The parallel layout: world = PP × DP × CP × TP (docs/design.md §4), TP fastest, then CP, DP, PP.

    layout = Layout.from_world(world_size, tp=2, pp=1, cp=1)   # pure arithmetic: checked at config time
    init_model_parallel(layout)                             # megatron-core groups + DeepSpeed's topology

megatron-core's `parallel_state` owns the process groups (its default order "tp-cp-ep-dp-pp");
DeepSpeed's `PipeModelDataParallelTopology` lays ranks out pipe > data > model, the same order; its
data axis covers DP × CP (every CP rank holds the same parameters, so gradients are reduced over both).
`init_model_parallel` builds both and asserts they agree rank by rank, so a future change of
either library's convention fails at start-up instead of silently mixing gradients.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @classmethod
    def from_world(cls, world: int, tp: int = 1, pp: int = 1, cp: int = 1) -> "Layout":
        if min(tp, pp, cp) < 1:
            raise ValueError(f"parallel.tp={tp}, parallel.pp={pp} and parallel.cp={cp} must be ≥ 1")
        if world % (tp * pp * cp):
            raise ValueError(
                f"world size {world} is not divisible by parallel.tp × parallel.pp × parallel.cp = {tp} × {pp} × {cp} "
                f"= {tp * pp * cp}; launch a multiple of {tp * pp * cp} processes or change the layout")
        return cls(world, tp, pp, cp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{'pp': stage, 'dp': data rank, 'cp': context rank, 'tp': tensor rank} of a global rank."""
        return {"pp": rank // (self.dp * self.cp * self.tp), "dp": (rank // (self.tp * self.cp)) % self.dp,
                "cp": (rank // self.tp) % self.cp, "tp": rank % self.tp}


def init_model_parallel(layout: Layout):
    """Create megatron-core's groups for `layout` (the default process group must exist) and
    DeepSpeed's matching topology; check they agree. Returns the DeepSpeed topology."""
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                                 context_parallel_size=layout.cp)
    topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp * layout.cp)
    rank = dist.get_rank()
    ours = layout.coordinates(rank)
    megatron = {"pp": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
                "cp": ps.get_context_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank()}
    coord = topo.get_coord(rank)
    deepspeed = {"pp": coord.pipe, "dp": coord.data // layout.cp, "cp": coord.data % layout.cp, "tp": coord.model}
    if not ours == megatron == deepspeed:
        raise RuntimeError(f"rank {rank}: parallel layouts disagree: FluidLM {ours}, megatron-core {megatron}, "
                           f"DeepSpeed {deepspeed}")
    return topo


class MegatronMPU:
    """The `mpu` object DeepSpeed's engine asks for groups (PP = 1): megatron-core's
    parallel_state plus the few names DeepSpeed expects that megatron-core does not define. Its
    data-parallel group includes the CP ranks (they hold the same parameters)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def __getattr__(self, name):  # get_tensor_model_parallel_*, get_data_parallel_* ...
        return getattr(self.ps, name)

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(self.get_data_parallel_group())
