"""The documentation's measured numbers stay tied to bench/results/: docs/results.md and the README's policy table
are what bench/make_results.py writes, every result CSV has a documented command, and the user-facing pages name
no internal work items. Standard library only; runs in about a second."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_page_and_policy_table_are_current():
    proc = subprocess.run([sys.executable, "bench/make_results.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr or proc.stdout


def test_every_result_csv_has_a_documented_command():
    index = (ROOT / "bench" / "README.md").read_text()
    missing = []
    for csv in sorted((ROOT / "bench" / "results").glob("*.csv")):
        name = csv.name
        # `accel eval --out F.csv` also writes F_samples.csv (bench/README.md says so)
        base = name[: -len("_samples.csv")] + ".csv" if name.endswith("_samples.csv") else name
        if f"`{name}`" not in index and f"`{base}`" not in index:
            missing.append(name)
    assert not missing, f"bench/README.md documents no command for: {missing}"


INTERNAL = [re.compile(p) for p in (r"\b[Ii]ssue\s*#?\d+", r"\b[Ss]ession\s*\d+", r"\bstop \d+",
                                    r"\bthis session\b", r"\bticket\b")]


def test_user_docs_name_no_internal_work_items():
    pages = [ROOT / "README.md", ROOT / "bench" / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    hits = []
    for page in pages:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for pat in INTERNAL:
                m = pat.search(line)
                if m:
                    hits.append(f"{page.relative_to(ROOT)}:{n}: {m.group(0)!r}")
    assert not hits, "internal work items in user docs:\n" + "\n".join(hits)
