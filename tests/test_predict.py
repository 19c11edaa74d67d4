"""predict.py: `flamingo_jax.load(workdir)` and its CLI on a tiny model trained for two steps."""
import json
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import flamingo_jax
from flamingo_jax import predict
from flamingo_jax.configs import tiny
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import decode
from flamingo_jax.eval import fewshot
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer
import train_helpers as helpers

WORDS = ("cat", "dog", "red", "blue", "a", "the", "on", "mat", "square", "circle", "green")
PROMPT = "<image>Output:"
STEPS = 6  # max_new_tokens throughout: one compile per batch shape and method.


def _train(workdir: str, tokenizer: str) -> None:
  """The tiny config with a tokenizer of its vocabulary (64 + <image>, <EOC>), two steps (in this
  process: a subprocess would import JAX again for the same compile)."""
  config = tiny.get_config()
  config.update(dict(total_steps=2, ckpt_every=2, log_every=1))
  config.lr_schedule.warmup_steps = 1
  config.input.tokenizer = tokenizer
  trainer.train(config, workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, compilation cache, image paths {name: path}) of the trained tiny model."""
  cache = helpers.compilation_cache(tmp_path_factory)
  base = tmp_path_factory.mktemp("predict")
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, 8)) + "." for _ in range(300)]
  tokenizer_lib.train_sentencepiece(texts + fewshot.template_corpus(), 64,
                                    str(base / "tok.model"))
  _train(str(base / "wd"), str(base / "tok.model"))
  files = {"a.png": (40, 30), "b.jpg": (20, 50), "c.png": (32, 32)}
  for name, shape in files.items():
    Image.fromarray(rng.integers(0, 256, (*shape, 3), np.uint8)).save(base / name)
  return base / "wd", cache, {name: str(base / name) for name in files}


@pytest.fixture(scope="module")
def model(trained):
  return flamingo_jax.load(str(trained[0]))


def cli(trained, *args: str, module: str = "flamingo_jax.predict") -> dict:
  """The CLI's --json output."""
  workdir, cache, _ = trained
  command = ([sys.executable, "-m", module] if module else
             [sys.executable, str(helpers.ROOT / "launch.py"), "--mode=predict"])
  result = subprocess.run([*command, f"--workdir={workdir}", "--json", *args],
                          env=helpers.env(cache), capture_output=True, text=True, timeout=600,
                          cwd=helpers.ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # A process that loads the model and compiles: about a minute each.
@pytest.mark.parametrize("method, flags, kwargs", [
    ("greedy", ["--repetition_penalty=1.5", "--no_repeat_ngram_size=2"],
     dict(repetition_penalty=1.5, no_repeat_ngram_size=2)),
    ("beam", ["--beam_size=2"], dict(beam_size=2)),
    ("sample", ["--temperature=0.7", "--top_k=20", "--top_p=0.9", "--seed=3"],
     dict(temperature=0.7, top_k=20, top_p=0.9, seed=3)),
])
def test_cli_equals_python(trained, model, method, flags, kwargs):
  images = trained[2]
  out = cli(trained, f"--prompt={PROMPT} the", f"--image={images['a.png']}", f"--method={method}",
            f"--max_new_tokens={STEPS}", *flags)
  want = model.generate([images["a.png"]], PROMPT + " the", method=method, max_new_tokens=STEPS,
                        **kwargs)
  assert out["text"] == want
  assert out["images"] == [images["a.png"]]


@pytest.mark.slow
def test_launch_predict_with_examples_and_scores(trained, model, tmp_path):
  """launch.py --mode=predict is the same CLI; --examples go first as <image>text<EOC>."""
  images = trained[2]
  shots = tmp_path / "shots.jsonl"
  shots.write_text(json.dumps({"image": images["b.jpg"], "text": "Output: a red cat"}) + "\n")
  out = cli(trained, f"--prompt={PROMPT}", f"--image={images['a.png']}", f"--examples={shots}",
            f"--max_new_tokens={STEPS}", module="")
  prompt = "<image>Output: a red cat<EOC>" + PROMPT
  assert out["prompt"] == prompt
  assert out["text"] == model.generate([images["b.jpg"], images["a.png"]], prompt,
                                       max_new_tokens=STEPS)
  scores = cli(trained, f"--prompt={PROMPT}", f"--image={images['a.png']}", "--candidate=a cat",
               "--candidate=the dog", module="")["scores"]
  want = model.score([images["a.png"]], PROMPT, ["a cat", "the dog"])
  np.testing.assert_allclose(list(scores.values()), want, rtol=1e-5)


def test_left_padded_batch_equals_each_alone(trained, model):
  images = trained[2]
  prompts = [PROMPT, "<image>Output: a red cat<EOC><image>Output: the"]
  media = [[images["a.png"]], [images["b.jpg"], images["c.png"]]]
  batch = model.generate(media, prompts, max_new_tokens=STEPS)
  alone = [model.generate(m, p, max_new_tokens=STEPS) for m, p in zip(media, prompts)]
  assert batch == alone
  assert batch[0] != batch[1]


def test_images_as_files_pil_or_arrays_are_the_same(trained, model):
  path = trained[2]["a.png"]
  with Image.open(path) as img:
    pil, array = img.copy(), np.asarray(img)
  outs = {model.generate([x], PROMPT, max_new_tokens=STEPS) for x in (path, pil, array)}
  assert len(outs) == 1


def test_sampling_top_k_one_is_greedy_and_a_seed_fixes_it(trained, model):
  image = [trained[2]["c.png"]]
  greedy = model.generate(image, PROMPT, max_new_tokens=STEPS)
  assert model.generate(image, PROMPT, method="sample", top_k=1, seed=5,
                        max_new_tokens=STEPS) == greedy
  hot = lambda seed: model.generate(image, PROMPT, method="sample", temperature=3.0, seed=seed,
                                    max_new_tokens=STEPS)
  assert hot(1) == hot(1)
  assert len({hot(s) for s in range(4)}) > 1  # Near-uniform at temperature 3: seeds differ.


def test_score_equals_fewshot_score_choices(trained, model):
  """The query-only prompt of score_choices is <BOS><image>: the same tokens, the same scores."""
  image = trained[2]["a.png"]
  choices = ["Output: a cat", "Output: the dog on the mat", "red"]
  scores = model.score([image], "<image>", choices)
  pixels = pp.build(pp.image_spec(model.config))({"image": image})["image"]
  visual = decode.visual_tokens(model.module, model.params, pixels[None, None, None])[0]
  want = fewshot.score_choices(model.module, model.params, model.tokenizer, [], visual[:0],
                               visual, choices, "{}")[0]
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  assert np.argmax(scores) == np.argmax(want)
  assert len(set(scores)) == len(choices)


def test_converted_directory_loads_from_init_from_and_backbones(trained, model, tmp_path):
  """config.json + params checkpoints (no training checkpoints): the same model."""
  workdir = trained[0]
  trainable = helpers.final_state(workdir, step=2)["params"]
  frozen = {p: np.asarray(x) for p, x in state_lib.flat(model.params).items()
            if p not in state_lib.flat(trainable)}
  ckpt_lib.save_params(str(tmp_path / "params"), trainable)
  for part in ("lm", "vision"):
    ckpt_lib.save_params(str(tmp_path / part), state_lib.unflat(
        {p: x for p, x in frozen.items() if p.startswith(part + "/")}))
  config = json.loads((workdir / "config.json").read_text())
  config.update(init_from=str(tmp_path / "params"), lm_init=str(tmp_path / "lm"),
                vision_init=str(tmp_path / "vision"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  converted = flamingo_jax.load(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, converted.params, model.params)


@pytest.fixture
def no_compute(monkeypatch):
  """Fails a test that reaches the model: bad input must be refused before."""
  def computed(*args, **kwargs):
    raise AssertionError("the model ran")
  monkeypatch.setattr(decode, "visual_tokens", computed)


@pytest.mark.parametrize("images, prompt, kwargs, error, message", [
    (["missing.png"], PROMPT, {}, FileNotFoundError, "missing.png"),
    (["garbage.png"], PROMPT, {}, ValueError, r"garbage.png.*not an image"),
    (["a.png"], PROMPT * 2, {}, ValueError, "2 <image> tags but 1 images"),
    (["a.png", "a.png"], PROMPT, {}, ValueError, "1 <image> tags but 2 images"),
    ("a.png", PROMPT, {}, TypeError, "list of images"),
    ([np.zeros((4, 4), np.uint8)], PROMPT, {}, ValueError, r"images\[0\]\[0\].*\[H, W, 3\]"),
    (["a.png"], PROMPT, dict(method="nucleus"), ValueError, "method='nucleus'"),
    (["a.png"], PROMPT, dict(method="beam", repetition_penalty=1.2), ValueError, "beam"),
    (["a.png"], PROMPT, dict(temperature=0.5), ValueError, "sampling only"),
    (["a.png"], PROMPT, dict(method="sample", top_p=0.0), ValueError, "top_p=0.0"),
    (["a.png"], PROMPT, dict(max_new_tokens=500), ValueError, "max_len"),
    (["a.png"], "", {}, ValueError, "non-empty string"),
])
def test_bad_input_is_named_before_compute(trained, model, no_compute, tmp_path, images, prompt,
                                           kwargs, error, message):
  (tmp_path / "garbage.png").write_bytes(b"not a png")
  where = {name: str(tmp_path / name) for name in ("missing.png", "garbage.png")} | trained[2]
  images = (where[images] if isinstance(images, str) else
            [where[x] if isinstance(x, str) else x for x in images])
  with pytest.raises(error, match=message):
    model.generate(images, prompt, **kwargs)


def test_bad_batch_and_candidates_are_named_before_compute(trained, model, no_compute):
  image = trained[2]["a.png"]
  with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
    model.generate([[image]], [PROMPT, PROMPT])
  with pytest.raises(ValueError, match="candidates"):
    model.score([image], PROMPT, "a cat")
  with pytest.raises(ValueError, match="candidates"):
    model.score([image], PROMPT, ["a cat", ""])


def test_bad_directories_and_configs_are_named(trained, tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json is missing"):
    flamingo_jax.load(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is not a readable config"):
    flamingo_jax.load(str(tmp_path))
  workdir = trained[0]
  config = predict.read_config(str(workdir))
  with config.unlocked():
    config.input.tokenizer = ""
  with pytest.raises(ValueError, match="names no tokenizer"):
    flamingo_jax.load(str(workdir), config)
  config = predict.read_config(str(workdir))
  config.model.resampler.ffw_mult = 4  # Another config: its checkpoints do not fit.
  with pytest.raises(ckpt_lib.ShapeMismatchError, match=r"checkpoints/2/state.*another config"):
    flamingo_jax.load(str(workdir), config)


def test_examples_file_lines_are_checked(tmp_path):
  path = tmp_path / "shots.jsonl"
  path.write_text('{"image": "x.png", "text": "Output: a cat"}\n\n{"text": "no image"}\n')
  with pytest.raises(ValueError, match=r"shots.jsonl line 3.*'image'"):
    predict._examples(str(path))
  path.write_text('{"image": "x.png", "text": "Output: a cat"}\n')
  assert predict._examples(str(path)) == ([str(tmp_path / "x.png")], "<image>Output: a cat<EOC>")


def test_image_pp_takes_the_configs_own_ops(trained):
  config = predict.read_config(str(trained[0]))
  assert pp.image_spec(config) == "decode|resize_pad(32)|value_range(-1, 1)"  # Synthetic.
  with config.unlocked():
    config.input.datasets.pairs.pp = ("decode|flip|resize_pad(48, method='bicubic')|"
                                      "value_range(0, 1)|tokenize_pair(max_len=32)")
  assert pp.image_spec(config) == ("decode|resize_pad(48, method='bicubic')|"
                                   "value_range(0, 1)")
  with config.unlocked():  # A converted ViT's: crop and normalise (configs/converted.py).
    config.eval = {"pp": "decode|resize_crop(224)|normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))"}
  assert pp.image_spec(config) == config.eval.pp
