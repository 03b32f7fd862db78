"""The stages of ``llama2 run``, in the order of the paper's pipeline (§2.2 pretraining, §3.1
SFT, §3.2.2 reward models, §3.2.3 rejection sampling then PPO, a second round of both on the
new policy's comparisons (RLHF-V1, V2, ...), DPO beside them, §3.3 GAtt, the Llama Guard
classifier, evaluation). The runner and the report both read them from here."""

STAGES = ("tokenizer", "data", "pretrain", "sft", "reward-helpfulness", "reward-safety", "rejection", "ppo",
          "reward-helpfulness-2", "reward-safety-2", "rejection-2", "ppo-2", "dpo", "gatt", "guard", "evaluate")
# Run only when the recipe has a block for them: the second round of §3.2.1's loop and DPO.
OPTIONAL = ("reward-helpfulness-2", "reward-safety-2", "rejection-2", "ppo-2", "dpo")
# Models evaluated on the assistant-world suite, in the order of the paper's pipeline.
EVALUATED = ("pretrain", "sft", "rejection", "ppo", "rejection-2", "ppo-2", "dpo", "gatt")
# Models set head to head against the SFT model (the paper's Figure 1 shape).
AGAINST_SFT = ("rejection", "ppo", "rejection-2", "ppo-2", "dpo", "gatt")
