"""Online learners of other kinds for the ``online-hedge`` pool (simulator
only, issue #22): each sees the stream differently from the 15 copies of
:mod:`models.online`, so the mixture can lean on it where the others err.

* :mod:`trainer.learners.neighbourhood` -- an item neighbourhood on another
  learner's errors, similarities from co-rating users learned per event;
* :mod:`trainer.learners.user_genre` -- per-user x genre biases on another
  learner's errors;
* :mod:`trainer.learners.wide_mf` -- the online learner with more factors.

Every learner here predicts event ``i`` from events ``< i`` only and learns
``i`` after predicting it (tests/test_diverse.py cuts the stream to check).
"""
