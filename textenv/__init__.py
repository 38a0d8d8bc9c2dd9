"""textenv: token-level text generation as Gymnasium environments.

    import gymnasium as gym
    import textenv  # registers textenv/<Task>-v0

    env = gym.make("textenv/Sentiment-v0", model="embedded")
    envs = gym.make_vec("textenv/Toy-v0", num_envs=16, model="tiny")  # tensors on the model's device
"""

import gymnasium as gym

from textenv.env import TextGenerationEnv, TextGenerationVectorEnv
from textenv.models import char_tokenizer, load_causal_lm, tiny_causal_lm
from textenv.rewards import RewardError, RewardFn, get_reward, register, score_batch
from textenv.tasks import TASKS, Task, make_task

__all__ = [
    "TASKS", "RewardError", "RewardFn", "Task", "TextGenerationEnv", "TextGenerationVectorEnv", "char_tokenizer",
    "get_reward", "load_causal_lm", "make_task", "register", "score_batch", "tiny_causal_lm",
]

for _name in TASKS:
    _id = f"textenv/{_name}-v0"
    if _id not in gym.registry:
        gym.register(
            id=_id,
            entry_point="textenv.env:TextGenerationEnv",
            vector_entry_point="textenv.env:TextGenerationVectorEnv",
            kwargs={"task": _name},
        )
