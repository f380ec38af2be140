"""The command-line interface: the one place where errors become messages and exit codes.

    cfgdiff train   --dataset mnist --out runs/NAME [--preset P] [--steps N] ...
    cfgdiff sample  --checkpoint PATH (--scale S | --w W) --out FILE.png|FILE.npz|FOLDER ...
    cfgdiff eval    --checkpoint PATH (--scale S | --w W) [--n N]   (class accuracy, FID, ...)
    cfgdiff sweep   --checkpoint PATH [--scales S,S,...] [--n N]   (metrics across scales)
    cfgdiff export  --checkpoint PATH --out FILE.safetensors        (one model file to ship)
    cfgdiff info    --checkpoint PATH                              (what a checkpoint holds)
    cfgdiff serve   --checkpoint PATH [--host 127.0.0.1] [--port 8000]  (a local web page)
    cfgdiff data    fetch NAME | info NAME

Each command module adds its parser and runs it: parse, one library call, print. Library errors
name parameters; they are said here in the CLI's flags (options.flag_words).

Under torchrun (`torchrun --nproc-per-node N -m cfgdiff train|sample|eval|sweep ...`) every
process runs the command inside one process group (dist.session); rank 0 alone prints results
and writes files. Other commands run in one process.

Exit status: 0 success; 2 bad input (one line on stderr, no traceback); 1 a run that could not go
on (non-finite loss, out of memory, disk full: one line saying what to change); 130 interrupted
twice; 141 the reader of its output went away (`| head`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cfgdiff.cli import data, evaluate, model, sample, serve, sweep, train
from cfgdiff.cli.options import KNOWN_FLAGS, Parser, UsageError, flag_words, option_strings
from cfgdiff.errors import CfgDiffError, RuntimeFault

# the commands that run as one job over several processes under torchrun
DISTRIBUTED = ("train", "sample", "eval", "sweep")

# name -> the function that runs its parsed arguments
COMMANDS = {
    "train": train.run,
    "sample": sample.run,
    "eval": evaluate.run,
    "sweep": sweep.run,
    "info": model.run_info,
    "export": model.run_export,
    "data": data.run,
    "serve": serve.run,
}


def build_parser() -> Parser:
    p = Parser(
        prog="cfgdiff", description="Class-conditional diffusion with classifier-free guidance."
    )
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    sub.required = True
    train.add_parser(sub)
    sample.add_parser(sub)
    evaluate.add_parser(sub)
    sweep.add_parser(sub)
    model.add_info_parser(sub)
    model.add_export_parser(sub)
    data.add_parser(sub)
    serve.add_parser(sub)
    KNOWN_FLAGS.update(option_strings(p))
    return p


def _check_data_dir(given: Path | None) -> None:
    """The data directory (--data-dir, else $CFGDIFF_DATA_DIR or ~/.cache/cfgdiff/data) must be a
    directory or not exist yet: checked before any work, since a file there would fail only when
    something is first cached, after a judge's training."""
    from cfgdiff.data import default_data_dir

    d = given if given is not None else default_data_dir()
    if not d.exists() or d.is_dir():
        return
    if given is not None:
        raise UsageError(f"argument --data-dir: not a directory: {d}")
    what = "$CFGDIFF_DATA_DIR" if os.environ.get("CFGDIFF_DATA_DIR") else "data dir"
    raise UsageError(f"{what}: not a directory: {d} (pass --data-dir DIR)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (tests call this directly)."""
    parser = build_parser()

    def error(e: BaseException, status: int) -> int:
        print(f"cfgdiff: error: {flag_words(str(e))}", file=sys.stderr)
        return status

    try:
        args = parser.parse_args(argv)
        if hasattr(args, "data_dir"):
            _check_data_dir(args.data_dir)
        if args.command != "data":  # every command that runs a network
            from cfgdiff.runtime import configure_cpu_threads, configure_cuda

            configure_cpu_threads()
            configure_cuda()
        return _run_command(args)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    except RuntimeFault as e:
        return error(e, 1)
    except CfgDiffError as e:
        return error(e, 2)
    except KeyboardInterrupt:
        print("cfgdiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cfgdiff ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # one no library call named a file for: classed by its cause
        from cfgdiff.files import NO_PERMISSION, NO_SPACE

        where = f"{e.filename}: " if e.filename else ""
        print(f"cfgdiff: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1 if e.errno in NO_SPACE + NO_PERMISSION else 2
    except Exception as e:  # an allocation failure outside the paths that name their batch size
        from cfgdiff.runtime import error_line, is_out_of_memory

        if not is_out_of_memory(e):
            raise
        print(
            f"cfgdiff: error: out of memory ({error_line(e)}); lower --batch-size", file=sys.stderr
        )
        return 1


def _run_command(args) -> int:
    """The command, joined to the other processes when torchrun started several."""
    from cfgdiff import dist

    world = dist.detect()
    if not world.enabled:
        return COMMANDS[args.command](args)
    if args.command not in DISTRIBUTED:
        raise UsageError(
            f"{args.command} runs in one process; under torchrun only "
            f"{', '.join(DISTRIBUTED)} do (WORLD_SIZE={world.size})"
        )
    from cfgdiff.runtime import resolve_device

    with dist.session(resolve_device(getattr(args, "device", None) or "auto")):
        return COMMANDS[args.command](args)


def console_main() -> None:
    sys.exit(main())
