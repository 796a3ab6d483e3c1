"""The (pp, dp, cp, tp) process mesh: which ranks talk to which, in Megatron's default rank order.

Rank r of a TP x CP x DP x PP job sits at tp = r % TP, cp = (r // TP) % CP, dp = (r // (TP * CP))
% DP, pp = r // (TP * CP * DP): tensor parallel is innermost so a TP group shares a node (the
chattiest collectives stay on NVLink), context parallel next (its ring passes K/V blocks every
layer), and a job laid out by Megatron-LM keeps the same rank -> shard assignment here. Without
context parallelism (CP = 1) this is the (pp, dp, tp) order.

Parameters are replicated over CP as over DP: gradients are summed over the combined DP x CP group
(`dp_cp_group`, Megatron's "data parallel with context parallel" group), while data is split over
DP only (the CP ranks of a DP rank read the same samples and keep their own sequence chunks).

With N distributed-optimizer instances (Megatron's --num-distributed-optimizer-instances) each
DP x CP group is cut into N contiguous runs of DP x CP / N ranks, Megatron's split: the
distributed optimizer shards its state within a run (`optimizer_shard_group`) and all-reduces
each reduced shard across the runs (`optimizer_instance_group`: the N ranks holding the same
shard), so sharding traffic stays inside an instance, e.g. a node.

Every process group is created once, here, and handed out by one `ParallelMesh` object; nothing
below this module looks up global state. A single process without torch.distributed gets a mesh
whose sizes are all 1 and whose groups are None (the collectives in comm.py treat that as "no
communication"), so the same model code runs unchanged in a notebook.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from megapre.errors import ConfigError

from .layout import (EVEN, INSTANCES_FLAG, StageSplit, check_parallel_sizes, check_positive,
                     data_parallel_size, optimizer_shard_size)

MESH_DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelConfig:
    """How a job is split. Data parallelism takes whatever of the world size is left over."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False  # shard norms/dropout activations along the sequence over TP
    context_parallel: int = 1  # split every sequence over this many ranks (ring attention)
    timeout_s: float = 1800.0  # collective timeout of every process group this mesh creates
    tp_pp_dp_order: bool = False  # Megatron's --use-tp-pp-dp-mapping: pp inside dp
    stage_split: StageSplit = EVEN  # Megatron's uneven pipeline split (layout.chunk_layers)
    optimizer_instances: int = 1  # --num-distributed-optimizer-instances (divides DP x CP)

    def __post_init__(self) -> None:
        check_parallel_sizes(self.tensor_parallel, self.pipeline_parallel, self.virtual_pipeline)
        check_positive("--context-parallel-size", self.context_parallel)
        check_positive(INSTANCES_FLAG, self.optimizer_instances)
        if not self.timeout_s > 0:
            raise ValueError(f"process-group timeout must be > 0 seconds, got {self.timeout_s}")


def rank_grid(world_size: int, tensor_parallel: int, pipeline_parallel: int,
              context_parallel: int = 1, tp_pp_dp_order: bool = False) -> torch.Tensor:
    """Global ranks arranged as a [pp, dp, cp, tp] tensor. Megatron's default order counts tp
    fastest, then cp, dp, pp (row-major here); its --use-tp-pp-dp-mapping order counts tp, cp,
    pp, then dp (pipeline stages of one replica on neighbouring ranks)."""
    dp = data_parallel_size(world_size, tensor_parallel, pipeline_parallel, context_parallel)
    ranks = torch.arange(world_size)
    if tp_pp_dp_order:
        return ranks.reshape(dp, pipeline_parallel, context_parallel,
                             tensor_parallel).transpose(0, 1).contiguous()
    return ranks.reshape(pipeline_parallel, dp, context_parallel, tensor_parallel)


def default_device() -> torch.device:
    """The device this process should compute on: its local GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """The --device flag: cuda (this process's local GPU), cpu, or auto (cuda when torch sees
    a GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but torch sees no GPU; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name != "cpu":
        raise ConfigError(f"--device {name!r} must be cuda, cpu or auto")
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _init_default_group(backend: str, timeout: timedelta) -> None:
    """init_process_group from torchrun's environment, with the store's keys namespaced by
    torchrun's restart count. Under --max-restarts with a c10d rendezvous (--standalone, or
    --rdzv-backend c10d) the restarted workers share the agent's store with the failed round;
    without a fresh namespace gloo reads the dead workers' addresses and fails in
    connectFullMesh ("connection refused")."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart != "0":
        store = dist.PrefixStore(f"megapre_restart_{restart}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class ParallelMesh:
    """Process groups and coordinates of this rank in the (pp, dp, cp, tp) mesh.

    Build it with `ParallelMesh.init(config)` (joins or starts torch.distributed when launched by
    torchrun) or `ParallelMesh.single()` for one process. Groups of size-1 dimensions still exist
    under torch.distributed; only the no-distributed case has None groups.
    """

    def __init__(self, config: ParallelConfig, device: torch.device, rank: int, world_size: int,
                 groups: dict[str, ProcessGroup | None], embedding_group: ProcessGroup | None,
                 device_mesh: DeviceMesh | None) -> None:
        self.config = config
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.dp_size = data_parallel_size(world_size, config.tensor_parallel,
                                          config.pipeline_parallel, config.context_parallel)
        self._grid = rank_grid(world_size, config.tensor_parallel, config.pipeline_parallel,
                               config.context_parallel, config.tp_pp_dp_order)
        pp, dp, cp, tp = (int(c) for c in (self._grid == rank).nonzero()[0])
        self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank = pp, dp, cp, tp
        self.tp_group = groups["tp"]
        self.pp_group = groups["pp"]
        self.dp_group = groups["dp"]
        # (a groups dict without the CP entries, as before CP existed, means CP = 1)
        self.cp_group = groups.get("cp")
        self.dp_cp_group = groups.get("dp_cp", self.dp_group)  # grads: replicated over DP and CP
        self.optimizer_shard_size = optimizer_shard_size(self.dp_cp_size,
                                                         config.optimizer_instances)
        # one instance: the shard group is DP x CP itself and there is nothing across instances
        self.optimizer_shard_group = groups.get("dp_cp_intra", self.dp_cp_group)
        self.optimizer_instance_group = groups.get("dp_cp_inter")
        self.embedding_group = embedding_group
        self.device_mesh = device_mesh

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def single(cls, config: ParallelConfig | None = None,
               device: torch.device | str | None = None) -> "ParallelMesh":
        """A one-process mesh (all sizes 1, no groups); TP/PP/CP in `config` must be 1."""
        config = config or ParallelConfig()
        data_parallel_size(1, config.tensor_parallel, config.pipeline_parallel,
                           config.context_parallel)
        dev = torch.device(device) if device is not None else default_device()
        return cls(config, dev, 0, 1, dict.fromkeys(("pp", "dp", "cp", "tp", "dp_cp")), None,
                   None)

    @classmethod
    def init(cls, config: ParallelConfig, device: torch.device | str | None = None) -> "ParallelMesh":
        """Create every group of the mesh. Collective: all ranks must call it in the same order.

        Joins an existing default process group, or starts one from torchrun's environment
        (backend nccl on CUDA, gloo on CPU, timeout from `config.timeout_s`). Without either,
        returns the single-process mesh.
        """
        dev = torch.device(device) if device is not None else default_device()
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "MASTER_ADDR" not in os.environ:
                return cls.single(config, dev)
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            _init_default_group(backend_for(dev), timedelta(seconds=config.timeout_s))
            # We started it, so we tear it down: a process that exits with live gloo/nccl threads
            # can abort ("terminate called without an active exception").
            atexit.register(_destroy_process_group)
        world, rank = dist.get_world_size(), dist.get_rank()
        # before any group exists, so a bad N fails alike on every rank
        optimizer_shard_size(data_parallel_size(world, config.tensor_parallel,
                                                config.pipeline_parallel, config.context_parallel)
                             * config.context_parallel, config.optimizer_instances)
        grid = rank_grid(world, config.tensor_parallel, config.pipeline_parallel,
                         config.context_parallel, config.tp_pp_dp_order)
        timeout = timedelta(seconds=config.timeout_s)
        groups = {name: _subgroups(grid, dim, timeout, name)
                  for dim, name in enumerate(MESH_DIMS)}
        groups["dp_cp"] = (groups["dp"] if config.context_parallel == 1
                           else _dp_cp_subgroups(grid, timeout))
        if config.optimizer_instances > 1:
            groups["dp_cp_intra"], groups["dp_cp_inter"] = _instance_subgroups(
                grid, config.optimizer_instances, timeout)
        embedding = _embedding_group(grid, timeout)
        # The DeviceMesh names "cp" only when CP > 1: a CP-free job keeps its (pp, dp, tp) mesh.
        dims = MESH_DIMS if config.context_parallel > 1 else ("pp", "dp", "tp")
        device_mesh = DeviceMesh.from_group([groups[n] for n in dims], dev.type,
                                            mesh=grid if len(dims) == 4 else grid.squeeze(2),
                                            mesh_dim_names=dims)
        return cls(config, dev, rank, world, groups, embedding, device_mesh)

    def destroy(self) -> None:
        """Tear down torch.distributed (all groups); the mesh is unusable afterwards."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- sizes and coordinates -----------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return self.config.tensor_parallel

    @property
    def pp_size(self) -> int:
        return self.config.pipeline_parallel

    @property
    def cp_size(self) -> int:
        return self.config.context_parallel

    @property
    def dp_cp_size(self) -> int:
        """Ranks that hold the same parameters of a stage's TP shard (gradients summed over)."""
        return self.dp_size * self.cp_size

    @property
    def virtual_pipeline(self) -> int | None:
        return self.config.virtual_pipeline

    @property
    def stage_split(self) -> StageSplit:
        """How layers are shared over pipeline stages (even unless Megatron's uneven options)."""
        return self.config.stage_split

    @property
    def sequence_parallel(self) -> bool:
        """Sequence parallelism is on only when there is more than one TP rank to shard over."""
        return self.config.sequence_parallel and self.tp_size > 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def rank_of(self, pp: int, dp: int, tp: int, cp: int | None = None) -> int:
        """Global rank at mesh coordinate (pp, dp, cp, tp); cp defaults to this rank's."""
        return int(self._grid[pp, dp, self.cp_rank if cp is None else cp, tp])

    @property
    def tp_ranks(self) -> list[int]:
        return self._grid[self.pp_rank, self.dp_rank, self.cp_rank, :].tolist()

    @property
    def cp_ranks(self) -> list[int]:
        """The ring of this rank's sequence chunks, in CP rank order."""
        return self._grid[self.pp_rank, self.dp_rank, :, self.tp_rank].tolist()

    @property
    def dp_ranks(self) -> list[int]:
        return self._grid[self.pp_rank, :, self.cp_rank, self.tp_rank].tolist()

    @property
    def dp_cp_rank(self) -> int:
        """This rank's place in the DP x CP group (its ranks ascend as (dp, cp) does)."""
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def dp_cp_ranks(self) -> list[int]:
        return self._grid[self.pp_rank, :, :, self.tp_rank].reshape(-1).tolist()

    @property
    def optimizer_instances(self) -> int:
        return self.config.optimizer_instances

    @property
    def optimizer_shard_rank(self) -> int:
        """This rank's place in its distributed-optimizer instance (which shard it owns)."""
        return self.dp_cp_rank % self.optimizer_shard_size

    @property
    def optimizer_instance(self) -> int:
        """Which of the N distributed-optimizer instances this rank belongs to."""
        return self.dp_cp_rank // self.optimizer_shard_size

    @property
    def optimizer_shard_ranks(self) -> list[int]:
        """The ranks of this rank's instance: a contiguous run of `dp_cp_ranks`."""
        lo = self.optimizer_instance * self.optimizer_shard_size
        return self.dp_cp_ranks[lo:lo + self.optimizer_shard_size]

    @property
    def optimizer_instance_ranks(self) -> list[int]:
        """The rank owning this rank's shard in every instance (the gradient all-reduce)."""
        return self.dp_cp_ranks[self.optimizer_shard_rank::self.optimizer_shard_size]

    @property
    def pp_ranks(self) -> list[int]:
        return self._grid[:, self.dp_rank, self.cp_rank, self.tp_rank].tolist()

    @property
    def embedding_ranks(self) -> list[int]:
        """First and last pipeline stage of this (dp, cp, tp) column: they share tied
        embeddings."""
        return sorted({self.pp_ranks[0], self.pp_ranks[-1]})

    @property
    def in_embedding_group(self) -> bool:
        return self.is_first_stage or self.is_last_stage

    def __repr__(self) -> str:
        return (f"ParallelMesh(rank={self.rank}/{self.world_size}, pp={self.pp_rank}/{self.pp_size},"
                f" dp={self.dp_rank}/{self.dp_size}, cp={self.cp_rank}/{self.cp_size},"
                f" tp={self.tp_rank}/{self.tp_size},"
                f" device={self.device})")


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _subgroups(grid: torch.Tensor, dim: int, timeout: timedelta, name: str) -> ProcessGroup:
    """This rank's group along mesh dimension `dim` (every rank creates every group, in order)."""
    lines = grid.movedim(dim, -1).reshape(-1, grid.shape[dim]).tolist()
    group, _ = dist.new_subgroups_by_enumeration(lines, timeout=timeout, group_desc=f"mesh_{name}")
    return group


def _dp_cp_subgroups(grid: torch.Tensor, timeout: timedelta) -> ProcessGroup:
    """This rank's DP x CP group: every (dp, cp) rank of one (pp, tp) coordinate."""
    pp, dp, cp, tp = grid.shape
    lines = grid.permute(0, 3, 1, 2).reshape(pp * tp, dp * cp).tolist()
    group, _ = dist.new_subgroups_by_enumeration(lines, timeout=timeout, group_desc="mesh_dp_cp")
    return group


def _instance_subgroups(grid: torch.Tensor, instances: int, timeout: timedelta
                        ) -> tuple[ProcessGroup, ProcessGroup]:
    """This rank's distributed-optimizer groups: its instance (a contiguous run of DP x CP /
    `instances` ranks of its DP x CP group, as Megatron cuts it) and the ranks at its place in
    every instance. All intra groups are created first, then all inter groups, on every rank."""
    pp, dp, cp, tp = grid.shape
    runs = grid.permute(0, 3, 1, 2).reshape(pp * tp, instances, dp * cp // instances)
    intra, _ = dist.new_subgroups_by_enumeration(runs.reshape(-1, runs.shape[-1]).tolist(),
                                                 timeout=timeout, group_desc="mesh_dp_cp_intra")
    inter, _ = dist.new_subgroups_by_enumeration(runs.transpose(1, 2).reshape(-1, instances)
                                                 .tolist(), timeout=timeout,
                                                 group_desc="mesh_dp_cp_inter")
    return intra, inter


def _embedding_group(grid: torch.Tensor, timeout: timedelta) -> ProcessGroup | None:
    """Group of first + last pipeline stage per (dp, cp, tp); None on middle stages."""
    columns = grid.reshape(grid.shape[0], -1)
    pairs = [sorted({int(columns[0, i]), int(columns[-1, i])}) for i in range(columns.shape[1])]
    group, _ = dist.new_subgroups_by_enumeration(pairs, timeout=timeout, group_desc="embedding")
    return group
