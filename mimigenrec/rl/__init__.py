"""Reinforcement learning on stock TRL: :mod:`~mimigenrec.rl.grpo` (the constrained GRPOTrainer subclass:
beam or sampled rollouts over the item trie), :mod:`~mimigenrec.rl.recpo` (RecPO, the item-head GRPO
stage), :mod:`~mimigenrec.rl.config` (the RL YAML), :mod:`~mimigenrec.rl.reward_watch` (held-out
NDCG@K during training and keeping the best step) and :mod:`~mimigenrec.rl.train_grpo` (the
``trl_trainer.sh`` entry point)."""
