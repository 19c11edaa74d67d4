"""pp ops: parsing, image ops, frame sampling and the tokenising ops over the data contract."""
import io

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.configs import common
from flamingo_jax.configs import flamingo_3b
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.models import nfnet
from flamingo_jax.models import vit

CAPTIONS = ["a red circle", "a blue square above a tree", "two green triangles"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "sp.model"
  return tokenizer_lib.train_sentencepiece(CAPTIONS * 10, 48, str(path))


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_parse_and_unknown_op():
  with pytest.raises(ValueError, match=r"unknown pp op 'resize'.*known ops: \[.*'resize_pad'"):
    pp.build("decode|resize(64)")
  with pytest.raises(ValueError, match="not of the form"):
    pp.build("decode|value_range(x)")
  with pytest.raises(ValueError, match="resize_pad.*size"):
    pp.build("resize_pad")  # Missing its argument.
  with pytest.raises(ValueError, match="needs a tokenizer"):
    pp.build("tokenize_pair(max_len=8)")


def test_decode_bytes_paths_and_arrays(tmp_path):
  image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  (tmp_path / "a.png").write_bytes(_png(image))
  fn = pp.build("decode")
  np.testing.assert_array_equal(fn({"image": _png(image)})["image"], image)
  np.testing.assert_array_equal(fn({"image": str(tmp_path / "a.png")})["image"], image)
  out = fn({"images": [_png(image), image], "texts": ["", "", ""]})
  assert out["images"].shape == (2, 4, 6, 3) and out["texts"] == ["", "", ""]
  with pytest.raises(FileNotFoundError, match="'image'.*missing.png"):
    fn({"image": str(tmp_path / "missing.png")})
  with pytest.raises(ValueError, match="not an image"):
    fn({"image": b"not a png"})


def test_wrong_rank_or_dtype():
  with pytest.raises(ValueError, match=r"field 'image' has a frame of shape \(4, 4\).*\[H, W, 3\]"):
    pp.build("resize_pad(8)")({"image": np.zeros([4, 4], np.uint8)})
  with pytest.raises(ValueError, match=r"'images' has shape \(4, 4, 3\); expected \[N, H, W, 3\]"):
    pp.build("resize_pad(8)")({"images": np.zeros([4, 4, 3], np.uint8)})
  with pytest.raises(ValueError, match="value_range: .*'image' has dtype float32; expected uint8"):
    pp.build("value_range(-1, 1)")({"image": np.zeros([4, 4, 3], np.float32)})


def test_resize_pad_keeps_aspect_and_pads_with_the_mean():
  image = np.zeros([20, 10, 3], np.uint8)
  image[..., 0] = 200  # Mean colour (200, 0, 0).
  image[:, :, 2] = np.arange(10, dtype=np.uint8)[None] * 20
  out = pp.build("resize_pad(16)")({"image": image})["image"]
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  mean = np.round(image.reshape(-1, 3).mean(0))
  np.testing.assert_array_equal(out[:, :4], np.broadcast_to(mean, [16, 4, 3]))  # 8 wide, centred.
  np.testing.assert_array_equal(out[:, 12:], np.broadcast_to(mean, [16, 4, 3]))
  assert out[:, 4, 2].max() < out[:, 11, 2].min()  # Content in order, not stretched over padding.
  # A document without images still gets a [0, S, S, 3] field.
  assert pp.build("resize_pad(16)")({"images": []})["images"].shape == (0, 16, 16, 3)


def test_resize_pad_of_a_square_image_is_the_resize_alone():
  image = np.random.default_rng(0).integers(0, 256, [24, 24, 3], dtype=np.uint8)
  for size in (8, 24, 32):
    out = pp.build(f"resize_pad({size})")({"image": image})["image"]
    np.testing.assert_array_equal(
        out, np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)))
    assert out.dtype == np.uint8 and out.flags.writeable


def test_value_range():
  image = np.array([0, 255, 51], np.uint8)[None, None, :]
  out = pp.build("value_range(-1, 1)")({"image": image})["image"]
  np.testing.assert_allclose(out, [[[-1, 1, -0.6]]], atol=1e-6)
  assert out.dtype == np.float32


def test_random_ops_are_seeded_per_example():
  image = np.random.default_rng(0).integers(0, 256, [8, 8, 3], dtype=np.uint8)
  fn = pp.build("flip(0.5)|color_jitter(0.3, 0.3, 0.3)")
  a, b = fn({"image": image, "_rng": _rng(1)}), fn({"image": image, "_rng": _rng(1)})
  np.testing.assert_array_equal(a["image"], b["image"])
  assert "_rng" not in a
  outs = {fn({"image": image, "_rng": _rng(s)})["image"].tobytes() for s in range(8)}
  assert len(outs) == 8
  flipped = pp.build("flip(1.0)")({"video": np.stack([image, image]), "_rng": _rng()})["video"]
  np.testing.assert_array_equal(flipped, np.stack([image[:, ::-1]] * 2))
  with pytest.raises(ValueError, match="'flip' is random and needs example\\['_rng'\\]"):
    pp.build("flip")({"image": image})


def test_sample_frames_at_a_target_rate():
  video = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones([30, 2, 2, 3], np.uint8)
  out = pp.build("sample_frames(4, fps=1)")({"video": video, "fps": 10})["video"]
  np.testing.assert_array_equal(out[:, 0, 0, 0], [0, 10, 20, 29])  # Short: last frame repeats.
  out = pp.build("sample_frames(3, fps=2, random_start=True)")(
      {"video": video, "fps": np.int32(10), "_rng": _rng(3)})["video"]
  np.testing.assert_array_equal(np.diff(out[:, 0, 0, 0]), [5, 5])
  with pytest.raises(ValueError, match="'fps' is 0.0"):
    pp.build("sample_frames(4)")({"video": video, "fps": 0})


def test_tokenize_pair_from_the_contract_and_coco_style(tok):
  image = np.full([12, 8, 3], 100, np.uint8)
  fn = pp.build("decode|resize_pad(16)|value_range(-1, 1)|tokenize_pair(max_len=16)", tok)
  out = fn({"image": _png(image), "caption": b"a red circle", "id": 3})
  assert set(out) == {"images", "tokens", "media_idx", "loss_mask", "media_mask"}
  assert out["images"].shape == (1, 1, 16, 16, 3) and out["images"].dtype == np.float32
  ids = tok.encode("a red circle")
  np.testing.assert_array_equal(
      out["tokens"][:len(ids) + 4], [tok.bos_id, tok.image_id, *ids, tok.eoc_id, tok.eos_id])
  # COCO's features: several captions under 'captions/text'; `choose` picks one per example.
  coco = pp.build("choose('captions/text', 'caption')|tokenize_pair(max_len=16)", tok)
  example = {"image": image, "captions": {"text": np.array(CAPTIONS, object)}}
  picks = {tok.decode(coco({**example, "_rng": _rng(s)})["tokens"], skip_special=True)
           for s in range(20)}
  assert picks == set(CAPTIONS)
  with pytest.raises(TypeError, match="use choose"):
    pp.build("tokenize_pair", tok)({"image": image, "caption": np.array(CAPTIONS)})


def test_tokenize_document(tok):
  images = [np.zeros([10, 20, 3], np.uint8), np.zeros([30, 30, 3], np.uint8)]  # Sizes differ.
  fn = pp.build("resize_pad(8)|value_range|tokenize_document(max_len=24, max_media=3)", tok)
  out = fn({"images": images, "texts": [b"", b"a red circle", b"two green triangles"]})
  assert out["images"].shape == (3, 1, 8, 8, 3)
  np.testing.assert_array_equal(out["media_mask"], [True, True, False])
  assert out["tokens"][1] == tok.image_id and out["media_idx"].max() == 2
  text_only = fn({"images": [], "texts": [b"a red circle"]})
  assert text_only["images"].shape == (3, 1, 8, 8, 3) and not text_only["media_mask"].any()
  with pytest.raises(ValueError, match="different sizes"):
    pp.build("tokenize_document", tok)({"images": images, "texts": ["", "a", "b"]})
  with pytest.raises(ValueError, match="2 media but 2 text chunks"):
    fn({"images": images, "texts": [b"", b"a red circle"]})


def test_tokenize_video(tok):
  video = np.zeros([16, 12, 12, 3], np.uint8)
  fn = pp.build("sample_frames(4, fps=2)|resize_pad(8)|value_range|tokenize_video(max_len=12)", tok)
  out = fn({"video": video, "caption": "a red circle", "fps": 8})
  assert out["images"].shape == (1, 4, 8, 8, 3)
  assert out["tokens"][1] == tok.image_id and out["media_mask"].tolist() == [True]


@pytest.mark.parity
@pytest.mark.parametrize("hw", [(37, 53), (53, 37), (24, 24), (9, 100)])
def test_resize_crop_normalize_equal_open_clip_eval_transform(hw):
  """OpenCLIP's eval preprocessing (what OpenFlamingo feeds its ViT), to float32 rounding."""
  import open_clip  # pylint: disable=g-import-not-at-top
  mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
  image = np.random.default_rng(0).integers(0, 256, (*hw, 3), np.uint8)
  expected = open_clip.image_transform(24, is_train=False, mean=mean, std=std)(
      Image.fromarray(image)).numpy().transpose(1, 2, 0)
  fn = pp.build(f"resize_crop(24)|normalize({tuple(mean)}, {tuple(std)})")
  np.testing.assert_allclose(fn({"image": image})["image"], expected, rtol=0, atol=1e-5)


def test_resize_crop_and_normalize_errors():
  with pytest.raises(ValueError, match="resize_crop: method='lanczos'"):
    pp.build("resize_crop(8, method='lanczos')")
  with pytest.raises(ValueError, match="must be 3 numbers each, std > 0"):
    pp.build("normalize((0.5, 0.5), (1, 1, 1))")


def test_sample_frames_random_clip_starts_vary_at_one_fps():
  """The paper's video: 8 frames at 1 FPS from a random clip start (training)."""
  video = np.arange(100, dtype=np.uint8)[:, None, None, None] * np.ones([100, 2, 2, 3], np.uint8)
  fn = pp.build("sample_frames(8, fps=1.0, random_start=True)")
  firsts = []
  for seed in range(40):
    frames = fn({"video": video, "fps": 5.0, "_rng": _rng(seed)})["video"][:, 0, 0, 0]
    np.testing.assert_array_equal(np.diff(frames), [5] * 7)  # 1 s apart at 5 FPS.
    firsts.append(int(frames[0]))
  assert len(set(firsts)) > 20 and 0 <= min(firsts) and max(firsts) <= 100 - 36
  again = fn({"video": video, "fps": 5.0, "_rng": _rng(3)})["video"]
  np.testing.assert_array_equal(again[:, 0, 0, 0], [firsts[3] + 5 * i for i in range(8)])
  with pytest.raises(ValueError, match="'sample_frames' is random"):
    fn({"video": video, "fps": 5.0})


def test_prepend_space_half_the_time_from_the_example_rng():
  fn = pp.build("prepend_space(0.5)")
  outs = [fn({"caption": b"a red circle", "_rng": _rng(s)})["caption"] for s in range(1000)]
  assert set(outs) == {"a red circle", " a red circle"}
  assert 0.45 < np.mean([o.startswith(" ") for o in outs]) < 0.55
  assert fn({"caption": "x", "_rng": _rng(5)}) == fn({"caption": "x", "_rng": _rng(5)})
  with pytest.raises(ValueError, match="'prepend_space' is random"):
    fn({"caption": "x"})
  with pytest.raises(ValueError, match="prepend_space: p=2; expected a probability"):
    pp.build("prepend_space(2)")
  with pytest.raises(ValueError, match="prepend_space: key='captions/text'; expected a top-level"):
    pp.build("prepend_space(key='captions/text')")


def test_tokenize_document_windows_and_p_next_draw_from_the_example_rng(tok):
  images = np.zeros([6, 8, 8, 3], np.uint8)
  texts = [b""] + [" ".join(CAPTIONS)] * 6
  fn = pp.build("tokenize_document(max_len=24, max_media=5, p_next=0.5, random_window=True)", tok)
  outs = [fn({"images": images, "texts": texts, "_rng": _rng(s)}) for s in range(40)]
  assert len({o["tokens"].tobytes() for o in outs}) > 5  # The window starts vary...
  assert len({o["media_idx"][0] for o in outs}) == 2  # ... <BOS> sees image 1 with p_next.
  again = fn({"images": images, "texts": texts, "_rng": _rng(0)})
  for field, value in outs[0].items():
    np.testing.assert_array_equal(value, again[field])
  with pytest.raises(ValueError, match="'tokenize_document' is random"):
    fn({"images": images, "texts": texts})


def test_paper_input_normalises_pixels_as_the_vision_backbone_was_trained():
  image = np.random.default_rng(0).integers(0, 256, [16, 16, 3], np.uint8)
  for spec in flamingo_3b.get_config().input.datasets.values():
    assert f"normalize({nfnet.IMAGENET_MEAN}, {nfnet.IMAGENET_STD})" in spec.pp
  vision = {"variant": "F0", "mean": [0.5] * 3, "std": [0.5] * 3}  # Trained on [-1, 1] pixels.
  as_trained = pp.build(common.vision_pp(vision, 16))({"image": image})["image"]
  np.testing.assert_allclose(as_trained, pp.build("value_range(-1, 1)")({"image": image})["image"],
                             atol=1e-6)
  clip = pp.build(common.vision_pp({"kind": "open_clip_vit", "name": "ViT-L-14"}, 16))
  np.testing.assert_allclose(clip({"image": image})["image"],
                             (image / 255 - vit.OPENAI_MEAN) / vit.OPENAI_STD, atol=1e-5)
  spec = common.paper_input(16).datasets.m3w.pp.removeprefix("decode|")
  assert pp.output_shapes(spec)["images"] == ((5, 1, 16, 16, 3), np.dtype(np.float32))
