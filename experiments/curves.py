"""The learning-curve figure of a training run, drawn from its ``metrics.jsonl``.

``python -m experiments.curves runs/demo`` writes ``runs/demo/learning_curve.png``: training
loss and accuracy (means over each logged window of steps) and the test accuracy at every
evaluation (``eval_every``, and the final one), against the optimiser step. A run trained on
another generator level than the benchmark's also shows its final accuracy on the standard
test split (one marker).
"""

import json
import pathlib
import sys


def read_metrics(workdir, /, *, split: str = "test") -> tuple[list[dict], list[dict]]:
    """``(train lines, test lines)`` of ``workdir/metrics.jsonl``, each sorted by step;
    ``split="test_standard"`` gives the lines of the benchmark's test split instead (runs on
    another generator level)."""
    text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    train = sorted((r for r in lines if "loss" in r), key=lambda r: r["step"])
    test = sorted((r for r in lines if r.get("split") == split), key=lambda r: r["step"])
    return train, test


def plot_learning_curve(workdir, /, *, path=None, title: str | None = None) -> pathlib.Path:
    """Draws the learning curve of run ``workdir``; returns the PNG's path.

    Args:
      workdir: run directory with ``metrics.jsonl``.
      path: output file (default ``workdir/learning_curve.png``).
      title: figure title (default: the directory name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = pathlib.Path(workdir)
    path = pathlib.Path(path) if path is not None else workdir / "learning_curve.png"
    train, test = read_metrics(workdir)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], label="train loss (window mean)")
    if test:
        ax_loss.plot([r["step"] for r in test], [r["test_loss"] for r in test], "o-",
                     label="test loss")  # fmt: skip
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(steps, [r["acc"] for r in train], label="train accuracy (window mean)")
    if test:
        ax_acc.plot([r["step"] for r in test], [r["test_acc"] for r in test], "o-",
                    label=f"test accuracy ({test[-1]['test_size']} images)")  # fmt: skip
        ax_acc.annotate(f"{test[-1]['test_acc']:.3f}", (test[-1]["step"], test[-1]["test_acc"]),
                        textcoords="offset points", xytext=(-30, 6))  # fmt: skip
    standard = read_metrics(workdir, split="test_standard")[1]
    for r in standard[-1:]:
        ax_acc.plot([r["step"]], [r["test_acc"]], "s", color="C3",
                    label=f"standard-level test accuracy: {r['test_acc']:.3f}")  # fmt: skip
    ax_acc.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    top = max([r["acc"] for r in train] + [r["test_acc"] for r in test] + [0.1])
    ax_acc.set_ylim(0, min(1.0, top + 0.1))
    ax_acc.legend()
    fig.suptitle(title or workdir.name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m experiments.curves RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    for workdir in argv:
        print(plot_learning_curve(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
