"""A small wrapper over Orbax's ``CheckpointManager``: the checkpoints of a training run.

A checkpoint holds one pytree (the model's ``nnx.State`` of parameters and the optimiser state)
and a JSON ``meta`` dict (step, data position, config). The training scripts
(``experiments/train.py``, ``experiments/train_dit.py``) write them;
:func:`markov_attn.nn.load_run` reads back the weights alone (``restore(..., partial=True)``),
without the optimiser state. Orbax writes each step into a temporary directory and renames it
when complete, so a process killed while saving leaves the previous checkpoints intact.
Restoring goes into an *abstract* target (``nnx.eval_shape`` / ``jax.eval_shape``), so no
memory is spent on a throw-away initialisation.
"""

import logging
import os
import pathlib


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupt, truncated, or another model)."""


class Checkpointer:
    """Saves and restores ``(state, meta)`` under ``directory/<step>``.

    Args:
      directory: checkpoint root (created if missing).
      max_to_keep: checkpoints kept on disk (oldest removed first).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        import orbax.checkpoint as ocp  # only here: importing markov_attn.nn stays light

        self.directory = pathlib.Path(directory).absolute()
        logging.getLogger("absl").setLevel(logging.WARNING)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Writes ``state`` (a pytree of arrays) and ``meta`` (JSON) as checkpoint ``step``."""
        import orbax.checkpoint as ocp

        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, abstract_state, *, step: int | None = None, partial: bool = False):
        """Reads checkpoint ``step`` (default: the latest) into the structure of ``abstract_state``.

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (from ``nnx.eval_shape`` /
            ``jax.eval_shape``) with the structure, shapes and dtypes to restore into.
          step: which checkpoint; default the latest.
          partial: ``abstract_state`` names a subset of the stored top-level entries (e.g. only
            ``{"params": ...}``); the others (the optimiser state) are not read. The arrays
            are placed on the default device.

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: if there is no checkpoint.
          CheckpointError: if the checkpoint cannot be read or does not match
            ``abstract_state``; the message names the directory to delete.
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        import jax
        import orbax.checkpoint as ocp

        path = self.directory / str(step)
        if partial:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            item = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state
            )
            state_args = ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
            )
            state, meta = out["state"], out["meta"]
            if not isinstance(meta, dict) or "step" not in meta:
                raise ValueError("the meta item is missing or has no 'step'")
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} cannot be restored ({type(e).__name__}: {e}). It is corrupt, "
                f"truncated, or from a different model/optimiser. Delete {path} to resume from "
                "an earlier checkpoint, or start a fresh run in another workdir."
            ) from e
        return state, meta

    def read_meta(self, *, step: int | None = None) -> dict:
        """Only the JSON ``meta`` of checkpoint ``step`` (default: the latest)."""
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        import orbax.checkpoint as ocp

        try:
            out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out["meta"]
            if not isinstance(meta, dict) or "step" not in meta:
                raise ValueError("the meta item is missing or has no 'step'")
        except Exception as e:
            path = self.directory / str(step)
            raise CheckpointError(
                f"the metadata of checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                f"delete {path} or start a fresh run in another workdir"
            ) from e
        return meta

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
