"""Process groups (torchrun), DDP / FSDP2 wrapping and small collective helpers.

FSDP2 (`fully_shard` on every transformer block, then the root): with `precision: bfloat16` the
blocks compute in bf16 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: bf16
all-gathers, fp32 gradient reduce-scatters and fp32 sharded master weights); gradients are
reduce-scattered after every micro-batch, so gradient accumulation adds into the sharded fp32
gradients and no rank keeps a whole model's gradients between micro-batches.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.adapters import base_module


@dataclass
class DistContext:
    """Where this process runs in a run (:func:`init_distributed`): its `rank` of `world_size`
    processes (torchrun's RANK / WORLD_SIZE; 0 of 1 for a single process), `local_rank` on its
    node, the `device` it computes on (its CUDA device, else the CPU), the parallelism `mode`
    (`runconfig.distributed`: none, ddp or fsdp) and whether this process created the process
    group (`initialized_here`: :meth:`shutdown` then destroys it). The default is one process on
    the CPU. Its collective helpers (`barrier`, `all_reduce_sum`, `broadcast_object`, `on_main`,
    `gather_objects`) are no-ops or local when the run is not distributed; when it is, every rank
    must call them in the same order."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"  # none | ddp | fsdp
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
        t = t.to(self.comm_device)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (small picklable values: paths, messages)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn, *args):
        """`fn(*args)` run on rank 0 only; its result, or its MmloomError, reaches every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args)
            except MmloomError as err:
                error = str(err)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise MmloomError(error)
        return result

    def gather_objects(self, obj) -> list | None:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(mode: str) -> DistContext:
    """Join the torchrun process group (gloo on CPU, nccl on GPUs) when launched with several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        if mode == "none":
            raise MmloomError(
                f"launched with {world_size} processes but runconfig.distributed is 'none'; set it to ddp or fsdp"
            )
        initialized_here = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
            initialized_here = True
        return DistContext(rank, world_size, local_rank, device, mode, initialized_here)
    return DistContext(0, 1, 0, device, "none", False)


# --------------------------------------------------------------------------------- wrapping
def block_classes(model) -> set[str]:
    """Transformer block class names of every HF part (their `_no_split_modules`)."""
    names: set[str] = set()
    for part in [*(e.module for e in model.encoders.values()), model.language_model]:
        base = base_module(part)
        names |= set(getattr(base, "_no_split_modules", None) or [])
    return names


def mixed_precision(precision: str):
    """FSDP2's policy for a config's `model.precision`: bf16 compute with fp32 gradient reduction
    (inputs are not cast: autocast does that, and the loss denominators stay fp32), else None."""
    if precision != "bfloat16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def apply_fsdp(model, precision: str = "float32") -> nn.Module:
    """FSDP2: `fully_shard` every transformer block of every part, then the root (see the module
    docstring for the bf16 policy)."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision)
    kwargs = {"mp_policy": policy} if policy is not None else {}
    classes = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    # Only the outermost matching modules (a block class may nest another).
    block_ids = {id(b) for b in blocks}
    outer = []
    for b in blocks:
        if not any(id(sub) in block_ids for sub in _ancestors(model, b)):
            outer.append(b)
    for block in outer:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _ancestors(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    path = []

    def visit(module, chain):
        if module is target:
            path.extend(chain)
            return True
        return any(visit(child, [*chain, module]) for child in module.children())

    visit(root, [])
    return [m for m in path if m is not root]


# LLM config attributes that make it a mixture of experts: each micro-batch routes to some experts only.
MOE_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def parameters_without_gradient(model: nn.Module, forward) -> list[str]:
    """Names of the trainable parameters of `model` that no output of `forward()` (which runs `model` on
    one real micro-batch and returns a tensor) depends on: they can never get a gradient, e.g. the layers
    of a vision tower after its selected feature layer (LLaVA's -2) and its final norm. Found by walking
    the autograd graph of the output (no backward, no gradients allocated), with `model` in eval mode
    (so that activation checkpointing, which hides the parameters it recomputes, is off) and the RNG
    states restored."""
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        with torch.enable_grad():
            output = forward()
            reached, seen = set(), set()
            stack = [output.grad_fn]
            while stack:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf parameter
                if variable is not None:
                    reached.add(id(variable))
                stack.extend(next_node for next_node, _ in node.next_functions)
            del output
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return [name for key, name in trainable.items() if key not in reached]


def routes_experts(model: nn.Module) -> bool:
    """Whether a part of `model` is a mixture of experts (its config names a number of experts): the
    experts a micro-batch does not route to get no gradient in that micro-batch."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and any((getattr(config, a, 0) or 0) > 1 for a in MOE_ATTRIBUTES
                                      if isinstance(getattr(config, a, 0), int)):
            return True
    return False


def wrap_model(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False,
               precision: str = "float32", without_gradient: list[str] | tuple[str, ...] = (),
               synced: bool = False) -> nn.Module:
    """`model` for `ctx`: as it is (one process), DDP, or FSDP2 (:func:`apply_fsdp`). DDP leaves out the
    parameters `without_gradient` (:func:`parameters_without_gradient`: they are never updated, so never
    synchronised) and finds the parameters unused by each micro-batch when `find_unused_parameters` is set
    or the model routes experts (:func:`routes_experts`), so that every trainable configuration trains as in
    one process without a user flag. `synced`: every rank holds the same weights already
    (`load_from_rank0`), DDP need not broadcast them again."""
    if not ctx.distributed:
        return model
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if without_gradient:
            DDP._set_params_and_buffers_to_ignore_for_model(model, list(without_gradient))
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters or routes_experts(model),
                   init_sync=not synced)
    if ctx.mode == "fsdp":
        return apply_fsdp(model, precision)
    raise MmloomError(f"unknown distributed mode {ctx.mode!r}")


# ---------------------------------------------------------------------- start-up from rank 0
def broadcast_rng_state(ctx: DistContext) -> None:
    """Give every rank the first rank's torch (CPU) random state."""
    if not ctx.distributed:
        return
    state = torch.get_rng_state().to(ctx.comm_device)
    dist.broadcast(state, src=0)
    torch.set_rng_state(state.cpu())


def _rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The rows [start, end) of an n-row tensor that FSDP2 gives `rank` (dim-0 shards of
    ceil(n / ranks) rows, as `torch.chunk`: the last ranks' shards are short or empty)."""
    rows = -(-n // world)
    start = min(rank * rows, n)
    return start, min(start + rows, n)


def _local_rows(target: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, int, int]:
    """This rank's shard of the FSDP2 parameter `target` (a plain tensor) and its rows."""
    from torch.distributed.tensor import Shard

    if tuple(target.placements) != (Shard(0),):
        raise MmloomError(f"cannot load a tensor placed as {target.placements}: FSDP2 shards on dim 0 are supported")
    local = target.detach().to_local()
    start, end = _rows(target.shape[0], ctx.world_size, ctx.rank)
    if local.shape[0] != end - start or not local.is_contiguous():
        raise MmloomError(f"unexpected FSDP2 shard of {tuple(target.shape)}: {tuple(local.shape)} on rank {ctx.rank}")
    return local, start, end


def _scatter_rows(target: torch.Tensor, value: torch.Tensor | None, ctx: DistContext) -> None:
    """Copy this rank's rows of `value` (the whole tensor, on the first rank only) into the FSDP2
    shard `target`: the first rank sends each rank its rows, which land in the shard directly."""
    local, start, end = _local_rows(target, ctx)
    with torch.no_grad():
        if ctx.is_main:
            value = value.to(device=local.device, dtype=target.dtype)
            for rank in range(1, ctx.world_size):
                a, b = _rows(target.shape[0], ctx.world_size, rank)
                if b > a:
                    dist.send(value[a:b].contiguous(), dst=rank)
            local.copy_(value[start:end])
        elif end > start:
            dist.recv(local, src=0)


def gather_rows(target: torch.Tensor, ctx: DistContext, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The whole tensor of the FSDP2 shard `target` on the first rank, in `dtype` (default its own;
    None on the other ranks): each rank sends its rows into one buffer there. Collective."""
    local, start, end = _local_rows(target, ctx)
    if not ctx.is_main:
        if end > start:
            dist.send(local, dst=0)
        return None
    whole = torch.empty(tuple(target.shape), dtype=dtype or target.dtype, device=local.device)
    whole[start:end].copy_(local)
    for rank in range(1, ctx.world_size):
        a, b = _rows(target.shape[0], ctx.world_size, rank)
        if b > a:
            rows = whole[a:b] if whole.dtype == target.dtype else torch.empty_like(local[: b - a])
            dist.recv(rows, src=rank)
            if rows.data_ptr() != whole[a:b].data_ptr():
                whole[a:b].copy_(rows)
    return whole


def load_from_rank0(model: nn.Module, ctx: DistContext, value, names: set[str] | None = None) -> None:
    """Set tensors of `model`'s state dict (every tensor once; those in `names` when given) to the
    values the first rank gets from `value(name, target)`, one tensor at a time: the whole tensor
    (None: the first rank's tensor holds its value already). An FSDP2 shard receives its rows
    (scatter), any other tensor the whole value (broadcast). Collective: every rank calls it with
    the same model structure and `names`. Raises MmloomError for an FSDP2 shard without a value."""
    from mmloom.model.meta_init import unique_state

    for name, target in unique_state(model):
        if names is not None and name not in names:
            continue
        given = value(name, target) if ctx.is_main else None
        if hasattr(target, "device_mesh"):
            if ctx.is_main and given is None:
                raise MmloomError(f"no value for {name} on the first rank")
            _scatter_rows(target, given, ctx)
            continue
        data = target.detach()
        with torch.no_grad():
            if given is not None:
                data.copy_(given)
        if ctx.distributed:
            dist.broadcast(data, src=0)
        del given


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, ctx: DistContext, sync: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch (DDP keeps whole gradients
    anyway). FSDP: reduce-scatter every micro-batch (gradients accumulate sharded)."""
    if ctx.distributed and ctx.mode == "ddp" and not sync:
        with model.no_sync():
            yield
        return
    yield
