"""paths: what a user types (relative, ~, gs://) resolved once at the edge."""
import os

from flamingo_jax import paths
from flamingo_jax.configs import demo


def test_resolve_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.resolve("wd/run") == str(tmp_path / "wd" / "run")
  assert paths.resolve("~/lm") == str(tmp_path / "home" / "lm")
  assert paths.resolve("/abs/./x/../y") == "/abs/y"
  assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
  assert paths.resolve("") == ""


def test_resolve_config_resolves_every_path_field_of_a_copy(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = demo.get_config()
  config.lm_init, config.vision_init, config.init_from = "lm", "~/vision", "gs://b/init"
  config.input.tokenizer = "tok.model"
  config.input.datasets.m3w.data_dir = "data"
  config.lock()
  resolved = paths.resolve_config(config)
  assert resolved.lm_init == str(tmp_path / "lm")
  assert resolved.vision_init == os.path.expanduser("~/vision")
  assert resolved.init_from == "gs://b/init"
  assert resolved.input.tokenizer == str(tmp_path / "tok.model")
  assert resolved.input.datasets.m3w.data_dir == str(tmp_path / "data")
  assert "data_dir" not in resolved.input.datasets.names  # Only fields that are there.
  assert config.lm_init == "lm" and resolved.is_locked  # The caller's config is left as it was.
