"""The frozen LM stored once, in the plain layout: regrouped for any xattn placement at load
(`lm.to_layout`, `lm.to_plain`), and config.lm_init read in any layout (`load_backbones`)."""
import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from flamingo_jax.configs import tiny
from flamingo_jax.convert import hf
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import kinds
from flamingo_jax.train import sharding as sharding_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer
from tests import model_utils
from tests import test_lm


def assert_trees_equal(got, want):
  got, want = state_lib.flat(got), state_lib.flat(want)
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)


@functools.cache
def _plain_lm():
  """(plain LM params, their logits on test_lm.inputs()): the same for every placement, so
  initialised and compiled once."""
  plain_cfg = test_lm.make_cfg()
  tokens, _, _ = test_lm.inputs()
  plain = model_utils.init(lm.LM(plain_cfg), tokens)
  return plain, jax.jit(lm.LM(plain_cfg).apply)({"params": plain}, tokens)


@pytest.mark.parametrize("placement", ["paper", "open_flamingo"])
@pytest.mark.parametrize("every", [1, 2, 3, 4])
def test_regrouped_plain_lm_round_trips_and_keeps_its_logits(every, placement):
  """5 layers: prefix, groups and tail each present or not, depending on every and placement."""
  cfg = test_lm.make_cfg(xattn=dict(every=every, placement=placement, num_heads=2, head_dim=8))
  tokens, visual, media_idx = test_lm.inputs()
  plain, want = _plain_lm()
  fresh = test_lm.init(cfg, tokens, visual, media_idx, gates=0.0)

  grouped = lm.to_layout(plain, cfg)
  frozen = {p: x for p, x in state_lib.flat(fresh).items() if lm.plain_path(p)[0] is not None}
  assert {p: x.shape for p, x in state_lib.flat(grouped).items()} == {
      p: x.shape for p, x in frozen.items()}
  assert_trees_equal(lm.to_plain(grouped), plain)
  got = jax.jit(lm.LM(cfg).apply)({"params": state_lib.merge(fresh, grouped)}, tokens, visual,
                                  media_idx)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trees_that_are_not_an_lm_are_named():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"Not an LM tree: expected the plain LM's 'layers' \[L"):
    lm.to_plain({"token_embed": x})
  with pytest.raises(ValueError, match=r"Not an LM tree.*\['groups/norm/scale'\]"):
    lm.to_plain({"layers": {"w": x}, "groups": {"norm": {"scale": x}}})
  with pytest.raises(ValueError, match="disagree on the layout"):
    lm.to_plain({"groups": {"layers": {"a": np.zeros((2, 2, 3)), "b": np.zeros((1, 4, 3))}}})
  with pytest.raises(ValueError, match=r"layers/w stacks 4 layers; lm.num_layers=5"):
    lm.to_layout({"layers": {"w": x}}, test_lm.make_cfg(xattn=dict(every=2)))


def tiny_config(lm_init, every=2, placement="paper"):
  config = tiny.get_config()
  config.model.lm.xattn.update(every=every, placement=placement)
  config.mesh = (1, -1, 1)  # FSDP over the 8 devices: the LM's widths are sharded.
  config.lm_init = str(lm_init)
  return config


def plain_lm(config, seed=1) -> dict:
  """Random parameters of config's LM without xattn blocks (what stage 2 trains)."""
  plain_cfg = dataclasses.replace(flamingo.lm_config(config.model), xattn=None)
  tokens = np.zeros((1, 4), np.int32)
  return nn.unbox(lm.LM(plain_cfg).init(jax.random.PRNGKey(seed), tokens))["params"]


def load(config):
  """load_backbones on the trainer's abstract (trainable, frozen) trees, with their shardings:
  with config.vision_init unset it reads only the LM's leaves, so the model is never initialised.
  Returns the loaded LM's {path: array} and {path: the abstract leaf it replaced}."""
  kind = kinds.get("flamingo")
  model, mesh = kind.model(config), sharding_lib.make_mesh(config.mesh)
  setup = trainer.make_setup(config, model, mesh, {"interleaved": 1.0})
  abstract = (setup.abstract_state["params"], setup.abstract_frozen)
  in_lm = lambda trees: {p: x for tree in trees for p, x in state_lib.flat(tree["lm"]).items()}
  return in_lm(kind.load_backbones(config, *abstract)), in_lm(abstract)


@pytest.mark.parametrize("every,placement,with_xattn", [(1, "paper", False),
                                                        (3, "open_flamingo", True)])
def test_a_grouped_checkpoint_from_before_loads_into_any_placement(tmp_path, every, placement,
                                                                   with_xattn):
  """{'lm': ...} grouped for every=2, as stage 2 wrote it before (with xattn blocks: as
  `convert hf --xattn_every` did), into another placement, on the model's shardings and dtype."""
  config = tiny_config(tmp_path / "lm", every, placement)
  config.frozen_dtype = "bfloat16"
  plain = plain_lm(config)
  old_cfg = flamingo.lm_config(tiny_config("", every=2).model)
  old = lm.to_layout(plain, old_cfg)
  if with_xattn:
    _, tokens, media_idx = model_utils.random_inputs(0)
    visual = np.zeros((tokens.shape[0], 2, old_cfg.num_latents, 32), np.float32)
    old = state_lib.merge(model_utils.init(lm.LM(old_cfg), tokens, visual, media_idx), old)
  assert "groups" in old and ("xattn" in old["groups"]) == with_xattn
  ckpt_lib.save_params(config.lm_init, {"lm": old})

  got, model = load(config)
  want = state_lib.flat(lm.to_layout(plain, flamingo.lm_config(config.model)))
  assert {"new_token_embed", "new_lm_head/kernel"} <= set(want)  # Trainable: carried.
  for path, x in want.items():
    assert (got[path].dtype, got[path].sharding) == (model[path].dtype, model[path].sharding)
    np.testing.assert_array_equal(got[path], np.asarray(x).astype(got[path].dtype), err_msg=path)
  assert got["token_embed"].dtype == np.dtype("bfloat16")  # config.frozen_dtype.


@pytest.fixture(scope="module")
def stored_plain(tmp_path_factory):
  """A `{'lm': plain LM}` checkpoint (what stage 2 writes now) for tiny_config."""
  path = tmp_path_factory.mktemp("lm") / "lm"
  ckpt_lib.save_params(str(path), {"lm": plain_lm(tiny_config(path))})
  return path


def test_an_lm_of_other_sizes_is_an_error_naming_each_leaf(stored_plain):
  config = tiny_config(stored_plain)
  config.model.lm.update(num_layers=6, mlp_dim=48)
  with pytest.raises(ckpt_lib.ShapeMismatchError, match=(
      r"(?s)config.lm_init='.*/lm' does not fit config.model.lm \(\d+ problems.*"
      r"layers/attn/query/kernel: checkpoint \(4, 32, 4, 8\) != model \(6, 32, 4, 8\).*"
      r"layers/mlp/wi/kernel: checkpoint \(4, 32, 64\) != model \(6, 32, 48\)")):
    load(config)


def test_a_tree_that_is_no_lm_is_an_error(tmp_path):
  config = tiny_config(tmp_path / "lm")
  ckpt_lib.save_params(config.lm_init, {"lm": {"token_embed": np.zeros((64, 32), np.float32)}})
  with pytest.raises(ValueError, match=r"config.lm_init='.*/lm': Not an LM tree"):
    load(config)
  config = tiny_config(tmp_path / "vision")
  ckpt_lib.save_params(config.lm_init, {"vision": {"w": np.zeros((2,), np.float32)}})
  with pytest.raises(ValueError, match=r"holds \['vision/w'\].*expected a tree \{'lm'"):
    load(config)


def test_a_converted_lm_must_agree_with_config_model_lm(tmp_path):
  """Fields that change the LM's outputs must match lm_config.json; the others need not."""
  config = tiny_config(tmp_path / "converted")
  lm_cfg = dataclasses.replace(flamingo.lm_config(config.model), xattn=None, max_len=2048)
  params = plain_lm(config)
  other = dataclasses.replace(lm_cfg, num_heads=2, norm_eps=1e-6, norm_bias=False)
  hf.save_converted(config.lm_init, other, params)
  with pytest.raises(ValueError, match=(
      r"config.lm_init='.*converted' holds another LM than config.model.lm: set these fields as "
      r"its lm_config.json has them.\n  num_heads: 2 in lm_config.json, 4 in config.model.lm\n"
      r"  num_kv_heads: 2 in lm_config.json, 4 in config.model.lm\n"
      r"  head_dim: 16 in lm_config.json, 8 in config.model.lm\n"
      r"  norm_eps: 1e-06 in lm_config.json, 1e-05 in config.model.lm$")):
    load(config)
  config.lm_init = str(tmp_path / "agrees")
  hf.save_converted(config.lm_init, lm_cfg, params)  # norm_bias: no bias in an RMSNorm.
  np.testing.assert_array_equal(load(config)[0]["token_embed"], params["token_embed"])


def test_initial_params_are_one_init_of_the_whole_tree_then_the_backbones(stored_plain):
  """trainer.initial_params compiles the init only for the trainable leaves and the frozen ones no
  checkpoint holds (here the NFNet: config.vision_init is unset): bit for bit what one init of the
  whole tree and load_backbones give, on the same shardings."""
  config = tiny_config(stored_plain)
  config.frozen_dtype = "bfloat16"
  kind = kinds.get("flamingo")
  setup = trainer.make_setup(config, kind.model(config), sharding_lib.make_mesh(config.mesh),
                             {"interleaved": 1.0})
  rng = jax.random.PRNGKey(3)
  whole = jax.jit(setup.init, out_shardings=(setup.state_sh["params"], setup.frozen_sh))(rng)
  want = state_lib.flat(state_lib.merge(*kind.load_backbones(config, *whole)))
  got = state_lib.flat(state_lib.merge(*trainer.initial_params(config, kind, setup, rng)))
  assert set(got) == set(want)
  assert any(p.startswith("vision/") for p in want) and "lm/token_embed" in want
  for path, x in want.items():
    assert (got[path].dtype, got[path].sharding) == (x.dtype, x.sharding), path
    np.testing.assert_array_equal(got[path], x, err_msg=path)
  trainable, frozen = trainer.initial_params(config, kind, setup, rng, init_trainable=False)
  assert state_lib.flat(frozen).keys() == state_lib.flat(whole[1]).keys()
  for path, x in state_lib.flat(frozen).items():
    np.testing.assert_array_equal(x, want[path], err_msg=path)
  xattn = [x for p, x in state_lib.flat(trainable).items() if "xattn" in p]
  assert xattn and all(isinstance(x, jax.ShapeDtypeStruct) for x in xattn)  # For a checkpoint.
