"""The batch path, one module per stage.

A stage's module is named like its ``fbp_stage_duration_seconds`` label, so
a metric names the file to read:

=============== ==================================================================
stage           what it does (module ``stream.batch.<stage>``)
=============== ==================================================================
``decode``      classify each record: an event, an event to re-key, a dead letter
``redis_load``  the batch's user states (through the overlay) and movie rows;
                drop events already applied (watermarks)
``model_step``  the model once for the whole batch (``models.batch.learn_batch``)
``topk``        each user's top-K after its events
``outputs``     prediction records, state rows, exactly-once re-emission
``produce``     send records to Kafka and wait for the acknowledgements
``redis_store`` states, watermarks, then the movie-side increments
=============== ==================================================================

Beside them: :mod:`.overlay` (what begun, unfinished batches wrote),
:mod:`.movie_rows` (the shared online movie side in and out of the model),
:mod:`.types` (the records stages hand each other), :mod:`.config` (the one
configuration object), :mod:`.groups` (retry user by user), :mod:`.observe`
(metrics).  :class:`stream.predictor.Predictor` strings them together.
"""
