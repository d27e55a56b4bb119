"""``junit.xml``: one test case per objective, so CI systems show which objective failed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from fleetprobe.exporters.files import write_atomically


class JudgedObjective(Protocol):
    """What the JUnit file needs of an objective's outcome."""

    @property
    def title(self) -> str: ...

    @property
    def explanation(self) -> str: ...

    @property
    def ok(self) -> bool: ...

    @property
    def inconclusive(self) -> bool: ...


def write_junit(
    path: str | Path, suite: str, outcomes: Sequence[JudgedObjective], time_s: float
) -> None:
    """Write a JUnit XML file with one test case per outcome, replacing it atomically.

    Raises:
        OSError: it could not be written; the previous file is left as it was.
    """
    errors = sum(1 for o in outcomes if o.inconclusive)
    failures = sum(1 for o in outcomes if not o.ok) - errors
    counts = {"tests": str(len(outcomes)), "failures": str(failures), "errors": str(errors)}
    root = ET.Element("testsuites", counts)
    suite_element = ET.SubElement(root, "testsuite", counts, name=suite, time=f"{time_s:.3f}")
    for outcome in outcomes:
        case = ET.SubElement(suite_element, "testcase", classname=suite, name=outcome.title)
        if outcome.inconclusive:
            # An error, not a failure: the prober could not judge, the platform did not fail.
            error = ET.SubElement(case, "error", message=outcome.explanation, type="inconclusive")
            error.text = outcome.explanation
        elif not outcome.ok:
            failure = ET.SubElement(case, "failure", message=outcome.explanation, type="objective")
            failure.text = outcome.explanation
        else:
            ET.SubElement(case, "system-out").text = outcome.explanation
    text = ET.tostring(root, encoding="unicode", xml_declaration=True)
    write_atomically(path, text + "\n")
