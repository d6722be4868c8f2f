"""Models: :mod:`mimigenrec.models.backbones` (from-scratch backbones and the SID tokens),
:mod:`mimigenrec.models.gguf_import` (pretrained GGUF checkpoints as HF models); :mod:`mimigenrec.models.item_head` (an item-scoring head on any causal LM, the R2ec
recipe), its warm-up trainer :mod:`mimigenrec.models.head_train` and its evaluation ranker
:mod:`mimigenrec.models.head_eval`; :mod:`mimigenrec.models.ensemble` (several checkpoints ranked as
one by their mean log-probability, ``evaluate.sh --model NAME=A+B``)."""
