"""The paper's ablations (Flamingo paper, Table 3: Flamingo-3B, 4 shots) as sweeps over the demo.

SWEEPS: sweep name -> [Variant], the baseline (flamingo_jax/configs/demo.py as it is) first. A
variant's overrides are dotted fields of configs/demo.py's get_config(); `paper` is Table 3's
overall score for that setting, or the paper's word where Table 3 has no row, and
`paper_baseline` Table 3's score for the baseline's setting of the same knob: the paper's
Flamingo-3B (70.7), except for the connector, where the demo's baseline is the paper's MLP row
(configs/demo.py says why).
experiments/sweep.py runs and tabulates them (experiments/README.md).
"""
from typing import Any, NamedTuple

import ml_collections

from flamingo_jax.configs import demo as demo_config

PAPER_BASELINE = 70.7  # Table 3, Flamingo-3B overall score.
PAPER_MLP = 66.6  # Table 3, "Resampler: MLP": the demo's connector.


class Variant(NamedTuple):
  name: str
  overrides: dict[str, Any]
  paper: float | str  # Table 3's overall score, or a note.
  paper_baseline: float = PAPER_BASELINE


BASELINE = Variant("baseline", {}, PAPER_BASELINE)
# The paper's connector at the demo's sizes (flamingo_jax/configs/demo.py's MLP replaces it there).
PERCEIVER = {"model.resampler.kind": "perceiver", "model.resampler.num_latents": 8,
             "model.resampler.num_layers": 2, "model.resampler.num_heads": 4,
             "model.resampler.head_dim": 16}

SWEEPS = {
    "mixture": [BASELINE, Variant("round_robin", {"mixture_mode": "round_robin"}, 62.9)],
    "tanh_gating": [BASELINE, Variant("no_tanh_gating", {"model.lm.xattn.gated": False}, 66.5)],
    # The demo's LM has 2 layers: every 2 puts one block before layer 0, as every 4 (68.8) would.
    "xattn_every": [BASELINE, Variant("every_2", {"model.lm.xattn.every": 2}, 68.2)],
    "resampler": [BASELINE._replace(paper=PAPER_MLP),
                  Variant("perceiver", PERCEIVER, PAPER_BASELINE, paper_baseline=PAPER_MLP)],
    "masking": [BASELINE, Variant("all_previous_images",
                                  {"model.lm.xattn.only_attend_immediate": False},
                                  "paper: per-image chosen (§2.3)")],
}


def get_config(variant: Variant, short: bool = False) -> ml_collections.ConfigDict:
  """flamingo_jax/configs/demo.py (`:short` if short) with the variant's overrides.

  Overrides outside `model.` must name existing fields; model fields that configs/demo.py leaves
  at their defaults (e.g. model.lm.xattn.gated) may be added: building the model rejects typos.
  """
  config = demo_config.get_config("short" if short else None)
  for key in variant.overrides:
    if not key.startswith("model.") and key not in config:
      raise KeyError(f"Variant {variant.name!r}: flamingo_jax/configs/demo.py has no field "
                     f"{key!r}.")
  config.update_from_flattened_dict(variant.overrides)
  return config
