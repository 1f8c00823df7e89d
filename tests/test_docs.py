"""Figures the README states are the ones the code computes."""

from __future__ import annotations

import re

from conftest import ROOT


def test_readme_states_the_corpus_entropy_the_text_dataset_computes():
    from plait.data.datasets import text

    stated = re.search(r"unigram entropy \((\d+\.\d+) nats\)", (ROOT / "README.md").read_text())
    assert stated, "the README no longer states the corpus's unigram entropy"
    _, _, info = text()
    assert f"{info['unigram_entropy']:.2f}" == stated.group(1)


def _block(language: str, first_line: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"```{language}\n({re.escape(first_line)}\n.*?)```", text, re.S)
    assert found, f"the README no longer has the {first_line!r} block"
    return found.group(1)


def test_readme_own_model_example_runs_from_its_own_folder(tmp_path):
    """The README's shortest own-model example, as a user would save it: mymodel.py and
    mymodel.toml in a folder of their own, plait train run from there (a pipeline of 2), and the
    plait.fit script beside them."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "mymodel.py").write_text(_block("python", "# mymodel.py"))
    (tmp_path / "mymodel.toml").write_text(_block("toml", "# mymodel.toml"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plait = [sys.executable, "-c", "import sys; from plait.cli import main; sys.exit(main())"]
    done = subprocess.run([*plait, "train", "mymodel.toml", "--nproc", "2", "--set", "parallel.pp=2",
                           "--set", "run.progress=false"], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "runs" / "mymodel" / "summary.json").read_text())
    assert summary["layout"] == "dp=1 x pp=2 x tp=1" and summary["test_accuracy"] > 0.9

    script = _block("python", "import plait\nfrom mymodel import Net, data").replace(
        'overrides=["parallel.zero=3"]', 'overrides=["parallel.zero=3", "train.steps=5", "run.name=fit"]')
    (tmp_path / "train.py").write_text(script)
    done = subprocess.run([sys.executable, "train.py"], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "plait: fit: 5 steps on 1 process (dp=1 x pp=1 x tp=1, ZeRO-3)" in done.stdout
