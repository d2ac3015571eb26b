"""Checkpoint and file I/O: safe header parsing, checkpoint folders, atomic writes, hashing.

Every byte gainsurgery reads from a checkpoint and every file it writes goes
through this package, so the rules for hostile input and for outputs that appear
whole or not at all live in one place:

- :mod:`~gainsurgery.io.safetensors`: one safetensors header, checked rule by rule;
- :mod:`~gainsurgery.io.checkpoint`: a checkpoint folder (index + shards + config);
- :mod:`~gainsurgery.io.atomic`: the one family of temp-file + fsync + rename writers,
  folder publishing, and the JSON readers;
- :mod:`~gainsurgery.io.hashing`: the one sha256 helper;
- :mod:`~gainsurgery.io.cache`: the gainsurgery cache folder and its lock.
"""
