"""Media kept in tar shards apart from the documents that name them (`--images`).

MMC4 and OBELICS downloads often keep the JSONL documents in one place and their images in
WebDataset tars elsewhere. A reference then names a tar member by its path in the tar
('part/x.jpg'), its file name ('x.jpg') or its key ('x'). Each worker process indexes the
shards' media members once (headers only: where each member's bytes are) and reads a member when
a record needs it. A path or file name found twice is an error naming both members, and so is a
reference to a key that several members share ('doc.0.jpg', 'doc.1.jpg'): either choice could be
the wrong image.
"""
import functools
import os
import tarfile

from etils import epath

from flamingo_jax.data.prepare.report import Skip

MEDIA = ('jpg', 'jpeg', 'png', 'webp', 'mp4', 'webm', 'mkv', 'mov', 'avi')
Member = tuple[str, str, int, int]  # (shard, member name, data offset, size)


@functools.lru_cache(maxsize=4)
def index(files: tuple[str, ...]) -> dict[str, list[Member]]:
  """{path, file name or key: the media members of uncompressed tar `files` it names}."""
  found: dict[str, list[Member]] = {}
  for path in files:
    if not path.endswith('.tar'):
      raise ValueError(f'--images: {path} is not an uncompressed .tar; members are read at '
                       'their offset, which a compressed tar does not have.')
    with epath.Path(path).open('rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
      for info in tar:
        if not info.isfile() or info.name.rpartition('.')[2].lower() not in MEDIA:
          continue
        member = (path, info.name, info.offset_data, info.size)
        base = os.path.basename(info.name)
        for alias in {info.name, base, base.partition('.')[0]}:
          found.setdefault(alias, []).append(member)
        for alias in {info.name, base}:
          if len(found[alias]) > 1:
            raise ValueError(f'--images: {alias!r} is in the shards twice: {_names(found[alias])}; '
                             'keep each image in one shard under one name.')
  return found


def _names(members: list[Member]) -> str:
  return ' and '.join(f'{shard}:{name}' for shard, name, _, _ in members)


def loader(files: tuple[str, ...]):
  """`load(ref)`: the bytes of the member `ref` names, or Skip('missing_file', ref)."""
  def load(ref: str) -> bytes:
    if not isinstance(ref, str) or not ref:
      raise Skip('malformed_record', str(ref), 'a media reference must be a non-empty string')
    members = index(files).get(ref)
    if not members:
      raise Skip('missing_file', ref, 'no such member in the --images shards')
    if len(members) > 1:
      raise ValueError(f'--images: {ref!r} is the key of {_names(members)}; name the member '
                       '(its file name or path) instead.')
    path, _, offset, size = members[0]
    with epath.Path(path).open('rb') as f:
      f.seek(offset)
      return f.read(size)
  return load
