"""`mgssl train --print-config CONFIG`: every config key with its value, its default and its meaning,
read from the comments beside the fields of the config dataclasses, as a YAML file that loads back."""
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any

import yaml

_FIELD = re.compile(r"    (\w+)\s*:")


def field_comments(cls) -> dict[str, str]:
    """name -> meaning of each field of dataclass `cls`: the comment on its line, or the comment lines
    just above a field that has none on its line; comment lines above a field that has its own
    continue the field before it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number (from 1) -> comment text
    whole_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                whole_line.add(tok.start[0])
    names = {f.name for f in dataclasses.fields(cls)}
    meanings: dict[str, str] = {}
    pending: list[str] = []
    last = None
    for number, line in enumerate(source.splitlines(), start=1):
        if number in whole_line:
            pending.append(comments[number])
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in names:
            name = match.group(1)
            own = comments.get(number)
            if own and pending and last:
                meanings[last] = " ".join([meanings[last], *pending]).strip()
            meanings[name] = own if own else " ".join(pending)
            pending, last = [], name
        elif pending and last:
            meanings[last] = " ".join([meanings[last], *pending]).strip()
            pending = []
    return meanings


def _inline(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _lines(obj, default, indent: str) -> list[str]:
    meanings = field_comments(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value, fallback = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out.append(f"{indent}{f.name}:")
            out += _lines(value, fallback, indent + "  ")
            continue
        note = meanings.get(f.name, "")
        if value != fallback:
            note = f"(default: {_inline(fallback)}) {note}".strip()
        out.append(f"{indent}{f.name}: {_inline(value)}" + (f"  # {note}" if note else ""))
    return out


def describe(cfg, source: str) -> str:
    """The whole config `cfg` as YAML, each key commented with its meaning, and with its default where
    `cfg` differs from it; `source` says where the values came from."""
    header = [f"# The config of {source}: every key, with its meaning and, where this config changes it, its",
              "# default. Override a key with --set KEY=VALUE (e.g. --set train.steps=1000 data.root=/data)."]
    return "\n".join(header + _lines(cfg, type(cfg)(), "")) + "\n"
