"""The command-line grammar every tool shares: argument parsers that import nothing heavy.

A tool builds its parser from these helpers, parses, and only then imports torch and the rest of
the package, so ``--help`` and a mistyped flag answer at once. The grammar:

- a dataset is ``--annotations JSON --images DIR`` in every tool that reads one;
- ``--workers N`` is the number of loader workers (processes or threads) everywhere;
- ``--output FILE`` is a tool's one result file; ``--output-dir DIR`` is the folder of a tool
  that writes several files (``--output`` is accepted there too, as earlier releases spelled it);
- every option's default is shown in ``--help``.
"""

from __future__ import annotations

import argparse

ON_INVALID = ("error", "clip", "repair")  # data.on_invalid's values (config.DataConfig), for --on-invalid


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default after its help (not for
    switches, options without a default, or help that already states its default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options without a help text still show their default."""

    def add_argument(self, *args, **kwargs):  # type: ignore[override]
        if args and str(args[0]).startswith("-") and kwargs.get("default") is not None and not kwargs.get("help"):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


def parser(doc: str | None, **kw) -> argparse.ArgumentParser:
    """A tool's argument parser: its docstring as the description, defaults shown.

    Args:
        doc: the tool's module docstring.
        **kw: passed to ``argparse.ArgumentParser``.
    """
    return Parser(description=doc, formatter_class=HelpFormatter, **kw)


def add_dataset_positional(ap: argparse.ArgumentParser, images: bool = True) -> None:
    """A dataset as ``--annotations JSON [--images DIR]`` or, as earlier releases took it, as
    positional ``ANNOTATIONS [IMAGES]``; :func:`dataset_paths` reads either.

    Args:
        ap: the parser.
        images: whether the tool takes an image root too.
    """
    ap.add_argument("annotations_arg", nargs="?", metavar="ANNOTATIONS", help="the same as --annotations")
    if images:
        ap.add_argument("images_arg", nargs="?", metavar="IMAGES", help="the same as --images")
    ap.add_argument("--annotations", metavar="JSON", help="the COCO json")
    if images:
        ap.add_argument(
            "--images", metavar="DIR", help="the image root that the json's file_name entries are relative to"
        )


def dataset_paths(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sets ``args.annotations`` (and ``args.images``) from the flags or the positionals; exits
    with a usage error when one is missing or given twice differently."""
    for name in ("annotations", "images"):
        if not hasattr(args, f"{name}_arg"):
            continue
        flag, positional = getattr(args, name), getattr(args, f"{name}_arg")
        if flag is not None and positional is not None and flag != positional:
            ap.error(f"the {name} are given twice: --{name} {flag} and {positional}")
        if flag is None and positional is None:
            ap.error(f"--{name} is required")
        setattr(args, name, flag if flag is not None else positional)


def add_on_invalid(ap: argparse.ArgumentParser) -> None:
    """``--on-invalid``: what to do with boxes that are not valid, as the training key ``data.on_invalid``."""
    ap.add_argument(
        "--on-invalid",
        choices=ON_INVALID,
        default="clip",
        help="as data.on_invalid: clip accepts boxes that overhang the image, counted (training clips them); "
        "repair also drops what cannot be used, counted; error stops at the first",
    )


def add_workers(ap: argparse.ArgumentParser, default: int, what: str) -> None:
    """``--workers N``: loader workers.

    Args:
        ap: the parser.
        default: the tool's default.
        what: what the workers do, for the help.
    """
    ap.add_argument("--workers", type=int, default=default, metavar="N", help=what)


def add_output_dir(ap: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """``--output-dir DIR`` (also spelled ``--output``): the folder a tool writes its files to.

    Args:
        ap: the parser.
        default: the folder when none is given (None: the tool decides, as its help says).
        what: what goes there, for the help.
    """
    ap.add_argument("--output-dir", "--output", dest="output_dir", default=default, metavar="DIR", help=what)


def add_slice_args(ap: argparse.ArgumentParser) -> None:
    """--slice/--overlap/--no-full-pass/--slice-iou, shared by tools/infer.py and tools/evaluate.py."""
    g = ap.add_argument_group("sliced inference (images much larger than the model's input)")
    g.add_argument("--slice", type=int, metavar="PX", help="detect by PX x PX tiles of the full-resolution image")
    g.add_argument("--overlap", type=float, default=0.2, help="tile overlap, a fraction of --slice")
    g.add_argument("--no-full-pass", action="store_true", help="tiles only (no whole-image pass merged in)")
    g.add_argument("--slice-iou", type=float, default=0.5, help="overlap of one object's duplicates")
    g.add_argument("--slice-merge", choices=["nmm", "nms"], default="nmm",
                   help="merge duplicates into one (nmm) or keep the best (nms)")  # fmt: skip
    g.add_argument("--slice-metric", choices=["ios", "iou"], default="ios",
                   help="duplicates by intersection over the smaller box (ios) or IoU")  # fmt: skip
