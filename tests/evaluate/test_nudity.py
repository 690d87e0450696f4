"""Text-to-image forgetting evaluation: I2P CSV parsing, seeded generation, NudeNet counting, retention."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate.nudity import (
    Detection,
    IdentityScorer,
    NudityDetector,
    PromptRow,
    exposed_classes,
    face_report,
    generate_rows,
    identity_report,
    load_identity_scorer,
    nudity_report,
    read_i2p_csv,
    retention_report,
)

HEADER = "prompt,categories,sd_seed,sd_guidance_scale\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "i2p.csv"
    p.write_text(text, encoding="utf-8")
    return p


# ---- CSV -----------------------------------------------------------------------------------------


def test_read_i2p_csv_good_file(tmp_path: Path) -> None:
    p = write(tmp_path, HEADER + 'a cat,sexual,4294967295,7\n"a dog, running",violence,12,7.5\n')
    rows = read_i2p_csv(p)
    assert rows == [
        PromptRow("a cat", 2**32 - 1, 7.0, 0),
        PromptRow("a dog, running", 12, 7.5, 1),
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("prompt,sd_seed\na,1\n", "'sd_guidance_scale'"),
        ("sd_seed,sd_guidance_scale\n1,7\n", "'prompt'"),
        (HEADER + " ,x,1,7\n", "row 1 (line 2) has an empty prompt"),
        (HEADER + "a,x,1,7\nb,x,1.5,7\n", "row 2 (line 3): sd_seed '1.5' is not an integer"),
        (HEADER + "a,x,-3,7\n", "sd_seed '-3' is not an integer in [0, 2**64)"),
        (HEADER + "a,x,1,nan\n", "sd_guidance_scale 'nan' is not a finite number"),
        (HEADER + "a,x,1,-1\n", "sd_guidance_scale '-1'"),
        (HEADER + "a,x,1,\n", "sd_guidance_scale ''"),
        (HEADER, "zero rows"),
        ("", "empty"),
    ],
)
def test_read_i2p_csv_bad_input(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(AmnesiaError) as e:
        read_i2p_csv(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_read_i2p_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="not found"):
        read_i2p_csv(tmp_path / "nope.csv")


# ---- generation ----------------------------------------------------------------------------------


class FakeModel:
    """Images are a function of (prompt, guidance, generator draw), so the tests can see each input."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.calls: list[tuple[list[int], float, int | None]] = []

    def prompt_ids(self, prompts: list[str]) -> Tensor:
        for p in prompts:
            if p not in self.prompts:
                self.prompts.append(p)
        return torch.tensor([self.prompts.index(p) for p in prompts], dtype=torch.int64)

    def sample(
        self,
        cond: Tensor,
        *,
        generator: list[torch.Generator],
        guidance_scale: float,
        num_inference_steps: int | None,
    ) -> Tensor:
        assert len(generator) == cond.shape[0]
        self.calls.append((cond.tolist(), guidance_scale, num_inference_steps))
        noise = torch.cat([torch.rand((1, 1, 2, 2), generator=g) for g in generator])
        x = noise.clone()
        x[:, 0, 0, 0] = cond.float() * 10 + guidance_scale  # pixel (0, 0) encodes prompt and guidance
        return x

    def to_uint8(self, x: Tensor) -> Tensor:
        out = x.clone()
        out[:, :, 1:, :] *= 255
        return out.round().clamp(0, 255).to(torch.uint8)


def test_generate_rows_order_seeds_and_guidance_groups() -> None:
    rows = [
        PromptRow("p0", 1, 7.0, 0),
        PromptRow("p1", 2, 3.0, 1),
        PromptRow("p2", 1, 7.0, 2),
        PromptRow("p0", 3, 7.0, 3),
        PromptRow("p1", 2, 3.0, 4),
    ]
    model = FakeModel()
    images = generate_rows(model, rows, batch_size=2, num_inference_steps=4, progress=False)
    assert images.shape == (5, 1, 2, 2) and images.dtype == torch.uint8
    # batches never mix guidance scales; the 7.0 group (3 rows) splits into 2 + 1
    assert [(len(c), w, s) for c, w, s in model.calls] == [(2, 7.0, 4), (1, 7.0, 4), (2, 3.0, 4)]
    # output order = row order: pixel (0, 0) = 10 * prompt id + guidance
    ids = {p: i for i, p in enumerate(model.prompts)}
    assert images[:, 0, 0, 0].tolist() == [10 * ids[r.prompt] + int(r.guidance_scale) for r in rows]
    # each image's noise comes from torch.Generator().manual_seed(row.seed)
    for img, r in zip(images, rows, strict=True):
        expect = (torch.rand((1, 1, 2, 2), generator=torch.Generator().manual_seed(r.seed)) * 255).round()
        assert torch.equal(img[0, 1:].float(), expect[0, 0, 1:])
    assert torch.equal(images[1, :, 1:], images[4, :, 1:])  # same seed, different batch
    assert not torch.equal(images[0, :, 1:], images[3, :, 1:])  # different seed


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    from selective_amnesia.models.text_to_image import TextToImageModel
    from selective_amnesia.worlds.mnist_t2i import WorldConfig, build_world

    out = tmp_path_factory.mktemp("t2i")
    build_world(out, WorldConfig.tiny(), progress=False)
    return TextToImageModel.from_pretrained(out)


def test_generate_rows_real_model_seeds(tiny_t2i: torch.nn.Module) -> None:
    rows = [
        PromptRow("a handwritten digit 3", 5, 2.0, 0),
        PromptRow("a handwritten digit 7", 9, 2.0, 1),
        PromptRow("a handwritten digit 3", 5, 2.0, 2),
        PromptRow("a handwritten digit 3", 6, 2.0, 3),
        PromptRow("a handwritten digit 3", 5, 4.0, 4),
    ]
    images = generate_rows(tiny_t2i, rows, batch_size=4, num_inference_steps=2, progress=False)
    assert images.shape == (5, *tiny_t2i.pixel_shape) and images.dtype == torch.uint8
    assert torch.equal(images[0], images[2])  # same prompt, seed and scale
    assert not torch.equal(images[0], images[3])  # another seed
    assert not torch.equal(images[0], images[4])  # another guidance scale
    # an image does not depend on its batch: generated alone it comes out the same
    alone = generate_rows(tiny_t2i, rows[3:4], num_inference_steps=2, progress=False)
    assert (alone[0].int() - images[3].int()).abs().max() <= 1


# ---- NudeNet -------------------------------------------------------------------------------------


def test_exposed_classes_from_nudenet() -> None:
    classes = exposed_classes()
    assert "FEMALE_BREAST_EXPOSED" in classes and "MALE_GENITALIA_EXPOSED" in classes
    assert all("EXPOSED" in c for c in classes) and "FACE_FEMALE" not in classes
    assert len(classes) == 9


def test_nudity_report_counts() -> None:
    br, bt = "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED"
    box = (0, 0, 1, 1)
    dets = [
        [Detection(br, 0.9, box), Detection(br, 0.7, box), Detection("FACE_FEMALE", 0.99, box)],
        [Detection(bt, 0.59, box), Detection("FEMALE_BREAST_COVERED", 0.95, box)],  # below threshold
        [Detection(bt, 0.6, box)],  # at threshold counts
        [],
    ]
    r = nudity_report(dets)
    assert r["threshold"] == 0.6 and r["num_images"] == 4
    assert r["classes"][br] == {"boxes": 2, "images": 1}
    assert r["classes"][bt] == {"boxes": 1, "images": 1}
    assert r["classes"]["ANUS_EXPOSED"] == {"boxes": 0, "images": 0}
    assert set(r["classes"]) == set(exposed_classes())
    assert r["exposed_boxes"] == 3 and r["images_with_exposed"] == 2 and r["fraction_with_exposed"] == 0.5
    low = nudity_report(dets, threshold=0.5)
    assert low["images_with_exposed"] == 3 and low["classes"][bt]["boxes"] == 2
    assert nudity_report([])["fraction_with_exposed"] is None
    with pytest.raises(AmnesiaError, match="threshold"):
        nudity_report(dets, threshold=1.5)

    f = face_report(dets + [[Detection("FACE_MALE", 0.8, box), Detection("FACE_MALE", 0.7, box)]])
    assert f["classes"] == {"FACE_FEMALE": {"boxes": 1, "images": 1}, "FACE_MALE": {"boxes": 2, "images": 1}}
    assert f["images_with_face"] == 2 and f["fraction_with_face"] == pytest.approx(2 / 5)


def test_nudenet_runs_on_synthetic_images() -> None:
    det = NudityDetector(num_threads=1)
    gray = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    noise = torch.randint(
        0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    mono = torch.full((1, 1, 16, 16), 200, dtype=torch.uint8)  # 1 channel -> 3
    out = det.detect(torch.cat([gray, noise]))
    out += det.detect(mono)
    assert len(out) == 3 and all(isinstance(d, list) for d in out)
    assert all(isinstance(d, Detection) and 0.2 <= d.score <= 1 for ds in out for d in ds)
    assert nudity_report(out[:1])["images_with_exposed"] == 0  # a flat gray image shows nothing
    with pytest.raises(AmnesiaError, match="uint8"):
        det.detect(gray.float())


# ---- identity and retention ----------------------------------------------------------------------


class MeanBrightness:
    name = "mean-brightness"

    def score(self, images: Tensor) -> Tensor:
        return images.float().mean(dim=(1, 2, 3)) / 255


def test_identity_report_and_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.stack([torch.full((3, 4, 4), v, dtype=torch.uint8) for v in (0, 51, 255, 204)])
    r = identity_report(MeanBrightness(), images)
    assert r["scorer"] == "mean-brightness" and r["num_images"] == 4
    assert r["mean_score"] == pytest.approx(0.5) and r["fraction_above"] == 0.5

    (tmp_path / "my_scorers.py").write_text(
        "class Scorer:\n    name = 'x'\n\n    def score(self, images):\n"
        "        return images.float().mean((1, 2, 3))\n\n\nbad = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_scorers", raising=False)
    scorer = load_identity_scorer("my_scorers:Scorer")
    assert isinstance(scorer, IdentityScorer) and scorer.name == "x"
    with pytest.raises(AmnesiaError, match=r"in \[0, 1\]"):
        identity_report(scorer, images)  # returns 0-255 values: rejected
    for spec, needle in [
        ("my_scorers", "package.module:attr"),
        ("no_such_module_xyz:S", "cannot import"),
        ("my_scorers:Missing", "has no 'Missing'"),
        ("my_scorers:bad", "needs a str 'name'"),
    ]:
        with pytest.raises(AmnesiaError, match=needle):
            load_identity_scorer(spec)


def test_retention_report() -> None:
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    same = retention_report(x, x.clone())
    assert same["mean_abs_diff_mean"] == 0 and same["mean_abs_diff_median"] == 0
    assert same["ssim_mean"] == pytest.approx(1.0) and same["psnr_db"] is None and same["num_images"] == 3

    y = x.clone()
    y[0] = 10  # one image replaced by a flat one
    z = torch.zeros_like(x)
    r = retention_report(z, z + torch.tensor([10, 20, 40], dtype=torch.uint8).view(3, 1, 1, 1))
    assert r["mean_abs_diff_mean"] == pytest.approx(70 / 3) and r["mean_abs_diff_median"] == pytest.approx(20)
    assert r["psnr_db"] == pytest.approx(
        10 * torch.log10(torch.tensor(255.0**2 / (2100 / 3))).item(), rel=1e-6
    )
    moved = retention_report(x, y)
    assert 0 < moved["mean_abs_diff_mean"] and moved["ssim_mean"] < 0.99

    small = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert retention_report(small, small)["ssim_kernel_size"] == 7  # shrunk window for tiny images
    with pytest.raises(AmnesiaError, match="one shape"):
        retention_report(x, x[:2])


def test_images_reach_nudenet_as_a_png_file_would(tmp_path: Path) -> None:
    """NudeNet reads files with cv2 (BGR) and then swaps twice; an RGB tensor must give the file's input."""
    import cv2
    from nudenet import nudenet as nn_module

    from selective_amnesia.evaluate.nudity import _to_bgr_hwc

    rgb = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    rgb[:, 0], rgb[:, 1, :4] = 255, 100  # red, with a green band
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), rgb[0].permute(1, 2, 0).numpy()[:, :, ::-1].copy())
    from_file = nn_module._read_image(str(png))[0]
    from_tensor = nn_module._read_image(_to_bgr_hwc(rgb)[0])[0]
    assert from_file.shape == (1, 3, 320, 320) and (from_file == from_tensor).all()
