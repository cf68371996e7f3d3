#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Tests of scripts/spec_latex.py: the generator and each of its checks (run by scripts/test.sh)."""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_latex as sl  # noqa: E402

MINI = """# Fabric Device

Intro text; the key words MUST and MAY are defined here.

## 1. Device ID

**56** (provisional). See §2.

### 1.1 Device Requirements: Device ID

The device MUST use the configured ID.

## 2. Feature bits

| Bit | Name |
|---|---|
| 0 | VIRTIO_FABRIC_F_MSG |

```c
struct virtio_fabric_config {
        le32 num_queue_pairs;
};
```

* `num_queue_pairs` counts queue pairs (≤ 31);
  continued here.
  * nested item

### 2.1 Driver Requirements: Feature bits

The driver MUST accept VIRTIO_F_VERSION_1.

## 3. Notes
<!-- latex:skip -->

Implementation MUST-style remarks that stay out of the chapter.

## Appendix B. Conformance

### B.1 Device conformance

* §1.1 Device ID

### B.2 Driver conformance

* §2.1 Feature bits
"""


class Generate(unittest.TestCase):
    def test_normative_blocks_and_clauses(self):
        files = sl.generate(MINI)
        desc = files["description.tex"]
        self.assertIn("\\devicenormative{\\subsubsection}{Device ID}{Device Types / Fabric Device / Device ID}", desc)
        self.assertIn("\\drivernormative{\\subsubsection}{Feature bits}{Device Types / Fabric Device / Feature bits}", desc)
        self.assertIn("\\item \\ref{devicenormative:Device Types / Fabric Device / Device ID}",
                      files["device-conformance.tex"])
        self.assertIn("\\item \\ref{drivernormative:Device Types / Fabric Device / Feature bits}",
                      files["driver-conformance.tex"])
        self.assertIn("\\conformance{\\subsection}{Fabric Device Conformance}", files["device-conformance.tex"])
        self.assertIn("\\label{sec:Conformance / Driver Conformance / Fabric Driver Conformance}",
                      files["driver-conformance.tex"])

    def test_markup(self):
        desc = sl.generate(MINI)["description.tex"]
        self.assertIn("\\ref{sec:Device Types / Fabric Device / Feature bits}", desc)  # §2
        self.assertIn("\\field{num\\_queue\\_pairs}", desc)  # a struct field
        self.assertIn("$\\leq$", desc)
        self.assertIn("\\begin{lstlisting}\nstruct virtio_fabric_config {", desc)
        self.assertIn("\\begin{tabularx}{\\textwidth}", desc)
        self.assertIn("VIRTIO\\_FABRIC\\_F\\_MSG", desc)
        self.assertEqual(desc.count("\\begin{itemize}"), 2)  # the nested list
        self.assertNotIn("stay out of the chapter", desc)  # latex:skip
        self.assertNotIn("Conformance", desc)  # Appendix B becomes the clauses
        for name, tex in sl.generate(MINI).items():
            self.assertEqual(sl.check_balanced(name, tex), [])

    def test_bad_reference_is_an_error(self):
        with self.assertRaisesRegex(sl.SpecError, "§5.3 names no section"):
            sl.generate(MINI.replace("See §2.", "See §5.3."))
        with self.assertRaisesRegex(sl.SpecError, "left out of the LaTeX chapter"):
            sl.generate(MINI.replace("See §2.", "See §3."))

    def test_unknown_character_is_an_error(self):
        with self.assertRaisesRegex(sl.SpecError, "no LaTeX form"):
            sl.generate(MINI.replace("(provisional)", "(provisional ☃)"))


class Checks(unittest.TestCase):
    def setUp(self):
        self.files = sl.generate(MINI)

    def test_clean(self):
        self.assertEqual(sl.check_conformance(self.files), [])
        self.assertEqual(sl.check_markdown(MINI, self.files), [])

    def test_block_missing_from_clause(self):
        f = dict(self.files)
        f["device-conformance.tex"] = f["device-conformance.tex"].replace(
            "\\item \\ref{devicenormative:Device Types / Fabric Device / Device ID}\n", "")
        self.assertTrue(any("listed in 0 conformance clauses" in p for p in sl.check_conformance(f)))

    def test_block_listed_twice(self):
        f = dict(self.files)
        item = "\\item \\ref{drivernormative:Device Types / Fabric Device / Feature bits}\n"
        f["driver-conformance.tex"] = f["driver-conformance.tex"].replace(item, item + item)
        self.assertTrue(any("listed in 2 conformance clauses" in p for p in sl.check_conformance(f)))

    def test_block_in_wrong_clause_and_dangling(self):
        f = dict(self.files)
        f["device-conformance.tex"] += "\\item \\ref{drivernormative:Device Types / Fabric Device / Feature bits}\n"
        f["driver-conformance.tex"] += "\\item \\ref{drivernormative:Device Types / Fabric Device / Nothing}\n"
        problems = sl.check_conformance(f)
        self.assertTrue(any("not a device requirement" in p for p in problems))
        self.assertTrue(any("does not define" in p for p in problems))

    def test_requirements_section_missing_from_latex(self):
        f = dict(self.files)
        f["description.tex"] = f["description.tex"].replace("\\devicenormative", "\\subsubsection")
        self.assertTrue(any("missing from description.tex" in p for p in sl.check_markdown(MINI, f)))

    def test_appendix_b_must_cite_every_section_once(self):
        md = MINI.replace("* §1.1 Device ID\n", "")
        self.assertTrue(any("cites requirements section §1.1 0 times" in p
                            for p in sl.check_markdown(md, sl.generate(md))))
        md = MINI.replace("* §2.1 Feature bits\n", "* §2.1 Feature bits\n* §1.1 Device ID\n")
        problems = sl.check_markdown(md, sl.generate(md))
        self.assertTrue(any("in the driver list" in p for p in problems))

    def test_key_word_outside_requirements(self):
        md = MINI.replace("**56** (provisional).", "**56** (provisional). The driver MUST use it.")
        problems = sl.check_markdown(md, sl.generate(md))
        self.assertTrue(any("key word MUST outside a requirements section (§1 Device ID)" in p for p in problems))

    def test_duplicate_section_number(self):
        md = MINI.replace("## 3. Notes", "### 2.1 Also two point one\n\n## 3. Notes")
        problems = sl.check_markdown(md, sl.generate(md))
        self.assertTrue(any("section number 2.1 is used twice" in p for p in problems))

    def test_unbalanced(self):
        self.assertTrue(sl.check_balanced("x", "\\textbf{a"))
        self.assertTrue(sl.check_balanced("x", "a}"))
        self.assertTrue(sl.check_balanced("x", "\\begin{itemize}\\item a\\end{enumerate}"))
        self.assertEqual(sl.check_balanced("x", "\\{ \\begin{lstlisting}\n{\n\\end{lstlisting}"), [])


class RealSpec(unittest.TestCase):
    def test_spec_generates_clean_and_committed_files_are_current(self):
        text = sl.SPEC.read_text(encoding="utf-8")
        files = sl.generate(text)
        for name, tex in files.items():
            self.assertEqual(sl.check_balanced(name, tex), [], name)
            self.assertEqual((sl.OUT_DIR / name).read_text(encoding="utf-8"), tex,
                             f"{name} is stale: run python3 scripts/spec_latex.py")
        self.assertEqual(sl.check_conformance(files), [])
        self.assertEqual(sl.check_markdown(text, files), [])


if __name__ == "__main__":
    unittest.main()
