"""Dictionary: encode/decode with its own settings and centre, save/load round trip."""

import json
import os

import pytest
import torch

from pipeline.core.coders import encode
from pipeline.core.dictionary import DICTIONARY_META, DICTIONARY_WEIGHTS, CoderSettings, Dictionary
from pipeline.core.synthetic import planted_problem
from pipeline.utils import atomic


def _dictionary(centre=True, nonnegative=True):
    p = planted_problem(seed=0, nonnegative=nonnegative)
    c = torch.linspace(-1, 1, 20) if centre else None
    return Dictionary(
        p.D.clone(),
        CoderSettings(k=3, nonnegative=nonnegative, refit=True),
        c,
        history=[{"iteration": 1, "fvu": 0.5}],
        metadata={"note": "test"},
    ), p


def test_encode_applies_centre_and_coder_settings():
    D, p = _dictionary()
    Y = p.Y + D.centre
    codes = D.encode(Y)
    direct = encode(p.Y, D.atoms, 3, nonnegative=True, refit=True)
    torch.testing.assert_close(codes.values, direct.values)
    torch.testing.assert_close(D.decode(codes), direct.decode(D.atoms) + D.centre)
    assert D.fvu(Y) < 0.05


TEMP_GLOB = ".*.tmp-*"
"""The names :mod:`pipeline.utils.atomic` writes before renaming (``.<name>.tmp-<pid>``)."""


def test_save_load_round_trip(tmp_path, monkeypatch):
    D, p = _dictionary()
    renamed = []
    replace = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: renamed.append((src, dst)) or replace(src, dst))
    D.save(tmp_path / "dict")
    monkeypatch.undo()
    # both files went through the atomic helper, from temp names the leftover glob below does match
    assert sorted(dst.name for _, dst in renamed) == sorted([DICTIONARY_WEIGHTS, DICTIONARY_META])
    assert all(src.match(TEMP_GLOB) and src.parent == tmp_path / "dict" for src, _ in renamed)
    assert (tmp_path / "dict" / DICTIONARY_WEIGHTS).exists()
    meta = json.loads((tmp_path / "dict" / DICTIONARY_META).read_text())
    assert meta["coder"]["k"] == 3 and meta["history"][0]["fvu"] == 0.5
    E = Dictionary.load(tmp_path / "dict")
    assert torch.equal(E.atoms, D.atoms) and torch.equal(E.centre, D.centre)
    assert E.coder == D.coder and E.metadata == {"note": "test"}
    torch.testing.assert_close(E.encode(p.Y).values, D.encode(p.Y).values)
    assert not list((tmp_path / "dict").glob(TEMP_GLOB))  # atomic writes leave nothing behind
    # and the glob would see one left by a killed write
    leftover = tmp_path / "dict" / f".{DICTIONARY_WEIGHTS}.tmp-{os.getpid()}"
    leftover.write_bytes(b"killed mid-write")
    assert list((tmp_path / "dict").glob(TEMP_GLOB)) == [leftover]


def test_load_missing_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=DICTIONARY_WEIGHTS):
        Dictionary.load(tmp_path)


def test_rejects_non_unit_atoms():
    with pytest.raises(ValueError, match="unit norm"):
        Dictionary(torch.ones(4, 3), CoderSettings(k=1))


def test_encode_rejects_wrong_width():
    D, _ = _dictionary()
    with pytest.raises(ValueError, match="d = 19"):
        D.encode(torch.randn(5, 19))
