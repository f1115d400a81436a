"""Reading JSONL files line by line, with errors that name the file and line."""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Iterator


def jsonl_records(path: str | pathlib.Path, error: type[Exception], what: str,
                  locate: Callable[[int], str] | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of the JSONL file at `path`.

    A missing file raises FileNotFoundError naming `what` (e.g. "SFT data file"); a line
    that is not JSON raises `error` with `locate(line)` (default `path:line`) and the
    parser's message (a line that is not UTF-8 too). Blank lines are skipped but counted, so
    numbers match an editor's.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    locate = locate or (lambda number: f"{path}:{number}")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{locate(number)}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                            f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{locate(number)}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield number, record
