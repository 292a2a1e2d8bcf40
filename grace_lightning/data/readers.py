"""Read and validate GRACE training data: supervised triplets and unsupervised sentences.

Formats follow the upstream GRACE data scripts (``process_data.py`` in GasolSun36/GRACE, see
``docs/grace_paper_notes.md`` §4):

- supervised: JSON lines with ``query``, ``positive``, ``negative`` (and an optional ``source``),
  e.g. ``echo_data_total.jsonl``. Here the negative field may also hold a list of strings
  (several negatives per example), and the field names are configurable.
- unsupervised: one sentence a line (``wiki1m_for_simcse.txt``) or JSON lines with a text field.

Upstream strips each text and silently skips blank lines; so do we (blank lines are counted in
the report, not treated as errors). Everything else that is wrong is an error that names the
file, the line (1-based) and the field, e.g. ``data/x.jsonl:17: field 'positive': empty text``.
With ``on_error="raise"`` the first problem raises :class:`DataError`; with ``on_error="skip"``
bad lines are dropped and counted per reason in a :class:`ReadReport`. An empty result is
always an error. Lines are decoded one at a time from bytes, so a non-UTF-8 line is reported
with its exact line number.

``load_hub_triplets`` / ``load_hub_sentences`` apply the same checks to rows of a Hugging Face
Hub dataset (row index instead of line number); they need the Hub and cannot run offline.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OnError = Literal["raise", "skip"]

#: how many error messages a :class:`ReadReport` keeps (the counts are always complete)
MAX_MESSAGES = 5

DATA_ROOT_HINT = (
    "Relative data paths are resolved against `data.root` (Hydra: data.root=/path/to/data, or "
    "the GRACE_DATA_ROOT environment variable); give an absolute path to bypass it."
)

# reasons a record is rejected (keys of ReadReport.skipped)
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
NOT_STRING = "not_string"
EMPTY_TEXT = "empty_text"


class DataError(ValueError):
    """Bad training data. ``str(err)`` names the file (or Hub dataset), line (or row) and field.

    Attributes ``source``, ``location`` (line number or ``"row N"``), ``field`` and ``reason``
    are kept for programmatic checks; any of them may be None for whole-file errors.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        location: int | str | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.location = location
        self.field = field
        self.reason = reason


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file does not exist (also a ``FileNotFoundError``)."""


@dataclass
class Triplet:
    """One supervised example. The positive is the GRACE policy prompt (upstream "main")."""

    query: str
    positive: str
    negatives: list[str]


@dataclass
class ReadReport:
    """What a reader kept and skipped.

    ``skipped`` counts rejected lines/rows per reason (``invalid_utf8``, ``invalid_json``,
    ``not_object``, ``missing_field``, ``not_string``, ``empty_text``); ``messages`` keeps the
    first :data:`MAX_MESSAGES` error messages. ``blank`` counts blank lines (ignored, as
    upstream does). ``truncated`` is True when reading stopped at ``max_examples``.
    """

    source: str
    kept: int = 0
    blank: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_problem(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def summary(self) -> str:
        text = f"{self.source}: kept {self.kept}"
        if self.truncated:
            text += " (stopped at max_examples)"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            text += f"; skipped {self.num_skipped} ({reasons})"
        if self.blank:
            text += f"; {self.blank} blank lines ignored"
        return text


class _BadRecord(Exception):
    """Internal: one record is invalid. Carries the reason, the field and the problem text."""

    def __init__(self, reason: str, problem: str, field: str | None = None) -> None:
        super().__init__(problem)
        self.reason = reason
        self.problem = problem
        self.field = field


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: use 'raise' or 'skip'")


def _where(source: str, location: int | str) -> str:
    """``file:17`` for files (line numbers), ``hub-id[split] row 17`` for Hub rows."""
    return f"{source}:{location}" if isinstance(location, int) else f"{source} {location}"


def _message(source: str, location: int | str, bad: _BadRecord) -> str:
    prefix = _where(source, location)
    if bad.field is not None:
        return f"{prefix}: field '{bad.field}': {bad.problem}"
    return f"{prefix}: {bad.problem}"


def _text(value: Any, name: str) -> str:
    """Validate one text value: a non-empty string after stripping (upstream strips texts)."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise _BadRecord(NOT_STRING, f"expected a string, got {kind}", name)
    text = value.strip()
    if not text:
        raise _BadRecord(EMPTY_TEXT, "empty text", name)
    return text


def _get(record: Any, name: str) -> Any:
    if not isinstance(record, dict):
        raise _BadRecord(NOT_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise _BadRecord(MISSING_FIELD, "missing", name)
    return record[name]


def _triplet_from_record(
    record: Any, query_field: str, positive_field: str, negative_field: str | None
) -> Triplet:
    query = _text(_get(record, query_field), query_field)
    positive = _text(_get(record, positive_field), positive_field)
    negatives: list[str] = []
    if negative_field is not None:
        value = _get(record, negative_field)
        if isinstance(value, list):
            if not value:
                raise _BadRecord(EMPTY_TEXT, "empty list of negatives", negative_field)
            negatives = [_text(v, f"{negative_field}[{i}]") for i, v in enumerate(value)]
        else:
            negatives = [_text(value, negative_field)]
    return Triplet(query=query, positive=positive, negatives=negatives)


def _sentence_from_record(record: Any, text_field: str) -> str:
    return _text(_get(record, text_field), text_field)


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        resolved = "" if p.is_absolute() else f" (resolved to {p.resolve()})"
        raise DataFileNotFoundError(
            f"data file not found: {path}{resolved}. {DATA_ROOT_HINT}", source=str(path)
        )
    if p.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file", source=str(path))
    return p


def _iter_lines(path: Path) -> Iterator[tuple[int, str | _BadRecord]]:
    """Yield (1-based line number, decoded line or the decoding problem). Binary mode, so a bad
    byte sequence only spoils its own line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _BadRecord(INVALID_UTF8, f"not valid UTF-8 (byte {e.start})")


def _parse_json(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRecord(INVALID_JSON, f"invalid JSON: {e.msg} (column {e.colno})") from None


def _iter_valid(
    records: Iterable[tuple[int | str, Any]],
    convert,
    report: ReadReport,
    on_error: str,
    max_examples: int | None,
) -> Iterator:
    """Yield ``convert(record)`` for each valid (location, record) pair, raising or counting
    problems in ``report`` (``report.kept`` is final once the iterator is exhausted).

    A record may be a ``_BadRecord`` already (decoding failed) or None (blank line).
    """
    for location, record in records:
        if max_examples is not None and report.kept >= max_examples:
            report.truncated = True
            break
        if record is None:
            report.blank += 1
            continue
        try:
            if isinstance(record, _BadRecord):
                raise record
            item = convert(record)
        except _BadRecord as bad:
            msg = _message(report.source, location, bad)
            if on_error == "raise":
                raise DataError(
                    msg,
                    source=report.source,
                    location=location,
                    field=bad.field,
                    reason=bad.reason,
                ) from None
            report.add_problem(bad.reason, msg)
            continue
        report.kept += 1
        yield item


def check_not_empty(report: ReadReport) -> None:
    """An empty result is always an error (after reading everything)."""
    if not report.kept:
        detail = f" ({report.summary()})" if report.skipped or report.blank else ""
        raise DataError(f"{report.source}: no valid examples{detail}", source=report.source)


def _collect(
    records: Iterable[tuple[int | str, Any]],
    convert,
    report: ReadReport,
    on_error: str,
    max_examples: int | None,
) -> list:
    """:func:`_iter_valid` into a list; empty is an error."""
    out = list(_iter_valid(records, convert, report, on_error, max_examples))
    check_not_empty(report)
    return out


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON | _BadRecord | None for blank lines)."""
    for lineno, line in _iter_lines(path):
        if isinstance(line, _BadRecord):
            yield lineno, line
        elif not line.strip():
            yield lineno, None
        else:
            try:
                yield lineno, _parse_json(line)
            except _BadRecord as bad:
                yield lineno, bad


def _text_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, line | _BadRecord | None for blank lines) for one-text-a-line files."""
    for lineno, line in _iter_lines(path):
        if isinstance(line, str) and not line.strip():
            yield lineno, None
        else:
            yield lineno, line


def _check_max(max_examples: int | None) -> None:
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"max_examples={max_examples}: must be positive or None")


def iter_triplets(
    path: str | Path,
    report: ReadReport | None = None,
    *,
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str | None = "negative",
    on_error: OnError = "raise",
    max_examples: int | None = None,
) -> Iterator[Triplet]:
    """Stream the valid triplets of :func:`read_triplets` (same checks and messages) without
    holding them in memory; problems are counted in ``report``. The caller checks emptiness
    (:func:`check_not_empty`) after exhausting it."""
    _check_on_error(on_error)
    _check_max(max_examples)
    p = _check_file(path)
    report = report if report is not None else ReadReport(source=str(path))

    def convert(record: Any) -> Triplet:
        return _triplet_from_record(record, query_field, positive_field, negative_field)

    yield from _iter_valid(_json_records(p), convert, report, on_error, max_examples)


def read_triplets(
    path: str | Path,
    *,
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str | None = "negative",
    on_error: OnError = "raise",
    max_examples: int | None = None,
) -> tuple[list[Triplet], ReadReport]:
    """Read supervised triplets from a JSON-lines file (upstream ``echo_data_total.jsonl``).

    The negative field may hold a string or a list of strings; it may only be absent when
    ``negative_field`` is None (then every triplet has no negatives). ``max_examples`` keeps
    the first N valid examples (upstream ``--max_samples`` also cuts before the split).
    """
    _check_on_error(on_error)
    _check_max(max_examples)
    p = _check_file(path)
    report = ReadReport(source=str(path))

    def convert(record: Any) -> Triplet:
        return _triplet_from_record(record, query_field, positive_field, negative_field)

    return _collect(_json_records(p), convert, report, on_error, max_examples), report


def _sentence_format(path: Path, format: str) -> str:
    if format == "auto":
        return "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "txt"
    if format not in ("txt", "jsonl"):
        raise ValueError(f"format={format!r}: use 'auto', 'txt' or 'jsonl'")
    return format


def iter_sentences(
    path: str | Path,
    report: ReadReport | None = None,
    *,
    format: Literal["auto", "txt", "jsonl"] = "auto",
    text_field: str = "text",
    on_error: OnError = "raise",
    max_examples: int | None = None,
) -> Iterator[str]:
    """Stream the valid sentences of :func:`read_sentences` (same checks and messages)."""
    _check_on_error(on_error)
    _check_max(max_examples)
    p = _check_file(path)
    fmt = _sentence_format(p, format)
    report = report if report is not None else ReadReport(source=str(path))
    if fmt == "txt":
        records, convert = _text_records(p), lambda line: _text(line, "text")
    else:
        records = _json_records(p)

        def convert(record: Any) -> str:
            return _sentence_from_record(record, text_field)

    yield from _iter_valid(records, convert, report, on_error, max_examples)


def read_sentences(
    path: str | Path,
    *,
    format: Literal["auto", "txt", "jsonl"] = "auto",
    text_field: str = "text",
    on_error: OnError = "raise",
    max_examples: int | None = None,
) -> tuple[list[str], ReadReport]:
    """Read unsupervised sentences: ``txt`` is one text a line (upstream
    ``wiki1m_for_simcse.txt``), ``jsonl`` takes ``text_field`` of each object. ``auto`` picks
    jsonl for ``.jsonl``/``.json``/``.ndjson`` files and txt otherwise."""
    _check_on_error(on_error)
    _check_max(max_examples)
    p = _check_file(path)
    fmt = _sentence_format(p, format)
    report = ReadReport(source=str(path))
    if fmt == "txt":
        records = _text_records(p)

        def convert(line: Any) -> str:
            return _text(line, "text")
    else:
        records = _json_records(p)

        def convert(record: Any) -> str:
            return _sentence_from_record(record, text_field)

    return _collect(records, convert, report, on_error, max_examples), report


# --------------------------------------------------------------------------- Hugging Face Hub


def _hub_rows(
    hub_id: str, name: str | None, split: str, load_kwargs: dict[str, Any]
) -> tuple[str, Iterator[tuple[str, Any]]]:
    import datasets  # imported lazily: only users online need it

    ds = datasets.load_dataset(hub_id, name, split=split, **load_kwargs)
    source = f"{hub_id}{'/' + name if name else ''}[{split}]"
    return source, ((f"row {i}", dict(row)) for i, row in enumerate(ds))


def load_hub_triplets(
    hub_id: str,
    *,
    name: str | None = None,
    split: str = "train",
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str | None = "negative",
    on_error: OnError = "raise",
    max_examples: int | None = None,
    **load_kwargs: Any,
) -> tuple[list[Triplet], ReadReport]:
    """Supervised triplets from a Hub dataset via ``datasets.load_dataset(hub_id, name,
    split=split, **load_kwargs)``, validated like :func:`read_triplets` (messages give the row
    index, e.g. ``sentence-transformers/all-nli/triplet[train] row 17: field 'positive': empty
    text``).

    NEEDS THE HUGGING FACE HUB: for users online. It cannot run on this project's machines
    (no Hub access); the offline default (``kind: offline``) or local files work instead.
    Pass ``streaming=True`` in ``load_kwargs`` together with ``max_examples`` to avoid
    downloading a whole large dataset.
    """
    _check_on_error(on_error)
    _check_max(max_examples)
    source, rows = _hub_rows(hub_id, name, split, load_kwargs)
    report = ReadReport(source=source)

    def convert(record: Any) -> Triplet:
        return _triplet_from_record(record, query_field, positive_field, negative_field)

    return _collect(rows, convert, report, on_error, max_examples), report


def load_hub_sentences(
    hub_id: str,
    *,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    on_error: OnError = "raise",
    max_examples: int | None = None,
    **load_kwargs: Any,
) -> tuple[list[str], ReadReport]:
    """Unsupervised sentences (``text_field`` of each row) from a Hub dataset, validated like
    :func:`read_sentences`.

    NEEDS THE HUGGING FACE HUB: for users online; it cannot run on this project's machines.
    """
    _check_on_error(on_error)
    _check_max(max_examples)
    source, rows = _hub_rows(hub_id, name, split, load_kwargs)
    report = ReadReport(source=source)

    def convert(record: Any) -> str:
        return _sentence_from_record(record, text_field)

    return _collect(rows, convert, report, on_error, max_examples), report
