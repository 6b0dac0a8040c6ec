"""python -m tsjax.render: files, cameras.json and one-line user errors."""
import json

import numpy as np
import pytest
from PIL import Image

from tsjax.render.__main__ import main
from tsjax.render.camera import orbit_c2w


def test_cli_builtin_tiny(tmp_path, capsys):
    out = tmp_path / "renders"
    assert main(["--exemplars", "builtin:toy-houses", "--views", "2", "--res", "24", "--out", str(out)]) == 0
    meta = json.loads((out / "cameras.json").read_text())
    assert "OpenGL" in meta["conventions"] and meta["resolution"] == 24 and len(meta["meshes"]) == 4
    for m in meta["meshes"]:
        assert len(m["views"]) == 2
        for v in m["views"]:
            for k in ("color", "normal", "mask"):
                img = np.asarray(Image.open(out / v[k]))
                assert img.shape[:2] == (24, 24)
            np.testing.assert_allclose(np.array(v["c2w"]), orbit_c2w(v["elevation"], v["azimuth"], v["distance"]),
                                       atol=1e-5)
            assert v["elevation"] in (0.0, 20.0) and v["fovy"] == 40.0 and v["ortho_half_height"] is None
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (2 * 2 * 24, 4 * 24)
    assert "wrote 4 x 2 views" in capsys.readouterr().out


@pytest.mark.parametrize("args, msg", [
    (["--exemplars", "/no/such/dir"], "no such directory"),
    (["--exemplars", "builtin", "--res", "0"], "--res"),
    (["--exemplars", "builtin", "--res", "100000"], "--res"),
    (["--exemplars", "builtin:nope"], "unknown built-in theme"),
])
def test_cli_user_errors(tmp_path, capsys, args, msg):
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0] and "Traceback" not in err[0]


def test_cli_dir_without_meshes(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("x")
    assert main(["--exemplars", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no mesh files" in capsys.readouterr().err
