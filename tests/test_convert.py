"""Weight conversion: golden parity with timm, file formats, and errors that list problems."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.convert import ConversionError, convert_state_dict, load_params, read_npz, save_params
from saitjax.tools import convert as convert_cli

from timm_reference import import_timm


def _timm_state_dict(name: str, seed: int = 0, **kwargs):
    torch, timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # timm zero-inits some biases and the tokens; randomise everything so the test sees every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return torch, model


@pytest.mark.torch
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_golden_timm_parity(name):
    """Random-init timm DeiT, converted, gives the same logits (fp32, 1e-4)."""
    torch, reference = _timm_state_dict(name)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = saitjax.create_model(name)
    params = convert_state_dict(state_dict, model, model_name=name)
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits, _ = jax.jit(model.apply)({"params": params}, images)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


@pytest.mark.torch
def test_pth_and_safetensors_read_identically(tmp_path):
    torch, reference = _timm_state_dict("deit_tiny_patch16_224", seed=1)
    state_dict = reference.state_dict()
    torch.save({"model": state_dict, "epoch": 3}, tmp_path / "ckpt.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp_path / "ckpt.safetensors"))
    a = load_params(str(tmp_path / "ckpt.pth"))  # model name guessed from the shapes
    b = load_params(str(tmp_path / "ckpt.safetensors"), "deit_tiny_patch16_224")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _tiny_params(name="vit_test_patch4_32", **overrides):
    model = saitjax.create_model(name, **overrides)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


def test_npz_round_trip_and_cli(tmp_path):
    model, params = _tiny_params()
    path = save_params(str(tmp_path / "p.npz"), params, model="vit_test_patch4_32")
    restored, meta = read_npz(path)
    assert meta["model"] == "vit_test_patch4_32"
    jax.tree.map(np.testing.assert_array_equal, params, restored)
    loaded = load_params(path)  # the model name comes from the file
    images = jnp.ones((2, 32, 32, 3))
    np.testing.assert_array_equal(model.apply({"params": params}, images)[0],
                                  model.apply({"params": loaded}, images)[0])
    # the CLI re-validates an .npz and writes another; it never overwrites without --overwrite
    out = tmp_path / "q.npz"
    assert convert_cli.main(["--src", path, "--out", str(out)]) == 0
    before = out.read_bytes()
    assert convert_cli.main(["--src", path, "--out", str(out)]) == 2
    assert out.read_bytes() == before


def test_npz_resizes_pos_embed_for_another_resolution(tmp_path):
    _, params = _tiny_params()
    path = save_params(str(tmp_path / "p.npz"), params, model="vit_test_patch4_32")
    params48 = load_params(path, img_size=48)
    assert params48["pos_embed"].shape == (1, 1 + 12 * 12, 32)
    model48 = saitjax.create_model("vit_test_patch4_32", img_size=48)
    logits, _ = model48.apply({"params": params48}, jnp.ones((1, 48, 48, 3)))
    assert logits.shape == (1, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_checkpoint_of_another_model_lists_mismatches(tmp_path):
    _, params = _tiny_params(embed_dim=64)  # wider than the registered test model
    path = save_params(str(tmp_path / "wide.npz"), params, model="vit_test_patch4_32")
    with pytest.raises(ConversionError, match=r"blocks_0/attn/qkv/kernel.*\(64, 192\) vs model \(32, 96\)"):
        load_params(path)


def test_unknown_and_missing_keys_are_listed():
    model, params = _tiny_params()
    state_dict = {"cls_token": np.zeros((1, 1, 32), np.float32), "mystery.weight": np.zeros((3,))}
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state_dict, model, model_name="vit_test_patch4_32")
    message = str(err.value)
    assert "mystery.weight" in message and "missing from the checkpoint" in message
    assert "blocks_3/mlp/fc2/kernel" in message or "more" in message
    # strict=False accepts a partial checkpoint (new modules of a sparse variant) but not unknown keys
    del state_dict["mystery.weight"]
    partial = convert_state_dict(state_dict, model, strict=False)
    assert set(partial) == {"cls_token"}


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_params(str(tmp_path / "nope.npz"))
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"x")
    with pytest.raises(ConversionError, match="unknown checkpoint format"):
        load_params(str(bad), "vit_test_patch4_32")


def _damaged_files(tmp_path):
    """``{name: (path, words the error must contain)}`` of files the converter cannot use."""
    from safetensors.numpy import save_file

    save_file({"cls_token": np.zeros((1, 1, 32), np.float32)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip archive")
    files = {"truncated safetensors": (tmp_path / "truncated.safetensors", "truncated"),
             "garbage npz": (tmp_path / "garbage.npz", "not a readable saitjax .npz")}
    try:
        import torch
    except ImportError:
        return files
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")  # a pickled module
    (tmp_path / "garbage.pth").write_bytes(b"garbage")
    files["pickled module"] = (tmp_path / "module.pth", "state_dict()")
    files["garbage pth"] = (tmp_path / "garbage.pth", "cannot be read as tensors only")
    return files


def test_damaged_or_unsafe_checkpoints_get_one_error_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out.npz"
    for name, (path, words) in _damaged_files(tmp_path).items():
        assert convert_cli.main(["--src", str(path), "--model", "vit_test_patch4_32", "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (name, err)
        assert "weights_only=False" not in err and "allow_pickle" not in err, name  # never advise unsafe loads
        assert not out.exists()
    (tmp_path / "a_file").write_text("x")  # output under a file
    under = tmp_path / "a_file" / "out.npz"
    assert convert_cli.main(["--src", str(tmp_path / "ok.safetensors"), "--model", "vit_test_patch4_32",
                             "--non-strict", "--out", str(under)]) == 2
    assert "a_file is a file, not a directory" in capsys.readouterr().err
