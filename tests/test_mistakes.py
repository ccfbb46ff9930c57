"""Every user mistake in the table (tests/mistakes.py) ends the same way: `ftl` exits 2, prints one
paragraph naming the field or file (and the fix), no traceback, and nothing appears in the run dir.

The CLI runs in this process (`launcher.cli.main`): the pre-flight it is testing happens there, before
any rank or torchrun would start, and one process keeps the table's ~50 cases to seconds each.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launcher.cli import main
from tests.conftest import REPO
from tests.mistakes import MISTAKES, write_fixtures

CONFIGS = {"quickstart": "configs/quickstart.yaml", "multitask": "configs/multitask.yaml", "minilm": "configs/minilm-classify.yaml"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mistakes")
    write_fixtures(folder)
    return folder


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m["name"] for m in MISTAKES])
def test_a_mistake_is_one_paragraph_and_exit_2(mistake: dict, fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    places = {**{k: str(REPO / v) for k, v in CONFIGS.items()}, "data": str(fixtures), "tmp": str(tmp_path)}
    argv = [part.format(**places) for part in mistake["argv"]]
    run_dir = tmp_path / "run"
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={run_dir}")
    if argv[0] == "run" and not any(a.startswith("data.cache_dir=") for a in argv):
        argv.append(f"data.cache_dir={tmp_path / 'cache'}")
    before = snapshot(run_dir)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in out + err
    paragraph = " ".join(err.split())  # rich may wrap; the paragraph is read as one line
    assert re.search(mistake["expect"], paragraph), paragraph[-3000:]
    assert snapshot(run_dir) == before  # nothing written (the table's run dirs do not exist beforehand)


def test_the_table_covers_at_least_30_mistakes() -> None:
    assert len(MISTAKES) >= 30 and len({m["name"] for m in MISTAKES}) == len(MISTAKES)


def test_a_rope_model_past_its_positions_is_a_warning_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", str(REPO / CONFIGS["quickstart"]), "train.seq_len=1024", f"output_dir={tmp_path / 'run'}", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["strategy"]
    assert main(["plan", str(REPO / CONFIGS["quickstart"]), "train.seq_len=1024", f"output_dir={tmp_path / 'run'}"]) == 0
    err = " ".join(capsys.readouterr().out.split())
    assert "warning:" in err and "`train.seq_len` 1024 is longer than the 512 positions llama was trained for" in err
