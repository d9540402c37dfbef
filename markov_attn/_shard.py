"""Running chain functions on a (batch, layer, head) stack sharded over a device mesh."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def stack_spec(axes: Sequence[str | None], /) -> PartitionSpec:
    """The ``PartitionSpec`` splitting the leading stack axes over the mesh axes ``axes``.

    Examples:
      >>> import markov_attn as ma
      >>> ma.stack_spec(("batch", None, "head"))
      P('batch', None, 'head')
    """
    return PartitionSpec(*axes)


def shard_stack(
    fn: Callable,
    /,
    *,
    mesh: Mesh,
    axes: Sequence[str | None],
    replicated: Sequence[int] = (),
) -> Callable:
    """Wraps a chain function to run per device on a stack sharded over its leading axes.

    Every chain function of this library treats leading axes as independent matrices, so a
    ``(batch, layer, head, ...)`` stack splits over a device mesh with no communication at all:
    each device runs ``fn`` on its own block of matrices (``jax.shard_map``), attention matrices
    and Q/K are never gathered, and the results come back sharded the same way
    (``PartitionSpec(*axes)`` on their leading axes). Iterative solvers stop per device, so one
    slow head does not hold back the other devices.

    The same code runs on a multi-host TPU or GPU slice: call ``jax.distributed.initialize()``
    on every host, build the mesh from ``jax.devices()`` (all hosts' devices), and pass global
    arrays (for example from ``jax.make_array_from_process_local_data``).

    Args:
      fn: function of positional arrays returning an array (or a pytree of arrays) whose leading
        axes are the stack axes; bind options first, e.g.
        ``functools.partial(ma.tokenrank_qk, alpha=0.99)``.
      mesh: the device mesh.
      axes: one mesh axis name (or ``None``: not split) per leading stack axis, e.g.
        ``("batch", "layer", "head")``. Each split axis's length must be divisible by the mesh
        axis size.
      replicated: indices of positional arguments passed whole to every device (a scalar start
        index or ``alpha``, ...: values that do not broadcast against the stack axes; per-matrix
        values must be split); all others are split on their leading axes.

    Returns:
      A jitted function with the same positional arguments, outputs sharded with
      ``NamedSharding(mesh, PartitionSpec(*axes))``.

    Examples:
      >>> import functools, jax, numpy as np, markov_attn as ma
      >>> mesh = jax.make_mesh((1,), ("head",))
      >>> f = ma.shard_stack(functools.partial(ma.tokenrank_qk, block=8), mesh=mesh,
      ...                    axes=(None, "head"))
      >>> q = np.random.default_rng(0).normal(size=(2, 4, 16, 8)).astype(np.float32)
      >>> f(q, q).sharding.spec
      P(None, 'head')
    """
    spec = stack_spec(axes)
    replicated = tuple(int(i) for i in replicated)

    def run(*args):
        bad = [i for i in replicated if not -len(args) <= i < len(args)]
        if bad:
            raise ValueError(
                f"replicated={replicated} names arguments {bad} of a call with {len(args)}"
            )
        whole = {i % len(args) for i in replicated}
        for i, a in enumerate(args):
            if i not in whole and jnp.ndim(a) < len(axes):
                raise ValueError(
                    f"argument {i} has {jnp.ndim(a)} axes, fewer than the {len(axes)} stack axes "
                    f"{tuple(axes)}: pass it in replicated= (scalars, shared starts)"
                )
        split = sorted(set(range(len(args))) - whole)
        stack = jnp.shape(args[split[0]])[: len(axes)] if split else None
        in_specs = tuple(PartitionSpec() if i in whole else spec for i in range(len(args)))
        # place (or reshard) inputs on the mesh: a scatter, never a gather
        args = [
            jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs, strict=True)
        ]
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
        out = mapped(*args)
        for leaf in jax.tree.leaves(out) if stack is not None else ():
            if leaf.shape[: len(stack)] != stack:
                raise ValueError(
                    f"fn's output has leading shape {leaf.shape[: len(stack)]}, not the stack's "
                    f"{stack}: a replicated argument broadcast against the stack axes on each "
                    "device (per-matrix start indices must be split, not replicated)"
                )
        return out

    return jax.jit(run, out_shardings=NamedSharding(mesh, spec))


__all__ = ["shard_stack", "stack_spec"]
