import json

from common.models import trained_max_length, training_args


def test_training_args_read_from_the_manifest_of_an_rm_folder(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "manifest.json").write_text(json.dumps({"args": {"seed": 2, "max_length": 256}}))
    assert training_args(str(rm)) == {"seed": 2, "max_length": 256}
    assert trained_max_length(str(rm), 1024) == 256


def test_training_args_of_other_models_are_empty(tmp_path):
    assert training_args(str(tmp_path / "missing")) == {}
    assert training_args("org/hub-model") == {}
    assert trained_max_length("org/hub-model", 1024) == 1024
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    assert training_args(str(broken)) == {}
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "manifest.json").write_text(json.dumps({"args": {"max_length": "long"}}))
    assert trained_max_length(str(odd), 512) == 512
