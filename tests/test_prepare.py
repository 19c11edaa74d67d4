"""`python -m flamingo_jax.data.prepare`: each source format to a TFDS dataset the trainer reads,
every skipped record counted by reason, and resume after an interruption."""
import csv
import io
import json
import subprocess
import sys
import tarfile

import av
from etils import epath
from flax.traverse_util import flatten_dict
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flamingo_jax.configs import flamingo_3b
from flamingo_jax.data import mixture
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.data.prepare import __main__ as cli
from flamingo_jax.data.prepare import records
from flamingo_jax.data.prepare import writer
from flamingo_jax.models import param_count
from test_gcs_workdir import gcs  # noqa: F401  (the GCS emulator fixture)
import train_helpers as helpers

COLORS = {'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255)}
WORDS = ['a', 'red', 'green', 'blue', 'cat', 'dog', 'intro', 'video', 'square']


@pytest.fixture(scope='module')
def tok_path(tmp_path_factory):
  texts = [f'{a} {b} {c}' for a in WORDS for b in WORDS for c in WORDS[:3]]
  path = str(tmp_path_factory.mktemp('tok') / 'sp.model')
  tokenizer_lib.train_sentencepiece(texts, 40, path)
  return path


@pytest.fixture(scope='module')
def tok(tok_path):
  return tokenizer_lib.load_tokenizer(tok_path)


def image_bytes(color: str, size=(12, 8), fmt='PNG') -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, COLORS[color]).save(buffer, format=fmt)
  return buffer.getvalue()


def write_tar(path, members: dict[str, bytes]):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  epath.Path(path).write_bytes(buffer.getvalue())


def write_video(path, seconds: float, rate: int = 4, size: int = 32):
  """Frame i is grey level 10 * i, so the frames read back tell their times."""
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('mpeg4', rate=rate)
    stream.width, stream.height, stream.pix_fmt = size, size, 'yuv420p'
    for i in range(round(seconds * rate)):
      frame = av.VideoFrame.from_ndarray(np.full([size, size, 3], 10 * i, np.uint8), 'rgb24')
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def jsonl(path, lines):
  path.write_bytes(b''.join((line if isinstance(line, bytes) else json.dumps(line).encode())
                            + b'\n' for line in lines))


def read(name, data_dir, spec, tok):
  source = mixture.open_source(name, 'train', str(data_dir))
  fn = pp.build(spec, tok)
  examples = [dict(source[i]) for i in range(len(source))]
  return examples, [fn({**ex, '_rng': np.random.default_rng(i)}) for i, ex in enumerate(examples)]


def skipped(report):
  return {reason: entry['count'] for reason, entry in report['skipped'].items()}


def color_of(image):
  return min(COLORS, key=lambda c: np.abs(np.asarray(image, float).mean((0, 1)) - COLORS[c]).sum())


@pytest.fixture
def documents(tmp_path):
  """OBELICS and MMC4 JSONL with images beside them, one record per kind of problem."""
  src = tmp_path / 'docs'
  (src / 'img').mkdir(parents=True)
  (src / 'img' / 'red.png').write_bytes(image_bytes('red'))
  (src / 'img' / 'blue.jpg').write_bytes(image_bytes('blue', fmt='JPEG'))
  (src / 'img' / 'bad.jpg').write_bytes(b'not an image')
  jsonl(src / 'obelics.jsonl', [
      {'texts': ['intro', None, 'a red square'], 'images': [None, 'img/red.png', None]},
      {'texts': ['intro', None], 'images': [None, 'img/gone.png']},  # missing_file
      {'texts': [None, 'a cat'], 'images': ['img/bad.jpg', None]},  # unreadable_image
      {'texts': [' ', None], 'images': [None, 'img/red.png']},  # empty_text
      {'texts': ['a', 'b'], 'images': [None]},  # image_position_mismatch
      b'{"texts": ["\xff"], "images": [null]}',  # non_utf8
      b'{"texts": ',  # malformed_record
  ])
  jsonl(src / 'mmc4.jsonl', [{
      'text_list': ['a cat', 'a dog'],
      'image_info': [{'image_name': 'img/blue.jpg', 'matched_text_index': 1}]}])
  return src


DOC_PP = 'decode|resize_pad(8)|value_range(-1, 1)|tokenize_document(max_len=16, max_media=2)'


def test_interleaved_jsonl(documents, tmp_path, tok):
  out = tmp_path / 'out'
  report = writer.prepare('interleaved', str(documents), str(out), 'my_docs',
                          options=records.Options(), rows_per_shard=3)
  assert report['num_shards'] == 4  # 7 OBELICS lines in 3 shards, 1 MMC4 line.
  assert report['records_written'] == 2
  assert skipped(report) == {'missing_file': 1, 'unreadable_image': 1, 'empty_text': 1,
                             'image_position_mismatch': 1, 'non_utf8': 1, 'malformed_record': 1}
  assert report['skipped']['missing_file']['examples'][0].endswith('img/gone.png')
  assert 'bad.jpg' in report['skipped']['unreadable_image']['examples'][0]
  assert json.loads((out / 'my_docs' / '1.0.0' / 'prepare_report.json').read_text()) == report
  examples, batches = read('my_docs', out, DOC_PP, tok)
  mmc4, obelics = examples  # Files in sorted order.
  assert [t.decode() for t in mmc4['texts']] == ['a cat', 'a dog']  # The image precedes 'a dog'.
  assert [color_of(i) for i in mmc4['images']] == ['blue']
  assert [t.decode() for t in obelics['texts']] == ['intro', 'a red square']
  assert obelics['images'][0].shape == (8, 12, 3) and color_of(obelics['images'][0]) == 'red'
  assert obelics['source'].decode().endswith('obelics.jsonl:1')
  for batch in batches:
    assert batch['tokens'].shape == (16,) and batch['media_mask'].tolist() == [True, False]


def test_interleaved_webdataset(tmp_path, tok):
  src = tmp_path / 'shards'
  src.mkdir()
  write_tar(src / '000.tar', {
      'doc0.json': json.dumps({'texts': ['intro', None, 'a green square'],
                               'images': [None, 'doc0.0.png', None]}).encode(),
      'doc0.0.png': image_bytes('green'),
      'doc1.json': json.dumps({'texts': ['a dog', None], 'images': [None, '1.jpg']}).encode(),
  })
  report = writer.prepare('interleaved', str(src / '*.tar'), str(tmp_path / 'out'), 'web_docs',
                          options=records.Options())
  assert report['records_written'] == 1 and skipped(report) == {'missing_file': 1}
  assert report['skipped']['missing_file']['examples'] == [f'{src}/000.tar:doc1.1.jpg']
  (doc,), _ = read('web_docs', tmp_path / 'out', DOC_PP, tok)
  assert [color_of(i) for i in doc['images']] == ['green']


def test_interleaved_jsonl_with_images_in_tar_shards(tmp_path, tok):
  """MMC4/OBELICS as downloaded: JSONL documents, their images in separate tar shards named by
  member path, file name or key; a missing member is counted, a corrupt one too."""
  images = tmp_path / 'images'
  images.mkdir()
  write_tar(images / '000.tar', {'part/red.png': image_bytes('red'),
                                 'part/blue.jpg': image_bytes('blue', (400, 330), 'JPEG'),
                                 'part/blue.txt': b'not media, not indexed'})
  write_tar(images / '001.tar', {'green.jpg': image_bytes('green', fmt='JPEG'),
                                 'bad.jpg': b'not an image'})
  jsonl(tmp_path / 'docs.jsonl', [
      {'texts': ['intro', None, 'a red square'], 'images': [None, 'part/red.png', None]},
      {'text_list': ['a cat', 'a dog'],
       'image_info': [{'image_name': 'blue.jpg', 'matched_text_index': 0},
                      {'image_name': 'green', 'matched_text_index': 1}]},
      {'texts': ['intro', None], 'images': [None, 'gone.jpg']},  # missing_file
      {'texts': [None, 'a cat'], 'images': ['bad.jpg', None]},  # unreadable_image
  ])
  out = tmp_path / 'out'
  report = cli.main(['interleaved', f'--src={tmp_path}/docs.jsonl', f'--out={out}',
                     '--name=tar_docs', f'--images={images}/*.tar', '--max_size=64',
                     '--rows_per_shard=2', '--num_workers=2'])
  assert report['records_written'] == 2
  assert skipped(report) == {'missing_file': 1, 'unreadable_image': 1}
  assert report['skipped']['missing_file']['examples'] == ['gone.jpg']
  assert report['skipped']['unreadable_image']['examples'][0].endswith('bad.jpg')
  (obelics, mmc4), _ = read('tar_docs', out, DOC_PP, tok)
  assert [color_of(i) for i in obelics['images']] == ['red']
  assert [color_of(i) for i in mmc4['images']] == ['blue', 'green']
  assert mmc4['images'][0].shape == (53, 64, 3)  # --max_size applies to members too.


def test_images_in_two_tar_shards_is_an_error(tmp_path):
  (tmp_path / 'images').mkdir()
  for shard in ('000', '001'):
    write_tar(tmp_path / 'images' / f'{shard}.tar', {'red.png': image_bytes('red')})
  jsonl(tmp_path / 'docs.jsonl', [{'texts': [None, 'a'], 'images': ['red.png', None]}])
  with pytest.raises(ValueError, match=r"'red.png' is in the shards twice: .*000.tar:red.png and "
                                       r".*001.tar:red.png"):
    writer.prepare('interleaved', str(tmp_path / 'docs.jsonl'), str(tmp_path / 'out'), 'twice',
                   options=records.Options(), images=str(tmp_path / 'images'))


PAIR_PP = 'decode|resize_pad(8)|value_range(-1, 1)|tokenize_pair(max_len=8)'


def pair_shards(src):
  """Two tar shards of 5 pairs: one caption is not UTF-8, and the second shard is cut short."""
  src.mkdir()
  write_tar(src / '000.tar', {'a.jpg': image_bytes('red', fmt='JPEG'), 'a.txt': b'a red cat',
                              'b.png': image_bytes('blue'),
                              'b.json': json.dumps({'caption': 'a blue dog'}).encode(),
                              'c.jpg': image_bytes('green', fmt='JPEG'), 'c.txt': b'\xff\xfe'})
  write_tar(src / '001.tar', {'d.jpg': image_bytes('green', (200, 100), 'JPEG'),
                              'd.txt': b'a green cat',
                              'e.jpg': image_bytes('red', (300, 300), 'JPEG'),
                              'e.txt': b'a red dog'})
  with tarfile.open(src / '001.tar') as tar:
    cut = tar.getmember('e.jpg').offset_data + 100  # Into e.jpg's data.
  (src / '001.tar').write_bytes((src / '001.tar').read_bytes()[:cut])
  return src


def test_pairs_webdataset_with_a_truncated_shard(tmp_path, tok):
  """img2dataset shards: .jpg with .txt or .json; a shard cut short keeps what came before."""
  src = pair_shards(tmp_path / 'shards')
  report = writer.prepare('pairs', str(src), str(tmp_path / 'out'), 'my_pairs',
                          options=records.Options(max_size=64))
  assert skipped(report) == {'non_utf8': 1, 'truncated_shard': 1}
  assert report['skipped']['truncated_shard']['examples'][0].startswith(f'{src}/001.tar')
  examples, batches = read('my_pairs', tmp_path / 'out', PAIR_PP, tok)
  assert [e['caption'].decode() for e in examples] == ['a red cat', 'a blue dog', 'a green cat']
  assert [color_of(e['image']) for e in examples] == ['red', 'blue', 'green']
  assert examples[2]['image'].shape == (32, 64, 3)  # --max_size=64 on the longer side.
  assert all(b['tokens'].shape == (8,) for b in batches)


def test_pairs_tables_through_the_cli(tmp_path, tok):
  """CSV and Parquet of image_path, caption, through the CLI."""
  src = tmp_path / 'tables'
  src.mkdir()
  for color in COLORS:
    (src / f'{color}.png').write_bytes(image_bytes(color))
  with open(src / 'pairs.csv', 'w', newline='') as f:
    csv.writer(f).writerows([['image_path', 'caption'], ['red.png', 'a red cat'],
                             ['green.png', ''], ['nowhere.png', 'a dog']])
  pq.write_table(pa.table({'image_path': ['blue.png'], 'caption': ['a blue square']}),
                 src / 'pairs.parquet')
  out = tmp_path / 'out'
  report = cli.main(['pairs', f'--src={src}', f'--out={out}', '--name=table_pairs',
                     '--rows_per_shard=2', '--num_workers=0'])
  assert report['num_shards'] == 3
  assert skipped(report) == {'empty_text': 1, 'missing_file': 1}
  examples, _ = read('table_pairs', out, PAIR_PP, tok)
  assert [e['caption'].decode() for e in examples] == ['a red cat', 'a blue square']
  (src / 'bad.csv').write_text('path,text\nred.png,a cat\n')
  with pytest.raises(ValueError, match=r"bad.csv: no column\(s\) \['caption', 'image_path'\]"):
    cli.main(['pairs', f'--src={src}/bad.csv', f'--out={out}', '--name=bad_pairs'])


def test_video_folder_with_captions(tmp_path, tok):
  src = tmp_path / 'videos'
  src.mkdir()
  write_video(src / 'two.mp4', 2.0)
  write_video(src / 'short.mp4', 0.5)
  (src / 'broken.mp4').write_bytes(b'\x00' * 100)
  jsonl(src / 'captions.jsonl', [
      {'video_path': 'two.mp4', 'caption': 'a video of a square'},
      {'video_path': 'short.mp4', 'caption': 'a short video'},
      {'video_path': 'broken.mp4', 'caption': 'a broken video'}])
  report = writer.prepare('video', str(src / 'captions.jsonl'), str(tmp_path / 'out'),
                          'my_videos', options=records.Options(max_size=16))
  assert skipped(report) == {'too_short_video': 1, 'unreadable_video': 1}
  spec = 'sample_frames(2)|resize_pad(8)|value_range(-1, 1)|tokenize_video(max_len=8)'
  (example,), (batch,) = read('my_videos', tmp_path / 'out', spec, tok)
  video = np.asarray(example['video'])  # TFDS gives frames of unknown size as a list.
  assert video.shape == (2, 16, 16, 3) and example['fps'] == 1.0
  # 1 FPS of a 4 FPS clip: frames 0 and 4, grey levels 0 and 40 (give or take the codecs).
  np.testing.assert_allclose(video.mean((1, 2, 3)), [0, 40], atol=6)
  assert batch['images'].shape == (1, 2, 8, 8, 3)


def test_long_videos_keep_max_frames_at_their_rate(tmp_path):
  src = tmp_path / 'videos'
  src.mkdir()
  write_video(src / 'long.mp4', 5.0)
  (src / 'captions.csv').write_text('video_path,caption\nlong.mp4,a long video\n')
  writer.prepare('video', str(src / 'captions.csv'), str(tmp_path / 'out'), 'long_videos',
                 options=records.Options(max_frames=3))
  (example,) = mixture.open_source('long_videos', 'train', str(tmp_path / 'out'))
  assert len(example['video']) == 3 and example['fps'] == pytest.approx(0.5)  # t = 0, 2, 4 s.


def test_resume_redoes_only_unfinished_shards(documents, tmp_path, monkeypatch):
  out = tmp_path / 'out'
  prepare = lambda: writer.prepare('interleaved', str(documents), str(out), 'resumed',
                                   options=records.Options(), rows_per_shard=3)
  real_write, done = writer.write_shard, []

  def interrupted(job):
    if job.index == 2:
      raise KeyboardInterrupt
    done.append(job.index)
    return real_write(job)
  monkeypatch.setattr(writer, 'write_shard', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare()
  assert done == [0, 1]
  assert not (out / 'resumed' / '1.0.0' / 'dataset_info.json').exists()
  done.clear()
  monkeypatch.setattr(writer, 'write_shard', lambda job: done.append(job.index) or real_write(job))
  report = prepare()
  assert done == [2, 3] and report['records_written'] == 2 and sum(skipped(report).values()) == 6
  resumed = mixture.open_source('resumed', 'train', str(out))
  whole = mixture.open_source('resumed', 'train', str(tmp_path / 'whole')) if writer.prepare(
      'interleaved', str(documents), str(tmp_path / 'whole'), 'resumed',
      options=records.Options(), rows_per_shard=3) else None
  assert [e['source'] for e in resumed] == [e['source'] for e in whole]
  done.clear()
  assert prepare() == report and done == []  # Finished: it only reports.
  with pytest.raises(ValueError, match='another plan'):
    writer.prepare('interleaved', str(documents), str(out), 'resumed',
                   options=records.Options(max_size=8), rows_per_shard=3)


def test_gs_src_and_out(gcs, monkeypatch, tok):  # noqa: F811
  """--src, --images and --out on gs:// (a local GCS emulator), read back from gs:// as the
  trainer reads it: tables with relative paths, tar samples, and images in a tar shard."""
  src, out = epath.Path('gs://bucket/src'), epath.Path('gs://bucket/data')
  (src / 'red.png').write_bytes(image_bytes('red'))
  (src / 'pairs.csv').write_text('image_path,caption\nred.png,a red cat\n')
  write_tar(src / '000.tar', {'a.jpg': image_bytes('blue', fmt='JPEG'), 'a.txt': b'a blue dog'})
  report = writer.prepare('pairs', str(src), str(out), 'gs_pairs', options=records.Options())
  assert report['records_written'] == 2 and not report['skipped']
  write_tar(src / 'images' / '000.tar', {'green.png': image_bytes('green')})
  jsonl(src / 'docs.jsonl', [{'texts': [None, 'a cat'], 'images': ['green.png', None]}])
  writer.prepare('interleaved', str(src / 'docs.jsonl'), str(out), 'gs_docs',
                 options=records.Options(), images=str(src / 'images' / '*.tar'))
  # array_record reads gs:// with google-cloud-cpp, which takes the emulator from this variable.
  monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT', gcs['STORAGE_EMULATOR_HOST'])
  examples, _ = read('gs_pairs', out, PAIR_PP, tok)
  assert [e['caption'].decode() for e in examples] == ['a blue dog', 'a red cat']  # Sorted files.
  (doc,), _ = read('gs_docs', out, DOC_PP, tok)
  assert [color_of(i) for i in doc['images']] == ['green']


def test_tiny_3b_config_keeps_the_3b_structure():
  """flamingo_3b.py:tiny (README "Train on your own data"): the 3B's fields, layers and xattn
  placement at tiny sizes, its vocabulary the tokenizer's."""
  full, tiny = flamingo_3b.get_config(), flamingo_3b.get_config('tiny,vocab=300')
  for part in ('lm', 'resampler'):  # The vision backbone: a small NFNet in place of F6.
    assert flatten_dict(tiny.model[part].to_dict()).keys() == flatten_dict(
        full.model[part].to_dict()).keys()
  assert tiny.input.datasets.keys() == full.input.datasets.keys() and not tiny.evals
  assert tiny.input.datasets.m3w.pp == full.input.datasets.m3w.pp.replace('320', '64')
  params = flatten_dict(param_count.abstract_params(tiny.model, tiny.image_size), sep='/')
  xattn = {k: v.shape for k, v in params.items() if k.startswith('lm/groups/xattn/')}
  assert xattn and all(shape[0] == tiny.model.lm.num_layers for shape in xattn.values())
  assert params['resampler/latents'].shape == (8, 32)  # Perceiver Resampler.
  assert 'vision/stem_conv1/kernel' in params and params['lm/token_embed'].shape == (300, 32)


@pytest.mark.slow
def test_tiny_flamingo_trains_on_prepared_data(documents, tmp_path, tmp_path_factory, tok_path):
  """The trainer reads prepared datasets by name and data_dir alone (config.input.datasets), its pp
  in 2 worker processes; the documents are prepared by 2 processes."""
  out = tmp_path / 'out'
  report = cli.main(['interleaved', f'--src={documents}', f'--out={out}', '--name=my_docs',
                     '--rows_per_shard=3', '--num_workers=2'])
  assert report['records_written'] == 2 and report['num_shards'] == 4
  writer.prepare('pairs', str(pair_shards(tmp_path / 'pairs')), str(out), 'my_pairs',
                 options=records.Options())
  image = 'decode|resize_pad(32)|value_range(-1, 1)'
  datasets = {
      'docs': dict(tfds_name='my_docs', data_dir=str(out), split='train', batch_size=8,
                   pp=f'{image}|tokenize_document(max_len=32, max_media=2)'),
      'pairs': dict(tfds_name='my_pairs', data_dir=str(out), split='train', batch_size=8,
                    weight=0.2,
                    pp=f'{image}|tokenize_pair(max_len=16)')}
  config = tmp_path / 'config.py'
  config.write_text(
      'import ml_collections\nfrom flamingo_jax.configs import tiny\n\n\n'
      'def get_config():\n  config = tiny.get_config()\n'
      f'  config.input = ml_collections.ConfigDict(dict(kind="tfds", tokenizer={tok_path!r}, '
      f'worker_processes=2, datasets={datasets!r}))\n'
      '  return config\n')
  cache = helpers.compilation_cache(tmp_path_factory)
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, str(helpers.ROOT / 'launch.py'), f'--workdir={workdir}',
       f'--config={config}', '--config.total_steps=2', '--config.log_every=1'],
      env=helpers.env(cache), cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  rows = helpers.metrics(workdir)
  assert [m['step'] for m in rows] == [1, 2]
  assert all(np.isfinite(m['loss/docs']) and np.isfinite(m['loss/pairs']) for m in rows)
