"""Persistent compilation cache of the CLIs (tsjax.compile_cache)."""
import subprocess
import sys
import textwrap

import pytest

from tsjax.compile_cache import default_cache_dir, enable_compile_cache

SCRIPT = textwrap.dedent(r"""
    import sys, time, jax, jax.numpy as jnp
    from tsjax.compile_cache import enable_compile_cache
    enable_compile_cache(sys.argv[1], min_compile_time_s=0.0)
    def f(x):
        for i in range(40):
            x = jnp.sin(x @ x.T + i)
        return x
    y = jax.jit(f)(jnp.eye(16))
    print(float(y.sum()))
""")


def test_second_process_reuses_the_cache(tmp_path):
    d = tmp_path / "xla"
    r1 = subprocess.run([sys.executable, "-c", SCRIPT, str(d)], capture_output=True, text=True, check=True)
    entries = sorted(p.name for p in d.iterdir())
    assert any(n.startswith("jit_f-") for n in entries), entries
    r2 = subprocess.run([sys.executable, "-c", SCRIPT, str(d)], capture_output=True, text=True, check=True)
    assert r1.stdout == r2.stdout  # same result from the cached executable
    assert sorted(p.name for p in d.iterdir()) == entries  # nothing new compiled


def test_off_and_bad_paths(tmp_path, monkeypatch):
    assert enable_compile_cache("off") is None and enable_compile_cache(None) is None
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        enable_compile_cache(str(f))
    monkeypatch.setenv("TSJAX_COMPILE_CACHE", "off")
    assert default_cache_dir() is None
    monkeypatch.setenv("TSJAX_COMPILE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("TSJAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "tsjax" / "xla")
