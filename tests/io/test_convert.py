"""``amnesia convert``: legacy reference-code files to safetensors, without ever running pickled code."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from selective_amnesia.cli.convert import add_convert_arguments, cmd_convert
from selective_amnesia.core.fisher import Fisher
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.convert import (
    convert_fisher,
    convert_to_cvae,
    convert_to_safetensors,
    file_sha256,
    load_legacy,
)
from selective_amnesia.models import load_model


class _RefVAE(nn.Module):
    """The reference MNIST VAE's layer names and wiring (vae/model.py), tiny, to make its checkpoints."""

    def __init__(self, x_dim: int = 784, h1: int = 32, h2: int = 16, z: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(x_dim + classes, h1), nn.Linear(h1, h2)
        self.fc31, self.fc32 = nn.Linear(h2, z), nn.Linear(h2, z)
        self.fc4, self.fc5, self.fc6 = nn.Linear(z + classes, h2), nn.Linear(h2, h1), nn.Linear(h1, x_dim)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc5(F.relu(self.fc4(torch.cat([z, c], 1)))))
        return torch.sigmoid(self.fc6(h))

    def loss(self, x: torch.Tensor, c: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc2(F.relu(self.fc1(torch.cat([x, c], 1)))))
        mu, logvar = self.fc31(h), self.fc32(h)
        recon = self.decode(mu + eps * torch.exp(0.5 * logvar), c)
        bce = F.binary_cross_entropy(recon, x, reduction="none").sum(1)
        return bce - 0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def _ref_vae_ckpt(path: Path) -> _RefVAE:
    torch.manual_seed(0)
    ref = _RefVAE()
    config = argparse.Namespace(dataset="MNIST", x_dim=784, h_dim1=32, h_dim2=16, z_dim=3)
    torch.save({"model": ref.state_dict(), "config": config}, path)
    return ref


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_convert_arguments(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- round trips


def test_torch_save_round_trip_picks_model_and_records_source(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    src = tmp_path / "ckpt.pt"
    torch.save({"model": tensors, "step": 7}, src)
    before = src.read_bytes()
    done = convert_to_safetensors(src, tmp_path / "out.safetensors")
    out = load_file(str(done.out))
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], tensors[k]) for k in tensors)
    with safe_open(str(done.out), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_file"] == "ckpt.pt" and meta["source_sha256"] == file_sha256(src)
    assert meta["source_key"] == "model" and meta["format"] == "pt"
    assert src.read_bytes() == before  # the input is never changed


def test_key_all_flattens_nested_and_skips_non_tensors(tmp_path: Path) -> None:
    src = tmp_path / "x.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": [torch.zeros(1), {"t": torch.ones(1)}], "n": 3}, src)
    convert_to_safetensors(src, tmp_path / "o.safetensors", key="all")
    out = load_file(str(tmp_path / "o.safetensors"))
    assert sorted(out) == ["extra.0", "extra.1.t", "model.w"]
    with pytest.raises(AmnesiaError, match="no 'nope'"):
        convert_to_safetensors(src, tmp_path / "p.safetensors", key="model.nope")


def test_reference_ddpm_list_strips_data_parallel_and_selects_ema(tmp_path: Path) -> None:
    model = {"module.conv_in.weight": torch.randn(2, 1, 3, 3), "module.temb.dense.0.bias": torch.randn(4)}
    ema = {k: v + 1 for k, v in model.items()}
    optim = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.99)}]}
    src = tmp_path / "ckpt.pth"
    torch.save([model, optim, 1000, ema], src)
    convert_to_safetensors(src, tmp_path / "m.safetensors")
    out = load_file(str(tmp_path / "m.safetensors"))
    assert sorted(out) == ["conv_in.weight", "temb.dense.0.bias"]
    assert torch.equal(out["conv_in.weight"], model["module.conv_in.weight"])
    convert_to_safetensors(src, tmp_path / "e.safetensors", key="3")
    assert torch.equal(
        load_file(str(tmp_path / "e.safetensors"))["conv_in.weight"], ema["module.conv_in.weight"]
    )


def test_shared_and_view_tensors_convert(tmp_path: Path) -> None:
    base = torch.randn(4, 4)
    src = tmp_path / "tied.pt"
    torch.save({"a": base, "b": base, "row": base[1], "t": base.T}, src)
    convert_to_safetensors(src, tmp_path / "o.safetensors")
    out = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(out["b"], base) and torch.equal(out["row"], base[1]) and torch.equal(out["t"], base.T)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_plain_pickle_tensor_dict_round_trip(tmp_path: Path, protocol: int) -> None:
    tensors = {
        "fc1.weight": torch.randn(3, 4),
        "half": torch.randn(5).half(),
        "view": torch.arange(12.0).reshape(3, 4)[:, 1],
    }
    src = tmp_path / "fisher_dict.pkl"
    with open(src, "wb") as f:
        pickle.dump(collections.OrderedDict(tensors), f, protocol=protocol)
    convert_to_safetensors(src, tmp_path / "f.safetensors")
    out = load_file(str(tmp_path / "f.safetensors"))
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in tensors.items())


def test_plain_pickle_of_gpu_tensors_loads_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the reference Fisher dicts hold CUDA tensors: pickle them tagged "cuda:0" (no GPU needed)
    t = torch.randn(2, 3)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        data = pickle.dumps({"w": t}, protocol=2)
    assert b"cuda:0" in data
    (tmp_path / "g.pkl").write_bytes(data)
    assert torch.equal(load_legacy(tmp_path / "g.pkl")["w"], t)


def test_lightning_ckpt_with_callback_class_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning 1.4 (the reference SD environment) keys callback states by the callback *class*
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    checkpoint_cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    monkeypatch.setattr(sys.modules[names[-1]], "ModelCheckpoint", checkpoint_cls, raising=False)
    state = {"model.diffusion_model.w": torch.randn(2, 2), "model_ema.w": torch.randn(2, 2)}
    src = tmp_path / "last.ckpt"
    torch.save(
        {"state_dict": state, "callbacks": {checkpoint_cls: {"best_model_score": torch.tensor(1.0)}}}, src
    )
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    convert_to_safetensors(src, tmp_path / "sd.safetensors")
    out = load_file(str(tmp_path / "sd.safetensors"))
    assert out.keys() == state.keys() and all(torch.equal(out[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------- refusals


def test_malicious_torch_save_is_refused_without_running(tmp_path: Path) -> None:
    target = tmp_path / "PWNED"
    src = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": _Evil(target)}, src)
    with pytest.raises(AmnesiaError, match=r"names Python global .*system.*refusing"):
        convert_to_safetensors(src, tmp_path / "o.safetensors")
    assert not target.exists() and not (tmp_path / "o.safetensors").exists()


def test_malicious_legacy_torch_save_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "PWNED"
    src = tmp_path / "evil_legacy.pt"
    torch.save({"x": _Evil(target)}, src, _use_new_zipfile_serialization=False)
    with pytest.raises(AmnesiaError, match="refusing"):
        load_legacy(src)
    assert not target.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_plain_pickle_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    target = tmp_path / "PWNED"
    src = tmp_path / "fisher_dict.pkl"
    with open(src, "wb") as f:
        pickle.dump({"w": torch.ones(2), "x": _Evil(target)}, f, protocol=protocol)
    with pytest.raises(AmnesiaError, match=r"names Python global (os|posix)\.system: refusing"):
        convert_to_safetensors(src, tmp_path / "o.safetensors")
    assert not target.exists()


def test_malicious_bytes_inside_a_tensor_storage_are_refused(tmp_path: Path) -> None:
    # _load_from_bytes is allowed, but its bytes are read with weights_only=True, not a full unpickler
    target = tmp_path / "PWNED"
    inner = pickle.dumps(_Evil(target), protocol=2)

    class Smuggle:
        def __reduce__(self) -> tuple[Any, ...]:
            return (torch.storage._load_from_bytes, (inner,))

    src = tmp_path / "s.pkl"
    src.write_bytes(pickle.dumps({"w": Smuggle()}, protocol=2))
    with pytest.raises(AmnesiaError):
        load_legacy(src)
    assert not target.exists()


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_hooks_in_a_pickled_tensor_are_refused(tmp_path: Path) -> None:
    class Hooked:
        def __reduce__(self) -> tuple[Any, ...]:
            storage = torch.ones(2).storage()
            hooks = collections.OrderedDict([(0, "not empty")])
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (2,), (1,), False, hooks))

    src = tmp_path / "h.pkl"
    src.write_bytes(pickle.dumps({"w": Hooked()}, protocol=2))
    with pytest.raises(AmnesiaError, match="unexpected arguments"):
        load_legacy(src)


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_truncated_file_is_an_amnesia_error(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "t.bin"
    tensors = {"w": torch.randn(64, 64)}
    if kind == "zip":
        torch.save(tensors, src)
    else:
        src.write_bytes(pickle.dumps(tensors, protocol=4))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(AmnesiaError, match="truncated, corrupt"):
        convert_to_safetensors(src, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(AmnesiaError, match="not a PyTorch checkpoint"):
        load_legacy(tmp_path / "a.txt")
    with pytest.raises(AmnesiaError, match="not found"):
        load_legacy(tmp_path / "missing.pt")


def test_existing_output_is_refused_unless_force(tmp_path: Path) -> None:
    src = tmp_path / "c.pt"
    torch.save({"w": torch.ones(2)}, src)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(AmnesiaError, match="--force"):
        convert_to_safetensors(src, out)
    assert out.read_bytes() == b"keep me"
    convert_to_safetensors(src, out, force=True)
    assert torch.equal(load_file(str(out))["w"], torch.ones(2))
    with pytest.raises(AmnesiaError, match="must end in .safetensors"):
        convert_to_safetensors(src, tmp_path / "o.pt")


def test_output_may_not_be_the_input(tmp_path: Path) -> None:
    src = tmp_path / "x.safetensors"
    torch.save({"w": torch.ones(2)}, src)
    with pytest.raises(AmnesiaError, match="is the input"):
        convert_to_safetensors(src, src, force=True)


# --------------------------------------------------------------------------------------- family targets


def test_reference_vae_checkpoint_converts_exactly(tmp_path: Path) -> None:
    ref = _ref_vae_ckpt(tmp_path / "ckpt.pt")
    convert_to_cvae(tmp_path / "ckpt.pt", tmp_path / "model")
    ours = load_model(tmp_path / "model")
    assert ours.config.hidden_dims == [32, 16] and ours.config.latent_dim == 3
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 3, 9])
    onehot = F.one_hot(labels, 10).float()
    z = torch.randn(3, 3, generator=gen)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(ours.decode_logits(z, labels)), ref.decode(z, onehot), atol=1e-6)
        x = torch.rand(3, 784, generator=gen)
        eps = torch.randn(3, 3, generator=gen)
        expected = ref.loss(x, onehot, eps)
        assert torch.allclose(ours.nelbo(x.view(3, 1, 28, 28), labels, noise=eps), expected, rtol=1e-5)
    meta = (tmp_path / "model" / "config.json").read_text()
    assert '"h_dim1": 32' in meta and "source_sha256" in meta


def test_reference_vae_fisher_maps_onto_our_names(tmp_path: Path) -> None:
    ref = _ref_vae_ckpt(tmp_path / "ckpt.pt")
    convert_to_cvae(tmp_path / "ckpt.pt", tmp_path / "model")
    fisher = {n: torch.rand_like(p) for n, p in ref.named_parameters()}
    src = tmp_path / "fisher_dict.pkl"
    with open(src, "wb") as f:
        pickle.dump(fisher, f)
    args = _parse(
        [
            str(src),
            "-o",
            str(tmp_path / "f.safetensors"),
            "--to",
            "fisher",
            "--model",
            str(tmp_path / "model"),
        ]
    )
    assert cmd_convert(args) == 0
    model = load_model(tmp_path / "model")
    loaded = Fisher.load(tmp_path / "f.safetensors", model)
    assert torch.equal(loaded.values["encoder.0.0.weight"], fisher["fc1.weight"])
    assert torch.equal(loaded.values["to_logvar.bias"], fisher["fc32.bias"])
    assert torch.equal(loaded.values["decoder.4.weight"], fisher["fc6.weight"])


def test_fisher_with_our_names_and_mismatches(tmp_path: Path, tiny_cvae: nn.Module) -> None:
    tiny_cvae.save_pretrained(tmp_path / "model")  # type: ignore[operator]
    ours = {n: torch.rand_like(p) for n, p in tiny_cvae.named_parameters()}
    torch.save(ours, tmp_path / "f.pt")
    convert_fisher(tmp_path / "f.pt", tmp_path / "f.safetensors", tmp_path / "model")
    assert Fisher.load(tmp_path / "f.safetensors", tiny_cvae).metadata["estimator"] == "converted"

    ddpm_like = {"module.temb.dense.0.weight": torch.rand(4, 2), "module.conv_in.weight": torch.rand(1)}
    torch.save(ddpm_like, tmp_path / "d.pt")
    with pytest.raises(AmnesiaError, match="no exact counterpart"):
        convert_fisher(tmp_path / "d.pt", tmp_path / "d.safetensors", tmp_path / "model")

    ours["decoder.4.bias"] = torch.rand(5)  # wrong shape
    torch.save(ours, tmp_path / "bad.pt")
    with pytest.raises(AmnesiaError, match="does not match the model"):
        convert_fisher(tmp_path / "bad.pt", tmp_path / "bad.safetensors", tmp_path / "model")
    assert not (tmp_path / "bad.safetensors").exists()


def test_cvae_target_refuses_other_state_dicts(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    with pytest.raises(AmnesiaError, match="not a reference MNIST VAE"):
        convert_to_cvae(tmp_path / "c.pt", tmp_path / "m")


def test_cmd_convert_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.ones(2)}, "global_step": 5}, src)
    assert cmd_convert(_parse([str(src), "-o", str(tmp_path / "sd.safetensors")])) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "[state_dict]" in line and "1 tensors" in line
    with pytest.raises(AmnesiaError, match="needs --model"):
        cmd_convert(_parse([str(src), "-o", str(tmp_path / "f.safetensors"), "--to", "fisher"]))
