"""Bad params paths, engine settings, params files and results databases, end to end through
the stage entry points: one line naming the key or file, exit 2, nothing written, and the
same command continues once the input is fixed (README "Bad input")."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages import dataset, evaluate, query, report, synth
from stages.errors import run_cli
from stages.params import load_params, load_section
from stages.results_db import open_db
from tests.eval_fixtures import make_workspace
from tests.mvtec_fixtures import REPO, error_line, make_mvtec, run_stage, write_params

LOF = {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [2, 4]}, "fixed": {"novelty": True}}
ONE_WORKER = {"n_workers": 1, "threads_per_worker": 1, "memory_limit": "2GiB"}
FEATURES = [("resnet18", "random", "layer4", "avg")]


def cli_error(main: Callable, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a stage's entry point as ``python -m`` does; its one ``error:`` line (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def files(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` with its modification time: what a run wrote."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*")}


def edit(params: Path, **sections: dict[str, Any]) -> Path:
    """Merge ``sections`` into the params file (one level deep)."""
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    for name, values in sections.items():
        raw[name] = {**(raw.get(name) or {}), **values}
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return params


def workspace(tmp_path: Path, **evaluate_extra: Any) -> Path:
    """Feature sets, ``feature_sets.json`` and a params file for evaluate, report and query."""
    params = make_workspace(tmp_path, categories={"alpha": []}, extractors=FEATURES,
                            evaluate={"detectors": [LOF], "engine": ONE_WORKER,
                                      **evaluate_extra})  # fmt: skip
    return edit(params, report={"out": str(tmp_path / "results")},
                data={"stats_dir": str(tmp_path / "results" / "dataset")})  # fmt: skip


def _evaluate(params: Path) -> subprocess.CompletedProcess:
    return run_stage("evaluate", params.parent, "--params", str(params))


# --- path params: folders that must be folders, files that must be files ---------------------

# (stage, dotted key, what is put in the way, the message)
WRONG_KIND = [
    ("dataset", "data.stats_dir", "file", "is a file, expected a folder"),
    ("dataset", "data.index", "folder", "is a folder, expected a file"),
    ("dataset", "data.root", "file", "is a file, expected a folder"),
    ("synth", "synth.out", "file", "is a file, expected a folder"),
    ("augment", "augment.out", "file", "is a file, expected a folder"),
    ("extract", "extract.out", "file", "is a file, expected a folder"),
    ("evaluate", "evaluate.scratch", "file", "is a file, expected a folder"),
    ("evaluate", "evaluate.summary", "folder", "is a folder, expected a file"),
    ("report", "report.out", "file", "is a file, expected a folder"),
    ("extract", "extract.out", "file-above", "cannot be created: {blocker} is a file, not a folder"),
    ("evaluate", "evaluate.summary", "file-above", "cannot be created: {blocker} is a file, not a folder"),
    ("evaluate", "evaluate.scratch", "broken-link", "is a broken symbolic link"),
    ("report", "report.out", "empty", "empty path"),
]  # fmt: skip


@pytest.mark.parametrize(("stage", "key", "blocker", "message"), WRONG_KIND,
                         ids=[f"{k}-{b}" for _, k, b, _ in WRONG_KIND])  # fmt: skip
def test_path_param_of_the_wrong_kind_is_one_line_naming_the_key(
    tmp_path: Path, stage: str, key: str, blocker: str, message: str
) -> None:
    params = workspace(tmp_path)
    params = edit(params, extract={"extractors": [{"backbone": "resnet18", "init": "random",
                                                   "layers": ["layer4"]}]})  # fmt: skip
    section, name = key.split(".")
    target = tmp_path / "in-the-way" / name
    target.parent.mkdir()
    value = str(target)
    if blocker == "file":
        target.write_text("not a folder\n")
    elif blocker == "folder":
        target.mkdir()
    elif blocker == "file-above":
        target.parent.rmdir()
        target.parent.write_text("a file where a folder should be\n")
        value = str(target / "below")
        message = message.format(blocker=target.parent)
    elif blocker == "broken-link":
        target.symlink_to(tmp_path / "nowhere")
    else:
        value = ""
    edit(params, **{section: {name: value}})
    before = files(tmp_path)

    line = error_line(run_stage(stage, tmp_path, "--params", str(params)))
    assert line.startswith(f"error: {params}: {key}: {message}"), line
    assert files(tmp_path) == before  # nothing written


def test_wrong_kind_then_fixed_rerun_continues(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    stats = tmp_path / "results" / "dataset"
    stats.parent.mkdir()
    stats.write_text("a file where the stats folder goes\n")
    index = tmp_path / "new/c/index.parquet"  # missing folders are fine: they are created
    params = write_params(tmp_path / "params.yaml", root, ["alpha"], data={"index": str(index)})
    line = error_line(run_stage("dataset", tmp_path, "--params", str(params)))
    assert "data.stats_dir: is a file, expected a folder (got 'results/dataset')" in line
    assert not (tmp_path / "new").exists()

    stats.unlink()  # fixed
    rerun = run_stage("dataset", tmp_path, "--params", str(params))
    assert rerun.returncode == 0, rerun.stderr
    assert (stats / "stats.json").is_file() and index.is_file()


def test_repository_params_files_still_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.extract import load_extract_params

    monkeypatch.chdir(REPO)
    for name in ("params.yaml", "params/study.yaml"):
        params = load_params(name)
        load_extract_params(name)
        section = load_section(name, "evaluate", evaluate.EvaluateParams)
        assert section.engine.connect_timeout_s == 10  # a bounded wait by default
        if params.report is not None:
            load_section(name, "report", report.ReportParams)


# --- OS errors on a path params named: one line; elsewhere: a traceback (a bug) -----------------


def test_os_error_under_a_params_path_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    params = write_params(tmp_path / "params.yaml", root, ["alpha"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results/dataset/stats.json").mkdir(parents=True)  # the stage's file is a folder
    line = cli_error(dataset.main, ["--params", str(params)], capsys)
    assert "results/dataset/stats.json" in line and "Is a directory" in line, line
    assert "data.stats_dir" in line, line

    (tmp_path / "results/dataset/stats.json").rmdir()  # fixed
    run_cli(dataset.main, ["--params", str(params)])
    assert (tmp_path / "results/dataset/stats.json").is_file()

    def bug(argv: Any) -> None:  # the same error elsewhere is a bug: its traceback stays
        load_params(params)
        raise IsADirectoryError(21, "Is a directory", "/somewhere/not/in/params")

    with pytest.raises(IsADirectoryError):
        run_cli(bug, [])


# --- the params file itself --------------------------------------------------------------------

BAD_FILES: dict[str, tuple[bytes | None, str]] = {
    "folder": (None, "is a folder, expected a params file (YAML; --params)"),
    "empty": (b"", "params file is empty (expected a YAML mapping of stage sections"),
    "blank": (b"\n  \n# only a comment\n", "expected a mapping of stage sections at the top level (data, augment, ...; got nothing)"),
    "list": (b"- data\n- augment\n", "expected a mapping of stage sections at the top level (data, augment, ...; got a list)"),
    "scalar": (b"params\n", "(data, augment, ...; got a string)"),
    "latin-1": ("data:\n  root: café\n".encode("latin-1"), "line 2: not UTF-8 text (byte 0xe9); save the params file as UTF-8"),
    "utf-16": ("data: {}\n".encode("utf-16"), "params file is UTF-16 text, expected UTF-8"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00", "line 1: not UTF-8 text (byte 0x89)"),
    "tab": (b"data:\n\troot: x\n", "line 2 is not valid YAML (found character '\\t' that cannot start any token)"),
    "control character": (b"data:\n  root: a\x00b\n", "line 2 is not valid YAML (it contains the control character '\\x00')"),
    "duplicate key": (b"data: {}\naugment: {}\ndata: {}\n", "line 3: key 'data' is given twice in one mapping"),
}  # fmt: skip


def _bad_params_file(tmp_path: Path, case: str) -> Path:
    content, _ = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize(
    ("name", "main"),
    [("dataset", dataset.main), ("evaluate", evaluate.main), ("report", report.main),
     ("query", None)],
)  # fmt: skip
def test_unreadable_params_file_is_one_line_for_every_stage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    name: str,
    main: Callable | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _bad_params_file(tmp_path, case)
    argv = ["--params", str(path)] + (["top"] if main is None else [])
    line = cli_error(main or query.main, argv, capsys)
    assert line.startswith(f"error: {path}: "), line
    assert BAD_FILES[case][1] in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_unreadable_params_file_then_fixed_rerun(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    params = write_params(tmp_path / "params.yaml", root, ["alpha"])
    good = params.read_text(encoding="utf-8")
    params.write_bytes(good.replace("alpha", "alphä").encode("latin-1"))
    line = error_line(run_stage("dataset", tmp_path, "--params", "params.yaml"))
    assert line.startswith("error: params.yaml: line ") and "not UTF-8 text" in line, line

    params.write_text(good, encoding="utf-8")  # saved as UTF-8
    rerun = run_stage("dataset", tmp_path, "--params", "params.yaml")
    assert rerun.returncode == 0, rerun.stderr


def test_query_with_a_missing_params_file_named_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not the default database of some other params file, silently."""
    monkeypatch.chdir(tmp_path)
    line = cli_error(query.main, ["--params", "typo.yaml", "top"], capsys)
    assert line == "error: typo.yaml: params file not found (expected a YAML file)", line
    (tmp_path / "link.yaml").symlink_to(tmp_path / "gone.yaml")  # a broken link: the same
    line = cli_error(synth.main, ["--params", "link.yaml"], capsys)
    assert line == "error: link.yaml: params file not found (expected a YAML file)", line


# --- engine settings: memory limits and scheduler addresses ------------------------------------

BAD_MEMORY = [
    ("lots", "not a memory size (expected auto, a size such as 4GiB"),
    ("10%", "not a memory size"),
    ("", "not a memory size"),
    ("-2GiB", "not a memory size"),
    (-1, "not a memory size"),
    ("inf", "not a memory size"),
    (True, "not a memory size"),
    ([2, "GiB"], "not a memory size"),
    (4, "4 bytes per worker is too little for a worker process (at least 256MiB; a plain number above 1 is bytes"),
    ("2", "2 bytes per worker is too little"),
    ("100MB", "100000000 bytes per worker is too little for a worker process (at least 256MiB)"),
    (1e-9, "bytes per worker is too little"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "message"), BAD_MEMORY, ids=[repr(v) for v, _ in BAD_MEMORY])
@pytest.mark.parametrize("section", ["evaluate", "extract"])
def test_bad_memory_limit_is_one_line_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    section: str,
    value: Any,
    message: str,
) -> None:
    params = workspace(tmp_path)
    extractor = {"backbone": "resnet18", "init": "random", "layers": ["layer4"]}
    edit(params, extract={"extractors": [extractor], "engine": {"memory_limit": value}},
         evaluate={"engine": {**ONE_WORKER, "memory_limit": value}})  # fmt: skip
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    if section == "evaluate":
        line = cli_error(evaluate.main, ["--params", str(params)], capsys)
    else:
        from stages import extract

        line = cli_error(extract.main, ["--params", str(params)], capsys)
    assert f"{section}.engine.memory_limit: " in line and message in line, line
    assert files(tmp_path) == before


def test_good_memory_limits_pass() -> None:
    from stages.engine import EngineParams

    for value in ["auto", "2GiB", "4 GB", "3e9", 0.5, 0, None, 4 * 2**30]:  # as Dask reads them
        assert EngineParams.model_validate({"memory_limit": value}).memory_limit == value


BAD_ADDRESS = [
    ("http://scheduler:8786", "unknown protocol 'http'"),
    ("scheduler", "no host and port"),
    ("tcp://scheduler", "no host and port"),
    ("tcp://:8786", "no host and port"),
    ("tcp://scheduler:99999", "port '99999' is not a port number 1-65535"),
    ("tcp://scheduler:port", "port 'port' is not a port number"),
    ("", "empty address"),
    ("inproc://scheduler", "unknown protocol 'inproc'"),
    ("  ", "empty address"),
]


@pytest.mark.parametrize(("value", "message"), BAD_ADDRESS, ids=[repr(v) for v, _ in BAD_ADDRESS])
def test_bad_scheduler_address_is_one_line_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: Any,
    message: str,
) -> None:
    params = edit(workspace(tmp_path), evaluate={"engine": {"address": value}})
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    line = cli_error(evaluate.main, ["--params", str(params)], capsys)
    assert f"evaluate.engine.address: {message}" in line, line
    assert files(tmp_path) == before


def _closed_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


@pytest.mark.parametrize("stage", ["evaluate", "extract"])
def test_unreachable_scheduler_is_one_line_after_a_bounded_wait(tmp_path: Path, stage: str) -> None:
    address = f"tcp://127.0.0.1:{_closed_port()}"
    engine = {"address": address, "connect_timeout_s": 1}
    extractor = {"backbone": "resnet18", "init": "random", "layers": ["layer4"]}
    params = edit(workspace(tmp_path), evaluate={"engine": engine},
                  extract={"engine": engine, "extractors": [extractor]})  # fmt: skip
    if stage == "extract":  # the dataset and augment indexes extract reads
        from tests.extract_fixtures import make_dataset

        sections = make_dataset(tmp_path, {"alpha": ("RGB", 32, [])})
        edit(params, data=sections["data"], augment=sections["augment"])
    before = files(tmp_path)
    started = time.monotonic()
    line = error_line(run_stage(stage, tmp_path, "--params", str(params)))
    assert time.monotonic() - started < 30
    assert line == (
        f"error: {params}: {stage}.engine.address: no Dask scheduler answered at {address} "
        f"within 1 s ({stage}.engine.connect_timeout_s): start the scheduler and its workers "
        "(README 'Scaling out'), or set address: null for a local cluster"
    ), line
    assert files(tmp_path) == before  # nothing written: no database, no scratch, no shards


def test_server_that_is_not_a_scheduler_is_one_line_after_a_bounded_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port where something listens but never speaks Dask (a web server, a typo'd port):
    the connection is accepted and nothing answers; Dask's client alone would wait forever."""
    with contextlib.closing(socket.socket()) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        engine = {"address": address, "connect_timeout_s": 1}
        params = edit(workspace(tmp_path), evaluate={"engine": engine})
        monkeypatch.chdir(tmp_path)
        before = files(tmp_path)
        started = time.monotonic()
        line = cli_error(evaluate.main, ["--params", str(params)], capsys)
        assert time.monotonic() - started < 10
    assert f"evaluate.engine.address: no Dask scheduler answered at {address} within 1 s" in line
    assert files(tmp_path) == before


@pytest.mark.slow
def test_unreachable_scheduler_then_local_cluster_continues(tmp_path: Path) -> None:
    engine = {"address": f"tcp://127.0.0.1:{_closed_port()}", "connect_timeout_s": 1}
    params = edit(workspace(tmp_path), evaluate={"engine": engine})
    assert "no Dask scheduler answered" in error_line(_evaluate(params))
    assert not (tmp_path / "results").exists()

    edit(params, evaluate={"engine": {**ONE_WORKER, "address": None}})  # fixed
    rerun = _evaluate(params)
    assert rerun.returncode == 0, rerun.stderr
    assert _statuses(tmp_path / "results/results.sqlite") == ["done", "done"]


# --- the results database: not SQLite, from an older or another schema -------------------------


def _statuses(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [s for (s,) in conn.execute("SELECT status FROM experiments ORDER BY key")]


def _readers(params: Path) -> list[subprocess.CompletedProcess]:
    """evaluate (the writer), report and query (the readers) on the same params."""
    return [_evaluate(params), run_stage("report", params.parent, "--params", str(params)),
            run_stage("query", params.parent, "--params", str(params), "top")]  # fmt: skip


NOT_SQLITE = ("not a SQLite database (evaluate.db_url): move it away or point evaluate.db_url "
              "at another file, then run the evaluate stage (it creates a new database)")  # fmt: skip


def test_results_file_that_is_not_sqlite_is_one_line_from_every_stage(tmp_path: Path) -> None:
    params = workspace(tmp_path)
    db = tmp_path / "results" / "results.sqlite"
    db.parent.mkdir()
    content = b"this is a text file, not a database\n"
    db.write_bytes(content)
    for result in _readers(params):
        assert error_line(result) == f"error: {db}: {NOT_SQLITE}"
    assert db.read_bytes() == content
    assert {p.name for p in db.parent.iterdir()} <= {"results.sqlite", "results.sqlite.lock"}


CORRUPT = ("not a usable SQLite database (file is not a database; evaluate.db_url): move it "
           "away or point evaluate.db_url at another file, then run the evaluate stage (it "
           "creates a new database)")  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"SQLite format 2\x00" + bytes(100), NOT_SQLITE),
        (b"x", NOT_SQLITE),
        (bytes(4096), NOT_SQLITE),
        (b"SQLite format 3", NOT_SQLITE),  # cut short
        (b"SQLite format 3\x00" + bytes(84), CORRUPT),  # a header and nothing usable
        (b"SQLite format 3\x00" + bytes(range(256)) * 32, CORRUPT),
    ],
)
def test_other_files_that_are_not_sqlite(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("results.sqlite").write_bytes(content)
    line = cli_error(query.main, ["--db", "sqlite:///results.sqlite", "top"], capsys)
    assert line == f"error: results.sqlite: {message}", line
    assert Path("results.sqlite").read_bytes() == content


def test_results_path_that_is_a_folder_is_one_line_from_every_stage(tmp_path: Path) -> None:
    params = workspace(tmp_path)
    db = tmp_path / "results" / "results.sqlite"
    db.mkdir(parents=True)
    for result in _readers(params):
        line = error_line(result)
        assert line.startswith(f"error: {db}: is a folder, expected a SQLite database file "
                               "(evaluate.db_url)"), line  # fmt: skip


def test_table_of_another_schema_gets_one_piece_of_advice_everywhere(tmp_path: Path) -> None:
    params = workspace(tmp_path)
    db = tmp_path / "results" / "results.sqlite"
    db.parent.mkdir()
    with contextlib.closing(sqlite3.connect(db)) as conn:  # e.g. an early prototype's table
        conn.execute("CREATE TABLE experiments (id INTEGER PRIMARY KEY, key TEXT, status TEXT)")
        conn.commit()
    lines = {error_line(result) for result in _readers(params)}
    assert len(lines) == 1, lines  # evaluate, report and query say the same
    (line,) = lines
    assert line.startswith(f"error: {db}: table experiments lacks category, augmented, "), line
    assert line.endswith("move it away or point evaluate.db_url at another file, then run the "
                         "evaluate stage (it creates a new database)"), line  # fmt: skip
    with contextlib.closing(sqlite3.connect(db)) as conn:  # evaluate created nothing in it
        tables = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["experiments"]


@pytest.mark.slow
def test_table_of_an_older_schema_readers_say_run_evaluate_which_fixes_it(
    tmp_path: Path,
) -> None:
    params = workspace(tmp_path)
    db = tmp_path / "results" / "results.sqlite"
    open_db(f"sqlite:///{db}").dispose()
    with contextlib.closing(sqlite3.connect(db)) as conn:  # as an older evaluate stage wrote it
        conn.execute("ALTER TABLE experiments DROP COLUMN group_s")
        conn.execute("ALTER TABLE experiments DROP COLUMN threshold_folds")
        conn.commit()
    expected = (f"error: {db}: table experiments lacks group_s, threshold_folds (written by an "
                "older evaluate stage; evaluate.db_url): run the evaluate stage, which adds "
                "them and keeps the finished experiments")  # fmt: skip
    report_run = run_stage("report", tmp_path, "--params", str(params))
    query_run = run_stage("query", tmp_path, "--params", str(params), "top")
    assert error_line(report_run) == expected
    assert error_line(query_run) == expected

    result = _evaluate(params)  # what both said to do
    assert result.returncode == 0, result.stderr
    assert _statuses(db) == ["done", "done"]
    rerun = run_stage("query", tmp_path, "--params", str(params), "top")
    assert rerun.returncode == 0 and "(2 experiments)" in rerun.stdout, rerun.stderr


@pytest.mark.slow
def test_not_sqlite_then_moved_away_evaluate_continues(tmp_path: Path) -> None:
    params = workspace(tmp_path)
    db = tmp_path / "results" / "results.sqlite"
    db.parent.mkdir()
    db.write_text("notes, not a database\n")
    assert "not a SQLite database" in error_line(_evaluate(params))
    db.rename(tmp_path / "notes.txt")  # what the message says
    result = _evaluate(params)
    assert result.returncode == 0, result.stderr
    assert _statuses(db) == ["done", "done"]


# --- export-submission's output path ----------------------------------------------------------


def test_export_submission_to_a_folder_is_one_line(tmp_path: Path) -> None:
    params = workspace(tmp_path)
    db = tmp_path / "results" / "results.sqlite"
    open_db(f"sqlite:///{db}").dispose()
    (tmp_path / "out.csv").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "stages.query", "--params", str(params), "export-submission",
         "abc", "out.csv"],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    line = error_line(result)
    assert (
        line == "error: out.csv: is a folder, expected a file (the output CSV of export-submission)"
    )
