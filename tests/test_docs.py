"""The repository documents itself: docs/ exists, is cited, and its config reference is current."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from so8t.config.reference import main as config_reference

REPO = Path(__file__).resolve().parents[1]
# A design document that is not in the repository (spelled in two parts so this file passes too).
MISSING_DOCUMENT = "DES" + "IGN"


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / n for n in names.splitlines()
            if n.endswith((".py", ".md", ".yaml", ".toml")) and (REPO / n).is_file()]


def test_the_config_reference_is_generated_from_the_current_schema_and_yaml(capsys):
    assert config_reference(["--check"]) == 0, capsys.readouterr().err


def test_every_docs_file_cited_exists_and_no_missing_design_document_is_cited():
    cited = set()
    for path in _tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        assert MISSING_DOCUMENT not in text, f"{path.relative_to(REPO)} cites a document that is not in the repository"
        cited.update(re.findall(r"docs/([\w-]+\.md)", text))
    assert cited, "the code points to docs/"
    missing = sorted(name for name in cited if not (REPO / "docs" / name).is_file())
    assert not missing, missing
