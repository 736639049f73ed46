"""How every command-line entry point ends on a user's mistake.

A mistake in flags, config fields, paths or inputs ends the command with one line on stderr, ``error: <field>=<value>:
<rule>``, and exit status 2, with no traceback (``LDM_JAX_DEBUG=1`` shows it). Anything else is an internal error and
keeps its traceback. A user error is one of the types below, or a ``ValueError`` written in the project's
convention for them: its message starts with ``<field>=<value>:`` or ``<field>: `` (``config_lib.fail`` and the checks that name a
field).

  if __name__ == "__main__":
      user_errors.run(main)      # instead of absl's app.run(main)
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

DEBUG_ENV = "LDM_JAX_DEBUG"
EXIT_CODE = 2
_FIELD_MESSAGE = re.compile(r"^-{0,2}[\w.\[\]]+(=|: )")


def _types() -> tuple[type, ...]:
    # Imported when an error is being classified: the entry points import none of these at start-up.
    from ldm_jax import config_lib
    from ldm_jax.data.sources import SourceError
    from ldm_jax.interop.state_dict import ConversionError
    from ldm_jax.interop.weight_files import WeightFileError
    from ldm_jax.models.lora import AdapterFileError
    from ldm_jax.training.checkpoint import CheckpointSaveFailed, CheckpointTreeMismatch, CheckpointUnreadable

    return (
        app.UsageError, flags.Error, config_lib.ConfigError, SourceError, ConversionError, WeightFileError,
        AdapterFileError, CheckpointTreeMismatch, CheckpointUnreadable, CheckpointSaveFailed, FileNotFoundError,
        FileExistsError,
    )  # fmt: skip


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, _types()):
        return True
    return isinstance(e, ValueError) and bool(_FIELD_MESSAGE.match(str(e)))


def _message(e: BaseException) -> str:
    """The user-facing line of ``e``: the innermost user error it wraps (config_flags wraps a config file's own
    error, and writes that error's traceback into its message: only the final line of it is kept)."""
    inner = e
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
        if is_user_error(inner):
            e = inner
    text = str(e)
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(text.split()) or type(e).__name__


def _fail(e: BaseException) -> None:
    message = _message(e)
    print(f"error: {message}\n(exit status {EXIT_CODE}; set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    sys.exit(EXIT_CODE)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors (unknown flags, bad values, config files and overrides that do not
    load) ended as user errors."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises several types for a config file or override that does not load
        if os.environ.get(DEBUG_ENV):
            raise
        _fail(e)


def run(main) -> None:
    def guarded(argv):
        try:
            return main(argv)
        except Exception as e:
            if os.environ.get(DEBUG_ENV) or not is_user_error(e):
                raise
            _fail(e)

    app.run(guarded, flags_parser=_parse_flags)
