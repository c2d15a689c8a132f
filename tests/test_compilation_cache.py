"""The entry points keep compiled programs between runs in the user's cache folder (planet_jax.runtime)."""
import json
import os
import subprocess
import sys

import jax
import pytest

from planet_jax import autotune, runtime


@pytest.fixture
def no_cache_dir(monkeypatch):
    """jax's cache folder unset for the test (the suite's own is put back after it); nothing is
    compiled meanwhile, so jax never opens a cache at the test's folders."""
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(runtime.ENV_COMPILATION_CACHE, raising=False)
    yield
    jax.config.update("jax_compilation_cache_dir", saved)


def test_cache_goes_to_a_folder_per_machine_in_the_users_cache(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    folder = runtime.use_compilation_cache()
    assert folder.parent == tmp_path / "xla" and folder.is_dir()
    assert " " not in folder.name and autotune.machine_id().split()[-1] in folder.name  # the jax version
    assert jax.config.jax_compilation_cache_dir == str(folder)


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_cache_can_be_turned_off(no_cache_dir, monkeypatch, tmp_path, value):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(runtime.ENV_COMPILATION_CACHE, value)
    assert runtime.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "xla").exists()


def test_a_folder_the_user_gave_jax_is_kept(no_cache_dir, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert runtime.use_compilation_cache() == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


def test_the_switch_does_not_hide_a_folder_the_user_gave_jax(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.ENV_COMPILATION_CACHE, "0")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert runtime.use_compilation_cache() == tmp_path / "mine"


def test_a_folder_that_cannot_be_written_leaves_the_cache_off_with_one_warning(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(runtime.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.warns(UserWarning, match="cannot write to"):
        assert runtime.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_folder_that_cannot_be_made_leaves_the_cache_off_with_a_warning(no_cache_dir, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="not kept between runs"):
        assert runtime.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


_PROGRAM = """
import json, jax, jax.numpy as jnp
from planet_jax import runtime
folder = runtime.use_compilation_cache()
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8)))
print(json.dumps({"folder": str(folder), "y": float(y), "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({autotune.ENV_CACHE_DIR: str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    env.pop(runtime.ENV_COMPILATION_CACHE, None)
    runs = [subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first["folder"].startswith(str(tmp_path / "xla")) and first["hits"] == 0
    assert any(os.scandir(first["folder"]))  # the program was written
    if "doesn't match the machine type for execution" in runs[1].stderr:
        pytest.skip("this CPU's XLA rejects its own cached programs (jax-ml/jax#38445)")
    assert second["hits"] >= 1 and second["y"] == first["y"]
