"""One tiny diffusers unCLIP pipeline (random weights) for every Karlo test of the session:
the pipeline, the folder its `save_pretrained` wrote, and unclip's import of that folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """diffusers' pipeline, and the folder its `save_pretrained` wrote. (diffusers 0.42 cannot
    `from_pretrained` that folder: it records text_proj as ["diffusers", "UnCLIPTextProjModel"],
    a name it no longer resolves; unclip's import reads the folder without that index entry.)"""
    pytest.importorskip("diffusers", reason="diffusers is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")
    from launch.diffusers_folder import write_clip_tokenizer
    from tests.karlo.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("karlo")
    write_clip_tokenizer(root, 77)  # OpenAI's BPE in CLIPTokenizer's files, as unclip exports it
    pipe = tiny_pipeline(root)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


@pytest.fixture(scope="session")
def folder(built) -> Path:
    return built[0]


@pytest.fixture(scope="session")
def theirs(built):
    return built[1]


@pytest.fixture(scope="session")
def imported(folder):
    from launch.import_diffusers import read_unclip_folder

    return {s.stage: s for s in read_unclip_folder(folder)}
