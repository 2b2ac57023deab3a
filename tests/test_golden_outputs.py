"""The tools' outputs are byte-identical to those recorded before the package moved
into layers (issue 15): every file of every Hugging Face export, and every tensor
(key, dtype, shape, bytes) that upcycling and compression write, from the fixed
checkpoints in ``tests/data/golden`` (``tests/golden.py`` says how they were made).
"""

import json

import pytest

import golden

DIGESTS = json.loads(golden.DIGESTS.read_text())

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:The argument order of load has been changed:UserWarning",
)


def _compare(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: other files/keys than recorded"
    changed = sorted(name for name in want if got[name] != want[name])
    assert not changed, f"{what}: bytes differ from the recorded output in {changed}"


@pytest.mark.parametrize("name", sorted(DIGESTS["export"]))
def test_export_is_byte_identical(dist1, name):
    case, fmt = name.split("/")
    _compare(dist1.run(golden.export_digests, case, fmt)[0], DIGESTS["export"][name], f"export {name}")


@pytest.mark.parametrize("name", sorted(DIGESTS["upcycle"]))
def test_upcycle_tensors_are_identical(dist1, name):
    _compare(dist1.run(golden.upcycle_digests, name)[0], DIGESTS["upcycle"][name], f"upcycle {name}")


@pytest.mark.parametrize("name", sorted(DIGESTS["compress"]))
def test_compress_tensors_are_identical(dist1, name):
    _compare(dist1.run(golden.compress_digests, name)[0], DIGESTS["compress"][name], f"compress {name}")


@pytest.mark.parametrize("name", sorted(DIGESTS["import"]))
def test_import_tensors_are_identical(dist1, name):
    _compare(dist1.run(golden.import_digests, name)[0], DIGESTS["import"][name], f"import {name}")


def test_digests_cover_every_case():
    assert {name.split("/")[0] for name in DIGESTS["export"]} == set(golden.CASES)
    assert set(DIGESTS["upcycle"]) == set(golden.UPCYCLES) and set(DIGESTS["compress"]) == set(golden.COMPRESSIONS)
    assert set(DIGESTS["import"]) == set(golden.IMPORTS)
