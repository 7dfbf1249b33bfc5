"""Dictionary: encode/decode with its own settings and centre, save/load round trip."""

import json

import pytest
import torch

from pipeline.core.dictionary import DICTIONARY_META, DICTIONARY_WEIGHTS, CoderSettings, Dictionary
from pipeline.core.coders import encode
from pipeline.core.synthetic import planted_problem


def _dictionary(centre=True, nonnegative=True):
    p = planted_problem(seed=0, nonnegative=nonnegative)
    c = torch.linspace(-1, 1, 20) if centre else None
    return Dictionary(p.D.clone(), CoderSettings(k=3, nonnegative=nonnegative, refit=True), c,
                      history=[{"iteration": 1, "fvu": 0.5}], metadata={"note": "test"}), p


def test_encode_applies_centre_and_coder_settings():
    D, p = _dictionary()
    Y = p.Y + D.centre
    codes = D.encode(Y)
    direct = encode(p.Y, D.atoms, 3, nonnegative=True, refit=True)
    torch.testing.assert_close(codes.values, direct.values)
    torch.testing.assert_close(D.decode(codes), direct.decode(D.atoms) + D.centre)
    assert D.fvu(Y) < 0.05


def test_save_load_round_trip(tmp_path):
    D, p = _dictionary()
    D.save(tmp_path / "dict")
    assert (tmp_path / "dict" / DICTIONARY_WEIGHTS).exists()
    meta = json.loads((tmp_path / "dict" / DICTIONARY_META).read_text())
    assert meta["coder"]["k"] == 3 and meta["history"][0]["fvu"] == 0.5
    E = Dictionary.load(tmp_path / "dict")
    assert torch.equal(E.atoms, D.atoms) and torch.equal(E.centre, D.centre)
    assert E.coder == D.coder and E.metadata == {"note": "test"}
    torch.testing.assert_close(E.encode(p.Y).values, D.encode(p.Y).values)
    assert not list((tmp_path / "dict").glob("*.tmp"))  # atomic writes leave nothing behind


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
