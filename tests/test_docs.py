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
