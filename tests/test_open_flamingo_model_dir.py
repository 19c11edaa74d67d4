"""An OpenFlamingo release end to end: `convert openflamingo` writes a model directory from its
checkpoint, HF LM and OpenCLIP ViT; predict on PNG files gives OpenFlamingo's own greedy
`generate` token for token (raw images through both ViTs), the eval protocol gives OpenFlamingo's
evaluate.py predictions on the same shots, and fine-tuning starts from it."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import safetensors.numpy
import tokenizers
from tokenizers import models, pre_tokenizers
import torch

from flamingo_jax.configs import converted
from flamingo_jax.convert import model_dir
from flamingo_jax.convert import open_flamingo
from tests.test_open_flamingo_parity import build_open_flamingo
from tests.peers import state_of

pytestmark = [pytest.mark.parity, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(64)]  # The tiny LM's 64 ids; OpenFlamingo adds 64 and 65.
PROMPT = "<image>w3 w4 w5<|endofchunk|><image>w6"


def _tokenizer(directory):
  """A word-level tokenizer.json for the tiny LM (BOS w1, EOS w2, pad w0, as LLaMA's ids; BOS
  starts every sequence, as LLaMA's add_bos_token says)."""
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "w1", "eos_token": "w2", "pad_token": "w0", "add_bos_token": True}))


def _run(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(OpenFlamingo model, directory with checkpoint.pt, lm/, the ViT's weights and model JSON,
  two PNG files)."""
  tmp = tmp_path_factory.mktemp("release")
  theirs = build_open_flamingo(tmp)
  _tokenizer(tmp / "lm")
  torch.save(theirs.state_dict(), tmp / "checkpoint.pt")
  safetensors.numpy.save_file(state_of(theirs.vision_encoder), str(tmp / "vit.safetensors"))
  (tmp / "vit.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": dict(
      layers=1, width=32, head_width=16, patch_size=8, image_size=16)}))
  rng = np.random.default_rng(0)
  for name, hw in (("a.png", (20, 27)), ("b.png", (31, 18))):  # Resized and cropped to 16².
    Image.fromarray(rng.integers(0, 256, (*hw, 3), np.uint8)).save(tmp / name)
  return theirs, tmp


@pytest.fixture(scope="module")
def converted_dir(release):
  _, tmp = release
  out = tmp / "converted"
  stdout = _run("-m", "flamingo_jax.convert", "openflamingo", f"--checkpoint={tmp}/checkpoint.pt",
                f"--lm={tmp}/lm", f"--vision=open_clip:{tmp}/vit.json:{tmp}/vit.safetensors",
                f"--out={out}", "--resampler_heads=8", "--xattn_heads=8")
  assert str(out) in stdout
  return out


def _their_greedy(theirs, tmp, ids, max_new_tokens):
  """OpenFlamingo's generate on the PNGs, preprocessed by OpenCLIP's own transform."""
  import open_clip  # pylint: disable=g-import-not-at-top  (tests/conftest.py patched torchvision)
  transform = open_clip.image_transform(16, is_train=False)
  vision_x = torch.stack([transform(Image.open(tmp / n)) for n in ("a.png", "b.png")])
  vision_x = vision_x[None, :, None]  # [B, N, F, C, H, W]
  with torch.no_grad():
    out = theirs.generate(vision_x, torch.tensor([ids]), max_new_tokens=max_new_tokens,
                          num_beams=1, eos_token_id=[64, 2], pad_token_id=0)
  return out[0, len(ids):].tolist()


def test_predict_on_pngs_equals_open_flamingo_generate(release, converted_dir):
  import flamingo_jax  # pylint: disable=g-import-not-at-top
  theirs, tmp = release
  model = flamingo_jax.load(str(converted_dir))
  tok = model.tokenizer
  assert (tok.eoc_id, tok.image_id, tok.eoc_token) == (64, 65, "<|endofchunk|>")
  ids = model.prompt_ids(PROMPT)
  assert ids == [1, 65, 3, 4, 5, 64, 65, 6]  # BOS, then OpenFlamingo's ids for the same text.
  images = [str(tmp / "a.png"), str(tmp / "b.png")]
  theirs_new = _their_greedy(theirs, tmp, ids, max_new_tokens=8)
  stop = next((i for i, t in enumerate(theirs_new) if t in (64, 2)), len(theirs_new))
  expected = tok.decode(theirs_new[:stop])
  assert model.generate(images, PROMPT, max_new_tokens=8) == expected
  printed = _run("launch.py", "--mode=predict", f"--workdir={converted_dir}", "--json",
                 f"--prompt={PROMPT}", f"--image={images[0]}", f"--image={images[1]}",
                 "--max_new_tokens=8")
  assert json.loads(printed)["text"] == expected


def test_eval_runs_a_benchmark_from_the_directory(converted_dir, tmp_path):
  """--mode=eval of a converted directory on a benchmark's files, OpenFlamingo's prompts, RICES;
  results beside the run, not in the model directory."""
  from tests import benchmark_fixtures  # pylint: disable=g-import-not-at-top
  benchmark_fixtures.write("vqav2", tmp_path / "vqav2", np.random.default_rng(0), num_per_split=3)
  printed = _run("launch.py", "--mode=eval", f"--workdir={tmp_path / 'run'}",
                 f"--config={ROOT}/flamingo_jax/configs/converted.py:dir={converted_dir}",
                 f"--benchmark=vqav2:{tmp_path / 'vqav2'}", "--shots=0,2", "--num_queries=2",
                 "--selection=rices", "--prompts=openflamingo")
  results = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert set(results["vqav2"]) == {"vqa_accuracy/0shot", "vqa_accuracy/2shot"}
  assert json.loads(printed[printed.index("{"):]) == results
  assert not (converted_dir / "eval.json").exists()


def test_converted_config_fine_tunes_from_the_directory(converted_dir, tmp_path):
  """configs/converted.py: frozen ViT and LM from the directory, the trained parts from its init
  (with lr 0 they end as they started)."""
  from flamingo_jax.configs import tiny  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from tests import train_helpers  # pylint: disable=g-import-not-at-top
  config = converted.get_config(f"dir={converted_dir}")
  assert config.init_from == os.path.join(converted_dir, model_dir.INIT)
  assert "decode|resize_crop(16)|normalize(" in config.input.datasets.m3w.pp
  config.input = tiny.get_config().input
  config.total_steps, config.ckpt_every, config.log_every, config.lr = 2, 2, 1, 0.0
  trainer.train(config, str(tmp_path / "ft"))
  assert [m["step"] for m in train_helpers.metrics(tmp_path / "ft")] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in train_helpers.metrics(tmp_path / "ft"))
  trained = train_helpers.final_state(tmp_path / "ft", step=2)["params"]
  init = train_helpers.as_numpy(config.init_from)
  for path, value in _flat(init).items():
    np.testing.assert_array_equal(_flat(trained)[path], value, err_msg=path)


def _flat(tree):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(tree, sep="/")


def test_a_vision_encoder_other_than_the_checkpoints_is_refused(release, tmp_path):
  theirs, tmp = release
  other = {k: v + 1 for k, v in state_of(theirs.vision_encoder).items()}
  safetensors.numpy.save_file(other, str(tmp_path / "other.safetensors"))
  with pytest.raises(ValueError, match="holds a vision encoder that differs from --vision"):
    open_flamingo.write_model_dir(
        str(tmp_path / "out"), str(tmp / "checkpoint.pt"), str(tmp / "lm"),
        f"open_clip:{tmp}/vit.json:{tmp_path}/other.safetensors", resampler_heads=8,
        xattn_heads=8)
  assert not (tmp_path / "out").exists()


def test_export_gives_back_the_release(release, converted_dir, tmp_path):
  """export openflamingo: a fresh OpenFlamingo loads it strictly and computes the release's
  logits; export hf: the LM's weights as they came, the new-token rows appended."""
  from tests.test_open_flamingo_parity import inputs  # pylint: disable=g-import-not-at-top
  theirs, tmp = release
  _run("-m", "flamingo_jax.export", "openflamingo", f"--workdir={converted_dir}",
       "--lm_type=llama", f"--out={tmp_path}/back.pt")
  fresh = build_open_flamingo(tmp_path, seed=1)
  saved = torch.load(tmp_path / "back.pt", weights_only=True)["model_state_dict"]
  fresh.load_state_dict(saved, strict=True)
  images, tokens = inputs()
  with torch.no_grad():
    np.testing.assert_allclose(fresh(images, tokens).logits.numpy(),
                               theirs(images, tokens).logits.numpy(), rtol=1e-5, atol=1e-5)
  _run("-m", "flamingo_jax.export", "hf", f"--workdir={converted_dir}", "--lm_type=llama",
       f"--out={tmp_path}/hf")
  exported = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
  original = safetensors.numpy.load_file(str(tmp / "lm" / "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key][:len(value)], value, err_msg=key)
  assert exported["model.embed_tokens.weight"].shape == (66, 32)


# OpenFlamingo's evaluate.py on the same shots: its prompts (its get_*_prompt joined with "\n",
# tags dropped at 0 shots), its tokenizer (factory.py's AutoTokenizer with its two tokens added;
# left padding, as its eval model), OpenCLIP's transform, generate as its eval model calls it (no
# eos_token_id: <|endofchunk|> alone stops), the new tokens decoded without specials and
# post-processed as evaluate.py. Not exercised: stopping. The random LM emits neither
# <|endofchunk|> nor its EOS here; OpenFlamingo stops at <|endofchunk|> alone (Flamingo.generate's
# eos_token_id), decode.generate at the EOS too, so a real LM's EOS before <|endofchunk|> would
# end our answer where OpenFlamingo's goes on (its EOS then dropped by skip_special_tokens).
OF_EVAL = {"vqav2": ("vqa_metric", "postprocess_vqa_generation"),
           "coco": ("coco_metric", "postprocess_captioning_generation")}


def _of_postprocess(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import open_flamingo  # pylint: disable=g-import-not-at-top
  module, fn = OF_EVAL[name]
  path = os.path.join(os.path.dirname(open_flamingo.__file__), "eval", f"{module}.py")
  spec = importlib.util.spec_from_file_location(f"of_{module}", path)
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  return getattr(loaded, fn)


def _of_tokenizer(lm_dir):
  """factory.py's tokenizer; unk named as the tiny tokenizer.json's (LLaMA's has its own <unk>:
  LlamaTokenizerFast would otherwise add one at id 64)."""
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(str(lm_dir), unk_token="w0")
  tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  tok.padding_side = "left"
  return tok


def _of_text(name, shots, query, k):
  from tests.test_protocol import OpenFlamingoPrompts  # pylint: disable=g-import-not-at-top
  of = OpenFlamingoPrompts()
  if name == "vqav2":
    shot = lambda ex: of.get_vqa_prompt(question=ex.question, answer=ex.answers[0])
    query_text = of.get_vqa_prompt(question=query.question)
  else:
    shot = lambda ex: of.get_caption_prompt(caption=ex.captions[0].strip())
    query_text = of.get_caption_prompt()
  context = "".join(shot(ex) + "\n" for ex in shots)
  return (context.replace("<image>", "") if k == 0 else context) + query_text


def _of_predictions(theirs, tok, name, rows, support, queries, k, beam_size, max_new_tokens):
  import open_clip  # pylint: disable=g-import-not-at-top
  transform = open_clip.image_transform(16, is_train=False)
  texts, images = [], []
  for row in rows:
    shots = [support[i] for i in row["shots"]]
    texts.append(_of_text(name, shots, queries[row["id"]], k))
    paths = [ex.media[0] for ex in shots[:k]] + [queries[row["id"]].media[0]]
    images.append(torch.stack([transform(Image.open(p)) for p in paths])[:, None])
  enc = tok(texts, padding="longest", return_tensors="pt")
  with torch.no_grad():
    out = theirs.generate(torch.stack(images), enc["input_ids"], enc["attention_mask"],
                          min_new_tokens=0, max_new_tokens=max_new_tokens, num_beams=beam_size,
                          length_penalty=0.0)
  decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
  postprocess = _of_postprocess(name)
  predictions = [postprocess(t).replace('"', "") if name == "coco" else postprocess(t)
                 for t in decoded]
  ids = [[i for i, m in zip(row, mask) if m] for row, mask in zip(enc["input_ids"].tolist(),
                                                                  enc["attention_mask"].tolist())]
  return texts, ids, predictions


@pytest.mark.parametrize("beam_size", [1, 3])
def test_eval_predictions_equal_open_flamingo_evaluate(release, converted_dir, tmp_path,
                                                       monkeypatch, beam_size):
  """Our protocol (openflamingo prompts, random shots) and OpenFlamingo's evaluate.py on the
  shots our predictions file names: the same prompts and predictions, query by query."""
  from flamingo_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  from flamingo_jax.eval import fewshot  # pylint: disable=g-import-not-at-top
  from flamingo_jax.eval import protocol  # pylint: disable=g-import-not-at-top
  from tests import benchmark_fixtures  # pylint: disable=g-import-not-at-top
  theirs, tmp = release
  # Words the LM knows; none starts with w0, w1 or w2, which HF's tokenizer splits off any word
  # as its special tokens.
  monkeypatch.setattr(benchmark_fixtures, "_WORDS", tuple(WORDS[30:40]))
  specs = []
  for i, name in enumerate(OF_EVAL):
    benchmark_fixtures.write(name, tmp_path / name, np.random.default_rng(i), num_per_split=4)
    specs.append(f"{name}:{tmp_path / name}")
  config = evaluate.configure(converted.get_config(f"dir={converted_dir}"), specs, shots=(0, 2),
                              seeds=(0,), selection="random", prompts="openflamingo",
                              beam_size=beam_size)
  evaluate.evaluate(config, str(tmp_path / "run"))
  tok, ours = _of_tokenizer(tmp / "lm"), tokenizer_lib.load_tokenizer(config.input.tokenizer)
  assert tok.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]) == [64, 65]
  compared = []
  for name in OF_EVAL:
    settings = protocol.settings(config.evals[name], name)
    support, queries = ({ex.id: ex for ex in split} for split in protocol.data(settings, name))
    for k in (0, 2):
      path = tmp_path / "run" / "eval_predictions" / name / f"{name}_{k}shot_seed0.json"
      saved = json.loads(path.read_text())["predictions"]
      texts, ids, predictions = _of_predictions(theirs, tok, name, saved, support, queries, k,
                                                beam_size, settings.max_new_tokens)
      assert [r["prompt"] for r in saved] == texts
      assert [fewshot.prompt_ids(ours, t) for t in texts] == ids
      assert [r["prediction"] for r in saved] == predictions, (name, k)
      compared += predictions
  assert len(compared) == 16 and len(set(compared)) > 2  # Answers that depend on the inputs.

