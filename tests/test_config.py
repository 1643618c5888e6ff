"""shardckpt.config: the one parser of SHARDCKPT_* variables and sizes (issue 12, defect 2).

Each variable is read at call time and a bad value raises ConfigError naming the variable; the size parser
reads every unit as binary, for the staging pool and `export --max-shard-size` alike."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import shardckpt
from shardckpt.format import codec
from shardckpt import config
from shardckpt import dist
from shardckpt.tools import export
from shardckpt.saving import staging
from shardckpt.errors import CheckpointError, ConfigError
from shardckpt.storage.local import LocalStorage

G, M, K = 1 << 30, 1 << 20, 1 << 10


@pytest.mark.parametrize("text, want", [
    ("8G", 8 * G), ("8GB", 8 * G), ("8GiB", 8 * G), ("8g", 8 * G), ("8 gib", 8 * G), ("  8G  ", 8 * G),
    ("512M", 512 * M), ("512MB", 512 * M), ("512MiB", 512 * M), ("64K", 64 * K), ("64KiB", 64 * K),
    ("2T", 2 << 40), ("1.5G", 3 * G // 2), ("0.5K", 512), ("100B", 100), ("4096", 4096), ("0", 0),
    (123, 123),
])
def test_sizes_are_binary_whatever_the_spelling(text, want):
    assert config.parse_size(text, name="X") == want


@pytest.mark.parametrize("text", ["", "G", "8X", "eight", "8GG", "-1", "-8G", "1.5", "8iB", "8 G B", "0x10",
                                  "1e9", "8G8", "nan", "inf"])
def test_size_garbage_is_refused_naming_the_variable(text):
    with pytest.raises(ConfigError, match="MY_OPTION") as e:
        config.parse_size(text, name="MY_OPTION")
    assert e.value.name == "MY_OPTION"
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)


def test_pool_bytes_reads_8GB_as_8_gibibytes_not_8_bytes(monkeypatch):
    # before: "8GB" -> 8 bytes (rstrip of the unit, multiplier from the last letter "B"), "512MiB" -> ValueError
    monkeypatch.setenv("SHARDCKPT_POOL_BYTES", "8GB")
    assert staging.pool_bytes_from_env() == 8 * G
    monkeypatch.setenv("SHARDCKPT_POOL_BYTES", "512MiB")
    assert staging.pool_bytes_from_env() == 512 * M
    assert staging.HostBufferPool().max_bytes == 512 * M
    monkeypatch.setenv("SHARDCKPT_POOL_BYTES", "")
    assert staging.pool_bytes_from_env() is None
    monkeypatch.delenv("SHARDCKPT_POOL_BYTES")
    assert staging.pool_bytes_from_env() is None


@pytest.mark.parametrize("text", ["lots", "8 GB please", "0", "0G", "-1G"])
def test_pool_bytes_garbage_is_refused(monkeypatch, text):
    monkeypatch.setenv("SHARDCKPT_POOL_BYTES", text)
    with pytest.raises(ConfigError, match="SHARDCKPT_POOL_BYTES"):
        staging.pool_bytes_from_env()


def test_pool_bytes_bad_value_fails_the_save_with_the_variable_named(monkeypatch, tmp_path):
    # the variable is read when a pool is created: make this save create the process's default pool
    monkeypatch.setattr(staging, "_default_pool", None)
    monkeypatch.setenv("SHARDCKPT_POOL_BYTES", "8 gigs")
    with pytest.raises(CheckpointError, match="SHARDCKPT_POOL_BYTES"):
        shardckpt.save({"w": torch.ones(4)}, str(tmp_path / "ck"))
    assert not (tmp_path / "ck" / "manifest.json").exists()


def test_export_max_shard_size_uses_the_same_parser():
    # before: export read "8G" as 8 * 10**9 while the pool read 8 * 2**30
    assert export.parse_size("8G") == config.parse_size("8G", name="x") == 8 * G
    assert export.parse_size(None) is None and export.parse_size(1000) == 1000
    with pytest.raises(ConfigError, match="max_shard_size"):
        export.parse_size("big")


def test_timeout(monkeypatch):
    monkeypatch.delenv("SHARDCKPT_TIMEOUT", raising=False)
    assert dist.default_timeout_s() == 600.0
    monkeypatch.setenv("SHARDCKPT_TIMEOUT", "2.5")
    assert dist.default_timeout_s() == 2.5
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv("SHARDCKPT_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="SHARDCKPT_TIMEOUT"):
            dist.default_timeout_s()


def test_threads(monkeypatch):
    monkeypatch.setenv("SHARDCKPT_THREADS", "3")
    assert codec.threads() == 3
    monkeypatch.delenv("SHARDCKPT_THREADS")
    assert codec.threads() >= 1
    for bad in ("0", "-2", "many", "1.5"):
        monkeypatch.setenv("SHARDCKPT_THREADS", bad)
        with pytest.raises(ConfigError, match="SHARDCKPT_THREADS"):
            codec.threads()


def test_zstd_level_is_read_at_call_time(monkeypatch, tmp_path):
    # before: read once at import, so setting it after `import shardckpt` did nothing
    monkeypatch.delenv("SHARDCKPT_ZSTD_LEVEL", raising=False)
    assert codec.zstd_level() == 1
    monkeypatch.setenv("SHARDCKPT_ZSTD_LEVEL", "19")
    assert codec.zstd_level() == 19
    data = {"w": torch.arange(1 << 16, dtype=torch.int64) % 7}  # int64: plain zstd/1, where the level applies
    shardckpt.save(data, str(tmp_path / "l19"))
    monkeypatch.setenv("SHARDCKPT_ZSTD_LEVEL", "1")
    shardckpt.save(data, str(tmp_path / "l1"))
    assert torch.equal(shardckpt.load_full(str(tmp_path / "l19"))["w"], data["w"])
    sizes = [sum(f.stat().st_size for f in (tmp_path / n).rglob("*.bin")) for n in ("l19", "l1")]
    assert sizes[0] != sizes[1]  # the level in force at save time was used
    for bad in ("fast", "23", "1.0"):
        monkeypatch.setenv("SHARDCKPT_ZSTD_LEVEL", bad)
        with pytest.raises(ConfigError, match="SHARDCKPT_ZSTD_LEVEL"):
            codec.zstd_level()


def test_direct_io(monkeypatch, tmp_path):
    monkeypatch.delenv("SHARDCKPT_DIRECT_IO", raising=False)
    assert LocalStorage(str(tmp_path)).direct_io is True
    for off in ("0", "false", "NO", "off"):
        monkeypatch.setenv("SHARDCKPT_DIRECT_IO", off)
        assert LocalStorage(str(tmp_path)).direct_io is False
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "yes")
    assert LocalStorage(str(tmp_path)).direct_io is True
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "maybe")  # before: anything but an off word meant on
    with pytest.raises(ConfigError, match="SHARDCKPT_DIRECT_IO"):
        LocalStorage(str(tmp_path))


def test_backend_and_require_native(monkeypatch):
    monkeypatch.delenv("SHARDCKPT_BACKEND", raising=False)
    assert config.backend() == "native"
    monkeypatch.setenv("SHARDCKPT_BACKEND", "Python")
    assert config.backend() == "python"
    monkeypatch.setenv("SHARDCKPT_BACKEND", "pyhton")  # before: a misspelling quietly meant native
    with pytest.raises(ConfigError, match="SHARDCKPT_BACKEND"):
        config.backend()
    monkeypatch.setenv("SHARDCKPT_REQUIRE_NATIVE", "1")
    assert config.require_native() is True
    monkeypatch.setenv("SHARDCKPT_REQUIRE_NATIVE", "sure")
    with pytest.raises(ConfigError, match="SHARDCKPT_REQUIRE_NATIVE"):
        config.require_native()


def test_misspelt_backend_fails_the_import_naming_the_variable():
    env = dict(os.environ, SHARDCKPT_BACKEND="pyhton")
    r = subprocess.run([sys.executable, "-c", "import shardckpt"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "ConfigError" in r.stderr and "SHARDCKPT_BACKEND='pyhton'" in r.stderr


def test_every_shardckpt_variable_is_read_only_in_config():
    """One home: no module but config (and the test-only fault switch) reads a SHARDCKPT_ variable."""
    root = os.path.dirname(shardckpt.__file__)
    offenders = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py") or f in ("config.py", "_faults.py"):
                continue
            text = open(os.path.join(dirpath, f), encoding="utf-8").read()
            for line in text.splitlines():
                if "environ" in line and "SHARDCKPT_" in line or "getenv(\"SHARDCKPT_" in line:
                    offenders.append(f"{f}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("var, bad", [("SHARDCKPT_THREADS", "0"), ("SHARDCKPT_THREADS", "two"),
                                      ("SHARDCKPT_ZSTD_LEVEL", "99")])
def test_bad_save_variables_raise_config_error_not_save_error(monkeypatch, tmp_path, var, bad):
    """Before: SaveError wrapping the ConfigError's text, so `except ConfigError` missed it."""
    monkeypatch.setenv(var, bad)
    for save in (shardckpt.save, lambda s, p: shardckpt.async_save(s, p).wait()):
        with pytest.raises(ConfigError, match=var) as e:
            save({"w": torch.randn(1000)}, str(tmp_path / "c"))
        assert e.value.name == var and not isinstance(e.value, shardckpt.SaveError)
    assert not (tmp_path / "c").exists()


def test_misspelt_require_native_fails_the_import_even_when_native_loads():
    env = dict(os.environ, SHARDCKPT_REQUIRE_NATIVE="maybe")  # before: only read when native failed to load
    r = subprocess.run([sys.executable, "-c", "import shardckpt"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "ConfigError" in r.stderr and "SHARDCKPT_REQUIRE_NATIVE='maybe'" in r.stderr
