"""Checkpoint and file I/O, where the trust boundaries live.

Every byte gainsurgery reads from a checkpoint and every file it writes goes
through this package, so the rules for hostile input and for outputs that appear
whole or not at all live in one place:

- :mod:`~gainsurgery.io.safetensors`: one safetensors header, held to safetensors' own rules;
- :mod:`~gainsurgery.io.checkpoint`: a checkpoint folder (index + shards + config), its extra files;
- :mod:`~gainsurgery.io.jsonsafe`: every JSON we read, with size and nesting limits and typed accessors;
- :mod:`~gainsurgery.io.inputs`: safe reading of input folders (no links out, no FIFOs or devices),
  and what a BASE argument names (local, embedded, Hub);
- :mod:`~gainsurgery.io.checks`: where a command may write (never into, around or inside an input...);
- :mod:`~gainsurgery.io.atomic`: files created never through a link, written whole or not at all; renames
  that never replace by accident;
- :mod:`~gainsurgery.io.claims`: folder outputs claimed at the start of a run and published whole;
- :mod:`~gainsurgery.io.locks`: the ``flock`` locks that say a run is writing somewhere;
- :mod:`~gainsurgery.io.mounts`: mount points told by mount identity; the deletion that never crosses one;
- :mod:`~gainsurgery.io.workdir`: a private, locked, resumable work folder in a shared temporary folder;
- :mod:`~gainsurgery.io.pausepoints`: named steps where a test can make a run wait;
- :mod:`~gainsurgery.io.secrets`: tokens and URL credentials never leave in messages or uploads;
- :mod:`~gainsurgery.io.fingerprint`: the content fingerprint of the base tensors a gain targets;
- :mod:`~gainsurgery.io.hashing`: the one sha256 helper;
- :mod:`~gainsurgery.io.cache`: the gainsurgery cache folder and its lock;
- :mod:`~gainsurgery.io.write_errors`: a full disk or a file-size limit, said in one line.
"""
