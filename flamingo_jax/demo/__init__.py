"""The demo: the project's main job end to end on embedded, locally generated data (README).

  python -m flamingo_jax.demo --workdir=workdir [--short]     (scripts/demo.sh runs this)

Everything the demo needs lives here, and the core (models, data, train, eval, convert) imports
none of it. Its configs list this package in `config.modules`; importing it registers the shapes
TFDS builders (datasets/), the pp ops `name_episode` and `copy_tokens` (pp_ops.py) and the few-shot
tasks `names`, `vqa` and `captioning` on shapes_fewshot (tasks.py). run.py runs the stages and
report.py writes workdir/report.md.
"""
from flamingo_jax.demo import datasets  # noqa: F401  (registers the TFDS builders)
from flamingo_jax.demo import features  # noqa: F401  (registers the pp op visual_features)
from flamingo_jax.demo import pp_ops  # noqa: F401  (registers the pp ops)
from flamingo_jax.demo import tasks  # noqa: F401  (registers the eval tasks)
