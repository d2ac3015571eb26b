"""The folder sink: stream the merged checkpoint into OUT, a claimed folder that appears only when complete.

OUT is claimed with :func:`~gainsurgery.io.claims.claim_folder` (lock, marked temp
folder; never BASE, inside it or around it, never a gain file); the shards are
streamed into the temp folder (:func:`~gainsurgery.merge.stream.execute`), judged
(:func:`~gainsurgery.applying.steps.judge`), the base's other files copied (safely),
the provenance record and the card written; with ``verify`` or a push, every byte
is verified; with a push, the verified folder is published first (a failed push
discards it); then OUT appears (fsync, then a no-replace rename, or an atomic
exchange with ``overwrite``).
"""

from __future__ import annotations

import time
from typing import ContextManager

from gainsurgery.errors import GainSurgeryError
from gainsurgery.io.checkpoint import copy_extra_files
from gainsurgery.io.checks import check_output
from gainsurgery.io.claims import claim_folder
from gainsurgery.merge.kernel import DEFAULT_CHUNK_BYTES
from gainsurgery.merge.provenance import OUTPUT_FILES, write_provenance
from gainsurgery.merge.stream import execute
from gainsurgery.applying.result import ApplyResult
from gainsurgery.applying.steps import (Job, Planned, judge, planned_checkpoint, progress_bar, verify_folder,
                                        write_card, writing)


class FolderSink:
    """Writes the merged checkpoint into the folder OUT (and, with a publisher, pushes it from there)."""

    def planned(self, job: Job) -> ContextManager[Planned]:
        return planned_checkpoint(job.base, job.gains, allow_negative=job.options.allow_negative, hub=job.hub)

    def dry_run(self, job: Job, planned: Planned) -> ApplyResult:
        assert job.out is not None
        check_output(job.out, inputs=planned.inputs, kind="folder", overwrite=job.options.overwrite)
        return ApplyResult(planned.plan, planned.opened.label, dry_run=True)

    def write(self, job: Job, planned: Planned) -> ApplyResult:
        assert job.out is not None
        options, publisher = job.options, job.publisher
        opened, plan = planned.opened, planned.plan
        chunk_bytes = options.chunk_bytes or DEFAULT_CHUNK_BYTES
        job.said.extend(planned.loaded.notes)
        t0 = time.perf_counter()
        with writing(job.out), claim_folder(job.out, inputs=planned.inputs, overwrite=options.overwrite) as claim:
            if publisher is not None:
                publisher.prepare()  # a bad token fails before any work
            with progress_bar(job.progress, "apply", opened.checkpoint.total_bytes) as update:
                streamed = execute(plan, claim.tmp, chunk_bytes=chunk_bytes, threads=options.threads, progress=update,
                                   fetch_shard=opened.fetch_shard, allow_saturation=options.allow_saturation,
                                   digest=planned.digest)
            provenance = judge(job, planned, streamed, written="nothing was written")
            copy_extra_files(opened.checkpoint, claim.tmp, skip=OUTPUT_FILES)
            write_provenance(claim.tmp, provenance)
            write_card(claim.tmp, provenance, options.base_model or opened.hub_id)
            checked = options.verify or publisher is not None
            if checked:
                report = verify_folder(plan, claim.tmp, chunk_bytes, allow_saturation=options.allow_saturation)
                if not report.ok:
                    raise GainSurgeryError("verification failed, output discarded: " + report.problems[0])
            pushed = publisher.publish(claim.tmp) if publisher is not None else None
            published = claim.publish()
        return ApplyResult(plan, opened.label, published, seconds=time.perf_counter() - t0,
                           shard_sha256=streamed.shard_sha256, provenance=provenance, verified=checked, pushed=pushed,
                           warnings=job.said)
