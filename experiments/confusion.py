"""Per-class accuracy and confusion matrix of a trained ViT on its test split.

Where a classifier's errors go says more than its accuracy: on the benchmark (Fashion-MNIST
objects on photos) the misses of the CPU reference runs gather in the four upper-body garment
classes, as they do on Fashion-MNIST itself. Writes ``confusion.json`` (counts, per-class
accuracy and recall-normalised matrix, with the command) and ``confusion.png`` (rows
normalised to 1, one colour bar) into ``--out`` (default: the run directory), prints a
Markdown table and, with ``--update-readme``, writes it into the README's ``--block``.

    python -m experiments.confusion --workdir runs/cpu_ref
    python -m experiments.confusion --weights experiments/reference/vit_reference.npz --out runs/c
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from .readme import command_line, publish

BLOCK = "confusion"


def predict(model, images: np.ndarray, *, batch_size: int = 250) -> np.ndarray:
    """Class predictions ``(n,)`` of an NNX ViT (``model(x) -> (logits, aux)``) for uint8
    images ``(n, h, w, 3)``, in evaluation mode (batch norms use their running averages)."""
    import jax.numpy as jnp
    from flax import nnx

    model.eval()

    @nnx.jit
    def logits(m, x):
        return m(x.astype(jnp.float32) / 255.0)[0]

    out = []
    for start in range(0, len(images), batch_size):
        out.append(np.asarray(logits(model, jnp.asarray(images[start : start + batch_size]))))
    return np.concatenate(out).argmax(-1)


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``counts[true, predicted]``."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, preds), 1)
    return counts


def summary(counts: np.ndarray, classes) -> dict:
    """Accuracy, per-class recall with a 95 % Wilson interval, and each class's most frequent
    wrong prediction."""
    n = counts.sum(1)
    hits = np.diag(counts)
    rows = []
    for c, name in enumerate(classes):
        wrong = counts[c].copy()
        wrong[c] = -1
        worst = int(wrong.argmax())
        lo, hi = _wilson(int(hits[c]), int(n[c]))
        rows.append(
            {
                "class": name,
                "n": int(n[c]),
                "recall": float(hits[c] / max(n[c], 1)),
                "recall_ci": [lo, hi],
                "most_confused_with": classes[worst] if n[c] > hits[c] else "—",  # no misses
                "share_of_misses": float(counts[c, worst] / max(n[c] - hits[c], 1)),
            }
        )
    misses = n - hits
    low4 = np.argsort(hits / np.maximum(n, 1))[:4]
    return {
        "accuracy": float(hits.sum() / max(n.sum(), 1)),
        "classes": rows,
        "lowest4_share_of_misses": float(misses[low4].sum() / max(misses.sum(), 1)),
    }


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


def table(result: dict, command: str) -> str:
    lines = [
        "| class | test images | recall (95 % CI) | most often taken for | share of its misses |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(result["classes"], key=lambda r: r["recall"]):
        lo, hi = r["recall_ci"]
        lines.append(
            f"| {r['class']} | {r['n']} | {100 * r['recall']:.1f} % [{100 * lo:.1f}, "
            f"{100 * hi:.1f}] | {r['most_confused_with']} | {100 * r['share_of_misses']:.0f} % |"
        )
    lines += [
        "",
        f"{result['model']}: test accuracy {100 * result['accuracy']:.1f} % on "
        f"{result['n_images']} test images ({result['difficulty']} level); the four classes of "
        f"lowest recall hold {100 * result['lowest4_share_of_misses']:.0f} % of the misses. "
        "Recall = the share of a class's test images predicted as that class; intervals are "
        "Wilson's. "
        f"Command: `{command}`.",
    ]
    return "\n".join(lines)


def figure(counts: np.ndarray, classes, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.2, 6))
    im = ax.imshow(frac, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j]:
                colour = "black" if frac[i, j] > 0.5 else "white"
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, c=colour)
    fig.colorbar(im, ax=ax, label="share of the true class (rows sum to 1)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m experiments.confusion", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run directory (its last checkpoint)")
    src.add_argument("--weights", help="a weights file written by train.save_weights (.npz)")
    p.add_argument("--out", help="where to write (default: the run directory)")
    p.add_argument("--n-images", type=int, help="test images (default: the run's test_size)")
    p.add_argument("--update-readme", nargs="?", const="README.md", metavar="README")
    p.add_argument("--block", default=BLOCK, help="README block to write")
    a = p.parse_args(argv)
    from markov_attn.data._fashion_mnist import CLASSES

    from .train import load_data, load_model, load_weights

    t0 = time.perf_counter()
    model, cfg = load_weights(a.weights) if a.weights else load_model(a.workdir)
    if a.out is None and a.weights:
        p.error("--out is required with --weights")
    out = pathlib.Path(a.out or a.workdir)
    out.mkdir(parents=True, exist_ok=True)
    n = a.n_images or cfg.test_size
    # the test split only matters; the smallest training split the config accepts
    small = dataclasses.replace(cfg, train_size=cfg.batch_size, test_size=n)
    test = load_data(small)["test"]
    preds = predict(model, test["images"])
    counts = confusion(test["labels"], preds, len(CLASSES))
    result = summary(counts, CLASSES)
    name = a.weights or a.workdir
    result.update(
        model=f"`{name}` ({cfg.name} preset, {cfg.model.image_size} px)",
        n_images=int(n),
        difficulty=cfg.difficulty,
        counts=counts.tolist(),
        command=command_line("experiments.confusion", argv),
        seconds=round(time.perf_counter() - t0, 1),
    )
    (out / "confusion.json").write_text(json.dumps(result, indent=1))
    figure(counts, CLASSES, out / "confusion.png", f"{name}: {100 * result['accuracy']:.1f} %")
    publish(table(result, result["command"]), a.update_readme, a.block)
    print(f"wrote {out / 'confusion.json'} and {out / 'confusion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
