"""RL trainers beside :mod:`mimigenrec.grpo`: :mod:`mimigenrec.rl.recpo` (RecPO, the item-head GRPO stage)."""
