"""qwen2-convert: HF -> megatron -> HF is bit-exact through a layout change; bad input is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2_megatron.checkpoint.model_checkpoint import read_info
from qwen2_megatron.cli import convert as convert_cli
from qwen2_megatron.convert.convert import export_hf, import_hf
from qwen2_megatron.convert.hf_io import CheckpointFormatError, HFCheckpoint
from qwen2_megatron.model.shape import ShapeError
from qwen2_megatron.parallel.layout import LayoutError, ParallelLayout
from qwen2_megatron.parallel.local_launch import WorkerError
from tests.conftest import flip_a_weight_byte, save_random_hf


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_bit_exact(a: Path, b: Path) -> None:
    left, right = _tensors(a), _tensors(b)
    assert sorted(left) == sorted(right)
    for name, tensor in left.items():
        assert right[name].dtype == tensor.dtype, name
        assert torch.equal(right[name], tensor), name


def test_dense_bf16_sharded_round_trip_tp2_to_pp2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    hf = tmp_path / "hf"
    save_random_hf(hf, moe=False, seed=3)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16)
    shutil.rmtree(hf)
    model.save_pretrained(hf, max_shard_size="20KB")  # several shards + index
    assert len(list(hf.glob("*.safetensors"))) > 1

    import_hf(hf, tmp_path / "mcore", ParallelLayout(tp=2))
    assert read_info(tmp_path / "mcore")["precision"] == "bf16"
    export_hf(tmp_path / "mcore", tmp_path / "back", ParallelLayout(pp=2))
    _assert_bit_exact(hf, tmp_path / "back")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert reloaded.config.tie_word_embeddings and reloaded.dtype == torch.bfloat16

    # verify: the bf16 weights run in fp32 on both sides
    assert convert_cli.main(["verify", "--hf", str(tmp_path / "back"), "--checkpoint", str(tmp_path / "mcore"), "--tp", "2"]) == 0
    assert "OK" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_moe_round_trip_ep2_to_tp2(tmp_path: Path, hf_moe: Path) -> None:
    import_hf(hf_moe, tmp_path / "mcore", ParallelLayout(ep=2))
    export_hf(tmp_path / "mcore", tmp_path / "back", ParallelLayout(tp=2))
    _assert_bit_exact(hf_moe, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 4

    # a weight whose bytes changed after writing is found by its checksum, not exported
    victim = flip_a_weight_byte(tmp_path / "mcore")
    with pytest.raises(WorkerError, match=f"shard {victim} is corrupt: the record of .* fails its checksum"):
        export_hf(tmp_path / "mcore", tmp_path / "rotten")
    assert not (tmp_path / "rotten").exists()


def test_missing_files_are_named(tmp_path: Path, hf_dense: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="config.json not found"):
        HFCheckpoint(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(hf_dense, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="holds no model.safetensors"):
        HFCheckpoint(broken)


def test_missing_and_misshapen_tensors_are_named(tmp_path: Path, hf_dense: Path) -> None:
    tensors = _tensors(hf_dense)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(hf_dense / "config.json", broken)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.mlp.up_proj.weight"}, broken / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match="lacks 1 tensors.*model.layers.2.mlp.up_proj.weight"):
        HFCheckpoint(broken)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 48)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"k_proj.weight has shape \(8, 48\) but config.json implies \(16, 48\)"):
        HFCheckpoint(broken)


def test_non_qwen2_and_bad_layouts_fail_before_any_process(tmp_path: Path, hf_dense: Path) -> None:
    llama = tmp_path / "llama"
    shutil.copytree(hf_dense, llama)
    config = json.loads((llama / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeError, match="not a Qwen2 model"):
        import_hf(llama, tmp_path / "out", ParallelLayout())
    with pytest.raises(LayoutError, match="valid tp: \\[1, 2\\]"):
        import_hf(hf_dense, tmp_path / "out", ParallelLayout(tp=4))
    with pytest.raises(LayoutError, match="num_hidden_layers=4 is not divisible by pp=3"):
        import_hf(hf_dense, tmp_path / "out", ParallelLayout(pp=3))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten(tmp_path: Path, hf_dense: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert convert_cli.main(["import", "--hf", str(hf_dense), "--out", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_megatron_checkpoint_without_description_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="qwen2_megatron.json not found"):
        export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
