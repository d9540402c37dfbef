"""Writing generated Markdown into the README between ``<!-- name:start -->`` and
``<!-- name:end -->`` markers (one helper for every script that publishes a table)."""

import pathlib


def markers(name: str, /) -> tuple[str, str]:
    """The start and end markers of block ``name``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(readme, name: str, text: str, /) -> None:
    """Replaces the text between the ``name`` markers of ``readme`` with ``text``.

    Raises:
      ValueError: if the markers are missing or out of order (nothing is written).
    """
    src, i, j = _block_span(readme, name)
    pathlib.Path(readme).write_text(src[:i] + "\n" + text.rstrip("\n") + "\n" + src[j:])


def check_block(readme, name: str, /) -> None:
    """Raises the :func:`replace_block` error now if ``readme`` lacks the ``name`` markers (so
    that a long run does not end in it)."""
    _block_span(readme, name)


def _block_span(readme, name: str, /) -> tuple[str, int, int]:
    """The text of ``readme`` and where its ``name`` block's content starts and ends."""
    start, end = markers(name)
    src = pathlib.Path(readme).read_text()
    i, j = src.find(start), src.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(
            f"{readme} must contain the markers {start} and {end} (in that order); add them "
            f"where the {name} block should go"
        )
    return src, i + len(start), j


def publish(text: str, readme, name: str, /) -> None:
    """Prints a generated table and, when ``readme`` is given (a script's ``--update-readme``),
    writes it into that file's ``name`` block."""
    print(text)
    if readme:
        replace_block(readme, name, text)
        print(f"updated {readme}")


def command_line(prog: str, argv, /, *, drop=("--update-readme",)) -> str:
    """The command that reproduces a table, for its README block: ``python -m prog`` and
    ``argv`` without the flags in ``drop`` (``--update-readme`` and its optional README path:
    where a table is copied is not how it is made).

    Examples:
      >>> command_line("experiments.x", ["--a", "1", "--update-readme", "R.md", "--b"])
      'python -m experiments.x --a 1 --b'
      >>> command_line("experiments.x", ["--update-readme", "--a", "1"])
      'python -m experiments.x --a 1'
      >>> command_line("experiments.x", ["--s", "0", "--update-readme=R.md", "--update-rea", "R"])
      'python -m experiments.x --s 0'
    """
    out, args, i = [], list(argv), 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        # argparse also takes --flag=value and unambiguous abbreviations (--update-rea)
        hit = next((d for d in drop if name == d or (len(name) > 3 and d.startswith(name))), None)
        if hit is not None:
            i += 1
            path_follows = hit == "--update-readme" and not eq
            if path_follows and i < len(args) and not args[i].startswith("-"):
                i += 1  # its README path
            continue
        out.append(args[i])
        i += 1
    return " ".join(["python -m " + prog, *out])
