"""Few-shot prompting: prompt structure, RICES ordering, log-likelihood ranking, open-ended
tasks."""
import numpy as np
import pytest

from flamingo_jax.eval import decode
from flamingo_jax.eval import fewshot
from flamingo_jax.eval import metrics
from tests.test_decode import V, char_tokenizer, logprobs, tiny_setup

BOS, IMG, EOC = 1, V, V + 1


def test_prompt_structure_zero_and_two_shot():
  tok = char_tokenizer()
  enc = tok.encode
  zero = fewshot.build_prompt(tok, ["ab", "c"], "q:", shot_images=False)
  assert zero == [BOS, *enc("ab"), EOC, *enc("c"), EOC, IMG, *enc("q:")]  # Text-only shots.
  two = fewshot.build_prompt(tok, ["ab", "c"], "q:")
  assert two == [BOS, IMG, *enc("ab"), EOC, IMG, *enc("c"), EOC, IMG, *enc("q:")]
  _, media_idx, _ = decode.left_pad([zero, two], tok.pad_id, IMG)
  np.testing.assert_array_equal(media_idx[0, -len(zero):], [0] * 6 + [1] * 3)
  np.testing.assert_array_equal(media_idx[1], [0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3])


def test_prompt_ids_read_tags_as_build_prompt_places_them():
  tok = char_tokenizer()
  shot, query = "Question: a Short answer: b", "Question: c Short answer:"
  assert (fewshot.prompt_ids(tok, f"<image>{shot}<EOC><image>{query}")
          == fewshot.build_prompt(tok, [shot], query))
  enc = tok.encode
  assert fewshot.prompt_ids(tok, "ab<|endofchunk|>\n<image>") == [BOS, *enc("ab"), EOC,
                                                                    *enc("\n"), IMG]


def test_rices_puts_the_most_similar_last():
  support = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
  query = np.array([[2.0, 0.1], [-0.1, -1.0]])
  np.testing.assert_array_equal(fewshot.rices_support(support, query, 3), [[1, 2, 0], [2, 0, 3]])
  # Random selection: distinct indices per query.
  chosen = fewshot.random_support(np.random.default_rng(0), 5, 4, 3)
  assert chosen.shape == (4, 3) and all(len(set(row)) == 3 for row in chosen)


def test_choice_scores_are_sums_of_full_forward_logprobs():
  model, params = tiny_setup()
  k = 2
  tok = char_tokenizer()
  rng = np.random.default_rng(1)
  images = rng.normal(size=(k + 2, 32, 32, 3)).astype(np.float32)  # k supports, 2 queries.
  visual = decode.visual_tokens(model, params, images[None, :, None])[0]
  shots = ["This is a dax.", "This is a blick."]
  choices = ["dax", "blick", "zup"]
  template = "This is a {}."
  scores = fewshot.score_choices(model, params, tok, shots, visual[:k], visual[k:], choices,
                                 template)
  prompt = fewshot.build_prompt(tok, shots, "", shot_images=k > 0)
  conts = [tok.encode(template.format(c)) + [EOC] for c in choices]
  for q in range(2):
    media = np.repeat(images[np.r_[np.arange(k), k + q]][None, :, None], len(choices), 0)
    logp = logprobs(params, media, [prompt + c for c in conts], width=64)
    for c, cont in enumerate(conts):
      want = sum(float(logp[c, len(prompt) + i - 1, t]) for i, t in enumerate(cont))
      np.testing.assert_allclose(scores[q, c], want, rtol=1e-4)


def test_continuation_scores_per_prompt_equal_shared_shot_scores():
  model, params = tiny_setup()
  tok = char_tokenizer()
  images = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
  visual = decode.visual_tokens(model, params, images[None, :, None])[0]
  shots, choices, template = ["This is a dax.", "A blick."], ["dax", "blick"], "This is a {}."
  want = fewshot.score_choices(model, params, tok, shots, visual[:2], visual[2:], choices,
                               template)
  prompt = fewshot.build_prompt(tok, shots, "")
  conts = [tok.encode(template.format(c)) + [EOC] for c in choices]
  media = np.stack([images[[0, 1, q]] for q in (2, 3)])[:, :, None]  # [2, 3, 1, H, W, 3]
  got = fewshot.score_continuations(model, params, tok, [prompt, prompt], media, conts)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  mean = fewshot.score_continuations(model, params, tok, [prompt, prompt], media, conts, True)
  np.testing.assert_allclose(mean, want / np.array([len(c) for c in conts]), rtol=1e-4)


def synthetic_data(rng, n):
  image = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  return [{"image": image(), "captions": [b"a red circle", b"a circle"], "question": b"what?",
           "answers": [b"red"]} for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("task,metric", [("captioning", "cider"), ("vqa", "vqa_accuracy")])
def test_open_ended_tasks_report_each_k(task, metric):
  model, params = tiny_setup()
  rng = np.random.default_rng(0)
  data = {"train": synthetic_data(rng, 5), "test": synthetic_data(rng, 3)}
  out = fewshot.evaluate_open_ended(task, model, params, char_tokenizer(), data, shots=(0, 2),
                                    selection="rices", beam_size=1, max_new_tokens=3)
  assert set(out) == {f"{metric}/0shot", f"{metric}/2shot"}
  assert all(np.isfinite(v) and v >= 0 for v in out.values())


@pytest.mark.parametrize("generated,answers,want", [
    ("red. Question: what", ["red"], 1.0),  # One reference: exact match after clean-up.
    ("Red", ["red"], 1.0),
    ("blue", ["red"], 0.0),
    ("2", ["2"] * 10, 1.0),  # Ten annotators: the official formula.
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
])
def test_vqa_score_gives_single_answer_questions_exact_match(generated, answers, want):
  assert fewshot.vqa_score(metrics.postprocess_vqa(generated), answers) == pytest.approx(want)
