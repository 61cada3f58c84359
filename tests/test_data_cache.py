"""Tests of the cache folder that the preparation tools write into."""

from pathlib import Path

from mol_tune.cache import CACHE_ENV, default_cache_dir


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == Path(tmp_path, ".cache", "mol_tune")


def test_empty_variable_means_default(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == Path(tmp_path, ".cache", "mol_tune")
