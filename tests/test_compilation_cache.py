"""The entry points keep compiled programs between runs in the user's cache folder (planet_jax.runtime)."""
import json
import os
import re
import subprocess
import sys

import jax
import pytest
from pathlib import Path

from planet_jax import autotune, runtime


@pytest.fixture
def no_cache_dir(monkeypatch):
    """jax's cache folder unset for the test (the suite's own is put back after it); nothing is
    compiled meanwhile, so jax never opens a cache at the test's folders."""
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_compilation_cache_max_size", -1)
    monkeypatch.delenv(runtime.ENV_COMPILATION_CACHE, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_cache_goes_to_a_folder_per_machine_in_the_users_cache(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    folder = runtime.use_compilation_cache()
    assert folder.parent == tmp_path / "xla" and folder.is_dir()
    assert " " not in folder.name and autotune.machine_id().split()[-1] in folder.name  # the jax version
    assert jax.config.jax_compilation_cache_dir == str(folder)


def _machine_folder(cache_dir):
    """Where use_compilation_cache puts this machine's folder under `cache_dir`."""
    return cache_dir / "xla" / re.sub(r"[^\w.-]+", "_", autotune.machine_id())


def _entries(folder, keys, with_access_time):
    for key in keys:
        (folder / f"{key}-cache").write_bytes(b"program")
        if with_access_time:
            (folder / f"{key}-atime").write_bytes((1).to_bytes(8, "little"))


def test_the_folder_is_bounded_and_entries_without_an_access_time_are_deleted(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    folder = _machine_folder(tmp_path)
    folder.mkdir(parents=True)
    _entries(folder, ["jit_kept"], with_access_time=True)
    _entries(folder, ["jit_damaged", "jit_unbounded"], with_access_time=False)
    assert runtime.use_compilation_cache() == folder
    assert jax.config.jax_compilation_cache_max_size == runtime.COMPILATION_CACHE_MAX_BYTES
    assert sorted(p.name for p in folder.glob("jit_*")) == ["jit_kept-atime", "jit_kept-cache"]


# jax's default is -1, so -1 set in the config alone reads as unset and is bounded; in the environment it is not.
@pytest.mark.parametrize("how, size", [("environment", -1), ("environment", 123456), ("config", 123456)])
def test_the_users_bound_is_kept_and_an_unbounded_folder_is_not_swept(no_cache_dir, monkeypatch, tmp_path, how, size):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    folder = _machine_folder(tmp_path)
    folder.mkdir(parents=True)
    _entries(folder, ["jit_a"], with_access_time=False)
    if how == "environment":
        monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", str(size))
    jax.config.update("jax_compilation_cache_max_size", size)  # what jax reads from the variable at import
    assert runtime.use_compilation_cache() == folder
    assert jax.config.jax_compilation_cache_max_size == size
    assert (folder / "jit_a-cache").exists() == (size == -1)


def test_a_bound_of_zero_leaves_the_cache_off(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    jax.config.update("jax_compilation_cache_max_size", 0)  # jax: caching disabled
    assert runtime.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "xla").exists()


def test_a_sweep_that_cannot_delete_warns_and_keeps_the_cache_on(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    folder = _machine_folder(tmp_path)
    folder.mkdir(parents=True)
    _entries(folder, ["jit_damaged"], with_access_time=False)
    unlink = runtime.Path.unlink

    def refuse_entries(self, missing_ok=False):
        if self.name.endswith("-cache"):
            raise PermissionError(13, "denied")
        unlink(self, missing_ok)
    monkeypatch.setattr(runtime.Path, "unlink", refuse_entries)
    with pytest.warns(UserWarning, match="may remain .*PermissionError"):
        assert runtime.use_compilation_cache() == folder
    assert jax.config.jax_compilation_cache_dir == str(folder)


def test_an_entry_is_not_deleted_while_another_process_holds_jaxs_lock(tmp_path):
    # The holder takes filelock's lock on '.lockfile', as jax's cache does around each write.
    _entries(tmp_path, ["jit_being_written"], with_access_time=False)
    with subprocess.Popen([sys.executable, "-c", "import filelock, sys, time\n"
                           f"with filelock.FileLock({str(tmp_path / '.lockfile')!r}):\n"
                           "    print('held', flush=True); time.sleep(60)"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held", holder.stderr.read() if holder.poll() is not None else ""
            with pytest.warns(UserWarning, match="may remain .*Timeout"):
                runtime._delete_entries_without_access_time(tmp_path, timeout=0.2)
            assert (tmp_path / "jit_being_written-cache").exists()
        finally:
            holder.kill()
    runtime._delete_entries_without_access_time(tmp_path)
    assert not (tmp_path / "jit_being_written-cache").exists()


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


def test_a_second_process_loads_what_the_first_compiled_and_a_damaged_entry_is_written_again(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")}
    env.update({autotune.ENV_CACHE_DIR: str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    env.pop(runtime.ENV_COMPILATION_CACHE, None)

    def run():
        done = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    (first, _), (second, stderr) = run(), run()
    assert first["folder"].startswith(str(tmp_path / "xla")) and first["hits"] == 0
    entries = list(Path(first["folder"]).glob("*-cache"))
    assert entries  # the programs were written
    if "doesn't match the machine type for execution" in stderr:
        pytest.skip("this CPU's XLA rejects its own cached programs (jax-ml/jax#38445)")
    assert second["hits"] >= 1 and second["y"] == first["y"]
    for entry in entries:  # a run killed while jax wrote them: part of each, no access time after it
        entry.write_bytes(entry.read_bytes()[:100])
        entry.with_name(entry.name.removesuffix("-cache") + "-atime").unlink()
    (third, stderr), (fourth, _) = run(), run()
    assert third["hits"] == 0 and "Error reading persistent compilation cache" not in stderr
    assert fourth["hits"] >= 1 and third["y"] == fourth["y"] == first["y"]
