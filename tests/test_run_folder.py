"""The run folder's format lives in rtune.run_folder; a run folder is not a base model."""

import pytest

from rtune import run_folder
from rtune.errors import RtuneError
from rtune.run_folder import check_base_model_spec, is_run_dir


def test_training_refuses_run_folder_as_base(tmp_path):
    (tmp_path / "rtune_run.json").write_text("{}")
    assert is_run_dir(tmp_path)
    with pytest.raises(RtuneError, match="run folder"):
        check_base_model_spec(str(tmp_path))


def test_train_cli_refuses_run_folder(tmp_path, capsys):
    from rtune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / run_folder.RUN_INFO).write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "0", "instruction": "", "response": "r"}\n')
    assert main(["train", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "run folder" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_unfinished_run_is_named(tmp_path):
    run_folder.write_run_info(tmp_path, {"status": "running"})
    with pytest.raises(RtuneError, match="has not finished.*nothing to merge"):
        run_folder.read_complete_run_info(tmp_path, "nothing to merge")
    assert not run_folder.run_is_complete(tmp_path)


def test_qlora_run_without_cuda_loads_unquantised_with_a_warning(caplog, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert run_folder.base_quantization({"config": {"peft": "qlora"}}, "merging into") is None
    assert "NF4" in caplog.text and "merging into" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_folder.base_quantization({"config": {"peft": "qlora"}}, "x") == "nf4"
    assert run_folder.base_quantization({"config": {"peft": "lora"}}, "x") is None
