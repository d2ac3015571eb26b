"""Checkpoint and file I/O, where the trust boundaries live.

Every byte gainsurgery reads from a checkpoint and every file it writes goes
through this package, so the rules for hostile input and for outputs that appear
whole or not at all live in one place:

- :mod:`~gainsurgery.io.safetensors`: one safetensors header, checked rule by rule;
- :mod:`~gainsurgery.io.checkpoint`: a checkpoint folder (index + shards + config);
- :mod:`~gainsurgery.io.jsonsafe`: every JSON we read, with size and nesting limits and typed accessors;
- :mod:`~gainsurgery.io.inputs`: safe reading of input folders (no links out, no FIFOs or devices);
- :mod:`~gainsurgery.io.outputs`: where a command may write, claimed and published folder outputs;
- :mod:`~gainsurgery.io.atomic`: temp-file + fsync + rename writers and the JSON readers;
- :mod:`~gainsurgery.io.secrets`: tokens and URL credentials never leave in messages or uploads;
- :mod:`~gainsurgery.io.hashing`: the one sha256 helper;
- :mod:`~gainsurgery.io.cache`: the gainsurgery cache folder and its lock.
"""
