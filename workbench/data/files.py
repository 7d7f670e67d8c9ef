"""User fact files: JSONL, CSV or Parquet, in four row shapes, read and written with clear errors.

Row shapes (:data:`FILE_FORMATS`; detected per row from the fields, or forced with ``format``):

* ``cloze``: ``{prompt, answer}`` -- the format :func:`save_fact_file` writes;
* ``mc``: multiple choice like WMDP / MMLU, ``{question, choices, answer=index}``;
* ``qa``: question answering like TOFU, ``{question, answer}`` with optional
  ``paraphrased_answer`` and ``perturbed_answer`` (a text or a list of texts each);
* ``text``: raw text like MUSE's forget corpora, ``{text}``, split into a prefix (the prompt)
  and its held-out continuation (the answer).

Every problem is a :class:`~workbench.core.errors.WorkbenchError` naming the file and the
line (the row, for Parquet).
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
from workbench.data.facts import FACT_KINDS, Fact

_JSON_SUFFIXES = (".jsonl", ".json")


_CSV_SUFFIXES = (".csv",)


_PARQUET_SUFFIXES = (".parquet",)


FILE_FORMATS = FACT_KINDS
"""The row shapes ``format`` may force: cloze, mc, qa, text."""


QA_PROMPT = "Question: {question}\nAnswer:"
"""How a question-answering row is asked (the answer follows after one space)."""


_TEXT_FIELDS = ("domain", "relation", "subject")


_DIGITS = re.compile(r"^[+-]?\d+$")


_SHAPES = ("cloze {prompt, answer}, multiple choice {question, choices, answer index}, "
           "question answering {question, answer}, raw text {text}")


def load_fact_file(
    path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    max_context: int | None = None,
    format: str | None = None,
) -> tuple[Fact, ...]:
    """Read facts from a JSONL (``.jsonl``/``.json``, one object per line), CSV or Parquet file.

    Row shapes (see the module docstring; extra fields are ignored):

    * cloze: ``{"prompt": ..., "answer": "<text>"}``, optional ``choices`` (list; must include
      the answer), ``corrupt_prompt``, ``domain``, ``relation``, ``subject``, ``template``,
      ``paraphrase``, ``kind``, ``paraphrased_answers``, ``perturbed_answers``;
    * multiple choice: ``{"question": ..., "choices": [...], "answer": <index>}`` where the
      index (an int or a digit string, 0-based) selects the answer among the choices; the fact
      gets ``prompt=question``, ``answer=choices[index]``;
    * question answering: ``{"question": ..., "answer": "<text>"}``, optional
      ``paraphrased_answer`` / ``perturbed_answer`` (text or list); the fact gets
      ``prompt = "Question: <question>\\nAnswer:"`` (:data:`QA_PROMPT`);
    * raw text: ``{"text": ...}``; the prompt is its first half of words, the answer the rest.

    ``format`` (one of :data:`FILE_FORMATS`) forces one shape for every row; by default each
    row's shape is told from its fields. In CSV the first row is the header, list fields are
    one ``|``-separated cell and empty cells count as absent; Parquet as the ``datasets``
    library writes it (``Dataset.to_parquet``), nulls counting as absent. Texts are stripped
    of surrounding whitespace; blank lines are skipped.

    With ``tokenizer`` (a Hugging Face tokenizer), no answer may contain the unknown token.
    Answers may be several tokens (scored over their whole span). With ``max_context`` too,
    the prompt (with special tokens) plus its longest answer/choice must fit in
    ``max_context`` tokens.

    Raises:
        WorkbenchError: naming the file and the line, for a missing path, a directory, an
            unknown extension or format, non-UTF-8 bytes, invalid JSON, a row of no known
            shape, a missing field, a bad answer index, an empty prompt or answer, an unknown
            answer token, a prompt longer than the context, a repeated prompt, or an empty file.
    """
    p = Path(path)
    if format is not None and format not in FILE_FORMATS:
        raise WorkbenchError(f"unknown fact file format {format!r}; use one of {', '.join(FILE_FORMATS)}")
    if not p.exists():
        raise WorkbenchError(f"{p}: no such file")
    if p.is_dir():
        raise WorkbenchError(f"{p}: is a directory, not a fact file (.jsonl, .json, .csv or .parquet)")
    suffix = p.suffix.lower()
    if suffix not in _JSON_SUFFIXES + _CSV_SUFFIXES + _PARQUET_SUFFIXES:
        raise WorkbenchError(
            f"{p}: unsupported fact file type {p.suffix or '(no extension)'!r}; "
            "use .jsonl / .json (one JSON object per line), .csv or .parquet"
        )
    if max_context is not None and tokenizer is None:
        raise WorkbenchError("max_context needs a tokenizer to count prompt tokens")
    rows, unit = _read_rows(p, suffix)

    facts: list[Fact] = []
    first_seen: dict[tuple[str, tuple[str, ...]], int] = {}
    for lineno, row in rows:
        where = f"{p}, {unit} {lineno}"
        fact = _row_to_fact(row, where, format or row_shape(row, where))
        key = (fact.prompt, fact.choices)
        if key in first_seen:
            raise WorkbenchError(f"{where}: repeats the prompt of {unit} {first_seen[key]}: {fact.prompt!r}")
        first_seen[key] = lineno
        if tokenizer is not None:
            _check_tokens(fact, where, tokenizer, max_context)
        facts.append(fact)
    return tuple(facts)


def row_shape(row: Mapping[str, Any], where: str) -> str:
    """The shape of one row (one of :data:`FILE_FORMATS`), told from its fields."""
    if "prompt" in row:
        return "cloze"
    if "question" in row:
        answer = row.get("answer")
        # A JSON integer answer can only be an index: a multiple-choice row (missing choices
        # are then reported as such).
        if "choices" in row or (isinstance(answer, int) and not isinstance(answer, bool)):
            return "mc"
        return "qa"
    if "text" in row:
        return "text"
    fields = ", ".join(sorted(row)) or "none"
    raise WorkbenchError(
        f"{where}: missing field 'prompt' (or 'question', or 'text'): a row has one of the shapes "
        f"{_SHAPES}; this row has the fields {fields} (force a shape with --format cloze|mc|qa|text)"
    )


def _read_rows(p: Path, suffix: str) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """The rows with their 1-based line numbers (row numbers for Parquet), and that unit's name."""
    if suffix in _PARQUET_SUFFIXES:
        return _parquet_rows(p), "row"
    try:
        data = p.read_bytes()
    except OSError as e:
        raise WorkbenchError(f"{p}: cannot read the file ({e.strerror or e})") from e
    lines = _decode_lines(data, str(p))
    return (_json_rows(lines, str(p)) if suffix in _JSON_SUFFIXES else _csv_rows(lines, str(p))), "line"


def _parquet_rows(p: Path) -> list[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowException) as e:
        raise WorkbenchError(f"{p}: not a readable Parquet file ({e})") from None
    # Nulls are absent fields, so "missing field" errors work as for JSON.
    rows = [(i, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(table.to_pylist(), start=1)]
    if not rows:
        raise WorkbenchError(f"{p}, row 1: the file is empty (no fact rows)")
    return rows


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
                if "text" in header and "prompt" not in header and "question" not in header:
                    continue  # raw text rows need no answer column
                if "answer" not in header:
                    raise WorkbenchError(
                        f"{label}, line {lineno}: missing column 'answer' in the header (columns: {', '.join(header)})"
                    )
                if "prompt" not in header and "question" not in header:
                    raise WorkbenchError(
                        f"{label}, line {lineno}: missing column 'prompt' (cloze) or 'question' "
                        f"(multiple choice, question answering) in the header (columns: {', '.join(header)})"
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


def _parse_texts(value: Any, name: str, where: str) -> tuple[str, ...]:
    """A list of non-empty texts: a JSON list, or one text (``a|b|c`` splits in CSV cells)."""
    if isinstance(value, str):
        items: list[Any] = value.split("|")
    elif isinstance(value, list):
        items = value
    else:
        raise WorkbenchError(f"{where}: field {name!r} must be a list of texts (or 'a|b|c' in CSV)")
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise WorkbenchError(f"{where}: {name} item {k} must be text, got {json.dumps(item)}")
        if not item.strip():
            raise WorkbenchError(f"{where}: {name} item {k} is empty")
        out.append(item.strip())
    return tuple(out)


def _parse_choices(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (str, list)):
        raise WorkbenchError(f"{where}: field 'choices' must be a list of texts (or 'a|b|c' in CSV)")
    out = _parse_texts(value, "choices", where)
    if len(out) < 2:
        raise WorkbenchError(f"{where}: multiple choice needs at least 2 choices, got {len(out)}")
    if len(set(out)) != len(out):
        raise WorkbenchError(f"{where}: the choices {list(out)} repeat a value")
    return out


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


def _require(row: Mapping[str, Any], names: tuple[str, ...], shape: str, where: str) -> None:
    for name in names:
        if name not in row:
            raise WorkbenchError(f"{where}: missing field {name!r} (a {shape} row has {', '.join(names)})")


def _row_to_fact(row: Mapping[str, Any], where: str, shape: str) -> Fact:
    """Build a Fact from one parsed row of the given shape."""
    if "question" in row and "prompt" in row:
        raise WorkbenchError(f"{where}: give either 'prompt' (cloze) or 'question' (multiple choice), not both")
    try:
        if shape == "text":
            return _text_fact(row, where)
        if shape == "qa":
            return _qa_fact(row, where)
        if shape == "mc":
            return _mc_fact(row, where)
        return _cloze_fact(row, where)
    except WorkbenchError as e:  # anything Fact itself rejects, reported with the line
        raise (e if str(e).startswith(where) else WorkbenchError(f"{where}: {e}")) from None


def _prompt(row: Mapping[str, Any], name: str, where: str) -> str:
    prompt = _text_field(row, name, where)
    if not prompt:
        raise WorkbenchError(f"{where}: empty prompt")
    return prompt


def _mc_fact(row: Mapping[str, Any], where: str) -> Fact:
    _require(row, ("question", "answer"), "multiple-choice", where)
    if "choices" not in row:
        raise WorkbenchError(f"{where}: missing field 'choices' (a multiple-choice row needs them)")
    question = _prompt(row, "question", where)
    choices = _parse_choices(row["choices"], where)
    answer = choices[_parse_index(row["answer"], len(choices), where)]
    return Fact(prompt=question, answer=answer, choices=choices, kind="mc", **_extras(row, question, where))


def _qa_fact(row: Mapping[str, Any], where: str) -> Fact:
    _require(row, ("question", "answer"), "question-answering", where)
    question = _prompt(row, "question", where)
    answer = _text_field(row, "answer", where)
    if not answer:
        raise WorkbenchError(f"{where}: empty answer")
    lists = {}
    for field, names in (("paraphrased_answers", ("paraphrased_answer", "paraphrased_answers")),
                         ("perturbed_answers", ("perturbed_answer", "perturbed_answers"))):
        for name in names:
            if name in row:
                lists[field] = _parse_texts(row[name], name, where)
    return Fact(prompt=QA_PROMPT.format(question=question), answer=answer, choices=(), kind="qa", **lists,
                **_extras(row, question, where))


def _text_fact(row: Mapping[str, Any], where: str) -> Fact:
    _require(row, ("text",), "raw-text", where)
    text = _text_field(row, "text", where)
    words = list(re.finditer(r"\S+", text))
    if len(words) < 2:
        raise WorkbenchError(f"{where}: a raw-text row needs at least two words (a prefix and its continuation)")
    # The first half of the words is the prompt; the rest is the continuation to reproduce.
    cut = words[len(words) // 2].start()
    return Fact(prompt=text[:cut].rstrip(), answer=text[cut:].strip(), choices=(), kind="text")


def _cloze_fact(row: Mapping[str, Any], where: str) -> Fact:
    if "prompt" not in row:
        raise WorkbenchError(f"{where}: missing field 'prompt' (a cloze row has prompt, answer)")
    if "answer" not in row:
        raise WorkbenchError(f"{where}: missing field 'answer'")
    prompt = _prompt(row, "prompt", where)
    choices = _parse_choices(row["choices"], where) if "choices" in row else ()
    raw = row["answer"]
    if isinstance(raw, int) and not isinstance(raw, bool) and choices:
        # A JSON integer next to choices can only be an index (digit strings stay text:
        # cloze answers such as "1984" are legitimate).
        answer = choices[_parse_index(raw, len(choices), where)]
    else:
        answer = _text_field(row, "answer", where)
        if not answer:
            raise WorkbenchError(f"{where}: empty answer")
        if choices and answer not in choices:
            raise WorkbenchError(f"{where}: the answer {answer!r} is not one of the choices {list(choices)}")
    extra = _extras(row, prompt, where)
    if "kind" in row:
        extra["kind"] = _text_field(row, "kind", where)
    for name in ("paraphrased_answers", "perturbed_answers"):
        if name in row:
            extra[name] = _parse_texts(row[name], name, where)
    return Fact(prompt=prompt, answer=answer, choices=choices, **extra)


def _extras(row: Mapping[str, Any], prompt: str, where: str) -> dict[str, Any]:
    """The optional metadata fields of any row shape."""
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
    return extra


def _token_ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _check_tokens(fact: Fact, where: str, tokenizer: Any, max_context: int | None) -> None:
    answers = fact.choices or (fact.answer,)
    spans = [_token_ids(tokenizer, " " + a, False) for a in answers]
    unk = getattr(tokenizer, "unk_token_id", None)
    for text, ids in zip(answers, spans):
        if unk is not None and unk in ids:
            raise WorkbenchError(
                f"{where}: the answer {text!r} is not in the tokenizer's vocabulary (it encodes to "
                f"{tokenizer.unk_token!r}); the model cannot be scored on it"
            )
        if not ids:
            raise WorkbenchError(f"{where}: the answer {text!r} encodes to no tokens")
    if max_context is not None:
        # The scored sequence is prompt (+ special tokens the model adds) + the answer tokens.
        cont = max(len(ids) for ids in spans)
        for name, text in (("prompt", fact.prompt), ("corrupt_prompt", fact.corrupt_prompt)):
            if not text:
                continue
            n = len(_token_ids(tokenizer, text, True)) + cont
            if n > max_context:
                raise WorkbenchError(
                    f"{where}: the {name} and its answer take {n} tokens, more than the model's "
                    f"context of {max_context}"
                )
