"""Every code block of the README and of the docs pages it links is run (against temp stores).

A ```python block is executed in a fresh namespace, in a temp working directory with a fresh
SQLite store as ``MLFLOW_TRACKING_URI``. A block right after ``<!-- needs: mlflow server at URL -->``
runs with URL replaced by a real loopback ``mlflow server``. ``<!-- skip: reason -->`` skips a block,
with its reason (installing packages, a UI that runs until stopped); ```text blocks are output, not code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlflow_er.testing import prefill_sqlite_store

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *(f"docs/{n}.md" for n in ("api", "delivery", "uri-schemes", "offline", "ranks", "health",
                                                   "environment", "compatibility"))]
#: Pages other helpers write; the README links them before they land.
ELSEWHERE = {"docs/integrations.md", "docs/bench.md", "docs/deployment.md", "docs/plugins.md"}
FENCE = re.compile(r"(?:<!--\s*(?P<marker>skip|needs):\s*(?P<note>.*?)\s*-->\n)?"
                   r"```(?P<lang>[a-z]*)\n(?P<code>.*?)\n```", re.S)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    marker: str | None
    note: str | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            out.append(Block(page, text.count("\n", 0, m.start("lang")) + 1, m.group("lang"), m.group("code"),
                             m.group("marker"), m.group("note")))
    return out


ALL = blocks()
RUNNABLE = [b for b in ALL if b.lang == "python" and b.marker != "skip"]


def test_readme_is_short_and_in_the_order_users_need() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    headings = re.findall(r"^## (.+)$", text, re.M)
    order = ["Install", "Quickstart", "Your code unchanged", "Works with"]
    found = [next(i for i, h in enumerate(headings) if h.startswith(want)) for want in order]
    assert found == sorted(found), headings
    assert "sqlite:///.demo" not in text  # the UI hint points at the Quickstart's own store
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text


def test_every_linked_page_exists() -> None:
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", text):
            resolved = (ROOT / page).parent / target
            rel = resolved.resolve().relative_to(ROOT).as_posix()
            assert resolved.exists() or rel in ELSEWHERE, f"{page} links {target}, which does not exist"


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    assert len(RUNNABLE) >= 10
    for b in ALL:
        if b.marker == "skip":
            assert b.note and len(b.note) >= 15, f"{b}: a skip needs a real reason"
        elif b.lang not in ("python", "text"):
            pytest.fail(f"{b}: a {b.lang or 'plain'} block is neither run nor skipped with a reason")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_code_block_runs(block: Block, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         request: pytest.FixtureRequest) -> None:
    import mlflow

    prefill_sqlite_store(tracking_uri)
    prefill_sqlite_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store the blocks name
    monkeypatch.setenv("MLFLOW_ER_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # a block that sets it is undone afterwards
    code = block.code
    if block.marker == "needs":
        url = re.search(r"https?://[\w.:]+", block.note or "")
        assert url, f"{block}: a needs marker names the URL the block uses"
        server = request.getfixturevalue("mlflow_server")
        code = code.replace(url.group(0), server.uri)
    try:
        exec(compile(code, str(block), "exec"), {"__name__": "__readme__"})
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
