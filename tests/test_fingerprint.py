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


def test_module_fingerprint_reads_only_the_module_files(tmp_path):
    """A training output folder (modules + trainer_state.json, training_args.bin, run_args.json) fingerprints as the
    bare module folder, and re-saving the trainer files does not change it; the weights and config do. The answer
    lines' identity uses it for --lpm-path / --atp-path."""
    from learnpruner_ext.atp import ATP_CONFIG, ATP_WEIGHTS, ATPModules
    from llava.eval.answer_loop import pruning_identity
    from learnpruner_ext import PruningConfig
    from llava.model.fingerprint import module_fingerprint

    ATPModules((1,), 4, hidden_features=2).save_pretrained(tmp_path / "bare")
    out = shutil.copytree(tmp_path / "bare", tmp_path / "out")
    (out / "trainer_state.json").write_text('{"global_step": 4}')
    (out / "training_args.bin").write_bytes(b"x")
    names = (ATP_WEIGHTS, ATP_CONFIG)
    base = module_fingerprint(out, names)
    assert base == module_fingerprint(tmp_path / "bare", names) == folder_fingerprint(tmp_path / "bare")
    (out / "training_args.bin").write_bytes(b"yy")
    assert module_fingerprint(out, names) == base
    identity = pruning_identity(PruningConfig("atp", 8, atp_path=str(out)))
    assert identity["atp_fingerprint"] == base
    config = json.loads((out / ATP_CONFIG).read_text())
    config["step"] = 5
    (out / ATP_CONFIG).write_text(json.dumps(config))
    assert module_fingerprint(out, names) != base
