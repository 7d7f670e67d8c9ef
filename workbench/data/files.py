"""User fact files: JSONL or CSV, read and written with clear errors.

Cloze rows ``{prompt, answer}`` or multiple-choice rows ``{question, choices, answer=index}``
(:func:`load_fact_file`, :func:`save_fact_file`). Every problem is a
:class:`~workbench.core.errors.WorkbenchError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from workbench.core.errors import WorkbenchError
from workbench.core.files import atomic_write, parse_json
from workbench.data.facts import Fact

_JSON_SUFFIXES = (".jsonl", ".json")


_CSV_SUFFIXES = (".csv",)


_TEXT_FIELDS = ("domain", "relation", "subject")


_DIGITS = re.compile(r"^[+-]?\d+$")


def load_fact_file(
    path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    max_context: int | None = None,
) -> tuple[Fact, ...]:
    """Read facts from a JSONL (``.jsonl``/``.json``, one object per line) or CSV file.

    Row formats (extra fields are ignored):

    * cloze: ``{"prompt": ..., "answer": "<text>"}``, optional ``choices`` (list; must include
      the answer), ``corrupt_prompt``, ``domain``, ``relation``, ``subject``, ``template``,
      ``paraphrase`` -- the format :func:`save_fact_file` writes;
    * multiple choice: ``{"question": ..., "choices": [...], "answer": <index>}`` where the
      index (an int or a digit string, 0-based) selects the answer among the choices; the fact
      gets ``prompt=question``, ``answer=choices[index]``.

    In CSV the first row is the header (column names as above), ``choices`` is one
    ``|``-separated cell and empty cells count as absent. Prompts and answers are stripped of
    surrounding whitespace; blank lines are skipped.

    With ``tokenizer`` (a Hugging Face tokenizer), the answer of every cloze row must be one
    token: ``tokenizer(" " + answer, add_special_tokens=False)`` gives exactly one id. (Choices
    of multiple-choice rows may be several tokens; they are scored by summed log-prob.) With
    ``max_context`` too, the prompt (with special tokens) plus the longest answer/choice must
    fit in ``max_context`` tokens.

    Raises:
        WorkbenchError: naming the file and the line, for a missing path, a directory, an
            unknown extension, non-UTF-8 bytes, invalid JSON, a missing field, a bad answer
            index, an empty prompt or answer, a multi-token cloze answer, a prompt longer than
            the context, a repeated prompt, or an empty file.
    """
    p = Path(path)
    if not p.exists():
        raise WorkbenchError(f"{p}: no such file")
    if p.is_dir():
        raise WorkbenchError(f"{p}: is a directory, not a fact file (.jsonl, .json or .csv)")
    suffix = p.suffix.lower()
    if suffix not in _JSON_SUFFIXES + _CSV_SUFFIXES:
        raise WorkbenchError(
            f"{p}: unsupported fact file type {p.suffix or '(no extension)'!r}; "
            "use .jsonl / .json (one JSON object per line) or .csv"
        )
    if max_context is not None and tokenizer is None:
        raise WorkbenchError("max_context needs a tokenizer to count prompt tokens")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise WorkbenchError(f"{p}: cannot read the file ({e.strerror or e})") from e
    lines = _decode_lines(data, str(p))
    rows = _json_rows(lines, str(p)) if suffix in _JSON_SUFFIXES else _csv_rows(lines, str(p))

    facts: list[Fact] = []
    first_seen: dict[tuple[str, tuple[str, ...]], int] = {}
    for lineno, row in rows:
        where = f"{p}, line {lineno}"
        fact, is_cloze = _row_to_fact(row, where)
        key = (fact.prompt, fact.choices)
        if key in first_seen:
            raise WorkbenchError(f"{where}: repeats the prompt of line {first_seen[key]}: {fact.prompt!r}")
        first_seen[key] = lineno
        if tokenizer is not None:
            _check_tokens(fact, is_cloze, where, tokenizer, max_context)
        facts.append(fact)
    return tuple(facts)


def save_fact_file(facts: Iterable[Fact], path: str | os.PathLike[str]) -> Path:
    """Write ``facts`` as JSONL (one :meth:`Fact.to_dict` cloze row per line), atomically.

    The file is written to a temporary file beside ``path`` and moved into place with
    ``os.replace``, so readers never see a half-written file. Returns the path.
    :func:`load_fact_file` reads it back to equal facts.
    """
    p = Path(path)
    if p.suffix.lower() not in _JSON_SUFFIXES:
        raise WorkbenchError(f"{p}: fact files are saved as JSON lines; use a .jsonl file name")
    facts = tuple(facts)
    if not facts:
        raise WorkbenchError(f"{p}: no facts to save")
    for f in facts:
        if not isinstance(f, Fact):
            raise WorkbenchError(f"{p}: cannot save {type(f).__name__} as a fact")
    if p.is_dir():
        raise WorkbenchError(f"{p}: is a directory")
    return atomic_write(p, "".join(json.dumps(f.to_dict(), ensure_ascii=False) + "\n" for f in facts))


def _decode_lines(data: bytes, label: str) -> list[tuple[int, str]]:
    """UTF-8 lines with 1-based numbers; a bad byte is reported with its line and column."""
    out = []
    # Splitting the bytes on b"\n" is safe: in UTF-8 that byte never occurs inside a character.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WorkbenchError(
                f"{label}, line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                f"{e.start + 1}); save the file as UTF-8"
            ) from None
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # byte-order mark written by some editors
        out.append((lineno, text.removesuffix("\r")))
    return out


def _json_rows(lines: list[tuple[int, str]], label: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for lineno, text in lines:
        if not text.strip():
            continue
        where = f"{label}, line {lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            hint = ""
            if text.strip() in ("[", "{") or text.lstrip().startswith("[{"):
                hint = " (expected one JSON object per line; JSON arrays and pretty-printed JSON are not supported)"
            raise WorkbenchError(f"{where}: invalid JSON: {e.msg} at column {e.colno}{hint}") from None
        except (ValueError, RecursionError):  # a 5,000-digit integer, or nesting past the stack
            obj = parse_json(text, source=where)  # re-parse with limits, for the message
        if not isinstance(obj, dict):
            raise WorkbenchError(f"{where}: expected a JSON object {{...}}, got {type(obj).__name__}")
        rows.append((lineno, obj))
    if not rows:
        raise WorkbenchError(f"{label}, line 1: the file is empty (no fact rows)")
    return rows


def _csv_rows(lines: list[tuple[int, str]], label: str) -> list[tuple[int, dict[str, Any]]]:
    text = "\n".join(t for _, t in lines)
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    header_line = 0
    rows = []
    start = 1
    try:
        for record in reader:
            lineno, start = start, reader.line_num + 1  # a quoted cell may span lines
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [h.strip().lower() for h in record]
                header_line = lineno
                if "answer" not in header:
                    raise WorkbenchError(
                        f"{label}, line {lineno}: missing column 'answer' in the header (columns: {', '.join(header)})"
                    )
                if "prompt" not in header and "question" not in header:
                    raise WorkbenchError(
                        f"{label}, line {lineno}: missing column 'prompt' (cloze) or 'question' "
                        f"(multiple choice) in the header (columns: {', '.join(header)})"
                    )
                continue
            if len(record) > len(header):
                raise WorkbenchError(
                    f"{label}, line {lineno}: {len(record)} cells but the header has {len(header)} columns"
                )
            # Empty cells are absent fields, so "missing field" errors work as for JSON.
            rows.append((lineno, {h: c for h, c in zip(header, record) if c.strip()}))
    except csv.Error as e:
        raise WorkbenchError(f"{label}, line {reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise WorkbenchError(f"{label}, line 1: the file is empty (no header, no fact rows)")
    if not rows:
        raise WorkbenchError(f"{label}, line {header_line + 1}: no fact rows after the header")
    return rows


def _text_field(row: Mapping[str, Any], name: str, where: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise WorkbenchError(f"{where}: field {name!r} must be text, got {json.dumps(value)}")
    return value.strip()


def _parse_choices(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):  # CSV cell (or a JSON string): "a|b|c"
        items: list[Any] = value.split("|")
    elif isinstance(value, list):
        items = value
    else:
        raise WorkbenchError(f"{where}: field 'choices' must be a list of texts (or 'a|b|c' in CSV)")
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise WorkbenchError(f"{where}: choice {k} must be text, got {json.dumps(item)}")
        if not item.strip():
            raise WorkbenchError(f"{where}: choice {k} is empty")
        out.append(item.strip())
    if len(out) < 2:
        raise WorkbenchError(f"{where}: multiple choice needs at least 2 choices, got {len(out)}")
    if len(set(out)) != len(out):
        raise WorkbenchError(f"{where}: the choices {out} repeat a value")
    return tuple(out)


def _parse_index(value: Any, n: int, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        idx = value
    elif isinstance(value, str) and _DIGITS.match(value.strip()):
        idx = int(value.strip())
    else:
        raise WorkbenchError(
            f"{where}: 'answer' must be the 0-based index of the right choice (an integer), got {json.dumps(value)}"
        )
    if not 0 <= idx < n:
        raise WorkbenchError(f"{where}: answer index {idx} is out of range for {n} choices (0..{n - 1})")
    return idx


def _row_to_fact(row: Mapping[str, Any], where: str) -> tuple[Fact, bool]:
    """Build a Fact from one parsed row; also says whether it is a cloze row."""
    has_q, has_p = "question" in row, "prompt" in row
    if has_q and has_p:
        raise WorkbenchError(f"{where}: give either 'prompt' (cloze) or 'question' (multiple choice), not both")
    if not has_q and not has_p:
        raise WorkbenchError(f"{where}: missing field 'prompt' (or 'question' for a multiple-choice row)")
    if "answer" not in row:
        raise WorkbenchError(f"{where}: missing field 'answer'")
    prompt = _text_field(row, "question" if has_q else "prompt", where)
    if not prompt:
        raise WorkbenchError(f"{where}: empty prompt")
    choices = _parse_choices(row["choices"], where) if "choices" in row else ()

    raw = row["answer"]
    if has_q:
        if not choices:
            raise WorkbenchError(f"{where}: missing field 'choices' (a multiple-choice row needs them)")
        answer = choices[_parse_index(raw, len(choices), where)]
    elif isinstance(raw, int) and not isinstance(raw, bool) and choices:
        # A JSON integer next to choices can only be an index (digit strings stay text:
        # cloze answers such as "1984" are legitimate).
        answer = choices[_parse_index(raw, len(choices), where)]
    else:
        answer = _text_field(row, "answer", where)
        if not answer:
            raise WorkbenchError(f"{where}: empty answer")
        if choices and answer not in choices:
            raise WorkbenchError(f"{where}: the answer {answer!r} is not one of the choices {list(choices)}")

    extra: dict[str, Any] = {}
    for name in (*_TEXT_FIELDS, "corrupt_prompt"):
        if name in row:
            extra[name] = _text_field(row, name, where)
    if "template" in row:
        value = row["template"]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise WorkbenchError(f"{where}: 'template' must be an integer >= 0, got {json.dumps(value)}")
        extra["template"] = value
    if "paraphrase" in row:
        value = row["paraphrase"]
        if isinstance(value, str):
            value = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}.get(
                value.strip().lower(), value
            )
        if not isinstance(value, bool):
            raise WorkbenchError(f"{where}: 'paraphrase' must be true or false, got {json.dumps(value)}")
        extra["paraphrase"] = value
    if extra.get("corrupt_prompt") == prompt:
        raise WorkbenchError(f"{where}: 'corrupt_prompt' equals the prompt")
    try:
        return Fact(prompt=prompt, answer=answer, choices=choices, **extra), not has_q
    except WorkbenchError as e:  # anything Fact itself rejects, reported with the line
        raise WorkbenchError(f"{where}: {e}") from None


def _token_ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _check_tokens(fact: Fact, is_cloze: bool, where: str, tokenizer: Any, max_context: int | None) -> None:
    if is_cloze:
        ids = _token_ids(tokenizer, " " + fact.answer, False)
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and unk in ids:
            raise WorkbenchError(
                f"{where}: the answer {fact.answer!r} is not in the tokenizer's vocabulary (it encodes to "
                f"{tokenizer.unk_token!r}); the model cannot be scored on it"
            )
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids) if hasattr(tokenizer, "convert_ids_to_tokens") else ids
            raise WorkbenchError(
                f"{where}: the answer {fact.answer!r} is {len(ids)} tokens for this tokenizer "
                f"({pieces}); a cloze answer must be exactly one token (encoded as ' ' + answer)"
            )
    if max_context is not None:
        # The scored sequence is prompt (+ special tokens the model adds) + the answer tokens.
        cont = 1 if is_cloze else max(len(_token_ids(tokenizer, " " + c, False)) for c in fact.choices)
        for name, text in (("prompt", fact.prompt), ("corrupt_prompt", fact.corrupt_prompt)):
            if not text:
                continue
            n = len(_token_ids(tokenizer, text, True)) + cont
            if n > max_context:
                raise WorkbenchError(
                    f"{where}: the {name} and its answer take {n} tokens, more than the model's "
                    f"context of {max_context}"
                )
