"""The paper's ablations (Flamingo paper, Table 3) as sweeps over any Flamingo config.

Table 3 ablates Flamingo-3B one knob at a time and reports the overall score over five DEV
benchmarks at 4 shots; p_next is the appendix's Table 7 (ix) (shared/DESIGN.md). The scores are
Table 3 of arXiv:2204.14198v2 as recalled, not checked here against a copy of the table
(shared/DESIGN.md has only the p_next rows): check one against the paper before citing it.
SWEEPS maps a sweep name to a function of the config that returns every setting of its knob as a
`Setting`: dotted overrides of config fields and the paper's score for that row. `variants` makes
the setting the config already has the baseline (the config as it is, trained once for all sweeps)
and the others its variants; a setting the config cannot express carries the reason as `skip`
(experiments/sweep.py also skips one whose model does not build).
experiments/sweep.py runs and tabulates them (experiments/README.md).
"""
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flamingo_jax.models import flamingo
from flamingo_jax.models import perceiver

XATTN = "model.lm.xattn."
NO_ROW = "no Table 3 row"


class Variant(NamedTuple):
  name: str
  overrides: dict[str, Any]  # Dotted config field -> value; None removes the field (a dataset).
  paper: float | str  # The paper's score for this setting, or a note where it has none.
  skip: str = ""  # Why the config cannot express it ("" = it can).
  paper_baseline: float | str = ""  # The paper's score for the baseline's setting.


BASELINE = "baseline"


def _settings(rows: list[Variant], current: str | None) -> list[Variant]:
  """rows with the config's own setting (`current`, None if no row is) first, as the baseline."""
  base = next((r for r in rows if r.name == current), None)
  paper = base.paper if base else f"{NO_ROW} for this setting"
  return [Variant(BASELINE, {}, paper)] + [
      r._replace(paper_baseline=paper) for r in rows if r.name != current]


def xattn_every(config) -> list[Variant]:
  """(v) Cross-attention frequency: every layer, every 2nd, every 4th, a single block in the
  middle of the LM."""
  x = flamingo.lm_config(config.model).xattn
  every = lambda n, score: Variant(f"every_{n}", {XATTN + "every": n,
                                                   XATTN + "placement": "paper"}, score)
  rows = [every(1, 70.7), every(2, 68.2), every(4, 68.8),
          Variant("single_in_middle", {XATTN + "placement": "middle"}, 59.8)]
  current = {"paper": f"every_{x.every}", "middle": "single_in_middle"}.get(x.placement)
  return _settings(rows, current)


def tanh_gating(config) -> list[Variant]:
  """(iii) tanh gating of the xattn blocks."""
  rows = [Variant("tanh_gating", {XATTN + "gated": True}, 70.7),
          Variant("no_tanh_gating", {XATTN + "gated": False}, 66.5)]
  gated = flamingo.lm_config(config.model).xattn.gated
  return _settings(rows, "tanh_gating" if gated else "no_tanh_gating")


def xattn_architecture(config) -> list[Variant]:
  """(iv) Cross-attention architecture: GATED XATTN-DENSE vs the original Transformer decoder's
  cross-attention (no gates, no FFW). GRAFTING (a second frozen-LM-free stack) is not built."""
  x = flamingo.lm_config(config.model).xattn
  rows = [Variant("gated_xattn_dense", {XATTN + "gated": True, XATTN + "dense": True}, 70.7),
          Variant("vanilla_xattn", {XATTN + "gated": False, XATTN + "dense": False}, 66.9)]
  current = {(True, True): "gated_xattn_dense", (False, False): "vanilla_xattn"}.get(
      (x.gated, x.dense))
  return _settings(rows, current)


def masking(config) -> list[Variant]:
  """§2.3: a token attends to its own image only, or to all previous ones (Table 3 has no row;
  the paper chose per-image masking)."""
  rows = [Variant("per_image", {XATTN + "only_attend_immediate": True},
                  f"{NO_ROW}: chosen in §2.3"),
          Variant("all_previous_images", {XATTN + "only_attend_immediate": False},
                  f"{NO_ROW}: not chosen in §2.3")]
  immediate = flamingo.lm_config(config.model).xattn.only_attend_immediate
  return _settings(rows, "per_image" if immediate else "all_previous_images")


def feature_tokens(config) -> int:
  """S, the vision encoder's features per frame at config.image_size: the MLP and Transformer
  connectors give one visual token per feature, so their num_latents must be S."""
  model = flamingo.from_config(config.model)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  encode = lambda m, x: m.vision_encoder(x, train=False)  # NFNet [1, h, w, C]; ViT [1, S, C].
  feats, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), images,
                                                           method=encode))
  return math.prod(feats.shape[1:-1])


def resampler(config) -> list[Variant]:
  """(vi) The connector: the Perceiver Resampler, an MLP or a Transformer over the features. The
  baseline is the config's connector; the others keep its sizes (num_latents = S for the two
  that give a token per feature)."""
  scores = {"perceiver": 70.7, "mlp": 66.6, "transformer": 66.7}
  current = perceiver.connector_config(config.model.resampler).kind
  per_feature = {"model.resampler.num_latents": feature_tokens(config)}
  if config.model.resampler.get("center_features"):  # The Perceiver's option only.
    per_feature["model.resampler.center_features"] = False
  rows = [Variant(kind, {"model.resampler.kind": kind,
                         **(per_feature if kind != "perceiver" else {})}, scores[kind])
          for kind in perceiver.KINDS]
  return _settings(rows, current)


def mixture(config) -> list[Variant]:
  """(ii) Gradients of all datasets accumulated into each step, or one dataset per step in turn:
  the same number of steps (and so of optimizer updates) either way."""
  rows = [Variant("accumulate", {"mixture_mode": "accumulate"}, 70.7),
          Variant("round_robin", {"mixture_mode": "round_robin"}, 62.9)]
  return _settings(rows, config.mixture_mode)


def _unfreeze(config, module: str, trained: bool) -> dict[str, Any]:
  others = tuple(m for m in config.get("unfreeze", ()) if m != module)
  return {"unfreeze": others + ((module,) if trained else ())}


def freeze_lm(config) -> list[Variant]:
  """(viii) Freezing the LM, or training it from its pretrained weights (config.unfreeze)."""
  rows = [Variant("frozen_lm", _unfreeze(config, "lm", False), 70.7),
          Variant("trainable_lm", _unfreeze(config, "lm", True), 62.7)]
  return _settings(rows, "trainable_lm" if "lm" in config.get("unfreeze", ()) else "frozen_lm")


def freeze_vision(config) -> list[Variant]:
  """The vision encoder frozen (the paper's pretraining) or trained too (config.unfreeze), as the
  paper's fine-tuning recipe does (§3.2); Table 3 has no row."""
  rows = [Variant("frozen_vision", _unfreeze(config, "vision", False), 70.7),
          Variant("trainable_vision", _unfreeze(config, "vision", True),
                  f"{NO_ROW}: unfrozen only to fine-tune (§3.2)")]
  trained = "vision" in config.get("unfreeze", ())
  return _settings(rows, "trainable_vision" if trained else "frozen_vision")


M3W_NAMES = ("m3w", "interleaved")  # configs/common.py:paper_input's, tiny's.
_DOCUMENT = re.compile(r"tokenize_document\(")
_P_NEXT = re.compile(r"p_next=([0-9.]+)")


def _with_p_next(pp: str, p: float) -> str:
  if _P_NEXT.search(pp):
    return _P_NEXT.sub(f"p_next={p}", pp)
  return _DOCUMENT.sub(f"tokenize_document(p_next={p}, ", pp)


def p_next(config) -> list[Variant]:
  """App. Table 7 (ix): the probability that an M3W document's tokens attend to the next image;
  set in the tokenize_document pp of the M3W datasets (named as in M3W_NAMES)."""
  docs = {name: d.pp for name, d in config.input.datasets.items()
          if name in M3W_NAMES and _DOCUMENT.search(d.get("pp", ""))}
  skip = "" if docs else (f"config.input.datasets has no dataset named one of {M3W_NAMES} with "
                          "tokenize_document in its pp (p_next is its argument)")
  rows = [Variant(f"p_next_{p:g}", {f"input.datasets.{n}.pp": _with_p_next(pp, p)
                                    for n, pp in docs.items()}, score, skip)
          for p, score in ((0.0, 67.8), (0.5, 68.4), (1.0, 67.6))]
  found = {float(m.group(1)) if (m := _P_NEXT.search(pp)) else 0.0 for pp in docs.values()}
  return _settings(rows, f"p_next_{found.pop():g}" if len(found) == 1 else None)


# (i) Training data, by the dataset names of configs/common.py:paper_input and the demo/tiny ones.
_WITHOUT = {**dict.fromkeys(M3W_NAMES, 53.4), "vtp": 67.3, "video": 67.3, "pairs": 60.9,
            "align": "60.9 without both ALIGN and LTIP", "ltip": "60.9 without both ALIGN and LTIP"}


def datasets(config) -> list[Variant]:
  """(i) Training data: the mixture, and each of its datasets removed in turn."""
  names = list(config.input.datasets)
  skip = "" if len(names) > 1 else "it is config.input's only dataset"
  rows = [Variant("all_datasets", {}, 70.7)] + [
      Variant(f"without_{name}", {f"input.datasets.{name}": None},
              _WITHOUT.get(name, f"{NO_ROW} for this dataset"), skip) for name in names]
  return _settings(rows, "all_datasets")


SWEEPS = {f.__name__: f for f in (xattn_every, tanh_gating, xattn_architecture, masking,
                                  resampler, mixture, freeze_lm, freeze_vision, p_next,
                                  datasets)}


def variants(config, sweep: str) -> list[Variant]:
  """The baseline, then the sweep's other settings, for `config`."""
  if sweep not in SWEEPS:
    raise ValueError(f"--sweep={sweep!r}; expected one of {sorted(SWEEPS)} or 'all'.")
  return SWEEPS[sweep](config)
