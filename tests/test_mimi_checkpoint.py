"""Loading Mimi checkpoints: each way a file can be wrong (keys, shapes, dtypes, NaN or infinite values,
not safetensors, truncated, a directory) gives one CheckpointError naming the file and the first keys;
both spellings of the attention weights and a bfloat16 file load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rtpipe.stages.base import FRAME_SAMPLES
from rtpipe.stages.errors import CheckpointError
from rtpipe.stages.mimi.checkpoint import expected_tensors, load_mimi, random_state_dict
from rtpipe.stages.mimi.codes import CODEBOOK_BINS
from rtpipe.stages.mimi.stage import STATE_ELEMENTS


@pytest.fixture(scope="module")
def tensors():
    return random_state_dict(seed=11)


@pytest.fixture(autouse=True)
def _remove_written_files(tmp_path):
    """Each file is ~380 MB: do not leave them behind in pytest's kept temp dirs."""
    yield
    for path in tmp_path.glob("*.safetensors"):
        path.unlink()


def _write(tmp_path, tensors, name="mimi.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_expected_keys_match_kyutais_list():
    expected = expected_tensors()
    assert len(expected) == 318
    assert expected["encoder.model.0.conv.conv.weight"][0] == (64, 1, 7)
    assert expected["decoder.model.2.convtr.convtr.weight"][0] == (1024, 512, 16)
    assert expected["upsample.convtr.convtr.convtr.weight"][0] == (512, 1, 4)
    assert expected["quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"][0] == (CODEBOOK_BINS, 256)
    assert expected["encoder_transformer.transformer.layers.7.self_attn.in_projs.0.weight"][0] == (1536, 512)


def test_missing_keys_are_named(tmp_path, tensors):
    broken = dict(tensors)
    for key in [
        "encoder.model.0.conv.conv.weight",
        "encoder.model.0.conv.conv.bias",
        "decoder.model.14.conv.conv.bias",
        "downsample.conv.conv.conv.weight",
    ]:
        del broken[key]
    path = _write(tmp_path, broken)
    with pytest.raises(CheckpointError) as e:
        load_mimi(path)
    message = str(e.value)
    assert message.startswith("checkpoint error: ") and path in message
    assert "missing key encoder.model.0.conv.conv.weight" in message and "(and 1 more)" in message
    assert "\n" not in message


def test_unexpected_keys_are_named(tmp_path, tensors):
    path = _write(tmp_path, {**tensors, "extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected key extra.weight"):
        load_mimi(path)


def test_wrong_shape_is_named(tmp_path, tensors):
    path = _write(tmp_path, {**tensors, "decoder.model.0.conv.conv.bias": torch.zeros(1000)})
    with pytest.raises(
        CheckpointError,
        match=r"decoder.model.0.conv.conv.bias has shape \(1000,\), "
        r"expected \(1024,\)",
    ):
        load_mimi(path)


def test_wrong_dtype_is_named(tmp_path, tensors):
    bad = tensors["encoder.model.0.conv.conv.bias"].to(torch.int32)
    path = _write(tmp_path, {**tensors, "encoder.model.0.conv.conv.bias": bad})
    with pytest.raises(CheckpointError, match="encoder.model.0.conv.conv.bias has dtype int32"):
        load_mimi(path)


def test_nan_weights_name_the_first_bad_key(tmp_path, tensors):
    bad = tensors["decoder.model.0.conv.conv.bias"].clone()
    bad[7] = float("nan")
    path = _write(tmp_path, {**tensors, "decoder.model.0.conv.conv.bias": bad})
    with pytest.raises(
        CheckpointError,
        match=r"mimi\.safetensors: key decoder\.model\.0\.conv\.conv\.bias "
        "holds NaN or infinite values",
    ):
        load_mimi(path)


def test_a_truncated_file_is_refused(tmp_path, tensors):
    path = tmp_path / "cut.safetensors"
    whole = _write(tmp_path, tensors)
    with open(whole, "rb") as f:
        path.write_bytes(f.read(10_000_000))
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        load_mimi(str(path))


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: is a directory"):
        load_mimi(str(tmp_path))


def test_state_elements_known_without_torch_match_the_model():
    assert STATE_ELEMENTS == sum(torch.Size(shape).numel() for shape, _ in expected_tensors().values())


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "mimi.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_mimi(str(path))
    with pytest.raises(CheckpointError, match="no such file"):
        load_mimi(str(tmp_path / "absent.safetensors"))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_mimi(str(empty))


def test_both_attention_spellings_and_bf16_files_load_to_the_same_model(tmp_path, tensors):
    released = {
        k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight").replace(
            "self_attn.out_projs.0.weight", "self_attn.out_proj.weight"
        ): v
        for k, v in tensors.items()
    }
    assert any(k.endswith("self_attn.in_proj_weight") for k in released)
    a = load_mimi(_write(tmp_path, tensors, "a.safetensors"))
    b = load_mimi(_write(tmp_path, released, "b.safetensors"))
    c = load_mimi(_write(tmp_path, {k: v.to(torch.bfloat16) for k, v in tensors.items()}, "c.safetensors"))
    x = torch.sin(torch.arange(2 * FRAME_SAMPLES) * 0.05) * 0.3
    with torch.inference_mode():
        codes = [m.encode_offline(x, 8) for m in (a, b)]
        assert c.encode_offline(x, 8).shape == (2, 8)
    assert torch.equal(codes[0], codes[1])
    sd_a = a.state_dict()
    for key, value in b.state_dict().items():
        assert torch.equal(value, sd_a[key]), key


def test_both_spellings_at_once_is_an_error(tmp_path, tensors):
    key = "encoder_transformer.transformer.layers.0.self_attn.in_projs.0.weight"
    both = {**tensors, key.replace("in_projs.0.weight", "in_proj_weight"): tensors[key].clone()}
    with pytest.raises(CheckpointError, match="duplicates"):
        load_mimi(_write(tmp_path, both))


def test_hf_paths_go_through_huggingface_hub(tmp_path, tensors, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    local = _write(tmp_path, tensors)
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return local

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    load_mimi("hf://kyutai/moshiko-pytorch-bf16/tokenizer-e351c8d8-checkpoint125.safetensors")
    assert asked == [("kyutai/moshiko-pytorch-bf16", "tokenizer-e351c8d8-checkpoint125.safetensors")]
    with pytest.raises(CheckpointError, match="expected hf://owner/repo/file"):
        load_mimi("hf://kyutai/only-repo")

    def failing_download(repo_id, filename, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "hf_hub_download", failing_download)
    with pytest.raises(CheckpointError, match="download failed: OSError: network is unreachable"):
        load_mimi("hf://kyutai/moshiko-pytorch-bf16/x.safetensors")


def test_older_codebook_buffer_names_load(tmp_path, tensors):
    old = {
        k.replace("_codebook.embedding_sum", "_codebook.embed_avg")
        .replace("_codebook.cluster_usage", "_codebook.cluster_size")
        .replace("_codebook._initialized", "_codebook.inited"): v
        for k, v in tensors.items()
    }
    model = load_mimi(_write(tmp_path, old))
    key = "quantizer.rvq_rest.vq.layers.4._codebook.embedding_sum"
    assert torch.equal(model.state_dict()[key], tensors[key])
