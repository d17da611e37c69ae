"""Property-based edges (issue 13): generated study YAMLs (valid and broken), data files (JSON, JSONL, malformed,
non-UTF-8, empty, random bytes) and result CSVs go to the loaders and the CLI. Every outcome must be success, or an
`InputError` / exit code 2 with ONE line that names the culprit (the file, or the key). Never a traceback.

Nothing here trains or loads a model: studies stop at loading and planning (`run --plan`, `status`), data files at loading
and scoring, tables at reading. Derandomized, so CI sees the same cases every run; about 2,400 cases in all.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import typer.main
import typer.testing
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from kdscope.cli import app
from kdscope.errors import InputError

# a generated training file often has rows without an 'output': the loader warns (and trains on them), as it should
pytestmark = pytest.mark.filterwarnings("ignore:.*rows with an empty 'output':UserWarning")

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------------------------------
def one_line_naming(message: str, culprits: list[str]) -> None:
    assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"
    assert "Traceback" not in message, message
    assert any(c and c in message for c in culprits), f"names none of {culprits}: {message!r}"


def loads_or_refuses(load: Callable[[], Any], culprits: list[str], label: str) -> Any:
    """Run a loader: it returns, or raises InputError with one line naming a culprit. Anything else fails."""
    try:
        loaded = load()
    except InputError as e:
        one_line_naming(str(e), culprits)
        event(f"{label}: refused")  # --hypothesis-show-statistics: both outcomes must be well represented
        return None
    event(f"{label}: loaded")
    return loaded


def exits_cleanly(result: Result, culprits: list[str]) -> None:
    """A CLI outcome: exit 0, or exit 2 with one 'error: ...' line on stderr naming a culprit."""
    if result.exit_code == 0:
        return
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (
        f"exit {result.exit_code}, {result.exception!r}\n{result.output}")
    line = result.stderr.strip()
    assert line.startswith("error: "), result.stderr
    one_line_naming(line, culprits)


@pytest.fixture(scope="module", autouse=True)
def built_once() -> Iterator[None]:
    """typer builds the click command from the app on every invoke (two thirds of an invoke's 80 ms); build once."""
    command = typer.main.get_command(app)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.testing, "_get_command", lambda _app: command)
        yield


def fresh(tmp_path: Path) -> Path:
    """A new folder for one generated case (hypothesis runs every case in the same test's tmp_path)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


def cli(args: list[str]) -> Result:
    return CliRunner().invoke(app, args)


# --------------------------------------------------------------------------------------------------------------------
# Generated values
# --------------------------------------------------------------------------------------------------------------------
ODD_TEXT = st.sampled_from(["", " ", "\t", "é", "😀", "\x00", "a\nb", "'", '"', ":", "- x", "{", "]", "#", "&a", "*a",
                            "!!binary x", "2020-13-45", "0x1F", "1e400", "nan", "-.inf", "~", "null", "yes", "no",
                            "synthetic:", "synthetic:math:0", "synthetic:nope", "synthetic:math:x", "builtin:nope",
                            "builtin:tiny-qwen-xs", "hf:", "/nonexistent/file.json", "../", "."])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), ODD_TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def base_study(train: str) -> dict[str, Any]:
    """A small valid study: one family of built-in models, one domain, its generated task."""
    return {
        "name": "fuzz",
        "seeds": [6],
        "device": "cpu",
        "families": [{"name": "tiny", "teachers": [{"name": "T-144K", "model": "builtin:tiny-qwen-m"}],
                      "students": [{"name": "S-35K", "model": "builtin:tiny-qwen-xs"}]}],
        "domains": [{"name": "math", "train": train, "tasks": [{"task": "toy_add"}]}],
        "methods": ["SeqKD", "GKD"],
        "temperatures": [1.0, 2.0],
        "training": {"lora": None, "common": {"max_steps": 2}, "kd": {"teacher_topk": 8}},
    }


# key paths a mutation may touch (a list index is an int); real keys and misspelled ones
KEY_PATHS = [
    ("name",), ("seeds",), ("seeds", 0), ("device",), ("threads",), ("families",), ("families", 0, "name"),
    ("families", 0, "teachers"), ("families", 0, "teachers", 0, "model"), ("families", 0, "students", 0, "name"),
    ("families", 0, "students", 0, "model"), ("families", 0, "studnets"), ("domains",), ("domains", 0, "name"),
    ("domains", 0, "train"), ("domains", 0, "tasks"), ("domains", 0, "tasks", 0, "task"),
    ("domains", 0, "tasks", 0, "data"), ("domains", 0, "training"), ("domains", 0, "training", "epochs"),
    ("methods",), ("methods", 0), ("temperatures",), ("temperatures", 1), ("ablations",),
    ("ablations", "noise_sigmas"), ("ablations", "base_teacher"), ("ablations", "teachers"), ("training",),
    ("training", "lora"), ("training", "lora", "r"), ("training", "common"), ("training", "common", "lr"),
    ("training", "common", "max_stpes"), ("training", "kd", "loss"), ("training", "kd", "temperature"),
    ("training", "kd", "max_stpes"), ("training", "teacher_sft", "objective"), ("training", "student_sft", "seed"),
    ("evaluation",), ("evaluation", "mode"), ("evaluation", "limit"), ("evaluation", "batch_size"),
    ("pretrain", "steps"), ("pretrain", "steps", "S-35K"), ("pretrain", "data"), ("pretrain", "extra_data"),
    ("executor", "kind"), ("executor", "workers"), ("nmae",), ("",),
]


def mutate(study: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool) -> None:
    node: Any = study
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


TEXT_DAMAGE = st.sampled_from(["none", "none", "truncate", "insert", "latin1", "tab", "bom", "nul"])


def damage_text(text: str, how: str, at: float, char: str) -> bytes:
    cut = int(len(text) * at)
    if how == "truncate":
        return text[:cut].encode()
    if how == "insert":
        return (text[:cut] + char + text[cut:]).encode()
    if how == "latin1":
        return (text[:cut] + "é" + text[cut:]).encode("latin-1", errors="replace")
    if how == "tab":
        return text.replace("  ", "\t", 1).encode()
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if how == "nul":
        return (text[:cut] + "\x00" + text[cut:]).encode()
    return text.encode()


# --------------------------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------------------------
FIELDS = ["instruction", "answer", "output", "input", "output_pred", "extra"]
RECORD = st.dictionaries(st.sampled_from(FIELDS), st.one_of(
    st.sampled_from(["true", "false", "42", "1.5", "the answer is 7", "answer1", "", " "]), SCALARS, VALUES),
    max_size=5)
GOOD_RECORD = st.builds(lambda q, a, o: {"instruction": q, "answer": a, "output": o},
                        st.text(min_size=1, max_size=20), st.sampled_from(["true", "false", "3", "12.5"]),
                        st.sampled_from(["true", "false", "3", "the answer is 12.5", ""]))
ROWS = st.one_of(st.lists(GOOD_RECORD, min_size=1, max_size=4),
                st.lists(st.one_of(GOOD_RECORD, GOOD_RECORD, RECORD, SCALARS), max_size=6))
DATA_KINDS = st.sampled_from(["json", "json", "jsonl", "jsonl", "empty", "whitespace", "not a list", "truncated",
                              "latin1", "random bytes", "bom", "jsonl blank lines", "nested deep"])


@st.composite
def data_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file suffix, bytes) of a data file, valid or broken in one of many ways."""
    kind = draw(DATA_KINDS)
    rows = draw(ROWS)
    suffix = draw(st.sampled_from([".json", ".jsonl", ".txt"]))
    as_list = json.dumps(rows, ensure_ascii=draw(st.booleans()), allow_nan=True)
    as_lines = "\n".join(json.dumps(r, allow_nan=True) for r in rows)
    if kind == "json":
        return ".json", as_list.encode()
    if kind == "jsonl":
        return ".jsonl", as_lines.encode()
    if kind == "empty":
        return suffix, b""
    if kind == "whitespace":
        return suffix, b" \n\t\n"
    if kind == "not a list":
        return suffix, json.dumps(draw(st.one_of(SCALARS, st.dictionaries(st.text(max_size=4), SCALARS)))).encode()
    if kind == "truncated":
        text = draw(st.sampled_from([as_list, as_lines]))
        return suffix, text[: draw(st.integers(0, max(0, len(text) - 1)))].encode()
    if kind == "latin1":
        return suffix, as_list.replace("[", '[{"instruction": "caf\u00e9", "answer": "1"},', 1).encode("latin-1", "replace")
    if kind == "random bytes":
        return suffix, draw(st.binary(max_size=64))
    if kind == "bom":
        return suffix, b"\xef\xbb\xbf" + as_list.encode()
    if kind == "jsonl blank lines":
        return ".jsonl", ("\n\n" + as_lines.replace("\n", "\n\n\n") + "\n\n").encode()
    return suffix, ("[" * 5000 + "]" * 5000).encode()  # nested deep


# --------------------------------------------------------------------------------------------------------------------
# Result CSVs
# --------------------------------------------------------------------------------------------------------------------
CSV_COLUMNS = ["Teacher", "Student", "Method", "KDMethod", "Temperature", "Ablation", "Seed", "gsm8k", "boolq",
               "toy_add", "Average", "notes"]
CELLS = st.one_of(st.sampled_from(["T-1.5B", "S-0.5B", "Qwen2.5-7B", "SFT", "BaseModel", "student_KD_temp_2.0",
                                   "student_GKD_temp_1.0", "student_KD_base_teacher_temp_1.0", "SeqKD", "GKD",
                                   "nope", "", "12.5", "-3", "nan", "1e9", "noise_sigma=1.0", "6"]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))


ID_CELLS = {"Teacher": st.sampled_from(["T-1.5B", "Qwen2.5-7B", "TinyQwen-657K", ""]),
            "Student": st.sampled_from(["S-0.5B", "Qwen2.5-0.5B", "TinyQwen-35K", "x"]),
            "Method": st.sampled_from(["SFT", "BaseModel", "student_KD_temp_2.0", "student_GKD_temp_1.0",
                                       "student_RevKD_temp_5.0", "student_KD_base_teacher_temp_1.0", "KD", ""])}
NUMBERS = st.one_of(st.floats(0, 100), st.floats(0, 100), st.floats(0, 100), st.sampled_from(["", "nan", "12,5", "x"]))


@st.composite
def result_csvs(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):  # anything
        columns = draw(st.lists(st.sampled_from(CSV_COLUMNS), unique=True, max_size=9))
        rows = draw(st.lists(st.lists(CELLS, min_size=len(columns), max_size=len(columns)), max_size=5))
    else:  # the study's layout, with now and then a bad cell
        tasks = draw(st.lists(st.sampled_from(["gsm8k", "boolq", "toy_add", "Average"]), unique=True, min_size=1))
        columns = ["Teacher", "Student", "Method", *tasks]
        rows = draw(st.lists(st.tuples(*(ID_CELLS[c] for c in columns[:3]), *(NUMBERS for _ in tasks)).map(list),
                             max_size=6))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    text = buffer.getvalue()
    how = draw(st.sampled_from(["none", "none", "none", "truncate", "insert", "latin1", "bom", "nul", "empty"]))
    if how == "empty":
        return b""
    return damage_text(text, how, draw(st.floats(0, 1)), draw(st.sampled_from(['"', ",", "\n", "\r", ";"])))


# --------------------------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=900)
@given(data=st.data())
def test_data_files_load_or_refuse(tmp_path: Path, data: st.DataObject) -> None:
    from kdscope.data import load_examples, load_task, load_training_data

    suffix, content = data.draw(data_files())
    folder = fresh(tmp_path)
    path = folder / f"data{suffix}"
    path.write_bytes(content)
    culprits = [str(path)]
    if loads_or_refuses(lambda: load_training_data(str(path)), culprits, "training data") is None:
        # refused: `train sft` must say so on one line before it loads a model (a file that loads would train)
        exits_cleanly(cli(["train", "sft", "--model", "builtin:tiny-qwen-xs", "--data", str(path),
                           "--out", str(folder / "out"), "--device", "cpu"]), culprits)
    loads_or_refuses(lambda: load_examples(path), culprits, "examples")
    task = data.draw(st.sampled_from(["boolq", "gsm8k", "toy_add"]))
    if loads_or_refuses(lambda: load_task(task, path), culprits, "test items") is None:
        exits_cleanly(cli(["eval", "--model", "builtin:tiny-qwen-xs", "--tasks", task, "--data", str(path),
                           "--out", str(folder / "eval"), "--device", "cpu"]), culprits)
    field = data.draw(st.sampled_from(["output", "output_pred"]))
    exits_cleanly(cli(["score", "--task", "boolq", "--predictions", str(path), "--field", field]),
                  [*culprits, "--field"])


@settings(FUZZ, max_examples=900)
@given(data=st.data())
def test_study_files_load_or_refuse(tmp_path: Path, data: st.DataObject) -> None:
    from kdscope.study import load_study

    case = fresh(tmp_path)
    suffix, content = data.draw(data_files())
    train_file = case / f"train{suffix}"
    train_file.write_bytes(content)
    train = data.draw(st.sampled_from(["synthetic:math:20", "synthetic:math:20", str(train_file), str(train_file)]))
    study = base_study(train)
    for _ in range(data.draw(st.integers(0, 3))):
        mutate(study, data.draw(st.sampled_from(KEY_PATHS)), data.draw(VALUES), data.draw(st.booleans()))
    text = yaml.dump(study, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                     allow_unicode=data.draw(st.booleans()), sort_keys=False)
    raw = damage_text(text, data.draw(TEXT_DAMAGE), data.draw(st.floats(0, 1)), data.draw(ODD_TEXT) or ":")
    path = case / "study.yaml"
    path.write_bytes(raw)
    # the culprit: every message starts with the study file (then the key, and the data file it names)
    culprits = [f"{path}: "]
    loads_or_refuses(lambda: load_study(path), culprits, "study")
    # the CLI wraps the same loader: a third of the cases also go through `run --plan` (runs nothing) or `status`
    command = data.draw(st.sampled_from(["plan", "status", "none", "none", "none", "none"]))
    if command == "plan":
        exits_cleanly(cli(["run", str(path), "--plan", "--json"]), culprits)
    elif command == "status":
        exits_cleanly(cli(["status", str(path), "--out", str(case / "out"), "--json"]), culprits)


@settings(FUZZ, max_examples=700)
@given(content=result_csvs(), suffix=st.sampled_from([".csv", ".csv", ".json", ".jsonl", ".tsv"]))
def test_result_tables_read_or_refuse(tmp_path: Path, content: bytes, suffix: str) -> None:
    from kdscope.stats import read_tables

    path = fresh(tmp_path) / f"results{suffix}"
    path.write_bytes(content)
    if loads_or_refuses(lambda: read_tables([path]), [str(path)], "table") is None:
        # refused: the command line must say the same on one line (a table that loads would run the whole
        # analysis, seconds per case; the stats tests cover that)
        exits_cleanly(cli(["stats", str(path)]), [str(path)])


@pytest.mark.parametrize("content", [b"", b"name: x\n\tfamilies: []\n", b"\xff\xfe", b"[1, 2]", b"a: 2020-13-45",
                                     b"name: x\nfamilies: [\n", b"{" * 3000])
def test_known_bad_study_files(tmp_path: Path, content: bytes) -> None:
    """Cases the generator reaches only by luck, written out."""
    path = tmp_path / "study.yaml"
    path.write_bytes(content)
    exits_cleanly(cli(["status", str(path), "--out", str(tmp_path / "out")]), [str(path)])
