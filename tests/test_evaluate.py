"""End-to-end test of ``python -m tsjax.evaluate`` on a few trimesh-made GLBs and a built-in theme."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from tsjax import evaluate

sys.path.insert(0, str(Path(__file__).parent / "metrics"))  # tiny-weight builders of the metric tests


def coloured(mesh: trimesh.Trimesh, rgb) -> trimesh.Trimesh:
    mesh.visual.vertex_colors = np.tile(np.asarray(list(rgb) + [255], np.uint8), (len(mesh.vertices), 1))
    return mesh


def make_results(root: Path) -> tuple[Path, Path]:
    a, b = root / "method_a", root / "method_b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    coloured(trimesh.creation.box((0.6, 0.4, 0.5)), (200, 40, 40)).export(a / "box.glb")
    coloured(trimesh.creation.icosphere(3, 0.4), (40, 160, 60)).export(a / "sub" / "ball.glb")
    coloured(trimesh.creation.cylinder(0.3, 0.8), (50, 60, 200)).export(a / "can.glb")
    (a / "box.txt").write_text("a red box")
    coloured(trimesh.creation.capsule(0.5, 0.2), (180, 180, 40)).export(b / "pill.glb")
    coloured(trimesh.creation.box((0.5, 0.5, 0.5)), (90, 90, 90)).export(b / "cube.glb")
    return a, b


def builtin_spec() -> str:
    from tsjax.data.builtin import THEMES

    return f"builtin:{sorted(THEMES)[0]}"


def referenced_images(html: str) -> list[str]:
    return re.findall(r"src='([^']+)'", html)


COMMON = ["--views", "2", "--res", "64", "--voxel-res", "32", "--chamfer-points", "2000"]


@pytest.mark.slow
def test_evaluate_geometric_only(tmp_path, capsys):
    a, b = make_results(tmp_path)
    out = tmp_path / "out"
    missing_vgg = tmp_path / "missing" / "vgg19.pth"
    rc = evaluate.main(["--results", str(a), str(b), "--exemplars", builtin_spec(), "--out", str(out),
                        "--prompt", "a toy", "--vgg", str(missing_vgg), *COMMON])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["methods"]) == {"method_a", "method_b"}
    assets = rep["methods"]["method_a"]["assets"]
    assert set(assets) == {"box", "can", "sub/ball"}
    for vals in assets.values():
        assert set(vals) == set(evaluate.PER_ASSET)
        assert 0.0 <= vals["novelty_iou"] <= 1.0
        assert 0.0 < vals["chamfer_to_exemplars"] < 1.0
        assert vals["palette_distance"] > 0.0
        assert vals["contextual_distance"] == f"not computed: weights missing at {missing_vgg}"
        for k in ("clip_score_text", "clip_score_exemplars", "aesthetic"):
            assert vals[k] == "not computed: weights missing at (no --clip given)"
    m = rep["methods"]["method_a"]
    assert 0.0 < m["method"]["diversity_iou"] <= 1.0
    assert m["method"]["diversity_lpips"] == "not computed: weights missing at (no --lpips given)"
    assert m["mean"]["novelty_iou"] == pytest.approx(np.mean([v["novelty_iou"] for v in assets.values()]))
    html = (out / "report.html").read_text()
    imgs = referenced_images(html)
    assert len(imgs) >= 5 + len(rep["exemplars"]["names"]) + 2  # asset strips, exemplars, plots
    assert all((out / p).is_file() for p in imgs)
    assert "not computed: weights missing" in html
    from PIL import Image

    strip = np.asarray(Image.open(out / m["images"]["box"]))
    assert strip.shape == (64, 128, 3)
    # The red box is visible: clearly red pixels on a white background.
    sr, sg, sb = (strip[..., c].astype(float) for c in range(3))
    red = (sr > 100) & (sr > 1.5 * sg) & (sr > 1.5 * sb)
    assert red.sum() > 100 and (strip == 255).all(-1).sum() > 1000
    # Determinism: a second run gives identical numbers.
    out2 = tmp_path / "out2"
    assert evaluate.main(["--results", str(a), "--exemplars", builtin_spec(), "--out", str(out2),
                          "--prompt", "a toy", "--vgg", str(missing_vgg), *COMMON]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["methods"]["method_a"] == rep["methods"]["method_a"]


@pytest.mark.torch
@pytest.mark.slow
def test_evaluate_with_tiny_weights(tmp_path):
    import torch
    from test_clip import make_tiny_clip
    from test_vgg import torch_vgg_features

    a, _ = make_results(tmp_path)
    make_tiny_clip(tmp_path / "clip", image_size=32, patch=8, proj=16)
    torch.save({"features." + k: v for k, v in torch_vgg_features("vgg19").state_dict().items()},
               tmp_path / "vgg19.pth")
    torch.save({"features." + k: v for k, v in torch_vgg_features("vgg16", seed=1).state_dict().items()},
               tmp_path / "vgg16.pth")
    torch.manual_seed(0)
    torch.save({f"lin{l}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1
                for l, c in enumerate((64, 128, 256, 512, 512))}, tmp_path / "lin.pth")
    head = torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), tmp_path / "aesthetic.pth")
    out = tmp_path / "out"
    rc = evaluate.main(["--results", str(a), "--exemplars", builtin_spec(), "--out", str(out),
                        "--clip", str(tmp_path / "clip"), "--vgg", str(tmp_path / "vgg19.pth"),
                        "--vgg16", str(tmp_path / "vgg16.pth"), "--lpips", str(tmp_path / "lin.pth"),
                        "--aesthetic", str(tmp_path / "aesthetic.pth"), *COMMON])
    assert rc == 0
    rep = json.loads((out / "metrics.json").read_text())
    m = rep["methods"]["method_a"]
    for name, vals in m["assets"].items():
        assert isinstance(vals["contextual_distance"], float) and vals["contextual_distance"] > 0
        assert 0.0 <= vals["clip_score_exemplars"] <= 100.0
        assert isinstance(vals["aesthetic"], float)
        if name == "box":  # sidecar prompt
            assert 0.0 <= vals["clip_score_text"] <= 100.0
        else:
            assert vals["clip_score_text"].startswith("not computed: no prompt")
    assert m["method"]["diversity_lpips"] > 0
    assert (out / "plots" / "contextual_distance.png").is_file()


def test_evaluate_bad_inputs(tmp_path, capsys):
    assert evaluate.main(["--results", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error: --results: directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate.main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no .glb files" in capsys.readouterr().err
    assert evaluate.main(["--results", str(tmp_path), "--res", "8", "--out", str(tmp_path / "o")]) == 2
    assert "--res must be >= 32" in capsys.readouterr().err
