"""The training-run machinery that ``experiments.train`` (the ViT classifier) and
``experiments.train_dit`` (the diffusion transformer) share; what they train, checkpoint and
evaluate stays in them.

A run directory holds ``checkpoints/<step>/`` (Orbax, with the config in each checkpoint's
meta), ``metrics.jsonl`` (one JSON line per logged window of steps, plus test lines) and
``summary.json``. A :class:`TrainingRun` is one process's part of such a run::

    run = TrainingRun(cfg, workdir, free_fields=...)   # refuses another run's checkpoint
    state = init() if run.latest is None else unpack(run.restore(abstract)[0])
    state = run.train(state, step_fn, summarise=..., postfix=..., saved=...)
    if run.stopped_early: ...                          # stop_after: as if killed there
    run.append({"step": cfg.steps, "split": "test", "final": True, **test})
    summary = run.summary(test, head={"name": cfg.name, ...}, params=count_params(...))

Its loop owns what both scripts need around the step: the windowed metrics log
(:class:`MetricsLog`), the progress bar, periodic evaluation and checkpoint saving (their time
is excluded from the step time), ``stop_after`` and an ``on_step`` callback after every step
(the kill tests' SIGKILL is one: :func:`sigkill_at`). Resuming truncates ``metrics.jsonl`` to
the checkpoint's step, so a killed run rewrites the same lines. The step time of the summary is
the steady state: the first window of a session holds the compilation and is left out, unless
it is the session's only one.
"""

import contextlib
import json
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable, Collection, Mapping

import jax
import numpy as np

from markov_attn.nn import config_to_dict

from .ckpt import Checkpointer

__all__ = [
    "TABLE_FREE",
    "VIT_ASSUMED",
    "MetricsLog",
    "TrainingDiverged",
    "TrainingRun",
    "check_same_run",
    "count_params",
    "read_metrics",
    "same_config",
    "truncate_metrics",
]


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: the run stops instead of training on (and then
    evaluating) non-finite weights. ``step`` is the last step of the first log window whose mean
    loss was not finite; ``checkpoint`` the run's last checkpoint before it (``None``: none)."""

    def __init__(self, message: str, *, step: int, checkpoint: int | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def check_same_run(
    stored: Mapping,
    current: Mapping,
    workdir: str | os.PathLike,
    /,
    *,
    free_fields: Collection[str] = (),
    assumed: Mapping | None = None,
) -> None:
    """Refuses to resume a checkpoint of another configuration.

    Args:
      stored: the config dict in the checkpoint's meta.
      current: the config dict of the run now (:func:`markov_attn.nn.config_to_dict`).
      workdir: the run directory (named in the message).
      free_fields: fields a resumed run may change (they do not change the trajectory).
      assumed: values of fields that runs written before the field existed did not store; a
        mapping value fills the missing keys of a nested config (``{"model": {"field": v}}``).

    Raises:
      ValueError: naming the first differing field (in sorted order) and both values.
    """
    assumed = assumed or {}
    for key in sorted(set(stored) | set(current)):
        if key in free_fields:
            continue
        old = stored[key] if key in stored else assumed.get(key)
        if isinstance(old, Mapping) and isinstance(assumed.get(key), Mapping):
            old = {**assumed[key], **old}  # nested fields older runs did not store
        if old != current.get(key):
            raise ValueError(
                f"{workdir} holds a checkpoint of a different run ({key}: stored "
                f"{old!r}, now {current.get(key)!r}); use another --workdir or "
                f"delete {workdir}"
            )


#: Config fields that do not change a finished run's numbers (checkpointing, evaluation
#: batching and cadence, the name, where the data came from): a table may reuse such a run.
TABLE_FREE = (
    "name",
    "data_root",
    "ckpt_every",
    "keep_checkpoints",
    "eval_batch_size",
    "eval_every",
)


#: Values of fields that ViT runs saved before the fields existed did not store (they had
#: these values): the standard difficulty level, the position-embedding grid at image_size.
VIT_ASSUMED = {"difficulty": "standard", "model": {"pos_size": None}}


def same_config(stored, cfg, /, *, free: Collection[str] = TABLE_FREE) -> bool:
    """Whether a finished run's stored config dict is ``cfg``'s (a config dataclass), up to the
    ``free`` fields (runs from before the difficulty levels are on the standard level)."""
    if not isinstance(stored, Mapping):
        return False
    try:
        check_same_run(stored, config_to_dict(cfg), "", free_fields=free, assumed=VIT_ASSUMED)
    except ValueError:
        return False
    return True


def read_metrics(path: pathlib.Path) -> list[tuple[str, dict]]:
    """The ``(line, record)`` pairs of a ``metrics.jsonl``, blank lines skipped. A last line
    torn by a crash mid-write is dropped; a line that is not JSON elsewhere is a ``ValueError``
    naming the file and the line."""
    lines = path.read_text().splitlines()
    last = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise ValueError(f"{path}, line {i + 1}: not JSON ({e}); fix or delete the line") from e
    return out


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drops metric lines logged after ``step`` and final lines (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = [
        line
        for line, rec in read_metrics(path)
        if rec.get("step", 0) <= step and not rec.get("final")
    ]
    path.write_text("".join(x + "\n" for x in keep))


def count_params(tree) -> int:
    """Number of scalars in the arrays of ``tree``."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class MetricsLog:
    """Windowed training metrics: one ``metrics.jsonl`` line per ``log_every`` steps and one at
    the run's last step.

    A line is ``{"step", **position(step), **summarise(window), "step_time_ms", "img_per_s",
    "elapsed_s"}``: ``window`` is the list of the window's step metrics (on the host) and the
    times are of the window, less the time spent inside :meth:`untimed` (evaluation,
    checkpoints). The windows after the session's first (which holds the compilation) add up to
    the steady-state step time, :meth:`step_time`.

    Args:
      path: the ``metrics.jsonl`` file (appended to).
      start: the step the session starts from.
      steps: the run's last step (always logged).
      log_every: steps per window.
      batch_size: images per step.
      summarise: ``window -> dict`` of the line's metrics.
      position: ``step -> dict`` of extra fields after ``"step"`` (e.g. the epoch).
      clock: seconds (``time.perf_counter``; tests pass their own).
    """

    def __init__(
        self,
        path: pathlib.Path,
        *,
        start: int,
        steps: int,
        log_every: int,
        batch_size: int,
        summarise: Callable[[list], dict],
        position: Callable[[int], dict] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.steps, self.log_every, self.batch_size = steps, log_every, batch_size
        self.summarise, self.position, self.clock = summarise, position, clock
        self.file = pathlib.Path(path).open("a")
        self.start = self.window_start = start
        self.window, self.paused, self.last = [], 0.0, {}
        self.timed_steps, self.timed_s = 0, 0.0
        self.t0 = self.t = clock()

    def step(self, done: int, metrics) -> dict | None:
        """Records the metrics of global step ``done``; returns the line if it wrote one."""
        self.window.append(metrics)
        if done % self.log_every and done != self.steps:
            return None
        window = jax.device_get(self.window)
        now = self.clock()
        dt, k = now - self.t - self.paused, done - self.window_start
        if self.window_start > self.start:  # the first window of a session holds compilation
            self.timed_steps, self.timed_s = self.timed_steps + k, self.timed_s + dt
        position = self.position(done) if self.position is not None else {}
        self.last = {
            "step": done,
            **position,
            **self.summarise(window),
            "step_time_ms": 1e3 * dt / k,
            "img_per_s": k * self.batch_size / dt,
            "elapsed_s": now - self.t0,
        }
        self.write(self.last)
        self.window, self.window_start, self.t, self.paused = [], done, self.clock(), 0.0
        return self.last

    def write(self, record: dict) -> None:
        """Appends one line (flushed)."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    @contextlib.contextmanager
    def untimed(self):
        """Time spent inside is not step time (it is left out of the current window)."""
        t = self.clock()
        try:
            yield
        finally:
            self.paused += self.clock() - t

    def step_time(self, *, fallback_steps: int, fallback_s: float) -> tuple[int, float]:
        """``(steps timed, seconds per step)`` over the windows after the session's first;
        ``fallback_steps`` in ``fallback_s`` if there were none (NaN if that is none either)."""
        steps, seconds = self.timed_steps, self.timed_s
        if steps == 0 and fallback_steps > 0:  # a single window: fall back to it (incl. compile)
            steps, seconds = fallback_steps, fallback_s
        return steps, seconds / steps if steps else float("nan")

    def close(self) -> None:
        self.file.close()


def sigkill_at(step: int | None, /) -> Callable[[int, object], None] | None:
    """An ``on_step`` callback that SIGKILLs this process once global step ``step`` is done (its
    checkpoint, if any, written): how the kill-and-resume tests kill a run mid-way through the
    command line's hidden ``--kill-at-step``. ``None`` for ``step=None``."""
    if step is None:
        return None

    def kill(done: int, state) -> None:
        if done == step:
            jax.block_until_ready(state)
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


class TrainingRun:
    """One process's part of a training run in ``workdir``: from its last checkpoint (if any) to
    the end of the run, or to ``stop_after``.

    Opening refuses a checkpoint of another configuration (before any expensive work).

    Args:
      cfg: the run's config, a frozen dataclass with ``steps``, ``batch_size``, ``log_every``,
        ``ckpt_every`` and ``keep_checkpoints`` (stored as :func:`markov_attn.nn.config_to_dict`).
      workdir: the run directory (created if needed).
      free_fields: config fields a resumed run may change (:func:`check_same_run`).
      assumed: values of config fields that older checkpoints did not store.
      stop_after: stop after this global step without a final checkpoint, as if killed there.
      on_step: ``(step, state) -> None``, called after each global step once its log line,
        evaluation and checkpoint are written (e.g. :func:`sigkill_at`).
      progress: keyword arguments of the tqdm progress bar (``desc`` ...), or ``None``: no bar.

    Attributes:
      latest: the step of the last checkpoint (``None``: a new run).
      start: the step this session starts from (set by :meth:`restore`).
      end: the step it stops after (``min(steps, stop_after)``).
      config: the stored config dict.
      metrics_path: ``workdir/metrics.jsonl``.
    """

    def __init__(
        self,
        cfg,
        workdir: str | os.PathLike,
        /,
        *,
        free_fields: Collection[str],
        assumed: Mapping | None = None,
        stop_after: int | None = None,
        on_step: Callable[[int, object], None] | None = None,
        progress: Mapping | None = None,
    ):
        self.t_start = time.perf_counter()
        self.cfg, self.workdir = cfg, pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.config = config_to_dict(cfg)
        self.on_step, self.progress = on_step, progress
        self.start, self.end = 0, cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        self.log, self.train_time = None, 0.0
        self.ckpt = Checkpointer(self.workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)
        self.latest = self.ckpt.latest_step()
        if self.latest is not None:
            try:
                stored = self.ckpt.read_meta(step=self.latest).get("config", {})
                check_same_run(
                    stored, self.config, self.workdir, free_fields=free_fields, assumed=assumed
                )
            except BaseException:
                self.ckpt.close()
                raise

    @property
    def stopped_early(self) -> bool:
        """Whether this session stopped before the run's last step (``stop_after``)."""
        return self.end < self.cfg.steps

    @property
    def last(self) -> dict:
        """The last metrics line this session wrote (``{}`` if none)."""
        return self.log.last if self.log is not None else {}

    def restore(self, abstract) -> tuple[object, dict]:
        """``(state, meta)`` of the last checkpoint (``abstract``: its shapes and dtypes); the
        session then starts from its step.

        Raises:
          CheckpointError: if it cannot be restored.
        """
        state, meta = self.ckpt.restore(abstract, step=self.latest)
        self.start = int(meta["step"])
        return state, meta

    def train(
        self,
        state,
        step_fn: Callable[[object, int], tuple[object, dict]],
        /,
        *,
        summarise: Callable[[list], dict],
        postfix: Callable[[dict], dict],
        saved: Callable[[object], object] = lambda state: state,
        position: Callable[[int], dict] | None = None,
        evaluate: Callable[[object], dict] | None = None,
        eval_every: int = 0,
    ):
        """Runs the steps ``start … end - 1`` and returns the state after them; raises
        :class:`TrainingDiverged` at the first log line whose loss is NaN or infinite (before
        that step's evaluation and checkpoint).

        After each global step ``done`` it logs (:class:`MetricsLog`), evaluates every
        ``eval_every`` steps before the last (a ``{"step", "split": "test", **evaluate(state)}``
        line), saves a checkpoint every ``ckpt_every`` steps and at the last (``saved(state)``
        with meta ``{"step", **position(done), "config"}``), moves the progress bar and calls
        ``on_step(done, state)``. Closes the checkpointer.

        Args:
          state: the training state (a pytree).
          step_fn: ``(state, step) -> (state, metrics)``, one optimiser step.
          summarise: ``window -> dict``, the metrics of a log line (:class:`MetricsLog`).
          postfix: ``line -> dict``, the progress bar's postfix of a log line.
          saved: ``state -> the checkpointed pytree``.
          position: ``step -> dict``, fields after ``"step"`` in log lines and checkpoint meta.
          evaluate: ``state -> dict`` of test metrics, for ``eval_every``.
          eval_every: steps between evaluations (``0``: none).
        """
        cfg = self.cfg
        truncate_metrics(self.metrics_path, self.start)
        bar = None
        if self.progress is not None and self.start < self.end:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start, dynamic_ncols=True, **self.progress)
        self.log = log = MetricsLog(
            self.metrics_path,
            start=self.start,
            steps=cfg.steps,
            log_every=cfg.log_every,
            batch_size=cfg.batch_size,
            summarise=summarise,
            position=position,
        )
        try:
            for step in range(self.start, self.end):
                state, metrics = step_fn(state, step)
                done = step + 1
                line = log.step(done, metrics)
                if line is not None and not math.isfinite(line.get("loss", 0.0)):
                    saved_at = self.ckpt.latest_step()
                    raise TrainingDiverged(
                        f"{self.workdir}: the training loss became {line['loss']} in steps "
                        f"{done - cfg.log_every + 1}-{done}; the run stops here (its last "
                        f"checkpoint: {saved_at}). Lower the learning rate, lengthen the warm-up "
                        "or clip the gradients harder, or try another seed",
                        step=done,
                        checkpoint=saved_at,
                    )
                if line is not None and bar is not None:
                    bar.set_postfix(**postfix(line))
                if evaluate and eval_every and done % eval_every == 0 and done < cfg.steps:
                    with log.untimed():
                        log.write({"step": done, "split": "test", **evaluate(state)})
                if done % cfg.ckpt_every == 0 or done == cfg.steps:
                    where = position(done) if position is not None else {}
                    meta = {"step": done, **where, "config": self.config}
                    with log.untimed():
                        self.ckpt.save(done, saved(state), meta)
                if bar is not None:
                    bar.update(1)
                if self.on_step is not None:
                    self.on_step(done, state)
            self.train_time = self.log.clock() - self.log.t0
        finally:
            log.close()
            self.ckpt.close()
            if bar is not None:
                bar.close()
        return state

    def append(self, record: dict) -> None:
        """Appends one line to ``metrics.jsonl`` (after :meth:`train`: the final test lines)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def train_lines(self) -> list[dict]:
        """The training lines of ``metrics.jsonl`` (those with a ``"loss"``), of all sessions."""
        history = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        return [h for h in history if "loss" in h]

    def step_time(self) -> tuple[int, float]:
        """``(steps timed, seconds per step)`` in the steady state (:meth:`MetricsLog.step_time`;
        a session with a single window falls back to its whole training time)."""
        return self.log.step_time(fallback_steps=self.end - self.start, fallback_s=self.train_time)

    def summary(
        self, results: dict, /, *, head: dict, params: int, extra: dict | None = None
    ) -> dict:
        """Writes ``summary.json`` and returns it: ``head`` (the run's name, seed ...),
        ``steps``, ``resumed_from``, ``results`` (test and training metrics), the steady-state
        ``step_time_ms`` and ``images_per_s`` (``None`` if no step ran), ``extra``, ``params``,
        ``train_time_s``, ``wall_time_s``, ``backend``, ``device`` and ``config``."""
        _, step_time = self.step_time()
        finite = math.isfinite(step_time)
        summary = {
            **head,
            "steps": self.cfg.steps,
            "resumed_from": self.start,
            **results,
            "step_time_ms": 1e3 * step_time if finite else None,
            "images_per_s": self.cfg.batch_size / step_time if finite else None,
            **(extra or {}),
            "params": params,
            "train_time_s": self.train_time,
            "wall_time_s": time.perf_counter() - self.t_start,
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
            "config": self.config,
        }
        path = self.workdir / "summary.json"
        if self.start == self.end and path.exists():
            # nothing trained in this session (a finished run evaluated again, e.g. a second
            # `make demo`): its timing is the training session's, not this one's zero steps
            old = json.loads(path.read_text())
            for key in ("step_time_ms", "images_per_s", "train_time_s", "timed_steps"):
                if key in old:
                    summary[key] = old[key]
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
