"""The paper's ablations (Flamingo paper, Table 3: Flamingo-3B, 4 shots) as sweeps over the demo.

SWEEPS: sweep name -> [Variant], the baseline (configs/demo.py as it is) first. A variant's
overrides are dotted fields of configs/demo.py's get_config(); `paper` is Table 3's overall score
for that setting (baseline 70.7), or the paper's word where Table 3 has no row. experiments/sweep.py
runs and tabulates them (experiments/README.md).
"""
from typing import Any, NamedTuple

import ml_collections

from configs import demo as demo_config

PAPER_BASELINE = 70.7  # Table 3, Flamingo-3B overall score.


class Variant(NamedTuple):
  name: str
  overrides: dict[str, Any]
  paper: float | str  # Table 3's overall score, or a note.


BASELINE = Variant("baseline", {}, PAPER_BASELINE)

SWEEPS = {
    "mixture": [BASELINE, Variant("round_robin", {"mixture_mode": "round_robin"}, 62.9)],
    "tanh_gating": [BASELINE, Variant("no_tanh_gating", {"model.lm.xattn.gated": False}, 66.5)],
    # The demo's LM has 2 layers: every 2 puts one block before layer 0, as every 4 (68.8) would.
    "xattn_every": [BASELINE, Variant("every_2", {"model.lm.xattn.every": 2}, 68.2)],
    # The demo's NFNet gives a 1x1 grid at 32 px: the MLP makes S = 1 token per image.
    "resampler": [BASELINE, Variant("mlp", {"model.resampler.kind": "mlp",
                                            "model.resampler.num_latents": 1}, 66.6)],
    "masking": [BASELINE, Variant("all_previous_images",
                                  {"model.lm.xattn.only_attend_immediate": False},
                                  "paper: per-image chosen (§2.3)")],
}


def get_config(variant: Variant, short: bool = False) -> ml_collections.ConfigDict:
  """configs/demo.py (`:short` if short) with the variant's overrides.

  Overrides outside `model.` must name existing fields; model fields that configs/demo.py leaves
  at their defaults (e.g. model.lm.xattn.gated) may be added: building the model rejects typos.
  """
  config = demo_config.get_config("short" if short else None)
  for key in variant.overrides:
    if not key.startswith("model.") and key not in config:
      raise KeyError(f"Variant {variant.name!r}: configs/demo.py has no field {key!r}.")
  config.update_from_flattened_dict(variant.overrides)
  return config
