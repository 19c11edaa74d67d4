"""Parameter groups by regex and the optimizer (paper App. B.1.2: AdamW, warmup, clip 1, wd 0.1).

`config.schedule = [(regex, rule), ...]` (big_vision style): the first regex that matches a
parameter path ('lm/groups/xattn/attn/query/kernel') decides its rule; every parameter must match
one. A rule of None freezes the parameter; a dict overrides fields of `config.lr_schedule` for
its group ({} = the default schedule). The optimizer sees only the trainable subtree, so frozen
parameters have no optimizer state and no gradients.

`config.unfreeze = ('vision', 'lm')` trains the parameters under those top-level modules that the
schedule freezes, with the default schedule: the paper's "frozen LM ✗" ablation (Table 3) and its
fine-tuning recipe's unfrozen vision encoder, without rewriting the schedule.
"""
import re
from typing import Any, Mapping

import optax

from flamingo_jax.train import state as state_lib


def param_rules(params: Any, schedule, unfreeze=()) -> dict[str, Any]:
  """{path: rule} for every parameter; an error lists the paths that no regex matches. Frozen
  parameters under a module named in `unfreeze` get the default rule {}."""
  compiled = [(re.compile(pattern), rule) for pattern, rule in schedule]
  paths = state_lib.flat(params)
  modules = sorted({path.split("/")[0] for path in paths})
  if set(unfreeze) - set(modules):
    raise ValueError(f"config.unfreeze={unfreeze!r}: expected a tuple of top-level modules "
                     f"among {modules}.")
  rules, unmatched = {}, []
  for path in paths:
    match = next(((rule,) for pattern, rule in compiled if pattern.search(path)), None)
    if match is None:
      unmatched.append(path)
    elif match[0] is None and path.split("/")[0] in unfreeze:
      rules[path] = {}
    else:
      rules[path] = match[0]
  if unmatched:
    raise ValueError(f"config.schedule: no regex matches {len(unmatched)} parameters: "
                     f"{unmatched}. Add a rule (None = frozen) that covers them.")
  return rules


def trainable_paths(rules: Mapping[str, Any]) -> set[str]:
  return {path for path, rule in rules.items() if rule is not None}


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                  decay_type: str = "constant", end_lr_frac: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then constant or cosine down to end_lr_frac * lr."""
  if decay_type == "constant":
    main = optax.constant_schedule(lr)
  elif decay_type == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1), end_lr_frac)
  else:
    raise ValueError(f"lr_schedule.decay_type={decay_type!r}; expected 'constant' or 'cosine'.")
  if not warmup_steps:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def make_optimizer(config, rules: Mapping[str, Any]) -> tuple[optax.GradientTransformation,
                                                               dict[str, optax.Schedule]]:
  """The optax chain over the trainable subtree, and each group's lr schedule by group name."""
  trainable = sorted(trainable_paths(rules))
  groups = {}  # repr(rule) -> group name; equal rules share one group.
  schedules = {}
  labels = {}
  for path in trainable:
    key = repr(sorted(dict(rules[path]).items()))
    if key not in groups:
      groups[key] = f"group{len(groups)}"
      kw = {**dict(config.lr_schedule), **dict(rules[path])}
      schedules[groups[key]] = make_schedule(kw.pop("lr", config.lr), config.total_steps, **kw)
    labels[path] = groups[key]
  labels = state_lib.unflat(labels)
  no_decay = re.compile(config.optim.no_decay) if config.optim.no_decay else None
  decay_mask = state_lib.unflat(
      {p: not (no_decay and no_decay.search(p)) for p in trainable})

  o = config.optim
  agc = optax.identity()
  if o.agc:  # Adaptive gradient clipping of the parameters matching optim.agc_params ('' = all).
    agc_params = re.compile(o.get("agc_params", ""))
    agc = optax.masked(optax.adaptive_grad_clip(o.agc),
                       state_lib.unflat({p: bool(agc_params.search(p)) for p in trainable}))
  tx = optax.chain(
      agc,
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
      optax.add_decayed_weights(o.weight_decay, decay_mask),
      optax.multi_transform(
          {name: optax.scale_by_learning_rate(s) for name, s in schedules.items()}, labels),
  )
  return tx, schedules
