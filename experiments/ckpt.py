"""A small wrapper over Orbax's ``CheckpointManager`` for the training runs.

A checkpoint holds one pytree (the model's ``nnx.State`` of parameters and the optimiser state)
and a JSON ``meta`` dict (step, data position, config). Orbax writes each step into a temporary
directory and renames it when complete, so a process killed while saving leaves the previous
checkpoints intact. Restoring goes into an *abstract* target (``nnx.eval_shape`` /
``jax.eval_shape``), so no memory is spent on a throw-away initialisation.
"""

import logging
import os
import pathlib

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupt, truncated, or another model)."""


class Checkpointer:
    """Saves and restores ``(state, meta)`` under ``directory/<step>``.

    Args:
      directory: checkpoint root (created if missing).
      max_to_keep: checkpoints kept on disk (oldest removed first).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
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
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, abstract_state, *, step: int | None = None):
        """Reads checkpoint ``step`` (default: the latest) into the structure of ``abstract_state``.

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (from ``nnx.eval_shape`` /
            ``jax.eval_shape``) with the structure, shapes and dtypes to restore into.
          step: which checkpoint; default the latest.

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
        path = self.directory / str(step)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
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
