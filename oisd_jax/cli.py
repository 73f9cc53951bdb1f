"""The edge of every command: a bad input ends in ONE line on stderr and exit code 2.

`run_absl(main)` replaces `absl.app.run(main)` (train, evaluate, export, analyze) and
`run_main(main)` wraps an argparse `main(argv) -> int` (plan). Both catch the project's
own errors (`UserError` and its kinds, `ConfigError`, `BadRowError`), absl usage and flag
errors, OS errors (a missing or unwritable file names itself) and the known library
errors of bad files (JSON, text decoding, pyarrow, safetensors), print
`error: <one line>` plus a hint line, and exit 2 without a traceback. A ValueError or
RuntimeError raised by oisd_jax's own code is a message too. Anything else is a bug and
keeps its traceback. `--debug` or OISD_DEBUG=1 re-raises everything, traceback included.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2
HINT = "(rerun with --debug or OISD_DEBUG=1 for the traceback)"
_MAX_CHARS = 2000
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(RuntimeError):
    """A problem with the user's input, files or environment, stated in one line."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    on = ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1")
    return os.environ.get("OISD_DEBUG", "") not in ("", "0") or any(a in on for a in argv)


def _library_error_types() -> tuple[type, ...]:
    """Bad-file errors of the libraries already imported (none is imported here)."""
    types: list[type] = [json.JSONDecodeError, UnicodeError]
    pa = sys.modules.get("pyarrow")
    if pa is not None and hasattr(pa, "ArrowException"):
        types.append(pa.ArrowException)
    st = sys.modules.get("safetensors")
    if st is not None and hasattr(st, "SafetensorError"):
        types.append(st.SafetensorError)
    return tuple(types)


def _raised_by_us(exc: BaseException) -> bool:
    """Whether the innermost frame that raised `exc` is oisd_jax code (a deliberate message)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` reports a bad input (one line) rather than a bug (a traceback)."""
    from absl import app, flags

    from oisd_jax.config import ConfigError
    from oisd_jax.data.sources import BadRowError
    if isinstance(exc, (UserError, ConfigError, BadRowError, app.UsageError, flags.Error, OSError,
                        *_library_error_types())):
        return True
    return isinstance(exc, (ValueError, RuntimeError)) and _raised_by_us(exc)


def one_line(exc: BaseException) -> str:
    """`exc` as a single line: its problems joined, library error types named."""
    from oisd_jax.config import ConfigError
    if isinstance(exc, ConfigError):
        n = len(exc.problems)
        text = ("invalid config: " if n == 1 else f"invalid config ({n} problems): ") + "; ".join(exc.problems)
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, _library_error_types()):  # "JSONDecodeError: ...", "ArrowInvalid: ..."
            text = f"{type(exc).__name__}: {text}"
    lines = [ln.strip().removeprefix("- ") for ln in text.splitlines() if ln.strip()]
    text = re.sub(r"\s+", " ", "; ".join(lines)).strip()
    return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS] + " ..."


def fail(exc: BaseException, *, exit_now: bool = True) -> int:
    """Print `exc` as `error: ...` plus the hint; exit 2 (os._exit: library threads, e.g.
    an async checkpoint writer stuck on a full disk, must not keep the process alive)."""
    print(f"error: {one_line(exc)}\n{HINT}", file=sys.stderr, flush=True)
    if exit_now:
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_BAD_INPUT)
    return EXIT_BAD_INPUT


def _unknown_override(exc: BaseException, argv: Sequence[str]) -> Exception | None:
    """`--config.optim.learning_rate=1` fails inside ml_collections with a bare
    KeyError/AttributeError("'learning_rate'"): name the flag instead."""
    if not isinstance(exc, (KeyError, AttributeError)):
        return None
    key = str(exc).strip("\"'")
    for a in argv:
        m = re.match(r"^--?(\w+)\.([\w.]+)(=|$)", a)
        if m and key in m.group(2).split("."):
            return UserError(f"--{m.group(1)}.{m.group(2)}: no such config field ({key!r} is not in the config)")
    return None


def _guarded(call: Callable[[], int | None], argv: Sequence[str]):
    if debug_requested(argv):
        return call()
    try:
        return call()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except Exception as e:  # noqa: BLE001 -- sorted into messages and bugs right here
        named = _unknown_override(e, argv)
        if named is not None:
            fail(named)
        if is_user_error(e):
            fail(e)
        raise


HELP_FLAGS = ("--help", "-h", "-?", "--helpfull", "--helpshort", "--helpxml")


def run_absl(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with flag parsing and `main` guarded; defines --debug."""
    from absl import app, flags
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "Show the Python traceback of an error (also OISD_DEBUG=1).")
    argv = list(sys.argv)

    def parse(args: list[str]) -> list[str]:
        return _guarded(lambda: flags.FLAGS(args), argv)

    try:
        app.run(lambda a: _guarded(lambda: main(a), argv), flags_parser=parse)
    except SystemExit as e:
        # absl's --help / --helpfull print the usage, then exit 1; asking for help succeeded.
        if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """sys.exit(main(argv)) with `main` guarded (argparse commands); strips --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    rest = [a for a in argv if not a.lstrip("-").startswith("debug")]
    if debug:
        os.environ["OISD_DEBUG"] = "1"
    sys.exit(_guarded(lambda: main(rest), argv))
