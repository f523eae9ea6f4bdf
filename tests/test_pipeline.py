"""kdlib.pipeline: overrides, parameter type checks, run plans, profiles, strip, papermill runs."""

from __future__ import annotations

import nbformat
import psutil
import pytest
import yaml

from kdlib.errors import ConfigError, RunError
from kdlib.experiment import Experiment
from kdlib.paths import STATIC_ENV
from kdlib.pipeline import (
    _type_ok,
    list_notebooks,
    load_profile,
    parse_overrides,
    plan_run,
    run_profile,
    split_overrides,
    strip_outputs,
)

PARAMS_00 = 'profile: str = "x"\nsteps: int = 2\nrate: float = 0.1\nratio: Optional[float] = None\n'
PARAMS_01 = 'profile: str = "x"\nsteps: int = 2\nflag: bool = False\nnames: list = []\n'


def write_notebook(path, params: str, *cells: str):
    """A notebook with a `parameters`-tagged cell and code cells, as papermill expects."""
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def notebooks(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "01_second.ipynb", PARAMS_01, "print(steps)")
    write_notebook(folder / "00_first.ipynb", PARAMS_00, "print(steps)")
    (folder / "scratch.ipynb").write_text("{}")  # not numbered: ignored
    return list_notebooks(folder)


def profile(**kw):
    return {"name": "tiny", "parameters": {}, "notebooks": {}, **kw}


# ---------------------------------------------------------------- overrides and types


def test_parse_overrides_reads_yaml_values():
    got = parse_overrides(["epochs=5", "lr=0.5", "ratios=[1, 4]", "grid_ratio=null", "name=hello",
                           "empty=", " spaced = 3", "expr=a=b", "flag=true"])
    assert got == {"epochs": 5, "lr": 0.5, "ratios": [1, 4], "grid_ratio": None, "name": "hello",
                   "empty": None, "spaced": 3, "expr": "a=b", "flag": True}
    assert type(got["epochs"]) is int and type(got["lr"]) is float
    assert parse_overrides(None) == {} == parse_overrides([])


@pytest.mark.parametrize("item", ["novalue", "=3", " =3"])
def test_parse_overrides_rejects_items_without_key_or_value(item):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([item])


@pytest.mark.parametrize("value, type_name, ok", [
    (3, "int", True), (True, "int", False), (3.0, "int", False), ("3", "int", False),
    (3, "float", True), (0.5, "float", True), (False, "float", False),
    (None, "Optional[float]", True), (2, "Optional[float]", True), (0.5, "Optional[ float ]", True),
    ("x", "Optional[float]", False), (True, "Optional[float]", False),
    (None, "float", False), (None, "int", False), (None, "str", False),
    ("a", "str", True), (1, "str", False),
    (True, "bool", True), (1, "bool", False),
    ([1, 4], "list", True), ((1, 4), "list", False), ([1], "list[int]", True),
    ({"a": 1}, "dict", True), ([], "dict", False),
    ("anything", "None", True), (None, "None", True),  # unannotated parameters are not checked
    ("x", "Union[int,str]", True),
])
def test_type_ok(value, type_name, ok):
    assert _type_ok(value, type_name) is ok


# ---------------------------------------------------------------- notebooks and plans


def test_list_notebooks_in_order_and_empty_folder(tmp_path, notebooks):
    assert [p.name for p in notebooks] == ["00_first.ipynb", "01_second.ipynb"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.ipynb").write_text("{}")
    (empty / "1_short.ipynb").write_text("{}")
    with pytest.raises(ConfigError, match="no numbered notebooks") as err:
        list_notebooks(empty)
    assert str(empty) in str(err.value)


def test_list_notebooks_defaults_to_the_project_notebooks():
    names = [p.name for p in list_notebooks()]
    assert names == sorted(names) and names[0].startswith("00_") and len(names) >= 5


def test_plan_injects_profile_and_merges_parameters(notebooks):
    prof = profile(parameters={"steps": 4}, notebooks={"01_second": {"flag": True}})
    plan = plan_run(prof, notebooks, overrides={"rate": 0.25})
    assert [nb.name for nb, _ in plan] == ["00_first.ipynb", "01_second.ipynb"]
    assert plan[0][1] == {"profile": "tiny", "steps": 4, "rate": 0.25}
    assert plan[1][1] == {"profile": "tiny", "steps": 4, "flag": True}
    # -p beats the per-notebook value, which beats the shared one
    prof = profile(parameters={"steps": 4}, notebooks={"01_second": {"steps": 6}})
    plan = plan_run(prof, notebooks, overrides={"steps": 9})
    assert [v["steps"] for _, v in plan] == [9, 9]
    plan = plan_run(prof, notebooks)
    assert [v["steps"] for _, v in plan] == [4, 6]


def test_plan_only_selects_in_notebook_order(notebooks):
    plan = plan_run(profile(), notebooks, only=["01", "00"])
    assert [nb.name for nb, _ in plan] == ["00_first.ipynb", "01_second.ipynb"]
    plan = plan_run(profile(), notebooks, only=["01_second"])
    assert [nb.name for nb, _ in plan] == ["01_second.ipynb"]
    with pytest.raises(ConfigError, match=r"--only \['07'\].*\['00', '01'\]"):
        plan_run(profile(), notebooks, only=["07"])


def test_plan_override_checked_against_the_selected_notebooks_only(notebooks):
    # `rate` belongs to 00 only: fine for the whole profile, an error when only 01 runs
    assert plan_run(profile(), notebooks, overrides={"rate": 0.2})[0][1]["rate"] == 0.2
    with pytest.raises(ConfigError, match=r"-p \['rate'\]: neither an experiment setting nor a"):
        plan_run(profile(), notebooks, only=["01"], overrides={"rate": 0.2})


@pytest.mark.parametrize("prof, overrides, match", [
    (profile(parameters={"epochz": 3}), None,
     r"parameters \['epochz'\] are declared by no notebook"),
    (profile(notebooks={"01_second": {"rate": 0.1}}), None,
     r"01_second declares no parameters \['rate'\]"),
    (profile(notebooks={"05_missing": {}}), None, r"no notebook '05_missing'"),
    (profile(), {"batch": 3}, r"-p \['batch'\]: neither an experiment setting nor a parameter"),
    (profile(parameters={"epochs": 3}), None,
     r"profile tiny: \['epochs'\] are experiment settings: move them .* to `experiment:`"),
    (profile(), {"epochs": "3"}, r"experiment setting epochs='3' should be int"),
    (profile(experiment={"teacher": "cnn_q"}), None, r"unknown model 'cnn_q'"),
    (profile(experiment={"epoch": 3}), None, r"unknown setting\(s\) \['epoch'\] in the experiment"),
    (profile(parameters={"steps": "3"}), None,
     r"00_first.ipynb: parameter steps='3' should be int"),
    (profile(parameters={"steps": True}), None, r"steps=True should be int"),
    (profile(notebooks={"00_first": {"ratio": "high"}}), None, r"ratio='high' should be Optional"),
    (profile(), {"flag": 1}, r"01_second.ipynb: parameter flag=1 should be bool"),
])
def test_plan_rejects_unknown_or_mistyped_parameters(notebooks, prof, overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan_run(prof, notebooks, overrides=overrides)


def test_plan_takes_experiment_settings_from_the_profile_and_p(tmp_path, notebooks):
    # -p of an experiment setting that no notebook declares is fine: it goes into the experiment
    plan = plan_run(profile(), notebooks, overrides={"epochs": 5, "ratios": [1, 8]})
    assert all("epochs" not in v for _, v in plan)
    # a notebook parameter named like an experiment setting gets the experiment's value
    write_notebook(tmp_path / "nbs" / "02_third.ipynb",
                   'profile: str = "x"\nratios: list = [1]\nsteps: int = 1\n', "print(ratios)")
    nbs = list_notebooks(tmp_path / "nbs")
    prof = profile(experiment={"ratios": [2, 8]}, parameters={"steps": 3})
    assert plan_run(prof, nbs)[2][1] == {"profile": "tiny", "ratios": [2, 8], "steps": 3}
    assert plan_run(prof, nbs, overrides={"ratios": [None, 4]})[2][1]["ratios"] == [None, 4]
    with pytest.raises(ConfigError, match=r"ratio=0.5 must lie in"):
        plan_run(prof, nbs, overrides={"ratios": [0.5]})


def test_split_overrides():
    assert split_overrides({"epochs": 5, "n_boot": 9, "teacher": "cnn_s"}) == (
        {"epochs": 5, "teacher": "cnn_s"}, {"n_boot": 9})
    assert split_overrides(None) == ({}, {})


def test_plan_accepts_none_for_optional_and_int_for_float(notebooks):
    plan = plan_run(profile(parameters={"ratio": None, "rate": 1}), notebooks)
    assert plan[0][1]["ratio"] is None and plan[0][1]["rate"] == 1


# ---------------------------------------------------------------- profiles


def test_load_profile_reads_a_yaml_path_and_fills_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"description": "d", "parameters": {"steps": 1}}))
    prof = load_profile(str(path))
    assert prof == {"description": "d", "parameters": {"steps": 1}, "notebooks": {}, "experiment": {},
                    "name": "mine"}


def test_load_profile_by_name_from_profiles_folder():
    prof = load_profile("smoke")
    assert prof["name"] == "smoke"
    assert isinstance(prof["parameters"], dict) and isinstance(prof["notebooks"], dict)


def test_load_profile_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"parameters": {}, "notebook": {}, "extra": 1}))
    with pytest.raises(ConfigError, match=r"unknown top-level keys \['extra', 'notebook'\]") as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and "'notebooks'" in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown profile 'nosuch'.*'smoke'"):
        load_profile("nosuch")


def test_profile_with_empty_sections_is_usable_or_a_clear_error(tmp_path, notebooks):
    path = tmp_path / "empty.yaml"
    path.write_text("description: all defaults\nparameters:\nnotebooks:\n")
    try:
        plan = plan_run(load_profile(str(path)), notebooks)
    except ConfigError:
        return
    assert [v for _, v in plan] == [{"profile": "empty"}, {"profile": "empty"}]


# ---------------------------------------------------------------- strip


def test_strip_outputs_removes_outputs_and_counts(tmp_path):
    path = write_notebook(tmp_path / "00_x.ipynb", "a: int = 1", "print(a)")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[1].execution_count = 3
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2024"}
    nb.cells[1].metadata["papermill"] = {"duration": 1.0}
    nb.cells.append(nbformat.v4.new_markdown_cell("text"))
    nb.metadata["papermill"] = {"parameters": {}}
    nbformat.write(nb, str(path))
    assert strip_outputs(path) is True
    clean = nbformat.read(str(path), as_version=4)
    code = [c for c in clean.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "execution" not in clean.cells[1].metadata and "papermill" not in clean.cells[1].metadata
    assert "papermill" not in clean.metadata
    assert clean.cells[0].metadata["tags"] == ["parameters"]  # the parameters tag stays
    assert clean.cells[2].source == "text"
    before = path.read_bytes()
    assert strip_outputs(path) is False
    assert path.read_bytes() == before


def test_strip_outputs_counts_cell_metadata_alone_as_a_change(tmp_path):
    path = write_notebook(tmp_path / "00_x.ipynb", "a: int = 1", "print(a)")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].metadata["papermill"] = {"duration": 1.0}
    nbformat.write(nb, str(path))
    assert strip_outputs(path) is True
    assert strip_outputs(path) is False


# ---------------------------------------------------------------- papermill runs (2 kernels)


def _profile_file(tmp_path, **params):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"description": "test", "parameters": params}))
    return path


def test_run_profile_executes_and_writes_the_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STATIC_ENV, raising=False)  # run_profile sets it; restored afterwards
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "00_hello.ipynb", 'profile: str = "x"\nvalue: int = 1\n',
                   "import os\n"
                   "print(f'{profile}|{value * 2}|{os.environ.get(\"KDLIB_STATIC_FIGURES\")}')")
    done = run_profile(str(_profile_file(tmp_path, value=21)), notebooks_dir=folder,
                       overrides={"epochs": 5}, log_output=False, progress_bar=False)
    out = tmp_path / "home" / "runs" / "tiny" / "notebooks" / "00_hello.ipynb"
    assert done == [out] and out.is_file()
    nb = nbformat.read(str(out), as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "tiny|42|1" in text  # profile injected, parameter applied, static figures on
    source = nbformat.read(str(folder / "00_hello.ipynb"), as_version=4)
    assert all(not c.outputs for c in source.cells if c.cell_type == "code")  # source untouched
    # the experiment, with the -p override, is recorded for the notebooks to read
    man = yaml.safe_load((tmp_path / "home" / "runs" / "tiny" / "manifest.yaml").read_text())
    assert man["experiment"] == {**Experiment().to_dict(), "epochs": 5}
    assert man["experiment_source"].endswith("tiny.yaml with -p {'epochs': 5}")


def test_run_profile_stops_the_kernel_and_its_children_at_once(tmp_path, monkeypatch):
    """A kernel that used multiprocessing (the launcher's workers start the resource tracker, which
    ignores SIGTERM) is stopped at once with its process group: no exit handler runs after the
    last cell, and no process is left behind."""
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STATIC_ENV, raising=False)
    folder = tmp_path / "nbs"
    folder.mkdir()
    pids, marker = tmp_path / "pids.txt", tmp_path / "atexit.txt"
    write_notebook(folder / "00_mp.ipynb", "x: int = 1",
                   "import atexit, multiprocessing, os, psutil, pathlib\n"
                   "lock = multiprocessing.get_context('spawn').Lock()  # starts the tracker\n"
                   f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'torn down')\n"
                   "kids = [p.pid for p in psutil.Process().children(recursive=True)]\n"
                   f"pathlib.Path({str(pids)!r}).write_text(' '.join(map(str, [os.getpid(), *kids])))")
    run_profile(str(_profile_file(tmp_path)), notebooks_dir=folder, log_output=False,
                progress_bar=False)
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2  # the kernel and the resource tracker
    gone = psutil.wait_procs([psutil.Process(p) for p in started if psutil.pid_exists(p)],
                             timeout=5)[1] == []
    assert gone and not marker.exists()


def test_run_profile_failure_names_the_notebook_and_the_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STATIC_ENV, raising=False)
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "00_boom.ipynb", "x: int = 1", "y = x + 1",
                   "raise ValueError('boom 7')")
    write_notebook(folder / "01_never.ipynb", "x: int = 1", "print(x)")
    children = set(psutil.Process().children(recursive=True))
    with pytest.raises(RunError) as err:
        run_profile(str(_profile_file(tmp_path)), notebooks_dir=folder, log_output=False,
                    progress_bar=False)
    msg = str(err.value)
    out = tmp_path / "home" / "runs" / "tiny" / "notebooks" / "00_boom.ipynb"
    assert msg.startswith("00_boom.ipynb failed in cell")
    assert "ValueError: boom 7" in msg and str(out) in msg
    assert out.is_file() and not out.with_name("01_never.ipynb").exists()
    # both kernels (the failed notebook's and the one started for the next) are stopped
    started = set(psutil.Process().children(recursive=True)) - children
    assert psutil.wait_procs(started, timeout=5)[1] == []


def test_each_notebook_gets_a_fresh_kernel_started_before_its_turn(tmp_path, monkeypatch):
    """The next notebook's kernel starts, importing WARM_IMPORTS, while the current one runs; it
    is another process and holds nothing of the notebook before it."""
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STATIC_ENV, raising=False)
    folder = tmp_path / "nbs"
    folder.mkdir()
    show = "import os, sys\nprint(os.getpid(), 'secret' in dir(), 'torch' in sys.modules)"
    write_notebook(folder / "00_a.ipynb", "x: int = 1", "secret = 41\n" + show)
    write_notebook(folder / "01_b.ipynb", "x: int = 1", show)
    done = run_profile(str(_profile_file(tmp_path)), notebooks_dir=folder, log_output=False,
                       progress_bar=False)
    printed = [nbformat.read(str(p), as_version=4).cells[-1].outputs[0]["text"].split()
               for p in done]
    assert printed[0][1:] == ["True", "True"] and printed[1][1:] == ["False", "True"]
    assert printed[0][0] != printed[1][0]
