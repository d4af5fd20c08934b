"""Exit codes and the one place that turns bad input into a message instead of a traceback.

0 done; 1 a speedup regression (the gate) and nothing else; 2 bad input or a refusal (the message names
the problem and the fix); 130 interrupted (rows already measured are kept); 3 a crash (a bug: the
traceback is printed).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["EXIT_BAD_INPUT", "EXIT_CRASH", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_REGRESSION", "BadInput", "Parser",
           "check_writable_dir", "guarded", "ignore_stop_signals"]

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# packages that may be missing: import name -> what to install
_EXTRAS = {
    "torch": "pip install torch (a CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu), then pip install -e .",
    "diffusers": 'pip install -e ".[dev]" (or pip install diffusers transformers)',
    "transformers": 'pip install -e ".[dev]" (or pip install transformers)',
    "safetensors": "pip install safetensors",
    "torchmetrics": "pip install torchmetrics",
    "imageio": "pip install imageio imageio-ffmpeg",
    "triton": "pip install triton (Linux)",
}


class BadInput(ValueError):
    """Input the program refuses; the message says what is wrong and what to do."""


class Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and no usage dump for a bad value (the message says what to fix); an
    option given twice keeps its last value, as argparse does, and says so."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        once = {o: a.dest for a in self._actions if a.option_strings and a.nargs is None
                and not isinstance(a, argparse._AppendAction) for o in a.option_strings}  # fmt: skip
        seen: set[str] = set()
        for tok in argv:
            if tok == "--":
                break
            opt = tok.split("=", 1)[0]
            if opt in once:
                if once[opt] in seen:
                    print(f"warning: {opt} is given more than once; the last one counts", file=sys.stderr)
                seen.add(once[opt])
        return super().parse_known_args(args, namespace)


def check_writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output directory that cannot be created or written (nothing is created)."""
    out = Path(path)
    held = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())  # created from here
    if not held.is_dir() or not os.access(held, os.W_OK | os.X_OK):
        why = "is a file" if not held.is_dir() else "is not writable"
        raise BadInput(f"{flag} {out} cannot be created or written: {held} {why}; choose a directory you can write")
    return out


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from salad_bench.methods import UnknownNameError

    # ValueError covers the packages' own refusals (a quality checkpoint's CheckpointError, a study config's error)
    return (BadInput, ValueError, UnknownNameError)


def _crash() -> int:
    traceback.print_exc()
    print("crash: this is a bug in salad-bench; please report it with the traceback above", file=sys.stderr)
    return EXIT_CRASH


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def ignore_stop_signals() -> None:
    """After the first Ctrl-C or SIGTERM: a second one while torch tears down prints no traceback over the
    message that says how to resume."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def guarded(fn: Callable[[], int]) -> int:
    """Run a command body; map its failures onto the exit codes above (messages on stderr). SIGTERM (a
    scheduler's stop, ``kill``) is taken as Ctrl-C: the rows measured are kept and the exit code is 130."""
    try:
        before = signal.signal(signal.SIGTERM, _stop)
    except ValueError:  # not the main thread: signals stay as they are
        before = None
    try:
        result = fn()
    except KeyboardInterrupt:
        ignore_stop_signals()
        print("\ninterrupted: rows already measured are kept; rerun with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        name = exc.name or ""
        if name in _EXTRAS:  # the package itself; a missing submodule of an installed one is a broken install
            print(f"error: this needs the package {name!r}, which is not installed: {_EXTRAS[name]}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return _crash()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: the disk is full ({exc.strerror}); free some space, then rerun with --resume where the "
                  "command has it (rows already written are kept)", file=sys.stderr)
            return EXIT_BAD_INPUT
        if exc.filename is None:  # not a path the user gave or the machine refused: a bug
            return _crash()
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        print(f"error: cannot use {where}: {exc.strerror or exc}; check the path and its permissions", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the exit code tells bad input from a crash
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            print(f"error: out of memory ({str(exc).splitlines()[0][:160]}); use a smaller workload", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(exc, _bad_input_types()):
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: {msg}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return _crash()
    finally:
        if before is not None and signal.getsignal(signal.SIGTERM) is _stop:
            signal.signal(signal.SIGTERM, before)
    return result
