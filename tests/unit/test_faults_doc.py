"""docs/faults.md is written by the fault tests: every row names a test that exists, and every test that
records a row appears in the table."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_fault_row_names_an_existing_test_and_every_recording_test_has_a_row():
    doc = (ROOT / "docs" / "faults.md").read_text()
    table = doc.split("<!-- fault-table:begin -->")[1].split("<!-- fault-table:end -->")[0]
    named = set(re.findall(r"`(test_faults_\w+\.py)::(\w+)(?:\[[^\]]*\])?`", table))
    assert named, "the table is empty: run the fault suite with FORGE_FAULTS_TABLE=docs/faults.md"
    recording = set()
    for path in (ROOT / "tests" / "faults").glob("test_faults_*.py"):
        text = path.read_text()
        for m in re.finditer(r"^def (test_\w+)\(([^)]*)\)", text, re.M):
            if "fault_row" in m.group(2):
                recording.add((path.name, m.group(1)))
    assert named <= recording, f"rows naming no test that records one: {sorted(named - recording)}"
    assert recording <= named, f"tests whose rows are missing (rerun the suite): {sorted(recording - named)}"
