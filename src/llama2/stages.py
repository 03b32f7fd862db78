"""The stages of ``llama2 run``, in the order of the paper's pipeline (§2.2 pretraining, §3.1
SFT, §3.2.2 reward models, §3.2.3 rejection sampling then PPO, §3.3 GAtt, the Llama Guard
classifier, evaluation). The runner and the report both read them from here."""

STAGES = ("tokenizer", "data", "pretrain", "sft", "reward-helpfulness", "reward-safety", "rejection", "ppo",
          "gatt", "guard", "evaluate")
# Models evaluated on the assistant-world suite, in the order of the paper's pipeline.
EVALUATED = ("pretrain", "sft", "rejection", "ppo", "gatt")
