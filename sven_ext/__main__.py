"""Command line: ``python -m sven_ext <command>`` (also installed as ``sven-ext``).

Commands:
    demo   Sven against Adam on the paper's 1-D regression; prints a table, saves a plot.
    info   versions, whether the CUDA kernels were compiled, whether a GPU is visible.
    bench  benchmarks: convergence against other optimizers, scaling, their report and plots.

Each command is a module-level pair in ``COMMANDS``: a function adding its flags to
an ``argparse`` subparser and a function running it from the parsed namespace.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _add_demo(parser: argparse.ArgumentParser) -> None:
    from . import demo

    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


def _add_bench(parser: argparse.ArgumentParser) -> None:
    from .harness import cli

    cli.add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from .harness import cli

    return cli.main(args)


def _add_info(parser: argparse.ArgumentParser) -> None:
    del parser  # no flags


def _run_info(args: argparse.Namespace) -> int:
    del args
    import torch

    import sven_ext

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"sven_ext           {sven_ext.__version__}")
    print(f"torch              {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"CUDA kernels built {'yes' if sven_ext.WITH_CUDA else 'no'}")
    print(f"GPU available      {gpu}")
    return 0


# name -> (help, add flags, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "demo": (
        "train the paper's 1-D regression with Sven and with Adam, print a table, save a plot",
        _add_demo,
        _run_demo,
    ),
    "info": ("print versions and whether CUDA kernels and a GPU are available", _add_info, _run_info),
    "bench": (
        "benchmarks: convergence against Adam, SGD, RMSprop, Polyak-SGD and L-BFGS; scaling; report; plots",
        _add_bench,
        _run_bench,
    ),
}


def _missing_package(command: str, exc: ModuleNotFoundError) -> str:
    package = (exc.name or "").partition(".")[0] or str(exc)
    return (f"python -m sven_ext {command}: needs the Python package {package!r}, which is not installed "
            f"(pip install {package})")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, one subparser per entry of ``COMMANDS``.

    A command whose module needs a package that is not installed still gets its
    subparser (without its flags, ``missing`` set); the other commands work.
    """
    parser = argparse.ArgumentParser(prog="python -m sven_ext", description="Sven (Singular Value dEsceNt) tools.")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        try:
            add_arguments(sub)
        except ModuleNotFoundError as exc:
            sub.set_defaults(missing=exc)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default: ``sys.argv[1:]``) and runs the command; returns its exit status.

    A package the command needs that is not installed is reported by name on stderr
    (exit status 1) instead of a traceback.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    missing = getattr(args, "missing", None)
    if missing is not None:
        print(_missing_package(args.command, missing), file=sys.stderr)
        return 1
    if unknown:
        parser.error("unrecognized arguments: " + " ".join(unknown))
    try:
        return args.run(args)
    except ModuleNotFoundError as exc:
        print(_missing_package(args.command, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
