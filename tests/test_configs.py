"""Config arguments (`--config=file.py:ARG`): parsed big_vision style, unknown ones refused."""
import importlib

import pytest

from flamingo_jax.configs import common

CONFIGS = ("demo", "lm_pretrain", "nfnet_contrastive", "tiny", "flamingo_3b", "flamingo_9b",
           "flamingo_80b")


def test_parse_arg_sets_flags_and_values():
  parsed = common.parse_arg("short,steps=7,lr=0.5,name=x", short=False, steps=1, lr=1.0, name="")
  assert (parsed.short, parsed.steps, parsed.lr, parsed.name) == (True, 7, 0.5, "x")
  assert common.parse_arg(None, short=False).short is False
  assert common.parse_arg("short=False", short=True).short is False
  with pytest.raises(ValueError, match="short='yes'; expected True or False"):
    common.parse_arg("short=yes", short=False)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_refuses_an_unknown_argument(name):
  module = importlib.import_module(f"flamingo_jax.configs.{name}")
  module.get_config()
  with pytest.raises(ValueError, match=r"Unknown config argument 'shrot'"):
    module.get_config("shrot")


def test_short_is_the_demo_configs_argument():
  from flamingo_jax.configs import demo  # pylint: disable=g-import-not-at-top
  assert (demo.get_config("short").evals.names.num_episodes
          < demo.get_config().evals.names.num_episodes)
