"""`make demo`'s step runner (scripts/run_demo.py): skip what is done, redo what an edited config made stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import REPO

# each fake step appends one line to <folder>/runs.txt and writes <folder>/done
WRITE = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
         "f = d / 'runs.txt'; f.write_text((f.read_text() if f.exists() else '') + 'run\\n'); "
         "(d / 'done').write_text('ok')")


def _runner():
    spec = importlib.util.spec_from_file_location("run_demo_script", REPO / "scripts" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _demo(module, tmp: Path) -> dict[str, float]:
    steps = module.Steps()
    for name in ("a", "b"):
        folder = tmp / name
        steps.run(name, folder / "done", ["-c", WRITE, str(folder)], folder, tmp / f"{name}.yaml")
    return steps.timings


def _runs(folder: Path) -> int:
    return len(folder.joinpath("runs.txt").read_text().splitlines())


def test_done_steps_are_skipped_and_an_edited_config_redoes_its_step_and_the_later_ones(tmp_path, capsys):
    module = _runner()
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text("run: {max_steps: 1}\n")
    _demo(module, tmp_path)
    assert (_runs(tmp_path / "a"), _runs(tmp_path / "b")) == (1, 1)

    assert _demo(module, tmp_path) == {"a": 0.0, "b": 0.0}  # nothing changed: both skipped
    assert (_runs(tmp_path / "a"), _runs(tmp_path / "b")) == (1, 1)

    (tmp_path / "b.yaml").write_text("run: {max_steps: 2}\n")  # only b's config: a stays, b is redone
    _demo(module, tmp_path)
    out = capsys.readouterr().out
    assert "its command or config changed since it ran: removing" in out
    assert (_runs(tmp_path / "a"), _runs(tmp_path / "b")) == (1, 1)  # b's folder was removed, then made again

    (tmp_path / "a.yaml").write_text("run: {max_steps: 3}\n")  # a's config: a and everything after it
    _demo(module, tmp_path)
    out = capsys.readouterr().out
    assert out.count("removing") == 2 and "an earlier step ran again" in out
    assert _demo(module, tmp_path) == {"a": 0.0, "b": 0.0}

    (tmp_path / "a" / module.STAMP).unlink()  # made by an older version (no record): trusted as it is
    (tmp_path / "a.yaml").write_text("run: {max_steps: 4}\n")
    assert _demo(module, tmp_path) == {"a": 0.0, "b": 0.0}
