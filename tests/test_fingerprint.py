"""The checkpoint fingerprint that keeps answers of different models apart (llava.model.fingerprint)."""

import json
import shutil

import pytest

from llava.model import fingerprint
from llava.model.fingerprint import folder_fingerprint


def test_same_files_same_fingerprint_anywhere(tiny_hf, tmp_path):
    copy = shutil.copytree(tiny_hf, tmp_path / "elsewhere" / "renamed")
    assert folder_fingerprint(copy) == folder_fingerprint(tiny_hf)
    assert len(folder_fingerprint(tiny_hf)) == 16 and int(folder_fingerprint(tiny_hf), 16) >= 0


def test_config_and_weights_change_it(tiny_hf, tmp_path):
    base = folder_fingerprint(tiny_hf)
    edited = shutil.copytree(tiny_hf, tmp_path / "cfg")
    config = json.loads((edited / "config.json").read_text())
    config["text_config"]["rope_theta"] = 123.0
    (edited / "config.json").write_text(json.dumps(config))
    assert folder_fingerprint(edited) != base
    retrained = shutil.copytree(tiny_hf, tmp_path / "w")
    weights = retrained / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > fingerprint.SMALL_FILE  # sampled, not hashed whole
    data[-1] ^= 0xFF  # the last slice is always read: a change of one weight byte there is seen
    weights.write_bytes(bytes(data))
    assert folder_fingerprint(retrained) != base


def test_shipped_lpm_and_local_tower_are_included(tiny_llava, tmp_path):
    base = folder_fingerprint(tiny_llava)
    tower = json.loads((tiny_llava / "config.json").read_text())["mm_vision_tower"]
    copy = shutil.copytree(tiny_llava, tmp_path / "m")
    assert (copy / tower).is_dir()  # the tiny original-format checkpoint keeps its tower folder inside
    tower_config = copy / tower / "config.json"
    tower_config.write_text(tower_config.read_text().replace("{", '{"note": 1, ', 1))
    assert folder_fingerprint(copy) != base
    copy2 = shutil.copytree(tiny_llava, tmp_path / "m2")
    (copy2 / "lpm").mkdir()
    (copy2 / "lpm" / "lpm_config.json").write_text("{}")
    assert folder_fingerprint(copy2) != base


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folder_fingerprint(tmp_path / "missing")
