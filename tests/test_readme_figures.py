"""Claims that cannot drift (issue 16 item 2): every figure in the README's findings comes from a file it cites.

The sections "What it found" and "What a `pass` guarantees" are split into units: a top-level bullet (with its
sub-bullets and continuation lines) or a paragraph.  A unit cites files by naming them in backticks (`results/hazards.md`,
`results/calibration.md`, `benchmarks/overhead.md`, a test that asserts the figure, `tests/test_goldens.py`, or the code
that sets it, `harness/tolerances.py`); every path in backticks that exists in the repo counts.  Each number in the
unit's prose (inline code is quoted API, not a figure) must then appear in one of those files, at the README's printed
precision or finer: README "9.1x" matches "9.1", "9.10" or "9.08" in the file, README "0.30" matches "0.3", README
"~1e-8" matches "9.8e-09", README "10^4" matches "1.25e+04", README "99%" matches "9.9e-01"; README "9.1" does not
match "9.2", nor "9" (less precise), README "-1.0e-2" does not match "0.01" (a sign is a figure).  Versions ("3.15.1")
must occur verbatim.  A figure printed with few digits (an integer, "0.3", "1e-8") is a weak check: some number in a
large file often rounds to it; the strong checks are the figures with two or more significant digits.

Numbers that are settings or definitions rather than measurements are removed first through ``ALLOWED``, each entry
with the place it comes from (test_the_allowed_definitions_hold recomputes them from the code); keep that list short:
a measured figure belongs in a generated file.  A bullet in ``PENDING_BULLETS`` is skipped; to check it, make it cite
its generated file in backticks and delete its entry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTIONS = ("## What it found", "## What a `pass` guarantees")

# bullets not checked yet (none: every findings bullet cites the generated files its figures come from)
PENDING_BULLETS: tuple[str, ...] = ()

# Settings and definitions, not measurements: each phrase (a regular expression) is blanked out of the prose before
# its numbers are looked up.  Where each comes from is in the comment, and test_the_allowed_definitions_hold checks it.
ALLOWED = {
    # the float64 floor, 2^20 rounding units (harness/tolerances.py POLICY), times float64's eps: 2.3e-10 relative
    r"2\.3e-10\s+relative": "harness/tolerances.py",
    # TF1's Bessel factor n/(n-1) at batch 1: the first conv of mnist_bn_cnn / examples/bn_audit.py gives 26x26 = 676
    # values per channel (models/zoo.py), and 1/675 = 1.5e-3
    r"n/\(n-1\): 1\.5e-3 at n = 676": "models/zoo.py",
    # the planted bugs and the diagnosis' hypotheses: len(harness.mutants.BUGS), len(harness.diagnose.BY_ID)
    r"23 bugs, one or more for each of the 22 hypotheses": "harness/mutants.py, harness/diagnose.py",
}


# -- the matcher ------------------------------------------------------------------------------------------------------

# A number standing alone: not part of a word (float32, TF1, x86), a version (3.15.1) or a name (4-3-1 is split into
# 4, 3, 1, which is harmless); a sign only when it is attached and follows a space or an opening bracket or quote.
_NUMBER = re.compile(
    r"(?<![\w.])(?:(?:^|(?<=[\s(\[\"'~=:,;]))(?P<sign>[-+\u2212]))?"
    r"(?P<mant>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?:[eE](?P<exp>[-+]?\d+))?"
    r"(?:\s*(?:\^|\*\*)\s*(?P<pow>\d+(?:\.0)?))?(?P<pct>%)?"
    r"(?![\w^]|\.\d|,\d{3})"
    r"|(?<![\w.])(?P<mult>\d+(?:\.\d+)?)x(?!\w)"
)
_VERSION = re.compile(r"(?<![\w.])\d+\.\d+\.\d+(?![\w.])")
_CODE = re.compile(r"``.+?``|`[^`\n]+`", re.S)


@dataclass(frozen=True)
class Figure:
    text: str  # as printed
    value: float
    quantum: float  # the last printed digit's place: 9.1 -> 0.1, 1.0e-3 -> 1e-4, 5,200 -> 1, 10^4 -> 1e4

    def matches(self, other: Figure) -> bool:
        """``other`` (from a cited file) is this figure at this figure's precision or finer."""
        if math.isclose(self.value, other.value, rel_tol=1e-12, abs_tol=0.0):
            return True
        if other.quantum > self.quantum * (1 + 1e-9):
            return False  # the file prints fewer digits than the README: the README's digits come from elsewhere
        return abs(self.value - other.value) <= 0.5 * self.quantum * (1 + 1e-9)


def figures(text: str) -> list[Figure]:
    out = []
    for m in _NUMBER.finditer(text):
        if m.group("mult") is not None:  # "9.1x": the multiple's x is not part of the number
            mant, _, frac = m.group("mult").partition(".")
            sign, frac, exp, power = "", "." + frac if frac else "", None, None
        else:
            sign, mant, frac = m.group("sign") or "", m.group("mant"), m.group("frac") or ""
            exp, power = m.group("exp"), m.group("pow")
        mantissa = float(mant.replace(",", "") + frac)
        if power is not None:  # 2^20, 10^4, 2.0 ** 20: one significant digit, as an order of magnitude
            value = mantissa ** float(power)
            quantum = 10.0 ** math.floor(math.log10(value)) if value > 0 else 1.0
        else:
            e = int(exp) if exp else 0
            value = float(f"{mantissa!r}e{e}")  # inf, not an OverflowError, for an exponent out of range
            quantum = float(f"1e{e - (len(frac) - 1 if frac else 0)}")
        if m.group("mult") is None and m.group("pct"):  # 99% is 0.99 at two digits
            value, quantum = value / 100, quantum / 100
        if sign in ("-", "\u2212"):
            value = -value
        out.append(Figure(m.group(0), value, quantum))
    return out


def unmatched(prose: str, sources: list[str]) -> list[str]:
    """The figures of ``prose`` found in none of ``sources`` (texts), and its version strings found in none."""
    known = [f for s in sources for f in figures(s)]
    missing = [f.text for f in figures(prose) if not any(f.matches(k) for k in known)]
    missing += [v for v in _VERSION.findall(prose) if not any(v in s for s in sources)]
    return missing


# -- the README -------------------------------------------------------------------------------------------------------

@dataclass
class Unit:
    section: str
    text: str  # the raw markdown of the bullet (with its sub-bullets) or the paragraph

    @property
    def head(self) -> str:
        return " ".join(self.text.split())[:70]

    def cited(self) -> list[Path]:
        paths = []
        for span in re.findall(r"`([^`\n]+)`", self.text):
            p = ROOT / span.strip()
            if "/" in span and p.is_file() and p not in paths:
                paths.append(p)
        return paths

    def prose(self) -> str:
        text = _CODE.sub(" ", self.text)
        for phrase in ALLOWED:
            text = re.sub(phrase, " ", text)
        return text


def units(markdown: str) -> list[Unit]:
    out = []
    for title in SECTIONS:
        start = markdown.index("\n" + title) + 1
        end = markdown.find("\n## ", start)
        lines = markdown[start:end if end >= 0 else len(markdown)].splitlines()[1:]
        block: list[str] = []
        for line in lines + [""]:
            new_unit = line.startswith("* ") or not line.strip()
            if new_unit and block:
                out.append(Unit(title, "\n".join(block)))
                block = []
            if line.strip():
                block.append(line)
    return out


def checked_units(markdown: str) -> list[Unit]:
    return [u for u in units(markdown) if not any(u.text.removeprefix("* ").startswith(p) for p in PENDING_BULLETS)]


def problems(unit: Unit) -> list[str]:
    prose = unit.prose()
    if not figures(prose) and not _VERSION.search(prose):
        return []
    files = unit.cited()
    if not files:
        return ["cites no file in backticks"]
    missing = unmatched(prose, [f.read_text(encoding="utf-8") for f in files])
    return [f"{m!r} is in none of {', '.join(str(f.relative_to(ROOT)) for f in files)}" for m in missing]


# -- the tests --------------------------------------------------------------------------------------------------------

def test_the_sections_are_found_and_the_pending_bullets_exist():
    markdown = README.read_text(encoding="utf-8")
    all_units, checked = units(markdown), checked_units(markdown)
    assert {u.section for u in all_units} == set(SECTIONS)
    assert len(checked) >= 15, [u.head for u in checked]
    assert len(all_units) - len(checked) <= len(PENDING_BULLETS)  # a pending marker skips one bullet, not a section


@pytest.mark.parametrize("unit", checked_units(README.read_text(encoding="utf-8")), ids=lambda u: u.head[:40])
def test_every_figure_comes_from_a_file_the_bullet_cites(unit):
    assert problems(unit) == [], unit.head


def test_the_allowed_definitions_hold():
    import numpy as np

    import harness.diagnose as diagnose
    import harness.mutants as mutants
    from harness.tolerances import POLICY
    from models import get_model

    assert f"{POLICY['float64'].floor_ulps * np.finfo(np.float64).eps:.1e}" == "2.3e-10"
    spec = get_model("mnist_bn_cnn")
    h, w, _ = spec.layers[0].output_shape(spec.input_shape)
    assert (h * w, f"{1 / (h * w - 1):.1e}") == (676, "1.5e-03")
    assert len(mutants.BUGS) == 23 and len(diagnose.BY_ID) == 22
    assert set(mutants.CAUSE.values()) == set(diagnose.BY_ID)  # one or more planted bugs for each hypothesis
    text = README.read_text(encoding="utf-8")
    for phrase in ALLOWED:  # an entry that no longer occurs is stale: remove it
        assert re.search(phrase, text), phrase


def test_the_policy_the_readme_states_is_the_code_s():
    """The definition of a pass (multiples 16 / 1024 / 256, floors 8 and 2^20 units) is harness/tolerances.py's."""
    from harness.tolerances import POLICY

    text = " ".join(README.read_text(encoding="utf-8").split())
    m = re.search(r"than (\d+) times \(steps 0 and 1\) or (\d+) times in float32 / (\d+) times in float64 .*?"
                  r"a floor of (\d+) units \(float32\) or 2\^(\d+) units \(float64\)", text)
    assert m, "the pass definition's wording changed: update this test"
    early, late32, late64, floor32, floor64_log2 = (int(g) for g in m.groups())
    assert (POLICY["float32"].early_multiple, POLICY["float64"].early_multiple) == (early, early)
    assert (POLICY["float32"].late_multiple, POLICY["float64"].late_multiple) == (late32, late64)
    assert (POLICY["float32"].floor_ulps, POLICY["float64"].floor_ulps) == (floor32, 2**floor64_log2)


def test_the_matcher_reads_numbers_as_printed():
    got = {f.text: (f.value, f.quantum) for f in figures("9.1x, 1.2, -1.0e-2, 5,200 and 0.25 (float32, TF1) ~1e-8 "
                                                       "2^20 units, Keras 3.15.1, 4-3-1 net, 0.04-0.06 s, 1e-312")}
    assert got["9.1x"] == pytest.approx((9.1, 0.1))
    assert got["-1.0e-2"] == pytest.approx((-0.01, 1e-3))
    assert got["5,200"] == (5200, 1)
    assert got["2^20"] == (2**20, 1e6)
    assert got["1e-312"][0] == 1e-312
    assert "0.04" in got and "0.06" in got
    assert figures("float32, TF1, x86, sha256, Keras 3.15.1, e.g. conv64-BN") == []  # names and versions: no figures
    assert [f.text for f in figures("99% and 10^4 times")] == ["99%", "10^4"]
    assert figures("99%")[0].value == pytest.approx(0.99)


def test_the_matcher_rounds_only_toward_the_readme():
    assert unmatched("the loss ends 9.1x off, 0.30, ~1e-8, 10^4 times, -1.05e-4, 2^20, 99%", [
        "| 9.1 | 0.3 | 9.8e-09 | 1.25e+04 | -0.000105 | 1.04858e+06 | 9.9e-01 |"]) == []
    assert unmatched("9.1x", ["9.08"]) == []  # the file's value, rounded to the README's digits
    assert unmatched("9.1x", ["9"]) == ["9.1x"]  # the file has fewer digits: 9.1 comes from elsewhere
    assert unmatched("0.34", ["0.3"]) == ["0.34"]
    assert unmatched("-1.0e-2", ["0.01"]) == ["-1.0e-2"]  # a sign is a figure too
    assert unmatched("Keras 3.15.1", ["Keras 3.16.0"]) == ["3.15.1"]


def test_a_wrong_figure_in_a_bullet_is_reported():
    """The check can fail: the hazards bullet with one figure changed (9.1x -> 9.4x) names exactly that figure."""
    markdown = README.read_text(encoding="utf-8")
    hazards = next(u for u in checked_units(markdown) if u.text.startswith("* **The porting hazards"))
    assert problems(hazards) == []
    wrong = Unit(hazards.section, hazards.text.replace("the loss ends 9.1x off", "the loss ends 9.4x off"))
    assert wrong.text != hazards.text
    assert problems(wrong) == ["'9.4x' is in none of results/hazards.md, tests/test_goldens.py, tests/test_oracle_vocab.py"]
    uncited = Unit(hazards.section, "* **A claim**: 3.7x faster than anything.")
    assert problems(uncited) == ["cites no file in backticks"]
