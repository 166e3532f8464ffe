"""reproduce.py's judgement of a claim by its interval, and its choice of the independent yardstick."""
import importlib.util
import os

from conftest import ROOT

spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "reproduce.py"))
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_verdict_by_interval():
    assert reproduce.verdict([0.01, 0.2]) == "reproduces"
    assert reproduce.verdict([-0.2, -0.01]).startswith("does not reproduce")
    assert reproduce.verdict([-0.1, 0.1]) == "cannot be told apart at this size"
    assert reproduce.verdict([0.0, 0.1]) == "cannot be told apart at this size"  # zero inside: no claim
    # a difference taken the other way round (ORM - SP-PRM for "SP-PRM above the ORM")
    assert reproduce.verdict([-0.2, -0.01], sign=-1) == "reproduces"


def test_independent_yardstick_skips_the_reference_and_its_parent():
    candidates = {"ORM seed 1": "r/orm_s1", "ORM seed 2": "r/orm_s2", "MiniLM, 2 epochs": "r/ref_2ep"}
    # the reference was trained on from seed 1: seed 2 is the only RM that shaped nothing
    assert reproduce.independent_of(candidates, "r/ref_2ep", {"r/ref_2ep": "r/orm_s1"}) == "r/orm_s2"
    assert reproduce.independent_of(candidates, "r/ref_2ep", {"r/ref_2ep": "r/orm_s2"}) == "r/orm_s1"
    assert reproduce.independent_of(candidates, "r/orm_s1", {"r/ref_2ep": "r/orm_s1"}) == "r/orm_s2"
    assert reproduce.independent_of({"ORM seed 1": "r/orm_s1"}, "r/orm_s1", {}) is None
