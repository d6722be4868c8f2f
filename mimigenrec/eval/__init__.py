"""Evaluation: :mod:`~mimigenrec.eval.evaluate` (full ranking and candidate ranking, ``evaluate.sh``),
:mod:`~mimigenrec.eval.metrics` (HR@K / NDCG@K, paired bootstrap), :mod:`~mimigenrec.eval.compare`
(paired intervals between two prediction files), :mod:`~mimigenrec.eval.candidates` (the one source
of candidate lists), :mod:`~mimigenrec.eval.select_checkpoint` (choosing a checkpoint on valid) and
:mod:`~mimigenrec.eval.baselines` (popularity, SASRec)."""
