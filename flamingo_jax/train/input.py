"""The trainer's input: the TFDS mixture (flamingo_jax/data/mixture.py) or seeded synthetic batches.

Both are iterators of `{dataset_name: batch}` with `weights` (λ per dataset), a JSON state
(`get_state`/`set_state`) and `close()` (stops the mixture's workers). Synthetic batches
(`config.input.kind='synthetic'`) need no tokenizer or data: tests and smoke runs of configs whose
vocabulary matches no tokenizer use them.
"""
import zlib

import jax
import numpy as np

from flamingo_jax.data import mixture as mixture_lib
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import sharding as sharding_lib

# Per synthetic dataset: batch_size (global), weight, num_media, num_frames, seq_len.
SYNTHETIC_FIELDS = {"batch_size", "weight", "num_media", "num_frames", "seq_len"}


def synthetic_batch(rng: np.random.Generator, *, batch_size: int, num_media: int, num_frames: int,
                    seq_len: int, image_size: int, vocab_size: int) -> dict[str, np.ndarray]:
  """Random tokens with an `<image>` (id vocab_size) opening each of num_media equal chunks."""
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len), dtype=np.int32)
  starts = np.arange(num_media) * (seq_len // num_media)
  tokens[:, starts] = vocab_size
  media_idx = np.broadcast_to(np.cumsum(np.isin(np.arange(seq_len), starts)), tokens.shape)
  return dict(
      images=rng.normal(size=(batch_size, num_media, num_frames, image_size, image_size, 3)
                        ).astype(np.float32),
      tokens=tokens, media_idx=media_idx.astype(np.int32),
      loss_mask=(tokens != vocab_size).astype(np.float32),
      media_mask=np.ones((batch_size, num_media), bool))


class Synthetic:
  """Iterator of `{name: batch}`; batch `step` is a pure function of (seed, name, step)."""

  def __init__(self, datasets, *, seed: int, image_size: int, vocab_size: int, mesh):
    for name, cfg in datasets.items():
      if set(cfg) != SYNTHETIC_FIELDS:
        raise ValueError(f"config.input.datasets.{name}: fields {sorted(cfg)}; expected "
                         f"{sorted(SYNTHETIC_FIELDS)}.")
    self.datasets = {name: dict(cfg) for name, cfg in datasets.items()}
    self.weights = {name: float(cfg["weight"]) for name, cfg in datasets.items()}
    self._seed, self._image_size, self._vocab_size, self._mesh = seed, image_size, vocab_size, mesh
    self._step = 0

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state) -> None:
    self._step = int(state["step"])

  def close(self) -> None:
    """Nothing to stop (the trainer closes either input)."""

  def __iter__(self):
    return self

  def __next__(self):
    batches = {}
    for name, cfg in self.datasets.items():
      rng = np.random.default_rng([self._seed, zlib.crc32(name.encode()), self._step])
      batch = synthetic_batch(rng, batch_size=cfg["batch_size"], num_media=cfg["num_media"],
                              num_frames=cfg["num_frames"], seq_len=cfg["seq_len"],
                              image_size=self._image_size, vocab_size=self._vocab_size)
      per_host = cfg["batch_size"] // jax.process_count()
      host = {k: v[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
              for k, v in batch.items()}
      batches[name] = mixture_lib.to_global(host, self._mesh, sharding_lib.BATCH_AXES)
    self._step += 1
    return batches


def check_batch_sizes(config, mesh) -> None:
  """Every dataset's global batch splits into config.microbatches data-parallel microbatches."""
  dp = sharding_lib.data_parallel_size(mesh)
  for name, cfg in config.input.datasets.items():
    per_microbatch, rest = divmod(cfg.batch_size, config.microbatches)
    if rest or per_microbatch % dp:
      raise ValueError(
          f"config.input.datasets.{name}.batch_size={cfg.batch_size} must split into "
          f"config.microbatches={config.microbatches} microbatches each divisible by the "
          f"data-parallel size {dp} (mesh data x fsdp = {mesh.shape['data']} x "
          f"{mesh.shape['fsdp']}).")


def check_required(config) -> None:
  """A TFDS input names its tokenizer and every dataset (the paper configs leave them '')."""
  missing = [] if config.input.tokenizer else ["config.input.tokenizer"]
  missing += [f"config.input.datasets.{name}.tfds_name"
              for name, cfg in config.input.datasets.items() if not cfg.tfds_name]
  if missing:
    name = next(iter(config.input.datasets))
    raise ValueError(
        f"Required config fields are not set: {', '.join(missing)}. Name the prepared datasets "
        f"and the tokenizer, e.g. --config.input.tokenizer=/data/tokenizer.model "
        f"--config.input.datasets.{name}.tfds_name=my_{name} "
        f"--config.input.datasets.{name}.data_dir=gs://BUCKET/tensorflow_datasets")


def _load_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  try:
    return tokenizer_lib.load_tokenizer(path)
  except Exception as e:  # pylint: disable=broad-except  (sentencepiece and tokenizers differ)
    raise ValueError(f"config.input.tokenizer={path!r} cannot be loaded: {type(e).__name__}: "
                     f"{e}") from e


def embedding_rows(model) -> tuple[str, int, int]:
  """(field, its vocab_size, rows) of config.model's token embedding: an LM's base plus new-token
  rows (a Flamingo's `lm`, or the plain LM itself) or the contrastive text tower's table."""
  if "text" in model:
    return "config.model.text.vocab_size", model["text"]["vocab_size"], model["text"]["vocab_size"]
  field, lm = ("config.model.lm", model["lm"]) if "lm" in model else ("config.model", model)
  lm = lm_lib.make_config(lm)
  return f"{field}.vocab_size", lm.vocab_size, lm.vocab_size + lm.num_new_tokens


def check_vocab(config, tokenizer: tokenizer_lib.Tokenizer) -> None:
  """Every id the tokenizer produces, its added specials included, has an embedding row."""
  field, vocab_size, rows = embedding_rows(config.model)
  if tokenizer.total_vocab_size > rows:
    new = f" + {rows - vocab_size} new-token rows" if rows > vocab_size else ""
    raise ValueError(
        f"config.input.tokenizer={config.input.tokenizer!r} has {tokenizer.vocab_size} tokens + "
        f"{tokenizer.num_new_tokens} added {list(tokenizer.new_tokens)}: ids up to "
        f"{tokenizer.total_vocab_size - 1}, but the model's token embedding has {rows} rows "
        f"({field}={vocab_size}{new}). Use the model's tokenizer or set {field}.")


def make_input(config, mesh):
  """The input named by config.input.kind ('synthetic' | 'tfds'), checked against the mesh.

  config.input.worker_processes > 0 runs the TFDS mixture's pp in that many processes, else in
  config.input.num_workers threads of this one (data/mixture.py).
  """
  if config.input.kind == "tfds":
    check_required(config)
  check_batch_sizes(config, mesh)
  if config.input.kind == "synthetic":
    return Synthetic(config.input.datasets, seed=config.seed, image_size=config.image_size,
                     vocab_size=config.model.lm.vocab_size, mesh=mesh)
  if config.input.kind == "tfds":
    tokenizer = _load_tokenizer(config.input.tokenizer)
    check_vocab(config, tokenizer)
    processes = config.input.get("worker_processes", 0)
    return mixture_lib.make_mixture(
        {name: dict(cfg) for name, cfg in config.input.datasets.items()},
        tokenizer=config.input.tokenizer if processes else tokenizer,  # Workers load the path.
        seed=config.seed, mesh=mesh, batch_axes=sharding_lib.BATCH_AXES,
        num_workers=config.input.get("num_workers", 0), worker_processes=processes,
        modules=config.get("modules", ()))
  raise ValueError(f"config.input.kind={config.input.kind!r}; expected 'synthetic' or 'tfds'.")
