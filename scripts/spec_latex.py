#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""docs/spec.md -> the chapter in the OASIS virtio specification's source layout.

Writes docs/virtio-spec/device-types/fabric/{description,device-conformance,driver-conformance}.tex
from docs/spec.md, using the specification's own macros (\\devicenormative, \\drivernormative,
\\conformance, \\field, lstlisting, tabularx), so the folder can be dropped into the
specification's tree (content.tex and conformance.tex then input it; see
docs/virtio-spec/README.md).

    python3 scripts/spec_latex.py           # regenerate the .tex files
    python3 scripts/spec_latex.py --check   # fail if they are stale or the chapter is inconsistent

--check fails (exit 1, one line per problem) when
  * a committed .tex file differs from what docs/spec.md generates (stale);
  * a requirements section of the markdown has no normative block in the LaTeX;
  * a normative block of description.tex is not listed in exactly one conformance clause (the
    device clause for device requirements, the driver clause for driver requirements), or a clause
    lists a block that does not exist;
  * Appendix B of the markdown does not cite every requirements section exactly once, in the right
    list;
  * a normative key word (MUST, SHOULD, MAY, ...) appears outside a requirements section, except in
    sections marked *(informative)* and in the key-word paragraph itself;
  * a reference (§N) names no section, or a skipped one, or two sections have the same number;
  * braces or \\begin/\\end environments of a generated file do not balance.

Markdown conventions the generator relies on:
  * headings "## 6. Title", "### 6.2 Title", "## Appendix A. Title"; requirements sections are
    headings titled "Device Requirements: X" / "Driver Requirements: X";
  * `<!-- latex:skip-begin -->` ... `<!-- latex:skip-end -->` leave the lines between them out;
  * `<!-- latex:skip -->` right after a heading leaves that section (and its subsections) out of
    the LaTeX chapter (project-specific material: implementation notes); before the first "##"
    heading it leaves out the preamble text up to the next heading;
  * Appendix B ("Conformance") lists the requirements sections as bullets starting with "§N",
    under "### B.1 Device conformance" and "### B.2 Driver conformance".
Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "spec.md"
OUT_DIR = ROOT / "docs" / "virtio-spec" / "device-types" / "fabric"
DEVICE_NAME = "Fabric Device"
BASE_PATH = f"Device Types / {DEVICE_NAME}"
SECTIONING = {1: "\\section", 2: "\\subsection", 3: "\\subsubsection", 4: "\\paragraph", 5: "\\subparagraph"}
KEYWORDS = re.compile(r"\b(MUST|SHALL|SHOULD|REQUIRED|RECOMMENDED|MAY|OPTIONAL)\b")
SKIP = "<!-- latex:skip -->"
SKIP_BEGIN = "<!-- latex:skip-begin -->"
SKIP_END = "<!-- latex:skip-end -->"
HEADER = "% Generated from docs/spec.md by scripts/spec_latex.py: edit the markdown, not this file.\n"

# Characters outside ASCII, as LaTeX that builds with pdflatex and xelatex alike.
UNICODE = {
    "—": "---", "–": "--", "−": "$-$", "→": "$\\rightarrow$", "←": "$\\leftarrow$",
    "≤": "$\\leq$", "≥": "$\\geq$", "≠": "$\\neq$", "×": "$\\times$", "·": "$\\cdot$",
    "…": "\\ldots{}", "⌊": "$\\lfloor$", "⌋": "$\\rfloor$", "✓": "yes", "∧": "$\\wedge$",
    "“": "``", "”": "''", "‘": "`", "’": "'", "§": "\\S{}", "≈": "$\\approx$", "µ": "$\\mu$",
    "±": "$\\pm$", "∞": "$\\infty$", "⁶": "$^6$", "²": "$^2$", "é": "\\'e", "ä": "\\\"a", "ö": "\\\"o",
    "ü": "\\\"u", "\u00a0": "~", "∈": "$\\in$", "⊆": "$\\subseteq$", "∪": "$\\cup$", "∩": "$\\cap$",
    "⇒": "$\\Rightarrow$", "⇔": "$\\Leftrightarrow$", "✗": "no", "≪": "$\\ll$", "≫": "$\\gg$",
    "′": "'", "″": "''", "√": "$\\surd$", "¹": "$^1$", "³": "$^3$", "½": "1/2", "€": "EUR", "↔": "$\\leftrightarrow$", "≡": "$\\equiv$", "°": "$^\\circ$",
}


class SpecError(Exception):
    """A problem in the markdown that stops generation."""


@dataclass
class Section:
    level: int
    number: str  # "6.2", "A", "" (unnumbered)
    title: str  # markdown inline text, number removed
    parent: "Section | None"
    line: int
    skipped: bool = False
    informative: bool = False
    children: list = field(default_factory=list)

    @property
    def plain_title(self) -> str:
        t = re.sub(r"\*\(informative\)\*|\(informative\)", "", self.title)
        t = t.replace("`", "").replace("*", "")
        return re.sub(r"\s+", " ", t).strip()

    @property
    def requirement(self) -> tuple[str, str] | None:
        m = re.match(r"(Device|Driver) Requirements: (.+)$", self.plain_title)
        return (m.group(1).lower(), m.group(2)) if m else None

    def path_titles(self) -> list[str]:
        out = []
        s: Section | None = self
        while s is not None and s.level >= 2:
            out.append(s.plain_title)
            s = s.parent
        return list(reversed(out))

    @property
    def label(self) -> str:
        req = self.requirement
        if req:
            parent = self.parent.path_titles() if self.parent else []
            return f"{req[0]}normative:" + " / ".join([BASE_PATH] + parent)
        if self.level == 1:
            return f"sec:{BASE_PATH}"
        return "sec:" + " / ".join([BASE_PATH] + self.path_titles())

    def is_skipped(self) -> bool:
        s: Section | None = self
        while s is not None:
            if s.skipped:
                return True
            s = s.parent
        return False

    def is_informative(self) -> bool:
        s: Section | None = self
        while s is not None:
            if s.informative:
                return True
            s = s.parent
        return False


HEADING = re.compile(r"^(#{1,6}) +(.*?)\s*$")


def parse_heading(text: str) -> tuple[str, str]:
    m = re.match(r"^Appendix ([A-Z])\. +(.*)$", text)
    if m:
        return m.group(1), m.group(2)
    m = re.match(r"^([A-Z]\.\d+(?:\.\d+)*|\d+(?:\.\d+)*)\.? +(.*)$", text)
    if m:
        return m.group(1), m.group(2)
    return "", text


@dataclass
class Doc:
    lines: list[str]
    sections: list[Section]
    # (section, line index) of each line: which section a line belongs to.
    owner: list[Section | None]
    struct_fields: set[str]

    def by_number(self, num: str) -> Section | None:
        for s in self.sections:
            if s.number == num:
                return s
        return None

    def requirements(self) -> list[Section]:
        return [s for s in self.sections if s.requirement]


def load(text: str) -> Doc:
    lines = text.split("\n")
    sections: list[Section] = []
    owner: list[Section | None] = []
    stack: list[Section] = []
    in_code = False
    preamble_skip = False
    range_skip = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        m = None if in_code else HEADING.match(line)
        if m and range_skip:
            raise SpecError(f"line {i + 1}: a heading inside {SKIP_BEGIN} ... {SKIP_END}: use {SKIP} after it")
        if m:
            level = len(m.group(1))
            num, title = parse_heading(m.group(2))
            while stack and stack[-1].level >= level:
                stack.pop()
            s = Section(level, num, title, stack[-1] if stack else None, i)
            s.informative = "(informative)" in title
            if s.parent:
                s.parent.children.append(s)
            sections.append(s)
            stack.append(s)
            preamble_skip = False
            owner.append(s)
            continue
        if line.strip() == SKIP_BEGIN:
            range_skip = True
        if range_skip:
            if line.strip() == SKIP_END:
                range_skip = False
            owner.append(None)
            continue
        if line.strip() == SKIP:
            if stack and stack[-1].level >= 2 and _only_blank_since(lines, stack[-1].line, i):
                stack[-1].skipped = True
            else:
                preamble_skip = True
        owner.append(None if preamble_skip else (stack[-1] if stack else None))
    if in_code:
        raise SpecError("unterminated ``` code block")
    if range_skip:
        raise SpecError(f"{SKIP_BEGIN} without {SKIP_END}")
    fields = set()
    for blk in re.findall(r"```c\n(.*?)```", text, flags=re.S):
        for fm in re.finditer(r"^\s*(?:le16|le32|le64|u8|u16|u32|u64|struct \w+)\s+(\w+)(?:\[[^\]]*\])?;", blk, flags=re.M):
            fields.add(fm.group(1))
    return Doc(lines, sections, owner, fields)


def _only_blank_since(lines: list[str], start: int, end: int) -> bool:
    return all(not lines[k].strip() for k in range(start + 1, end))


# ---------------------------------------------------------------------------------------------
# Inline text


def escape(s: str) -> str:
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\textbackslash{}")
        elif ch in "{}$&#%_":
            out.append("\\" + ch)
        elif ch == "~":
            out.append("\\textasciitilde{}")
        elif ch == "^":
            out.append("\\textasciicircum{}")
        elif ch == "<":
            out.append("\\textless{}")
        elif ch == ">":
            out.append("\\textgreater{}")
        elif ch == "|":
            out.append("\\textbar{}")
        elif ord(ch) > 127:
            if ch not in UNICODE:
                raise SpecError(f"no LaTeX form for character {ch!r} (U+{ord(ch):04X}): add it to UNICODE")
            out.append(UNICODE[ch])
        else:
            out.append(ch)
    return "".join(out)


class Renderer:
    def __init__(self, doc: Doc):
        self.doc = doc
        self.refs: dict[str, str] = {}
        for s in doc.sections:
            if s.number:
                self.refs[s.number] = s.label
        self.problems: list[str] = []
        self.line = 0

    def ref(self, num: str) -> str:
        s = self.doc.by_number(num)
        if s is None:
            raise SpecError(f"line {self.line + 1}: reference §{num} names no section")
        if s.is_skipped():
            raise SpecError(f"line {self.line + 1}: reference §{num} names a section left out of the LaTeX chapter")
        return "\\ref{" + s.label + "}"

    def inline(self, text: str) -> str:
        try:
            return self._inline(text)
        except SpecError as e:
            if str(e).startswith("line "):
                raise
            raise SpecError(f"line {self.line + 1}: {e}") from None

    def _inline(self, text: str) -> str:
        text = text.replace("\\|", "|")
        out = []
        pos = 0
        # Code spans first: nothing inside them is markup.
        for m in re.finditer(r"`([^`]+)`", text):
            out.append(self._emph(text[pos:m.start()]))
            code = m.group(1)
            if code in self.doc.struct_fields:
                out.append("\\field{" + escape(code) + "}")
            else:
                out.append("\\texttt{" + escape(code) + "}")
            pos = m.end()
        out.append(self._emph(text[pos:]))
        return "".join(out)

    def _emph(self, text: str) -> str:
        out = []
        pos = 0
        for m in re.finditer(r"\*\*(.+?)\*\*|\*([^*\s](?:[^*]*?[^*\s])?)\*", text):
            out.append(self._plain(text[pos:m.start()]))
            if m.group(1) is not None:
                out.append("\\textbf{" + self._plain(m.group(1)) + "}")
            else:
                out.append("\\emph{" + self._plain(m.group(2)) + "}")
            pos = m.end()
        out.append(self._plain(text[pos:]))
        return "".join(out)

    def _plain(self, text: str) -> str:
        out = []
        pos = 0
        for m in re.finditer(r"§([A-Z]?\d+(?:\.\d+)*)|\[([^\]]+)\]\(([^)]+)\)", text):
            out.append(escape(text[pos:m.start()]))
            if m.group(1):
                out.append(self.ref(m.group(1)))
            else:
                out.append(escape(m.group(2)))
            pos = m.end()
        out.append(escape(text[pos:]))
        return "".join(out)

    # -----------------------------------------------------------------------------------------
    # Blocks

    def blocks(self, lines: list[str], base: int) -> list[str]:
        """LaTeX for a run of markdown lines without headings (`base`: index of lines[0])."""
        out: list[str] = []
        i = 0
        n = len(lines)
        while i < n:
            self.line = base + i
            line = lines[i]
            s = line.strip()
            if not s or s == SKIP or re.fullmatch(r"-{3,}", s):
                i += 1
                continue
            if s.startswith("```"):
                j = i + 1
                while j < n and not lines[j].strip().startswith("```"):
                    j += 1
                body = lines[i + 1:j]
                for k, b in enumerate(body):
                    if any(ord(c) > 127 for c in b):
                        raise SpecError(f"line {base + i + 2 + k}: non-ASCII character in a code block")
                out.append("\\begin{lstlisting}\n" + "\n".join(body) + "\n\\end{lstlisting}")
                i = j + 1
                continue
            if s.startswith("|"):
                j = i
                while j < n and lines[j].strip().startswith("|"):
                    j += 1
                out.append(self.table(lines[i:j]))
                i = j
                continue
            if LIST_ITEM.match(line):
                j, items, ordered = self.list_items(lines, i)
                env = "enumerate" if ordered else "itemize"
                body = []
                for start, item in items:
                    inner = self.blocks(item, base + start)
                    body.append("\\item " + "\n\n".join(inner))
                out.append(f"\\begin{{{env}}}\n" + "\n".join(body) + f"\n\\end{{{env}}}")
                i = j
                continue
            if re.fullmatch(r"`[^`]+`", s) and i + 1 < n and lines[i + 1].startswith(": "):
                items = []
                while i < n and re.fullmatch(r"`[^`]+`", lines[i].strip()) and i + 1 < n and lines[i + 1].startswith(": "):
                    term = lines[i].strip()
                    j = i + 1
                    body = [lines[j][2:]]
                    j += 1
                    while j < n and lines[j].startswith("  ") and lines[j].strip():
                        body.append(lines[j].strip())
                        j += 1
                    items.append("\\item[" + self.inline(term) + "] " + self.inline(" ".join(body)))
                    while j < n and not lines[j].strip():
                        j += 1
                    i = j
                out.append("\\begin{description}\n" + "\n".join(items) + "\n\\end{description}")
                continue
            j = i
            para = []
            while j < n and lines[j].strip() and not self._starts_block(lines, j):
                para.append(lines[j].strip())
                j += 1
            if not para:  # a line that starts a block we do not know: keep it as text
                para.append(s)
                j = i + 1
            out.append(self.inline(" ".join(para)))
            i = j
        return out

    def _starts_block(self, lines: list[str], j: int) -> bool:
        s = lines[j].strip()
        return (s.startswith("```") or s.startswith("|") or bool(LIST_ITEM.match(lines[j]))
                or s == SKIP or bool(re.fullmatch(r"-{3,}", s)))

    def list_items(self, lines: list[str], i: int) -> tuple[int, list[tuple[int, list[str]]], bool]:
        first = LIST_ITEM.match(lines[i])
        assert first
        ordered = first.group(2)[0].isdigit()
        items: list[tuple[int, list[str]]] = []
        n = len(lines)
        while i < n:
            m = LIST_ITEM.match(lines[i])
            if not m or m.group(1):  # an indented item belongs to the previous item
                break
            if m.group(2)[0].isdigit() != ordered:
                break
            indent = len(m.group(1)) + len(m.group(2)) + 1
            body = [lines[i][indent:]]
            start = i
            i += 1
            while i < n:
                ln = lines[i]
                if not ln.strip():
                    # A blank line continues the item if the next line is indented.
                    k = i
                    while k < n and not lines[k].strip():
                        k += 1
                    if k < n and lines[k].startswith("  "):
                        body.extend([""] * (k - i))
                        i = k
                        continue
                    break
                if ln.startswith(" "):
                    body.append(_dedent(ln, indent))
                    i += 1
                    continue
                if LIST_ITEM.match(ln):
                    break
                # A lazy continuation line of the item's paragraph.
                body.append(ln)
                i += 1
            items.append((start, body))
            while i < n and not lines[i].strip():
                k = i
                while k < n and not lines[k].strip():
                    k += 1
                m2 = LIST_ITEM.match(lines[k]) if k < n else None
                if m2 and not m2.group(1) and m2.group(2)[0].isdigit() == ordered:
                    i = k
                else:
                    break
        return i, items, ordered

    def table(self, rows: list[str]) -> str:
        cells = [_split_row(r) for r in rows]
        if len(cells) < 2 or not all(re.fullmatch(r":?-{3,}:?", c.strip()) for c in cells[1]):
            raise SpecError(f"line {self.line + 1}: table without a header separator")
        header, body = cells[0], cells[2:]
        ncol = len(header)
        for r in body:
            if len(r) != ncol:
                raise SpecError(f"line {self.line + 1}: table row with {len(r)} cells, header has {ncol}")
        # Short columns keep their natural width (l); the others stretch (X), weighted by how much
        # text they hold, so names stay on one line and descriptions wrap.
        widths = [max(len(r[c].strip()) for r in [header] + body) for c in range(ncol)]
        spec = ["l" if w <= 12 else "X" for w in widths]
        if "X" not in spec:
            spec[widths.index(max(widths))] = "X"
        xcols = [c for c in range(ncol) if spec[c] == "X"]
        # Each stretched column gets room for its longest word (identifiers do not break), and the
        # rest of the line in proportion to its text.
        free = max(20, LINE_CHARS - sum(widths[c] + 3 for c in range(ncol) if spec[c] == "l"))
        longest = {c: max(len(w) for r in [header] + body for w in (r[c].split() or [""])) for c in xcols}
        base = {c: min(longest[c] + 2, free / len(xcols) * 1.6) for c in xcols}
        spare = max(0.0, free - sum(base.values()))
        text = {c: min(widths[c], 80) for c in xcols}
        weight = {c: base[c] + spare * text[c] / sum(text.values()) for c in xcols}
        wsum = sum(weight.values())
        colspec = []
        for c in range(ncol):
            if spec[c] == "l":
                colspec.append("l")
            else:
                factor = weight[c] * len(xcols) / wsum
                colspec.append(f">{{\\hsize={factor:.2f}\\hsize}}X" if len(xcols) > 1 else "X")
        # A tabularx never breaks across pages: cut long tables into several, each with the header
        # row, at an estimated height that fits a page.
        per_line = {c: max(8, free * weight[c] / wsum) for c in xcols}

        def height(row: list[str]) -> float:
            return 0.6 + max(1, *(-(-len(row[c].strip()) // int(per_line[c])) for c in xcols))

        chunks: list[list[list[str]]] = [[]]
        used = height(header)
        for r in body:
            h = height(r)
            if chunks[-1] and used + h > TABLE_LINES:
                chunks.append([])
                used = height(header)
            chunks[-1].append(r)
            used += h
        out = []
        for chunk in chunks:
            out.append("\\begin{tabularx}{\\textwidth}{|" + "|".join(colspec) + "|}")
            out.append("\\hline")
            out.append(" & ".join(self.inline(h.strip()) for h in header) + " \\\\")
            out.append("\\hline \\hline")
            for r in chunk:
                out.append(" & ".join(self.inline(c.strip()) for c in r) + " \\\\")
                out.append("\\hline")
            out.append("\\end{tabularx}")
            out.append("")
        return "\n".join(out).rstrip("\n")


LIST_ITEM = re.compile(r"^( *)([*-]|\d+\.) +\S")
# Characters of body text on one line of the page, and the text lines one table part may take.
LINE_CHARS = 75
TABLE_LINES = 34


def _dedent(line: str, indent: int) -> str:
    k = 0
    while k < indent and k < len(line) and line[k] == " ":
        k += 1
    return line[k:]


def _split_row(row: str) -> list[str]:
    s = row.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    parts = re.split(r"(?<!\\)\|", s)
    return [p.replace("\\|", "\\|") for p in parts]


# ---------------------------------------------------------------------------------------------
# The three files


def generate(text: str) -> dict[str, str]:
    doc = load(text)
    r = Renderer(doc)
    desc: list[str] = [HEADER]
    body_lines: list[tuple[int, str]] = []

    def flush(chunk: list[tuple[int, str]]):
        if chunk:
            desc.extend(b + "\n" for b in _join(r.blocks([c for _, c in chunk], chunk[0][0])))

    chunk: list[tuple[int, str]] = []
    for i, line in enumerate(doc.lines):
        sec = doc.owner[i]
        if sec is not None and sec.line == i:  # a heading
            flush(chunk)
            chunk = []
            if sec.is_skipped() or _in_conformance_appendix(sec):
                continue
            if sec.level > 5:
                raise SpecError(f"line {i + 1}: headings deeper than ##### have no sectioning command")
            r.line = i
            cmd = SECTIONING[sec.level]
            req = sec.requirement
            if req:
                macro = "\\devicenormative" if req[0] == "device" else "\\drivernormative"
                path = sec.label.split(":", 1)[1]
                desc.append(f"{macro}{{{cmd}}}{{{r.inline(req[1])}}}{{{path}}}\n")
            else:
                title = sec.title.replace("*(informative)*", "(informative)")
                desc.append(f"{cmd}{{{r.inline(title)}}}\\label{{{sec.label}}}\n")
            continue
        if sec is None or sec.is_skipped() or _in_conformance_appendix(sec):
            flush(chunk)
            chunk = []
            continue
        chunk.append((i, line))
    flush(chunk)
    del body_lines

    dev = [s for s in doc.requirements() if s.requirement[0] == "device" and not s.is_skipped()]
    drv = [s for s in doc.requirements() if s.requirement[0] == "driver" and not s.is_skipped()]

    def clause(kind: str, items: list[Section]) -> str:
        # "Fabric Device Conformance", "Fabric Driver Conformance" (as the specification names
        # the clauses of every device type).
        title = f"{DEVICE_NAME.removesuffix(' Device')} {kind} Conformance"
        target = "device" if kind == "Device" else "driver"
        out = [HEADER,
               f"\\conformance{{\\subsection}}{{{title}}}\\label{{sec:Conformance / {kind} Conformance / {title}}}\n",
               f"A fabric {target} MUST conform to the following normative statements:\n",
               "\\begin{itemize}"]
        out += ["\\item \\ref{" + s.label + "}" for s in items]
        out.append("\\end{itemize}\n")
        return "\n".join(out)

    return {
        "description.tex": "\n".join(desc).replace("\n\n\n", "\n\n"),
        "device-conformance.tex": clause("Device", dev),
        "driver-conformance.tex": clause("Driver", drv),
    }


def _join(blocks: list[str]) -> list[str]:
    return blocks


def _in_conformance_appendix(sec: Section) -> bool:
    s: Section | None = sec
    while s is not None:
        if s.level == 2 and s.number == "B":
            return True
        s = s.parent
    return False


# ---------------------------------------------------------------------------------------------
# Checks


def check_balanced(name: str, tex: str) -> list[str]:
    problems = []
    # Listings are verbatim: leave them out of the brace count.
    stripped = re.sub(r"\\begin\{lstlisting\}.*?\\end\{lstlisting\}", "", tex, flags=re.S)
    depth = 0
    k = 0
    while k < len(stripped):
        c = stripped[k]
        if c == "\\":
            k += 2
            continue
        if c == "%":
            nl = stripped.find("\n", k)
            k = len(stripped) if nl < 0 else nl
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                problems.append(f"{name}: unbalanced '}}' at offset {k}")
                depth = 0
        k += 1
    if depth:
        problems.append(f"{name}: {depth} unclosed '{{'")
    stack: list[str] = []
    for m in re.finditer(r"\\(begin|end)\{([^}]*)\}", tex):
        if m.group(1) == "begin":
            stack.append(m.group(2))
        elif not stack or stack[-1] != m.group(2):
            problems.append(f"{name}: \\end{{{m.group(2)}}} does not close {stack[-1] if stack else 'anything'}")
            if stack:
                stack.pop()
        else:
            stack.pop()
    if stack:
        problems.append(f"{name}: environments left open: {', '.join(stack)}")
    return problems


def check_conformance(files: dict[str, str]) -> list[str]:
    """Every normative block listed in exactly one clause of its side; no dangling references."""
    problems = []
    desc = files.get("description.tex", "")
    blocks = re.findall(r"\\(device|driver)normative\{[^}]*\}\{[^}]*\}\{([^}]*)\}", desc)
    labels = [f"{kind}normative:{path}" for kind, path in blocks]
    seen = set()
    for lab in labels:
        if lab in seen:
            problems.append(f"description.tex: normative block {lab!r} defined twice")
        seen.add(lab)
    sec_labels = re.findall(r"\\label\{(sec:[^}]*)\}", desc)
    dup = {x for x in sec_labels if sec_labels.count(x) > 1}
    for d in sorted(dup):
        problems.append(f"description.tex: label {d!r} defined twice")
    listed: dict[str, list[str]] = {}
    for name, kind in (("device-conformance.tex", "device"), ("driver-conformance.tex", "driver")):
        for ref in re.findall(r"\\item\s*\\ref\{([^}]*)\}", files.get(name, "")):
            listed.setdefault(ref, []).append(name)
            if not ref.startswith(f"{kind}normative:"):
                problems.append(f"{name}: lists {ref!r}, which is not a {kind} requirement")
            elif ref not in seen:
                problems.append(f"{name}: lists {ref!r}, which description.tex does not define")
    for lab in labels:
        n = len(listed.get(lab, []))
        if n != 1:
            problems.append(f"normative block {lab!r} is listed in {n} conformance clauses (must be exactly 1)")
    all_labels = seen | set(sec_labels)
    for ref in re.findall(r"\\ref\{([^}]*)\}", desc):
        if ref not in all_labels:
            problems.append(f"description.tex: \\ref{{{ref}}} names no label of the chapter")
    return problems


def check_markdown(text: str, files: dict[str, str]) -> list[str]:
    problems = []
    doc = load(text)
    desc = files.get("description.tex", "")
    reqs = doc.requirements()
    numbers: dict[str, int] = {}
    for s in doc.sections:
        if s.number in numbers:
            problems.append(f"line {s.line + 1}: section number {s.number} is used twice (also line {numbers[s.number] + 1})")
        elif s.number:
            numbers[s.number] = s.line
    for s in reqs:
        if s.is_skipped():
            problems.append(f"line {s.line + 1}: requirements section {s.plain_title!r} sits in a section left out of the LaTeX chapter")
            continue
        kind, _ = s.requirement
        path = s.label.split(":", 1)[1]
        if not re.search(r"\\" + kind + r"normative\{[^}]*\}\{[^}]*\}\{" + re.escape(path) + r"\}", desc):
            problems.append(f"line {s.line + 1}: requirements section §{s.number or '?'} {s.plain_title!r} is missing from description.tex")
        if not s.number:
            problems.append(f"line {s.line + 1}: requirements section {s.plain_title!r} has no number (Appendix B cannot cite it)")
    # Appendix B: every requirements section cited exactly once, in the right list.
    appendix = next((s for s in doc.sections if s.level == 2 and s.number == "B"), None)
    if appendix is None:
        problems.append("Appendix B (conformance) is missing")
    else:
        cited: dict[str, list[str]] = {}
        lists = {"device": None, "driver": None}
        for c in appendix.children:
            t = c.plain_title.lower()
            for kind in lists:
                if t.startswith(kind):
                    lists[kind] = c
        for kind, sec in lists.items():
            if sec is None:
                problems.append(f"Appendix B has no '{kind.capitalize()} conformance' subsection")
                continue
            end = _section_end(doc, sec)
            for k in range(sec.line + 1, end):
                m = re.match(r"^\s*[*-] +§([A-Z]?\d+(?:\.\d+)*)", doc.lines[k])
                if not m:
                    continue
                num = m.group(1)
                cited.setdefault(num, []).append(kind)
                target = doc.by_number(num)
                if target is None:
                    problems.append(f"line {k + 1}: Appendix B cites §{num}, which does not exist")
                elif not target.requirement:
                    problems.append(f"line {k + 1}: Appendix B cites §{num}, which is not a requirements section")
                elif target.requirement[0] != kind:
                    problems.append(f"line {k + 1}: Appendix B cites §{num} ({target.requirement[0]} requirements) in the {kind} list")
        for s in reqs:
            if s.number and len(cited.get(s.number, [])) != 1:
                problems.append(
                    f"line {s.line + 1}: Appendix B cites requirements section §{s.number} {len(cited.get(s.number, []))} times (must be exactly 1)")
    # Key words only in requirements sections (and informative sections, where they describe).
    in_code = False
    for i, line in enumerate(doc.lines):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        sec = doc.owner[i]
        if in_code or sec is None or sec.line == i or sec.is_skipped() or sec.is_informative():
            continue
        if sec.requirement or _in_conformance_appendix(sec):
            continue
        if sec.level == 1:  # the chapter's introduction (it defines the key words)
            continue
        m = KEYWORDS.search(re.sub(r"`[^`]*`", "", line))
        if m:
            problems.append(f"line {i + 1}: key word {m.group(1)} outside a requirements section (§{sec.number} {sec.plain_title})")
    return problems


def _section_end(doc: Doc, sec: Section) -> int:
    for s in doc.sections:
        if s.line > sec.line and s.level <= sec.level:
            return s.line
    return len(doc.lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="verify instead of writing")
    ap.add_argument("--spec", type=Path, default=SPEC)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    a = ap.parse_args()
    text = a.spec.read_text(encoding="utf-8")
    try:
        files = generate(text)
    except SpecError as e:
        print(f"spec_latex: {a.spec}: {e}", file=sys.stderr)
        return 1
    problems = []
    for name, tex in files.items():
        problems += check_balanced(name, tex)
    if a.check:
        committed = {}
        for name, tex in files.items():
            p = a.out / name
            if not p.exists():
                problems.append(f"{p} is missing: run python3 scripts/spec_latex.py")
                continue
            committed[name] = p.read_text(encoding="utf-8")
            if committed[name] != tex:
                problems.append(f"{p} is stale (differs from what {a.spec.name} generates): run python3 scripts/spec_latex.py")
        problems += check_conformance(committed)
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        for name, tex in files.items():
            (a.out / name).write_text(tex, encoding="utf-8")
        problems += check_conformance(files)
    problems += check_markdown(text, files)
    for p in problems:
        print(f"spec_latex: {p}", file=sys.stderr)
    if problems:
        return 1
    if a.check:
        blocks = sum(files[n].count("\\item ") for n in ("device-conformance.tex", "driver-conformance.tex"))
        print(f"spec_latex: {a.out} matches {a.spec.name}; {blocks} normative blocks, each in one clause")
    return 0


if __name__ == "__main__":
    sys.exit(main())
