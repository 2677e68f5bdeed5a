"""Griffe extension used by the documentation build (mkdocs.yml): reStructuredText habits -> Markdown.

The docstrings of this project are Google style, with two habits that griffe does not translate:

* a singular ``Example:`` heading: griffe parses only ``Examples:`` as a section of doctest code; the
  singular becomes an admonition whose ``>>>`` lines render as nested quotes and whose outputs
  (``[...]``) are mistaken for cross-references;
* ``.. math::`` blocks and ``:math:`...``` roles, which become ``$$ ... $$`` and ``$...$`` for the
  ``pymdownx.arithmatex`` extension (rendered by MathJax in the browser);
* Sphinx cross-reference roles (``:func:`~pkg.mod.name```), which become inline code (``name``; the
  full path without ``~``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::[ \t]*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        base = match.group(1)
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(base)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        content = [line for line in body if line.strip()]
        depth = min((_indent(line) for line in content), default=0)
        out.append(f"{base}$$")
        out.extend(f"{base}{line[depth:]}" if line.strip() else "" for line in body if line.strip())
        out.append(f"{base}$$")
        out.append("")
    return "\n".join(out)


def _xref_as_code(match: re.Match) -> str:
    target = match.group(2)
    shown = target.rsplit(".", 1)[-1] if match.group(1) else target
    return f"`{shown}`"


class DocstringsToMarkdown(griffe.Extension):
    """Apply the rewrites above to every docstring before griffe parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        value = docstring.value
        if "Example:" in value:
            value = _SINGULAR.sub(r"\1Examples:", value)
        if ".. math::" in value:
            value = _math_blocks(value)
        if ":math:`" in value:
            value = _MATH_ROLE.sub(r"$\1$", value)
        if ":`" in value:
            value = _XREF_ROLE.sub(_xref_as_code, value)
        docstring.value = value
